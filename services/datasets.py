"""Uploaded datasets: parsing CSV, .npy and .npz uploads into float32 x and y (numpy only, no
torch: the API parses them).

- CSV: a header row naming the columns; the `target` column (default `y`) is y, every other
  column a feature. Every cell a finite number.
- .npz: arrays `x` (samples x features, or one feature as a flat array) and `y`.
- .npy: one 2-D array whose last column is y and the others the features.

A dataset's id is the sha256 of the uploaded bytes: the same file is stored once.
"""

import csv
import io
import math
import zipfile
from dataclasses import dataclass
from typing import IO

import numpy as np

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"


class DatasetInvalid(ValueError):
    """An upload that is not a dataset; the message says where and why."""


@dataclass(frozen=True)
class ParsedDataset:
    x: np.ndarray  # (samples, features) float32
    y: np.ndarray  # (samples,) float32
    format: str  # csv | npy | npz
    columns: list[str] | None  # CSV: the feature columns' names
    target: str | None  # CSV: the target column's name

    @property
    def samples(self) -> int:
        return int(self.x.shape[0])

    @property
    def features(self) -> int:
        return int(self.x.shape[1])


def parse_dataset(content: bytes, target: str = "y", max_elements: int = 10**8) -> ParsedDataset:
    """The dataset in an upload; DatasetInvalid naming the problem. Arrays are checked against
    `max_elements` from their headers, before anything is read into memory (a compressed
    .npz of zeros, or a header that claims a huge shape, cannot make the parser allocate)."""
    try:
        if content.startswith(NPY_MAGIC):
            return _from_npy(content, max_elements)
        if content.startswith(ZIP_MAGIC):
            return _from_npz(content, max_elements)
        return _from_csv(content, target)
    except MemoryError:
        raise DatasetInvalid("the dataset does not fit in memory") from None


def _check_header(stream: IO[bytes], name: str, max_elements: int) -> None:
    """Read an .npy header from `stream` (left where the data starts) and refuse an array
    larger than `max_elements` or not of numbers."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetInvalid(f"{name} is not a readable .npy array: {exc}") from None
    if dtype.hasobject or not np.issubdtype(dtype, np.number):
        raise DatasetInvalid(f"{name} must hold numbers; it holds {dtype}")
    elements = math.prod(shape)
    if elements > max_elements:
        raise DatasetInvalid(f"{name} has {elements} values; max_elements is {max_elements}")


def _checked(
    x: np.ndarray,
    y: np.ndarray,
    fmt: str,
    columns: list[str] | None = None,
    target: str | None = None,
) -> ParsedDataset:
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    if x.ndim != 2 or y.ndim != 1:
        raise DatasetInvalid(f"x must be 2-D and y 1-D; got shapes {x.shape} and {y.shape}")
    if len(x) == 0 or x.shape[1] == 0:
        raise DatasetInvalid("the dataset is empty: it needs at least one sample and one feature")
    if len(x) != len(y):
        raise DatasetInvalid(f"x has {len(x)} rows but y has {len(y)} values")
    if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number)):
        raise DatasetInvalid(f"x and y must be numbers; got {x.dtype} and {y.dtype}")
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    if not (np.isfinite(x32).all() and np.isfinite(y32).all()):
        raise DatasetInvalid("the dataset holds NaN or infinite values (or values beyond float32)")
    return ParsedDataset(np.ascontiguousarray(x32), np.ascontiguousarray(y32), fmt, columns, target)


def _from_npy(content: bytes, max_elements: int) -> ParsedDataset:
    _check_header(io.BytesIO(content), "the .npy file", max_elements)
    try:
        array = np.load(io.BytesIO(content), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetInvalid(f"not a readable .npy file: {exc}") from None
    if array.ndim != 2 or array.shape[1] < 2:
        raise DatasetInvalid(
            f".npy needs a 2-D array of feature columns then the target column; got {array.shape}"
        )
    return _checked(array[:, :-1], array[:, -1], "npy")


def _from_npz(content: bytes, max_elements: int) -> ParsedDataset:
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            names = set(archive.namelist())
            missing = {"x.npy", "y.npy"} - names
            if missing:
                wanted = sorted(name.removesuffix(".npy") for name in missing)
                raise DatasetInvalid(f".npz needs arrays x and y; missing {wanted}")
            for name in ("x.npy", "y.npy"):
                with archive.open(name) as member:
                    _check_header(member, f"array {name[0]}", max_elements)
        with np.load(io.BytesIO(content), allow_pickle=False) as arrays:
            x, y = arrays["x"], arrays["y"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DatasetInvalid):
            raise
        raise DatasetInvalid(f"not a readable .npz file: {exc}") from None
    return _checked(x, y, "npz")


def _from_csv(content: bytes, target: str) -> ParsedDataset:
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetInvalid("not CSV text in UTF-8, nor a .npy or .npz file") from None
    reader = csv.reader(io.StringIO(text))
    try:
        rows = [row for row in reader if row]
    except csv.Error as exc:  # a stray carriage return, a cell over the module's field limit
        raise DatasetInvalid(f"line {reader.line_num}: {exc}") from None
    if not rows:
        raise DatasetInvalid("the CSV is empty: it needs a header row naming the columns")
    header = [name.strip() for name in rows[0]]
    if target not in header:
        raise DatasetInvalid(
            f"no target column {target!r} in the header (columns: {', '.join(header)})"
        )
    if len(set(header)) != len(header):
        raise DatasetInvalid("the header names a column twice")
    if len(header) < 2:
        raise DatasetInvalid("the CSV needs at least one feature column beside the target")
    values = np.empty((len(rows) - 1, len(header)), dtype=np.float64)
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DatasetInvalid(f"row {i} has {len(row)} cells; the header has {len(header)}")
        for j, cell in enumerate(row):
            try:
                value = float(cell)
            except ValueError:
                raise DatasetInvalid(
                    f"row {i}, column {header[j]!r}: {cell.strip()[:40]!r} is not a number"
                ) from None
            if not math.isfinite(value):
                raise DatasetInvalid(
                    f"row {i}, column {header[j]!r}: {cell.strip()!r} is not finite"
                )
            values[i - 2, j] = value
    t = header.index(target)
    columns = [name for k, name in enumerate(header) if k != t]
    x = np.delete(values, t, axis=1)
    return _checked(x, values[:, t], "csv", columns, target)
