"""Step history beyond Redis memory (DESIGN §10): a finished job's step stream as one Parquet
file per job under GRADSTREAM_ARCHIVE_URL (any fsspec URL), and the cached readers that serve
it again.

A file holds one row per step: `step` (int64), `loss` (float32), `grads` and `params` (fixed-
size lists of float32, the record's `[w..., b]`; null at the steps a job with record.every N > 1
did not keep them), `explain` (float32, an explained job's graph, null where `grads` is)
and `epoch`, `batch` (int64, a mini-batch job's). Its schema's metadata keeps the job's row
layout, so that a row group becomes a `Chunk` again and is expanded into records by the very
code that expands the stream's chunks: the JSON served from the archive cannot differ from the
JSON served from Redis.

Files are published as object stores and data lakes do it: written under a temporary name,
read back and checked (rows, steps, a SHA-256 of the float32 rows), then renamed. On a local
disk the file and its folders are fsynced around the rename, so that the record names a file
that survives a host crash once the stream is gone; on an object store the PUT's success is
the durability point (the store acknowledges only what it keeps). When each step runs, and
marking the job archived in Redis, is services/archiver.py's.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib
import itertools
import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from services.config import Settings
from services.errors import StoreUnavailable
from services.records import Chunk, row_width, sparse_rows


class _ImportedOnUse:
    """A module imported when first used: the store imports this module everywhere, but only
    archiving and reading archived jobs need pyarrow (and fsspec), so a worker that never gets
    that far (a GPU node's minimal environment, a pool process) does not load them."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)


if TYPE_CHECKING:
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq
else:
    fsspec = _ImportedOnUse("fsspec")
    pa = _ImportedOnUse("pyarrow")
    pq = _ImportedOnUse("pyarrow.parquet")

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_METADATA_KEY = b"gradstream"
# Bytes of float32 rows per row group: a page of /steps decodes the row group it starts in,
# so groups stay a few MB; the cache keeps decoded groups for the pages that follow.
ROW_GROUP_BYTES = 4 * 1024 * 1024
# Archived jobs one API process keeps a file open for (each a handle and a footer).
MAX_OPEN_FILES = 64


class ArchiveMismatch(Exception):
    """A file read back does not hold what was written (or what the job's record says)."""


@dataclass(frozen=True)
class Layout:
    """The row layout of one job's steps (services/records.py): [loss, grads, params, graph,
    validation loss]."""

    features: int
    bias: bool
    batches: int
    explain: int
    evaluated: bool = False
    every: int = 1  # record.every: > 1 for a sparse job, whose grads and params may be null

    @classmethod
    def of(cls, chunk: Chunk) -> Layout:
        return cls(
            chunk.features, chunk.bias, chunk.batches, chunk.explain, chunk.evaluated, chunk.every
        )

    @classmethod
    def from_schema(cls, schema: pa.Schema) -> Layout:
        meta = json.loads((schema.metadata or {}).get(_METADATA_KEY, b"{}"))
        if meta.get("version") != FORMAT_VERSION:
            raise ArchiveMismatch(f"not a gradstream archive of version {FORMAT_VERSION}")
        evaluated = meta.get("evaluated", False)  # files from before eval have no such key
        every = meta.get("every", 1)  # nor from before sparse records
        return cls(
            meta["features"], meta["bias"], meta["batches"], meta["explain"], evaluated, every
        )

    @property
    def params(self) -> int:
        return self.features + int(self.bias)

    @property
    def width(self) -> int:
        return row_width(self.features, self.bias, self.explain, self.evaluated)

    @property
    def graph_end(self) -> int:
        """Where an explained row's graph ends (the validation loss may follow)."""
        return self.width - int(self.evaluated)

    def schema(self) -> pa.Schema:
        p = self.params
        fields = [
            pa.field("step", pa.int64(), nullable=False),
            pa.field("loss", pa.float32()),
            pa.field("grads", pa.list_(pa.float32(), p)),
            pa.field("params", pa.list_(pa.float32(), p)),
        ]
        if self.explain:
            fields.append(pa.field("explain", pa.list_(pa.float32(), self.graph_end - 1 - 2 * p)))
        if self.evaluated:
            # As the rows hold it: NaN where a step was not evaluated (records.NOT_EVALUATED).
            fields.append(pa.field("val_loss", pa.float32()))
        if self.batches:
            fields += [pa.field("epoch", pa.int64()), pa.field("batch", pa.int64())]
        meta = {"version": FORMAT_VERSION, **self.__dict__}
        return pa.schema(fields, metadata={_METADATA_KEY: json.dumps(meta).encode()})

    def encodings(self) -> dict[str, str]:
        """Parquet encodings by column: step numbers as deltas (next to nothing), floats split
        by byte (a trajectory's slowly changing values then compress)."""
        floats = ["loss", "grads.list.element", "params.list.element"]
        ints = ["step"]
        if self.explain:
            floats.append("explain.list.element")
        if self.evaluated:
            floats.append("val_loss")
        if self.batches:
            ints += ["epoch", "batch"]
        return {
            **{name: "BYTE_STREAM_SPLIT" for name in floats},
            **{name: "DELTA_BINARY_PACKED" for name in ints},
        }

    def table(self, first: int, rows: bytes, kept: np.ndarray[Any, Any] | None = None) -> pa.Table:
        """Full rows of float32 (as a dense chunk packs them, Chunk.dense) from step `first` on,
        as columns; `kept`: which rows keep gradients and parameters (None: all)."""
        values = np.frombuffer(rows, np.float32).reshape(-1, self.width)
        steps = np.arange(first, first + len(values), dtype=np.int64)
        p = self.params
        mask = None if kept is None or kept.all() else pa.array(~kept)

        def lists(begin: int, end: int) -> pa.Array:
            return pa.FixedSizeListArray.from_arrays(
                pa.array(values[:, begin:end].ravel()), end - begin, mask=mask
            )

        columns = [
            pa.array(steps),
            pa.array(values[:, 0]),
            lists(1, 1 + p),
            lists(1 + p, 1 + 2 * p),
        ]
        if self.explain:
            columns.append(lists(1 + 2 * p, self.graph_end))
        if self.evaluated:
            columns.append(pa.array(values[:, -1]))
        if self.batches:
            epochs, batches = np.divmod(steps, self.batches)
            columns += [pa.array(epochs), pa.array(batches)]
        return pa.Table.from_arrays(columns, schema=self.schema())

    def rows(self, table: pa.Table) -> tuple[bytes, np.ndarray[Any, Any]]:
        """The float32 rows of a table `table()` made (a row group read back), NaN where
        gradients and parameters are null, and which rows keep them (bool)."""
        p = self.params
        out = np.full((table.num_rows, self.width), np.nan, np.float32)
        out[:, 0] = table.column("loss").to_numpy()
        kept = table.column("grads").combine_chunks().is_valid().to_numpy(zero_copy_only=False)
        parts = [("grads", 1, 1 + p), ("params", 1 + p, 1 + 2 * p)]
        if self.explain:
            parts.append(("explain", 1 + 2 * p, self.graph_end))
        for name, begin, end in parts:
            flat = table.column(name).combine_chunks().flatten().to_numpy()  # the valid rows'
            out[kept, begin:end] = flat.reshape(-1, end - begin)
        if self.evaluated:
            out[:, -1] = table.column("val_loss").to_numpy()
        return out.tobytes(), kept


@dataclass(frozen=True)
class ArchivedFile:
    """Where a job's steps went, as its record keeps it (the `archived` field)."""

    url: str
    rows: int
    sha256: str

    def to_json(self) -> str:
        return json.dumps({"url": self.url, "rows": self.rows, "sha256": self.sha256})

    @classmethod
    def from_json(cls, value: bytes | str) -> ArchivedFile:
        return cls(**json.loads(value))


def _write_parquet(handle: Any, chunks: Iterable[Chunk]) -> tuple[int, str]:
    """Write consecutive chunks from step 0 as Parquet row groups of about ROW_GROUP_BYTES:
    the rows written and the SHA-256 of their float32 bytes."""
    stream = iter(chunks)
    head = next(stream, None)
    if head is None:
        raise ArchiveMismatch("the job has no stored steps")
    layout = Layout.of(head)
    row_bytes = 4 * layout.width
    group_rows = max(1, ROW_GROUP_BYTES // row_bytes)
    group_bytes = row_bytes * group_rows
    # The digest is of the full rows (a sparse job's with NaN where it kept no gradients and
    # parameters, as `Layout.rows` reads them back), however the rows were chunked.
    digest, rows, pending, kept = hashlib.sha256(), 0, bytearray(), np.ones(0, bool)
    with pq.ParquetWriter(
        handle, layout.schema(), use_dictionary=False, column_encoding=layout.encodings()
    ) as writer:
        for chunk in itertools.chain([head], stream):
            if chunk.first != rows:
                raise ArchiveMismatch(f"the stream jumps from step {rows} to {chunk.first}")
            dense, chunk_kept = chunk.dense()
            full = dense.tobytes()
            digest.update(full)
            pending += full
            kept = np.concatenate([kept, chunk_kept])
            rows += chunk.count
            while len(pending) >= group_bytes:
                first = rows - len(pending) // row_bytes
                table = layout.table(first, bytes(pending[:group_bytes]), kept[:group_rows])
                writer.write_table(table)
                del pending[:group_bytes]
                kept = kept[group_rows:]
        if pending:
            first = rows - len(pending) // row_bytes
            writer.write_table(layout.table(first, bytes(pending), kept))
    return rows, digest.hexdigest()


def _fsync(path: str, flags: int = 0) -> None:
    """Wait until what `path` holds (a file's bytes, a folder's entries) is on the disk."""
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def archived_file(archive: Archive | None, archived: bytes) -> tuple[Archive, ArchivedFile]:
    """The archive, and the file an archived job's record (its `archived` field) names."""
    if archive is None:
        raise StoreUnavailable("this job's steps are archived, and no archive is configured")
    return archive, ArchivedFile.from_json(archived)


class _OpenFile:
    """One archived job's Parquet file, open: where each row group starts, and a lock (a file
    handle is read by one thread at a time). The cache may drop it (evicted, or its job
    deleted) while threads read it: it is closed when the last of them is done (`readers`
    and `retired` change under the Archive's lock)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.handle = fs.open(path, "rb")
        self.parquet = pq.ParquetFile(self.handle)
        self.layout = Layout.from_schema(self.parquet.schema_arrow)
        metadata = self.parquet.metadata
        self.starts = [0]
        for i in range(metadata.num_row_groups):
            self.starts.append(self.starts[-1] + metadata.row_group(i).num_rows)
        self.lock = threading.Lock()
        self.readers = 0  # threads reading it now
        self.retired = False  # out of the cache: closed once no thread reads it

    def group_of(self, step: int) -> int | None:
        """The row group holding `step`, or None past the last step."""
        if step < 0 or step >= self.starts[-1]:
            return None
        return bisect.bisect_right(self.starts, step) - 1

    def read_group(self, group: int) -> Chunk:
        with self.lock:
            table = self.parquet.read_row_group(group)
        layout = self.layout
        first = self.starts[group]
        rows, kept = layout.rows(table)
        if layout.every > 1:  # a sparse job's rows as its stream held them
            full = np.frombuffer(rows, np.float32).reshape(-1, layout.width)
            # Beside the steps divisible by every, only the job's last step keeps its gradients.
            last = bool(kept[-1]) and (first + len(kept) - 1) % layout.every != 0
            rows = sparse_rows(full, first, layout.every, layout.evaluated, last)
        return Chunk(
            first=first,
            count=table.num_rows,
            features=layout.features,
            bias=layout.bias,
            rows=rows,
            batches=layout.batches,
            explain=layout.explain,
            evaluated=layout.evaluated,
            every=layout.every,
        )

    def close(self) -> None:
        with self.lock:
            self.handle.close()


class Archive:
    """The archive's file system, and this process's cache of archived steps: open files (at
    most MAX_OPEN_FILES) and decoded row groups (at most `cache_bytes`), least recently used
    first out."""

    def __init__(self, url: str, options: dict[str, Any] | None = None, cache_bytes: int = 0):
        self.options = options or {}
        self.fs, self.root = fsspec.core.url_to_fs(url, **self.options)
        self.root = self.root.rstrip("/")
        protocols = self.fs.protocol
        # A local disk acknowledges writes it has only cached: publishing fsyncs there.
        self.local = "file" in ((protocols,) if isinstance(protocols, str) else protocols)
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self._files: OrderedDict[str, _OpenFile] = OrderedDict()
        self._groups: OrderedDict[tuple[str, int], Chunk] = OrderedDict()
        self._cached_bytes = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Archive:
        options = settings.archive_options.get_secret_value()
        return cls(settings.archive_url, options, settings.archive_cache_bytes)

    # Where files go: a tenant's jobs in its folder, a sweep's members in the sweep's (so that
    # deleting a sweep removes one folder).

    def job_path(self, tenant: str, job_id: str, sweep: str | None = None) -> str:
        folder = self.sweep_folder(tenant, sweep) if sweep else f"{self.root}/{tenant}"
        return f"{folder}/{job_id}.parquet"

    def sweep_folder(self, tenant: str, sweep_id: str) -> str:
        return f"{self.root}/{tenant}/sweeps/{sweep_id}"

    def url(self, path: str) -> str:
        """The URL the job's record keeps (with the file system's protocol)."""
        return str(self.fs.unstrip_protocol(path))

    # Writing: temporary file, read back, rename.

    def write(self, path: str, chunks: Iterable[Chunk]) -> tuple[str, int, str]:
        """Write a job's consecutive chunks (from step 0) to a new temporary file beside `path`,
        this writer's own (another archiver whose claim lapsed may be writing the same job):
        its path, the rows written and the SHA-256 of their float32 bytes."""
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        temporary = f"{path}.tmp-{secrets.token_hex(6)}"
        try:
            with self.fs.open(temporary, "wb") as handle:
                rows, sha256 = _write_parquet(handle, chunks)
        except BaseException:
            self.remove_temporary(temporary)
            raise
        return temporary, rows, sha256

    def verify(self, path: str, rows: int, sha256: str) -> None:
        """Read the file back: ArchiveMismatch unless it holds steps 0 .. rows-1, in order,
        whose float32 rows hash to `sha256`."""
        with self.fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            layout = Layout.from_schema(parquet.schema_arrow)
            digest, expected = hashlib.sha256(), 0
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group)
                steps = table.column("step").to_numpy()
                if not np.array_equal(steps, np.arange(expected, expected + len(steps))):
                    raise ArchiveMismatch(f"{path}: steps out of order in row group {group}")
                digest.update(layout.rows(table)[0])
                expected += len(steps)
        if expected != rows or digest.hexdigest() != sha256:
            raise ArchiveMismatch(
                f"{path} holds {expected} rows hashing to {digest.hexdigest()}; "
                f"written: {rows} rows hashing to {sha256}"
            )

    def publish(self, temporary: str, path: str) -> None:
        """Rename the verified file to its place, durably: on a local disk the rename is atomic,
        and the file's bytes and then its folders (the rename, and folders `write` made) are
        fsynced before this returns, since the caller deletes the only other copy next; on an
        object store it is a copy then a delete, each object whole and kept once acknowledged."""
        if self.local:
            _fsync(temporary)
        self.fs.mv(temporary, path)
        if self.local:
            # Up to the root's parent: the first write made the tenant's folder, maybe the root.
            folder, last = path.rsplit("/", 1)[0], self.root.rsplit("/", 1)[0] or "/"
            while True:
                _fsync(folder, os.O_DIRECTORY)
                if len(folder) <= len(last):
                    break
                folder = folder.rsplit("/", 1)[0] or "/"

    # Removing.

    def _glob(self, pattern: str) -> list[str]:
        # Another process writes and removes files here: no listing cached by this one counts.
        self.fs.invalidate_cache()
        found: list[str] = self.fs.glob(pattern)
        return found

    def remove_temporary(self, temporary: str) -> None:
        """Remove a temporary file this process wrote (its write or its check failed)."""
        if self.fs.exists(temporary):
            self.fs.rm(temporary)

    def remove_stale_temporaries(self, path: str, older_than_s: float) -> list[str]:
        """Remove the temporary files beside `path` last written over `older_than_s` ago, left
        by writers that died; younger ones may be a live writer's, and stay. Those removed."""
        removed = []
        for leftover in self._glob(f"{path}.tmp-*"):
            try:
                age = time.time() - self.fs.modified(leftover).timestamp()
                if age > older_than_s:
                    self.fs.rm(leftover)
                    removed.append(leftover)
            except FileNotFoundError:  # its writer published or removed it meanwhile
                continue
            except NotImplementedError:  # a file system that keeps no times: left alone
                break
        return removed

    def remove_url(self, url: str) -> None:
        """Remove a deleted job's archived file by the URL its record kept (wherever the archive
        is configured now), and temporary files beside it. Raises when the file system fails:
        the caller keeps the URL to try again."""
        self.forget(url)
        fs, path = fsspec.core.url_to_fs(url, **self._options_for(url))
        fs.invalidate_cache()
        for found in fs.glob(f"{path}*"):
            fs.rm(found)

    def remove_job(self, tenant: str, job_id: str) -> None:
        """Remove what archiving left of a deleted job at the configured path (a temporary file
        of a writer that died); its archived file goes by its record's URL (`remove_url`). A
        file system that fails leaves the file behind (logged): the job is gone either way."""
        path = self.job_path(tenant, job_id)
        self.forget(self.url(path))
        try:
            for found in self._glob(f"{path}*"):
                self.fs.rm(found)
        except OSError:
            log.exception("archive: could not remove %s (deleted job %s)", path, job_id)

    def remove_sweep(self, tenant: str, sweep_id: str) -> None:
        """Remove the files of all of a deleted sweep's members (one folder)."""
        folder = self.sweep_folder(tenant, sweep_id)
        with self._lock:
            stale = [url for url in self._files if f"/sweeps/{sweep_id}/" in url]
        for url in stale:
            self.forget(url)
        try:
            if self._glob(f"{folder}/*"):
                self.fs.rm(folder, recursive=True)
        except OSError:
            log.exception("archive: could not remove %s (deleted sweep %s)", folder, sweep_id)

    # Reading, through the cache.

    def chunk_after(self, archived: ArchivedFile, after: int) -> Chunk | None:
        """The row group holding step `after + 1` as a Chunk, or None past the job's last step.
        StoreUnavailable when the file cannot be read."""
        try:
            with self._reading(archived.url) as opened:
                group = opened.group_of(after + 1)
                if group is None:
                    return None
                key = (archived.url, group)
                with self._lock:
                    chunk = self._groups.get(key)
                    if chunk is not None:
                        self._groups.move_to_end(key)
                        return chunk
                chunk = opened.read_group(group)
        except (OSError, ArchiveMismatch, pa.ArrowException) as exc:
            log.warning("archived steps unreadable at %s: %s", archived.url, exc)
            raise StoreUnavailable("this job's archived steps cannot be read for now") from exc
        self._keep(key, chunk)
        return chunk

    @contextmanager
    def _reading(self, url: str) -> Iterator[_OpenFile]:
        """The file open, held for this thread: the cache may drop it meanwhile, not close it."""
        opened = self._open(url)
        try:
            yield opened
        finally:
            with self._lock:
                opened.readers -= 1
                done = opened.retired and not opened.readers
            if done:
                opened.close()

    def _open(self, url: str) -> _OpenFile:
        """The file open (from the cache, else opened and cached), counted as read by one more
        thread."""
        with self._lock:
            opened = self._files.get(url)
            if opened is not None:
                self._files.move_to_end(url)
                opened.readers += 1
                return opened
        fs, path = fsspec.core.url_to_fs(url, **self._options_for(url))
        opened = _OpenFile(fs, path)
        closing = []
        with self._lock:
            if url in self._files:  # another thread opened it meanwhile: use that one
                closing.append(opened)
                opened = self._files[url]
            self._files[url] = opened
            opened.readers += 1
            while len(self._files) > MAX_OPEN_FILES:
                closing += self._retire(self._files.popitem(last=False)[1])
        for old in closing:
            old.close()
        return opened

    @staticmethod
    def _retire(opened: _OpenFile) -> list[_OpenFile]:
        """Under the lock: a file out of the cache, to close now if no thread reads it (else
        its last reader closes it)."""
        opened.retired = True
        return [] if opened.readers else [opened]

    def _options_for(self, url: str) -> dict[str, Any]:
        # A file of the configured file system's kind is read with its options (an S3
        # endpoint...), also one written before the archive's URL changed; another kind's
        # file (a folder's, when the archive moved to S3) with none.
        protocol = fsspec.core.split_protocol(url)[0] or "file"
        protocols = self.fs.protocol
        same = protocol in ((protocols,) if isinstance(protocols, str) else protocols)
        return self.options if same else {}

    def _keep(self, key: tuple[str, int], chunk: Chunk) -> None:
        size = len(chunk.rows)
        if size > self.cache_bytes:
            return
        with self._lock:
            if key in self._groups:
                return
            self._groups[key] = chunk
            self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes:
                _, old = self._groups.popitem(last=False)
                self._cached_bytes -= len(old.rows)

    def forget(self, url: str) -> None:
        """Drop a file from the cache (it is being deleted)."""
        closing: list[_OpenFile] = []
        with self._lock:
            opened = self._files.pop(url, None)
            if opened is not None:
                closing = self._retire(opened)
            for key in [k for k in self._groups if k[0] == url]:
                self._cached_bytes -= len(self._groups.pop(key).rows)
        for old in closing:
            old.close()
