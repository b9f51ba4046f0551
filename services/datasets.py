"""Uploaded datasets: parsing CSV, .npy and .npz uploads into float32 x and y (numpy only, no
torch: the API parses them).

- CSV: a header row naming the columns; the `target` column (default `y`) is y, every other
  column a feature. Every cell a finite number.
- .npz: arrays `x` (samples x features, or one feature as a flat array) and `y`, stored or
  deflated (as np.savez and np.savez_compressed write them).
- .npy: one 2-D array whose last column is y and the others the features.

Arrays hold floats or integers, within a budget of bytes once read.

A dataset's id is the sha256 of the uploaded bytes: the same file is stored once.
"""

import csv
import io
import math
import zipfile
import zlib
from dataclasses import dataclass
from typing import IO

import numpy as np

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
# Floats and integers, signed or not: never complex, bool, text, objects, dates or durations
# (numpy counts timedelta64 among the integers), which float32 would misread or refuse.
REAL_KINDS = "fiu"
# What np.savez and np.savez_compressed write; zipfile may read more (bzip2, lzma, depending on
# how Python was built), refused so that what is accepted does not depend on the machine.
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
ZIP_ENCRYPTED = 0x01 | 0x40  # general-purpose flag bits: encrypted, strongly encrypted
DEFAULT_MAX_ARRAY_BYTES = 256 * 1024 * 1024


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


def parse_dataset(
    content: bytes,
    target: str = "y",
    max_elements: int = 10**8,
    max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES,
) -> ParsedDataset:
    """The dataset in an upload; DatasetInvalid naming the problem. Arrays are checked against
    `max_elements` and `max_array_bytes` from their headers (and an .npz's from the sizes its
    zip declares) before anything is read into memory: a compressed .npz of zeros, or a header
    that claims a huge shape, cannot make the parser allocate."""
    try:
        if content.startswith(NPY_MAGIC):
            return _from_npy(content, max_elements, max_array_bytes)
        if content.startswith(ZIP_MAGIC):
            return _from_npz(content, max_elements, max_array_bytes)
        return _from_csv(content, target)
    except MemoryError:
        raise DatasetInvalid("the dataset does not fit in memory") from None


def _array_bytes(stream: IO[bytes], name: str, max_elements: int) -> int:
    """Read an .npy header from `stream` (left where the data starts): the bytes its array
    holds. Refuses an array larger than `max_elements` or not of real or integer numbers."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetInvalid(f"{name} is not a readable .npy array: {exc}") from None
    if dtype.kind not in REAL_KINDS:
        raise DatasetInvalid(f"{name} must hold real or integer numbers; it holds {dtype}")
    elements = math.prod(shape)
    if elements > max_elements:
        raise DatasetInvalid(f"{name} has {elements} values; max_elements is {max_elements}")
    return elements * dtype.itemsize


def _over_budget(what: str, nbytes: int, max_array_bytes: int) -> DatasetInvalid:
    return DatasetInvalid(
        f"{what} {nbytes} bytes once read; max_dataset_array_bytes is {max_array_bytes}"
    )


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
    if x.dtype.kind not in REAL_KINDS or y.dtype.kind not in REAL_KINDS:
        raise DatasetInvalid(
            f"x and y must be real or integer numbers; got {x.dtype} and {y.dtype}"
        )
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    if not (np.isfinite(x32).all() and np.isfinite(y32).all()):
        raise DatasetInvalid("the dataset holds NaN or infinite values (or values beyond float32)")
    return ParsedDataset(np.ascontiguousarray(x32), np.ascontiguousarray(y32), fmt, columns, target)


def _from_npy(content: bytes, max_elements: int, max_array_bytes: int) -> ParsedDataset:
    nbytes = _array_bytes(io.BytesIO(content), "the .npy file", max_elements)
    if nbytes > max_array_bytes:
        raise _over_budget("the .npy array is", nbytes, max_array_bytes)
    try:
        array = np.load(io.BytesIO(content), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetInvalid(f"not a readable .npy file: {exc}") from None
    if array.ndim != 2 or array.shape[1] < 2:
        raise DatasetInvalid(
            f".npy needs a 2-D array of feature columns then the target column; got {array.shape}"
        )
    return _checked(array[:, :-1], array[:, -1], "npy")


def _from_npz(content: bytes, max_elements: int, max_array_bytes: int) -> ParsedDataset:
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            names = set(archive.namelist())
            missing = {"x.npy", "y.npy"} - names
            if missing:
                wanted = sorted(name.removesuffix(".npy") for name in missing)
                raise DatasetInvalid(f".npz needs arrays x and y; missing {wanted}")
            total = 0
            for name in ("x.npy", "y.npy"):
                total += _member_bytes(archive, archive.getinfo(name), max_elements)
            if total > max_array_bytes:
                raise _over_budget("arrays x and y are", total, max_array_bytes)
        with np.load(io.BytesIO(content), allow_pickle=False) as arrays:
            x, y = arrays["x"], arrays["y"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        if isinstance(exc, DatasetInvalid):
            raise
        raise DatasetInvalid(f"not a readable .npz file: {exc}") from None
    return _checked(x, y, "npz")


def _member_bytes(archive: zipfile.ZipFile, info: zipfile.ZipInfo, max_elements: int) -> int:
    """The bytes an .npz member's array takes once read, from its .npy header or the size the
    zip declares for it, whichever is larger; only the header is decompressed."""
    name = f"array {info.filename.removesuffix('.npy')}"
    if info.flag_bits & ZIP_ENCRYPTED:
        raise DatasetInvalid(f"{name} is encrypted; upload it without a password")
    if info.compress_type not in ZIP_METHODS:
        raise DatasetInvalid(
            f"{name} is compressed with zip method {info.compress_type}; only stored or "
            "deflated members (as np.savez and np.savez_compressed write them) are read"
        )
    try:
        member = archive.open(info)
    except RuntimeError as exc:  # what else zipfile cannot read (NotImplementedError is one)
        raise DatasetInvalid(f"{name} cannot be read: {exc}") from None
    with member:
        nbytes = _array_bytes(member, name, max_elements)
        declared = info.file_size - member.tell()  # what follows the header
    return max(nbytes, declared)


def _from_csv(content: bytes, target: str) -> ParsedDataset:
    try:
        content.decode("utf-8-sig")  # all of it first, then dropped: the error is the encoding's
    except UnicodeDecodeError:
        raise DatasetInvalid("not CSV text in UTF-8, nor a .npy or .npz file") from None
    # Decoded a buffer at a time and read a row at a time: neither the whole text nor every
    # cell as a str is ever held. newline="\n" splits lines as the str's own did.
    with io.TextIOWrapper(io.BytesIO(content), encoding="utf-8-sig", newline="\n") as text:
        reader = csv.reader(text)
        rows = (row for row in reader if row)
        try:
            header = [name.strip() for name in next(rows, [])]
            if not header:
                raise DatasetInvalid("the CSV is empty: it needs a header row naming the columns")
            if target not in header:
                raise DatasetInvalid(
                    f"no target column {target!r} in the header (columns: {', '.join(header)})"
                )
            if len(set(header)) != len(header):
                raise DatasetInvalid("the header names a column twice")
            if len(header) < 2:
                raise DatasetInvalid("the CSV needs at least one feature column beside the target")
            # A record takes a line at least, and one the header accepts holds len(header) - 1
            # commas: a bound on the rows that blank lines cannot inflate. (UTF-8 never puts
            # these two bytes inside another character.)
            bound = min(content.count(b"\n") + 1, content.count(b",") // (len(header) - 1))
            values = np.empty((bound, len(header)), dtype=np.float64)
            count = 0
            for i, row in enumerate(rows, start=2):
                values[count] = _csv_row(row, i, header)
                count += 1
        except csv.Error as exc:
            raise DatasetInvalid(f"line {reader.line_num}: {exc}") from None
    values = values[:count]
    t = header.index(target)
    columns = [name for k, name in enumerate(header) if k != t]
    x = np.delete(values, t, axis=1)
    return _checked(x, values[:, t], "csv", columns, target)


def _csv_row(row: list[str], i: int, header: list[str]) -> list[float]:
    """Row `i` of a CSV as floats; DatasetInvalid naming the row and the column."""
    if len(row) != len(header):
        raise DatasetInvalid(f"row {i} has {len(row)} cells; the header has {len(header)}")
    values = []
    for j, cell in enumerate(row):
        try:
            value = float(cell)
        except ValueError:
            raise DatasetInvalid(
                f"row {i}, column {header[j]!r}: {cell.strip()[:40]!r} is not a number"
            ) from None
        if not math.isfinite(value):
            raise DatasetInvalid(f"row {i}, column {header[j]!r}: {cell.strip()!r} is not finite")
        values.append(value)
    return values
