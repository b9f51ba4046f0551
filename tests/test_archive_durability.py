"""What archiving promises past its main path: the file is on the disk before the stream goes,
two archivers of one job do not undo each other, files are deleted where the record says they
are (and again, when a delete fails), jobs finished before the archiver existed get archived,
and a file the cache closes is not closed under a reader.

Each race is run in a chosen order, through a hook between two steps: nothing here waits for
time to pass. Jobs run in-process against a Redis of the test's own, so that an archiver pass
with a hot window of 0 archives only the test's jobs."""

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from cli.stack import Stack
from services import archive as archive_module
from services.archive import Archive, ArchivedFile, ArchiveMismatch
from services.archiver import CLAIM_TTL_S, RETRY_AFTER_S, ArchiveRun, archive_due, archive_job
from services.config import get_settings
from services.records import Chunk
from services.runner import run_job
from services.schemas import JobSpec
from services.store import Store
from services.store.keys import (
    ARCHIVE_BACKFILLED,
    ARCHIVE_DUE,
    ARCHIVE_REMOVALS,
    archiving_key,
    job_key,
    steps_key,
)
from tests.attempts import run_groups, store_sweep, stored_steps

SPEC = {
    "data": {"x": [[1.0, 2.0], [3.0, 4.0], [0.5, -1.0]], "y": [1.0, 0.0, 2.0]},
    "bias": True,
    "optimizer": {"name": "sgd", "lr": 0.01},
    "steps": 300,
    "device": "cpu",
}


@dataclass
class Private:
    """A Redis of the test's own, a store on it and a local archive."""

    stack: Stack
    store: Store
    archive: Archive
    folder: Path

    def finished_job(self, steps: int = 300, tenant: str = "test") -> str:
        spec = JobSpec.model_validate({**SPEC, "steps": steps})
        job_id, _ = self.store.create_job(spec, "cpu", "cpu", "test", tenant=tenant)
        run_job(self.store, job_id, "test-worker", torch.device("cpu"), get_settings())
        return job_id


@pytest.fixture
def private(tmp_path: Path) -> Iterator[Private]:
    stack = Stack(tmp_path)
    stack.start_redis()
    folder = tmp_path / "archive"
    archive = Archive(str(folder), cache_bytes=64 * 1024 * 1024)
    store = Store.from_url(stack.redis_url, archive)
    try:
        yield Private(stack, store, archive, folder)
    finally:
        store.redis.close()
        stack.kill_redis()
        stack.stop()


def _opened(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_the_file_and_its_folders_are_fsynced_before_the_stream_is_deleted(
    private: Private, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = private.finished_job()
    path = private.archive.job_path("test", job_id)
    events: list[tuple[str, str, bool]] = []  # (what, the path synced, the file in place)
    real_fsync, real_mark = os.fsync, private.store.mark_archived

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsync", _opened(fd), os.path.exists(path)))

    def mark(*args: Any) -> str:
        events.append(("mark", "", os.path.exists(path)))
        return real_mark(*args)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(private.store, "mark_archived", mark)

    assert archive_job(private.store, private.archive, job_id) == "ok"

    marked = events.index(("mark", "", True))
    synced = events[:marked]
    # The file's bytes (under its temporary name, before the rename made it visible)...
    assert [p for _, p, _ in synced if p.startswith(f"{path}.tmp-")], events
    # ...then, with the file in place, its folder, the archive's root and the root's parent
    # (the first write made both folders).
    folders = [p for _, p, in_place in synced if in_place and os.path.isdir(p)]
    root = private.folder
    assert folders == [str(root / "test"), str(root), str(root.parent)]
    assert not private.store.redis.exists(steps_key(job_id))


def test_an_object_store_publishes_without_fsync(
    private: Private, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an object store the PUT's success is the durability point: nothing to fsync."""
    memory = Archive("memory://gradstream-test-archive")
    job_id = private.finished_job()
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    try:
        assert archive_job(private.store, memory, job_id) == "ok"
    finally:
        memory.fs.rm(memory.root, recursive=True)
    assert synced == []
    assert private.store.redis.hexists(job_key(job_id), "archived")


def test_two_archivers_of_one_job_keep_each_others_claim_and_file(
    private: Private, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's claim lapses while it works (its TTL ran out); B takes the job over and is half-way
    when A finishes: A's release leaves B's claim, A's write leaves B's temporary file."""
    store, folder = private.store, private.folder / "test"
    job_id = private.finished_job()
    steps = stored_steps(store, job_id)
    claim = archiving_key(job_id)
    slow = Archive(str(private.folder))  # A's archive, with a hook between claim and write
    second = ArchiveRun(store, private.archive, job_id)
    tokens: dict[str, str | None] = {}
    real_job_path = slow.job_path

    def job_path(*args: Any) -> str:
        if "b" not in tokens:
            tokens["a"] = store.redis.get(claim).decode()
            store.redis.delete(claim)  # A's claim lapses, as its TTL does
            tokens["b"] = store.claim_archiving(job_id, CLAIM_TTL_S)
            assert second.read()
            second.write()  # B holds the claim and a temporary file: then A goes on
        return real_job_path(*args)

    monkeypatch.setattr(slow, "job_path", job_path)

    assert archive_due(store, slow, hot_retention_s=0) == [job_id]

    assert store.redis.exists(claim), "A's release dropped B's claim"
    assert isinstance(tokens["b"], str) and tokens["b"] != tokens["a"]
    assert store.redis.get(claim) == tokens["b"].encode()
    assert store.claim_archiving(job_id, CLAIM_TTL_S) is None
    assert Path(second.temporary).exists()  # A's write left B's file
    second.verify()
    second.publish()
    assert second.mark() == "archived"  # the same rows: A's file or B's, the same bytes
    assert store.release_archiving(job_id, tokens["b"])
    assert not store.redis.exists(claim)
    assert sorted(p.name for p in folder.iterdir()) == [f"{job_id}.parquet"]
    assert stored_steps(store, job_id) == steps


def test_a_failed_write_removes_only_its_own_temporary_file(
    private: Private, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = private.finished_job()
    other = ArchiveRun(private.store, private.archive, job_id)
    assert other.read()
    other.write()  # another archiver, still at work
    failing = ArchiveRun(private.store, Archive(str(private.folder)), job_id)

    def verify(path: str, rows: int, sha256: str) -> None:
        raise ArchiveMismatch(f"{path}: does not read back")

    monkeypatch.setattr(failing.archive, "verify", verify)
    with pytest.raises(ArchiveMismatch):
        failing.run()

    assert failing.temporary and not Path(failing.temporary).exists()
    assert Path(other.temporary).exists()


def test_deleting_removes_the_file_where_its_record_says_after_the_archive_moved(
    private: Private, tmp_path: Path
) -> None:
    job_id = private.finished_job()
    assert archive_job(private.store, private.archive, job_id) == "ok"
    path = Path(private.archive.job_path("test", job_id))
    # GRADSTREAM_ARCHIVE_URL changed since: new files go elsewhere, old ones stay where they are.
    moved = Store.from_url(private.stack.redis_url, Archive(str(tmp_path / "moved")))
    try:
        assert len(stored_steps(moved, job_id)) == 300  # read where the record says
        moved.delete_job(job_id, "test")
    finally:
        moved.redis.close()
    assert not path.exists()
    assert private.store.redis.zcard(ARCHIVE_REMOVALS) == 0


def test_a_file_whose_removal_failed_is_removed_by_the_next_archiver_pass(
    private: Private, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = private.finished_job()
    assert archive_job(private.store, private.archive, job_id) == "ok"
    path = Path(private.archive.job_path("test", job_id))
    file_system = type(private.archive.fs)
    real_rm = file_system.rm
    unreachable = True  # while the job is deleted

    def rm(self: Any, *args: Any, **kwargs: Any) -> Any:
        if unreachable:
            raise OSError("the file system is unreachable")
        return real_rm(self, *args, **kwargs)

    monkeypatch.setattr(file_system, "rm", rm)
    private.store.delete_job(job_id, "test")  # the job goes; its file stays, for now
    unreachable = False

    assert not private.store.redis.exists(job_key(job_id))
    assert path.exists()
    url = private.archive.url(str(path))
    assert private.store.redis.zrange(ARCHIVE_REMOVALS, 0, -1) == [url.encode()]

    assert archive_due(private.store, private.archive, hot_retention_s=0) == []

    assert not path.exists()
    assert private.store.redis.zcard(ARCHIVE_REMOVALS) == 0


def test_a_job_finished_before_archiving_existed_is_archived(private: Private) -> None:
    job_id = private.finished_job()
    steps = stored_steps(private.store, job_id)
    private.store.redis.zrem(ARCHIVE_DUE, job_id)  # finished by a version with no archiver
    private.store.redis.delete(ARCHIVE_BACKFILLED)

    # Due from when it finished: not before its hot window has passed...
    assert archive_due(private.store, private.archive, hot_retention_s=3600) == []
    finished = private.store.get_job(job_id).finished_at
    assert finished is not None
    due_at = private.store.redis.zscore(ARCHIVE_DUE, job_id)
    assert due_at == pytest.approx(finished.timestamp(), abs=1e-3)
    assert private.store.redis.exists(steps_key(job_id))

    # ...then archived like any other.
    assert archive_due(private.store, private.archive, hot_retention_s=0) == [job_id]
    assert not private.store.redis.exists(steps_key(job_id))
    assert stored_steps(private.store, job_id) == steps


@pytest.mark.parametrize("dropped_by", ["delete", "eviction"])
def test_a_file_dropped_from_the_cache_is_not_closed_under_a_reader(
    private: Private, monkeypatch: pytest.MonkeyPatch, dropped_by: str
) -> None:
    """A thread reads a row group of an open file while another drops the file from the cache
    (`forget`, as a delete does; or the LRU evicting it): the read completes, and the file is
    closed once it has."""
    first, other = private.finished_job(), private.finished_job(steps=20)
    for job_id in (first, other):
        assert archive_job(private.store, private.archive, job_id) == "ok"
    archived = {
        job_id: ArchivedFile.from_json(private.store.redis.hget(job_key(job_id), "archived") or b"")
        for job_id in (first, other)
    }
    reader = Archive(str(private.folder), cache_bytes=64 * 1024 * 1024)
    monkeypatch.setattr(archive_module, "MAX_OPEN_FILES", 1)
    inside, go = threading.Event(), threading.Event()
    real_group_of = archive_module._OpenFile.group_of

    def group_of(self: Any, step: int) -> int | None:
        if threading.current_thread().name == "reader":  # open, about to read: hold here
            inside.set()
            assert go.wait(10)
        return real_group_of(self, step)

    monkeypatch.setattr(archive_module._OpenFile, "group_of", group_of)
    read: list[Any] = []

    def read_first() -> None:
        try:
            read.append(reader.chunk_after(archived[first], -1))
        except BaseException as exc:  # what the route would have turned into a 500
            read.append(exc)

    thread = threading.Thread(target=read_first, name="reader")
    thread.start()
    assert inside.wait(10)
    opened = reader._files[archived[first].url]
    if dropped_by == "delete":
        reader.forget(archived[first].url)
    else:
        assert reader.chunk_after(archived[other], -1) is not None  # the LRU evicts `first`
    assert archived[first].url not in reader._files
    go.set()
    thread.join(10)

    [chunk] = read
    assert isinstance(chunk, Chunk), chunk
    assert (chunk.first, chunk.count) == (0, 300)
    assert opened.handle.closed  # by its last reader


def test_a_job_that_changed_while_being_archived_keeps_its_stream_and_waits(
    private: Private, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ARCHIVE's `changed`: the record is not as the archiver read it (here its attempt moved
    on between the file's rename and the mark): nothing is marked, the stream stays, the job
    is tried again RETRY_AFTER_S later, and then archived."""
    store = private.store
    job_id = private.finished_job()
    steps = stored_steps(store, job_id)
    real_publish = private.archive.publish

    def publish(temporary: str, path: str) -> None:
        real_publish(temporary, path)
        store.redis.hincrby(job_key(job_id), "attempt", 1)  # the job is not as read

    monkeypatch.setattr(private.archive, "publish", publish)
    asked_at = store.redis_time()
    assert archive_due(store, private.archive, hot_retention_s=0) == []

    assert not store.redis.hexists(job_key(job_id), "archived")
    assert store.redis.exists(steps_key(job_id))
    assert (store.redis.zscore(ARCHIVE_DUE, job_id) or 0) >= asked_at + RETRY_AFTER_S
    assert stored_steps(store, job_id) == steps

    monkeypatch.undo()
    store.redis.zadd(ARCHIVE_DUE, {job_id: 0})  # its retry is due
    assert archive_due(store, private.archive, hot_retention_s=0) == [job_id]
    assert stored_steps(store, job_id) == steps


def test_a_job_deleted_while_being_archived_leaves_no_file(
    private: Private, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ARCHIVE's `missing`: the job is deleted after its file was published, before the mark:
    the file goes, nothing is due, nothing is left to remove."""
    store = private.store
    job_id = private.finished_job()
    path = Path(private.archive.job_path("test", job_id))
    outcomes = []
    real_mark = store.mark_archived

    def mark(*args: Any) -> str:
        assert path.exists()  # published
        store.delete_job(job_id, "test")
        outcomes.append(real_mark(*args))
        return outcomes[-1]

    monkeypatch.setattr(store, "mark_archived", mark)
    assert archive_due(store, private.archive, hot_retention_s=0) == []

    assert outcomes == ["missing"]
    assert not path.exists()
    assert list(path.parent.iterdir()) == []
    assert store.redis.zcard(ARCHIVE_DUE) == 0
    assert store.redis.zcard(ARCHIVE_REMOVALS) == 0
    assert not store.redis.exists(job_key(job_id))


@pytest.mark.parametrize("marked_before_page", [0, 1])
def test_a_read_racing_the_mark_reads_every_step(
    private: Private, monkeypatch: pytest.MonkeyPatch, marked_before_page: int
) -> None:
    """The mark lands after a page read the job's record (no `archived` field yet) and before
    it read the stream, on the first page or between pages: every step is read once, in
    order, from the stream, the file, or both."""
    job_id = private.finished_job()
    steps = stored_steps(private.store, job_id)
    run = ArchiveRun(private.store, private.archive, job_id)
    for step in ("read", "write", "verify", "publish"):
        getattr(run, step)()
    reader = Store.from_url(private.stack.redis_url, Archive(str(private.folder)))
    real_job_fields = reader.job_fields
    pages: list[dict[bytes, bytes]] = []

    def job_fields(*args: Any, **kwargs: Any) -> dict[bytes, bytes]:
        fields = real_job_fields(*args, **kwargs)
        if len(pages) == marked_before_page:
            assert b"archived" not in fields
            assert run.mark() == "ok"  # the stream goes, under this page's read
        pages.append(fields)
        return fields

    monkeypatch.setattr(reader, "job_fields", job_fields)
    read: list[dict[str, Any]] = []
    after: int | None = -1
    try:
        while after is not None:
            records, after = reader.read_steps(job_id, after, 120)
            read += records
    finally:
        reader.redis.close()
    assert read == steps
    assert len(pages) == 3  # 120 + 120 + 60
    assert not private.store.redis.exists(steps_key(job_id))


def test_deleting_a_sweep_removes_its_members_files_where_their_records_say(
    private: Private, tmp_path: Path
) -> None:
    spec = {"base": {**SPEC, "steps": 40}, "grid": {"optimizer.lr": [0.01, 0.02]}}
    sweep = store_sweep(private.store, spec)
    run_groups(private.store, sweep.id, torch.device("cpu"), get_settings())
    members = [m.id for m in private.store.get_sweep(sweep.id).members]
    assert sorted(archive_due(private.store, private.archive, hot_retention_s=0)) == sorted(members)
    files = [Path(private.archive.job_path("test", m, sweep.id)) for m in members]
    assert all(f.exists() for f in files)

    moved = Store.from_url(private.stack.redis_url, Archive(str(tmp_path / "moved")))
    try:
        moved.delete_sweep(sweep.id, "test")
    finally:
        moved.redis.close()
    assert not any(f.exists() for f in files)
    assert private.store.redis.zcard(ARCHIVE_REMOVALS) == 0
