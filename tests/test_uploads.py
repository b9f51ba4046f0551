"""What an upload may hold and cost: real or integer arrays only, a byte budget on the arrays
once read (from the .npy headers and the zip's declared sizes), zip members zipfile should not
read refused, CSV parsed without a str per cell, and a few uploads at a time per API process."""

import contextlib
import io
import select
import socket
import time
import tracemalloc
import zipfile
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from api.client import Client
from cli.stack import Stack, wait_until
from services.datasets import parse_dataset

BUDGET = 4096  # GRADSTREAM_MAX_DATASET_ARRAY_BYTES of the API below


@pytest.fixture(scope="module")
def limited(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API of its own (same Redis) with one upload at a time and a small array budget."""
    api = Stack(tmp_path_factory.mktemp("uploads"), tenants=("hana",))
    api.redis_url = stack.redis_url
    try:
        api.start_api(
            GRADSTREAM_MAX_CONCURRENT_UPLOADS="1",
            GRADSTREAM_MAX_DATASET_ARRAY_BYTES=str(BUDGET),
        )
        yield api
    finally:
        api.stop()


@pytest.fixture
def hana(limited: Stack) -> Iterator[Client]:
    with Client(limited.api_url, limited.api_key, timeout=10) as client:
        yield client


def _upload(client: Client, content: bytes) -> httpx.Response:
    return client.http.post("/v1/datasets", content=content)


def _refused(response: httpx.Response, *words: str) -> None:
    assert response.status_code == 422, response.text
    message = response.json()["detail"][0]["msg"]
    assert all(word in message for word in words), message


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype.hasobject)
    return buffer.getvalue()


def _npz(x: np.ndarray, y: np.ndarray, compressed: bool = False) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, x=x, y=y)
    return buffer.getvalue()


def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _patched(content: bytes, member: str, flags: int = 0, method: int | None = None) -> bytes:
    """The zip with `flags` set and `method` written in `member`'s local and central headers."""
    data = bytearray(content)
    name = member.encode()
    # (signature, fixed length before the name, offset of the flags, offset of the method)
    for signature, fixed, flags_at, method_at in (
        (b"PK\x03\x04", 30, 6, 8),
        (b"PK\x01\x02", 46, 8, 10),
    ):
        at = data.find(signature)
        while data[at + fixed : at + fixed + len(name)] != name:
            at = data.find(signature, at + 1)
            assert at != -1, member
        data[flags_at + at] |= flags
        if method is not None:
            data[at + method_at : at + method_at + 2] = method.to_bytes(2, "little")
    return bytes(data)


def _rows(n: int) -> np.ndarray:
    return np.arange(2 * n, dtype=np.float64).reshape(n, 2) % 7


@pytest.mark.parametrize(
    "values",
    [
        np.ones((4, 2), dtype=np.complex128),
        np.ones((4, 2), dtype=np.bool_),
        np.array([["1", "2"], ["3", "4"]]),
        np.array([[1, "2"], [3, 4]], dtype=object),
        np.ones((4, 2), dtype="datetime64[s]"),
        np.ones((4, 2), dtype="timedelta64[s]"),  # numpy counts it among the integers
    ],
    ids=lambda values: str(values.dtype),
)
@pytest.mark.parametrize("kind", ["npy", "npz"])
def test_arrays_of_other_than_real_or_integer_numbers_are_422_naming_the_dtype(
    client: Client, kind: str, values: np.ndarray
) -> None:
    content = _npy(values) if kind == "npy" else _npz(values, values[:, 0])
    _refused(_upload(client, content), "real or integer numbers", str(values.dtype))


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.int64, np.float16, np.float64])
def test_integer_and_float_arrays_are_read(client: Client, dtype: type) -> None:
    values = (_rows(5) + 1).astype(dtype)
    for content in (_npy(values), _npz(values[:, :1], values[:, 1], compressed=True)):
        response = _upload(client, content)
        assert response.status_code in (200, 201), response.text
        assert response.json()["samples"] == 5


def test_arrays_just_within_the_byte_budget_pass_and_just_over_are_422(hana: Client) -> None:
    rows = BUDGET // 16  # two float64 columns: exactly the budget
    assert _upload(hana, _npy(_rows(rows))).status_code == 201
    _refused(_upload(hana, _npy(_rows(rows + 1))), "max_dataset_array_bytes", str(BUDGET))
    # x and y count together.
    within = _rows(rows)
    assert _upload(hana, _npz(within[:, :1], within[:, 1], compressed=True)).status_code == 201
    over = _rows(rows + 1)
    response = _upload(hana, _npz(over[:, :1], over[:, 1], compressed=True))
    _refused(response, "max_dataset_array_bytes", str(BUDGET))


def test_an_npz_member_that_declares_more_than_its_header_is_held_to_the_budget(
    hana: Client,
) -> None:
    x, y = _npy(np.ones((16, 1)) * 3), _npy(np.arange(16.0))
    assert _upload(hana, _zip({"x.npy": x, "y.npy": y})).status_code == 201
    # 16 values in the header, 8 KiB more that np.load would never look at: still refused.
    padded = _zip({"x.npy": x + bytes(2 * BUDGET), "y.npy": y})
    assert len(padded) < BUDGET
    _refused(_upload(hana, padded), "max_dataset_array_bytes")


NPZ = {"x.npy": _npy(np.arange(8.0).reshape(4, 2)), "y.npy": _npy(np.arange(4.0))}
# Stored, then labelled deflated: its first block has deflate's reserved type (zlib.error).
BAD_DEFLATE = _zip({**NPZ, "x.npy": b"\x07" + bytes(64)}, zipfile.ZIP_STORED)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_patched(_zip(NPZ), "x.npy", flags=0x01), "array x is encrypted"),
        (_patched(_zip(NPZ), "y.npy", flags=0x40), "array y is encrypted"),  # strong encryption
        (_zip(NPZ, zipfile.ZIP_BZIP2), "zip method 12"),
        (_zip(NPZ, zipfile.ZIP_LZMA), "zip method 14"),
        (_patched(_zip(NPZ), "x.npy", method=99), "zip method 99"),
        (_patched(_zip(NPZ), "x.npy", flags=0x20), "array x cannot be read: compressed patched"),
        (_patched(BAD_DEFLATE, "x.npy", method=zipfile.ZIP_DEFLATED), "not a readable .npz"),
    ],
    ids=["encrypted", "strongly-encrypted", "bzip2", "lzma", "unknown-method", "patched", "zlib"],
)
def test_zip_members_that_are_not_stored_or_plainly_deflated_are_422(
    client: Client, content: bytes, message: str
) -> None:
    _refused(_upload(client, content), message)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"a,y\n1,2\r3,4\n", "line 2: new-line character seen in unquoted field"),
        (b"a,y\n1,2\n3," + b"4" * 200_000 + b"\n", "line 3: field larger than field limit"),
    ],
)
def test_what_the_csv_module_cannot_read_is_422_naming_the_line(
    client: Client, content: bytes, message: str
) -> None:
    _refused(_upload(client, content), message)


def test_csv_records_across_lines_and_blank_lines_parse_as_before() -> None:
    content = '\ufeffa,"b",y\n\n"1,5e0\n",2,3\n\n\n4, 5 ,6\n'.encode()
    with pytest.raises(ValueError, match="row 2, column 'a': '1,5e0' is not a number"):
        parse_dataset(content)
    parsed = parse_dataset(content.replace(b"1,5e0", b"1.5e0"))
    assert parsed.columns == ["a", "b"] and parsed.target == "y"
    np.testing.assert_array_equal(parsed.x, [[1.5, 2], [4, 5]])
    np.testing.assert_array_equal(parsed.y, [3, 6])


def test_csv_parsing_holds_floats_not_a_str_per_cell() -> None:
    rows, columns = 100_000, 5
    content = ("c0,c1,c2,c3,y\n" + "12,34,56,78,90\n" * rows).encode()
    tracemalloc.start()
    try:
        parsed = parse_dataset(content)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert parsed.samples == rows
    # The float64 table (4 MB), its features' copy and the float32 result: under three tables.
    # A str per cell (~50 bytes each, with its list) took ~49 MB.
    table = rows * columns * 8
    assert peak < 3 * table, peak


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@contextlib.contextmanager
def _holding_the_only_slot(api: Stack, client: Client) -> Iterator[socket.socket]:
    """An upload whose chunked body has begun and not ended, once it holds the API's one upload
    slot: an upload of `client` is then refused. (A probe that gets in first takes the slot and
    this upload is refused instead: it starts again.)"""
    url = urlsplit(api.api_url)
    assert url.hostname is not None and url.port is not None
    probe = f"a,y\n1,{time.time_ns()}\n".encode()
    deadline = time.monotonic() + 10
    while True:
        with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                + f"Authorization: Bearer {api.api_key}\r\n".encode()
                + b"Transfer-Encoding: chunked\r\n\r\n"
                + _chunk(b"a,y\n")
            )
            while not select.select([sock], [], [], 0)[0]:  # not answered (refused) yet
                if _upload(client, probe).status_code == 429:
                    yield sock
                    return
                assert time.monotonic() < deadline, "no upload was ever refused"
        assert time.monotonic() < deadline, "the upload was refused each time"


def test_uploads_beyond_max_concurrent_uploads_are_429_until_one_ends(
    limited: Stack, hana: Client
) -> None:
    def fresh() -> bytes:
        return f"a,y\n1,{time.time_ns()}\n".encode()

    with _holding_the_only_slot(limited, hana) as slow:
        refused = _upload(hana, fresh())
        assert refused.status_code == 429 and refused.json()["limit"] == "max_concurrent_uploads"
        assert "max_concurrent_uploads is 1" in refused.json()["detail"]
        assert refused.headers["Retry-After"] == "1"
        slow.sendall(_chunk(f"2,{time.time_ns()}\n".encode()) + b"0\r\n\r\n")
        reply = b""
        while chunk := slow.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 201"), reply[:300]
    # Its slot was given back before it answered; one refused as invalid gives its back too.
    _refused(_upload(hana, b"a,y\n1,x\n"), "is not a number")
    assert _upload(hana, fresh()).status_code == 201
    # A client that goes away mid-body frees its slot as well.
    with _holding_the_only_slot(limited, hana):
        pass
    wait_until(lambda: _upload(hana, fresh()).status_code == 201, 10, "the slot given back")
