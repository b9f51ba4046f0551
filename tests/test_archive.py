"""History beyond Redis memory, on a local folder: an archived job reads back byte for byte
(`/steps` pages and SSE replays), archiving survives a crash between any two of its steps, and
deleting a job takes its file along.

Archiving runs here in-process, step by step, against the session's Redis and the folder its
API reads archived jobs from (a worker does the same every GRADSTREAM_ARCHIVE_INTERVAL_S:
tests/test_archive_s3.py runs one)."""

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
import torch

from api.client import Client
from cli.stack import Stack
from services.archive import Archive, ArchivedFile
from services.archiver import STALE_TEMPORARY_S, ArchiveRun, archive_due, archive_job
from services.config import get_settings
from services.errors import StorageFull
from services.runner import run_job
from services.schemas import JobSpec
from services.store import Store
from services.store.keys import ARCHIVE_DUE, job_key, steps_key
from tests.attempts import stored_steps
from tests.conftest import SEED_EXAMPLE

SPECS: dict[str, dict[str, Any]] = {
    "full batch, bias": {
        "data": {"x": [[1.0, 2.0], [3.0, 4.0], [0.5, -1.0]], "y": [1.0, 0.0, 2.0]},
        "bias": True,
        "optimizer": {"name": "sgd", "lr": 0.01},
        "steps": 1200,
        "device": "cpu",
    },
    "mini-batch": {
        "data": {"synthetic": {"n": 48, "d": 3, "seed": 1}},
        "batch_size": 16,
        "optimizer": {"name": "adam", "lr": 0.05},
        "steps": 300,
        "device": "cpu",
    },
    "explained": {**SEED_EXAMPLE, "steps": 30, "record": {"explain": True}},
    # The validation loss is the rows' last column, after an explained job's graph.
    "held out, explained": {
        "data": {"x": [[1.0, 2.0], [3.0, 4.0], [0.5, -1.0], [2.0, 1.0]], "y": [1.0, 0.0, 2.0, 1.5]},
        "optimizer": {"name": "sgd", "lr": 0.01},
        "eval": {"holdout": 0.5, "seed": 3, "every": 7},
        "record": {"explain": True},
        "steps": 40,
        "device": "cpu",
    },
    "mini-batch, validation set": {
        "data": {"synthetic": {"n": 48, "d": 3, "seed": 1}},
        "batch_size": 16,
        "eval": {"data": {"x": [[1.0, 0.0, 2.0], [0.5, 1.0, -1.0]], "y": [1.0, 2.0]}},
        "steps": 60,
        "device": "cpu",
    },
    "diverged": {
        "data": {"x": [[10.0], [20.0]], "y": [1.0, 2.0]},
        "optimizer": {"name": "sgd", "lr": 10.0},
        "steps": 500,
        "device": "cpu",
    },
    # Sparse records (record.every): grads and params null in the file where not kept.
    "sparse, mini-batch, validation set": {
        "data": {"synthetic": {"n": 48, "d": 3, "seed": 1}},
        "batch_size": 16,
        "eval": {"data": {"x": [[1.0, 0.0, 2.0], [0.5, 1.0, -1.0]], "y": [1.0, 2.0]}, "every": 4},
        "record": {"every": 9},
        "steps": 301,
        "device": "cpu",
    },
    "sparse, explained": {**SEED_EXAMPLE, "steps": 30, "record": {"explain": True, "every": 4}},
    "sparse, diverged": {
        "data": {"x": [[10.0], [20.0]], "y": [1.0, 2.0]},
        "optimizer": {"name": "sgd", "lr": 10.0},
        "record": {"every": 5},
        "steps": 500,
        "device": "cpu",
    },
}


@pytest.fixture
def archive(stack: Stack) -> Archive:
    """The archive the session's API reads from (its GRADSTREAM_ARCHIVE_URL)."""
    return Archive(str(stack.archive_dir), cache_bytes=64 * 1024 * 1024)


@pytest.fixture
def archiving_store(stack: Stack, archive: Archive) -> Iterator[Store]:
    store = Store.from_url(stack.redis_url, archive)
    yield store
    store.redis.close()


def served(stack: Stack, job_id: str, steps_done: int) -> list[bytes]:
    """Every answer a client can get of a finished job's steps, as bytes: /steps pages (a
    whole walk, cursors inside and past the end, a small and a large limit) and SSE replays
    (from step 0, after a Last-Event-ID, after `?after=`)."""
    answers = []
    with httpx.Client(base_url=stack.api_url, headers=stack.auth(), timeout=30) as http:
        path = f"/v1/jobs/{job_id}"
        after: int | None = -1
        while after is not None:
            page = http.get(f"{path}/steps", params={"after": after, "limit": 97})
            answers.append(page.content)
            after = page.json()["next"]
        cursors = [{}, {"limit": 5000}, {"after": 7}, {"after": steps_done - 2}, {"after": 10**6}]
        for params in cursors:
            answers.append(http.get(f"{path}/steps", params=params).content)
        answers.append(http.get(f"{path}/events").content)
        answers.append(http.get(f"{path}/events", headers={"Last-Event-ID": "5"}).content)
        answers.append(http.get(f"{path}/events", params={"after": steps_done // 2}).content)
    assert all(b"event: done" in answer for answer in answers[-3:])
    return answers


def test_an_archived_job_reads_back_byte_for_byte(
    stack: Stack,
    client: Client,
    redis_client: "redis.Redis",
    archive: Archive,
    archiving_store: Store,
) -> None:
    jobs = {name: client.submit(spec)["id"] for name, spec in SPECS.items()}
    for name, job_id in jobs.items():
        view = client.wait(job_id, timeout=60)
        assert view["status"] == ("diverged" if "diverged" in name else "succeeded")
        before = served(stack, job_id, view["steps_done"])
        records = list(client.steps(job_id))
        if "eval" in SPECS[name]:  # read back with its validation losses where evaluated
            evaluated = [r["step"] for r in records if "val_loss" in r]
            every = SPECS[name]["eval"].get("every", 1)
            assert evaluated == [*range(0, len(records) - 1, every), len(records) - 1]
        assert redis_client.zscore(ARCHIVE_DUE, job_id) is not None  # due once finished

        assert archive_job(archiving_store, archive, job_id) == "ok"

        assert not redis_client.exists(steps_key(job_id))  # the stream went
        assert redis_client.zscore(ARCHIVE_DUE, job_id) is None
        archived = ArchivedFile.from_json(redis_client.hget(job_key(job_id), "archived") or b"")
        assert archived.rows == view["steps_done"]
        assert served(stack, job_id, view["steps_done"]) == before, name
        assert client.get(job_id) == view
        assert list(client.steps(job_id)) == records
        replay = [e.data for e in client.stream(job_id, last_event_id=3) if e.event == "step"]
        assert replay == records[4:]

        # The file is plain Parquet: float32 columns, the step numbers as ints.
        table = pq.read_table(archived.url.removeprefix("file://"))
        assert table.column("step").to_pylist() == list(range(view["steps_done"]))
        assert table.schema.field("loss").type == pa.float32()
        assert table.schema.field("params").type.value_type == pa.float32()
        every = SPECS[name].get("record", {}).get("every", 1)
        kept = [r["step"] for r in records if "grads" in r]
        last = view["steps_done"] - 1
        assert kept == sorted({*range(0, last + 1, every), last})  # the last: it ended there
        assert table.column("grads").null_count == view["steps_done"] - len(kept)
        assert table.column("params").is_valid().to_pylist() == ["grads" in r for r in records]
        if name == "mini-batch":
            steps = json.loads(before[0])["steps"]
            assert table.column("epoch").to_pylist()[:97] == [s["epoch"] for s in steps]
            assert table.column("batch").to_pylist()[:97] == [s["batch"] for s in steps]


def _files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_a_crash_between_any_two_steps_of_archiving_loses_nothing(
    stack: Stack,
    client: Client,
    redis_client: "redis.Redis",
    archive: Archive,
    archiving_store: Store,
) -> None:
    job_id = client.submit(SPECS["full batch, bias"])["id"]
    view = client.wait(job_id, timeout=60)
    before = served(stack, job_id, view["steps_done"])
    folder = stack.archive_dir / "alice"
    steps = ["read", "write", "verify", "publish"]
    left: list[str] = []  # temporary files of archivers that died after writing one
    for crash_after in range(1, len(steps) + 1):
        # An archiver that dies after `crash_after` steps: whatever it left behind, the steps
        # still read the same, from Redis.
        run = ArchiveRun(archiving_store, archive, job_id)
        for step in steps[:crash_after]:
            getattr(run, step)()
        if steps[crash_after - 1] in ("write", "verify"):
            left.append(Path(run.temporary).name)
        assert redis_client.exists(steps_key(job_id))
        assert served(stack, job_id, view["steps_done"]) == before, steps[crash_after - 1]

    # The one left after `publish` ran its last step: the job is archived, by that file.
    assert run.mark() == "ok"
    assert not redis_client.exists(steps_key(job_id))
    assert served(stack, job_id, view["steps_done"]) == before

    # Run again from scratch: exactly one file, nothing to do twice. The dead archivers'
    # temporary files stay (a writer removes only its own: they might be alive) until they
    # are old enough (test_a_crash_before_marking_is_finished_by_the_next_run) or the job goes.
    stale = ArchiveRun(archiving_store, archive, job_id)
    assert stale.read() is False
    assert archive_job(archiving_store, archive, job_id) == "skipped"
    assert run.mark() == "archived"
    mine = [f for f in _files(folder) if f.startswith(job_id)]
    assert mine == sorted([f"{job_id}.parquet", *left])
    assert served(stack, job_id, view["steps_done"]) == before


def test_a_crash_before_marking_is_finished_by_the_next_run(
    stack: Stack,
    client: Client,
    redis_client: "redis.Redis",
    archive: Archive,
    archiving_store: Store,
) -> None:
    job_id = client.submit({**SPECS["full batch, bias"], "steps": 300})["id"]
    view = client.wait(job_id, timeout=60)
    before = served(stack, job_id, view["steps_done"])
    crashed = ArchiveRun(archiving_store, archive, job_id)
    for step in ("read", "write", "verify"):
        getattr(crashed, step)()  # dies holding a verified temporary file
    # ...long enough ago that no live writer can hold it: the next run removes it.
    then = time.time() - STALE_TEMPORARY_S - 60
    os.utime(crashed.temporary, (then, then))

    assert archive_job(archiving_store, archive, job_id) == "ok"
    folder = stack.archive_dir / "alice"
    assert [f for f in _files(folder) if f.startswith(job_id)] == [f"{job_id}.parquet"]
    assert served(stack, job_id, view["steps_done"]) == before


def test_deleting_an_archived_job_removes_its_file_and_frees_its_bytes(
    stack: Stack, redis_client: "redis.Redis", archive: Archive, archiving_store: Store
) -> None:
    with Client(stack.api_url, stack.keys["bob"], timeout=10) as bob:
        job_id = bob.submit(SPECS["mini-batch"])["id"]
        view = bob.wait(job_id, timeout=60)
        kept = archiving_store.tenant_bytes("bob")
        job_bytes = int(redis_client.hget(job_key(job_id), "bytes") or 0)
        assert job_bytes > 0
        assert archive_job(archiving_store, archive, job_id) == "ok"
        assert archiving_store.tenant_bytes("bob") == kept  # archived steps still count
        path = Path(archive.job_path("bob", job_id))
        assert path.exists()
        assert len(list(bob.steps(job_id))) == view["steps_done"]

        bob.delete(job_id)

        assert not path.exists()
        assert not redis_client.exists(job_key(job_id))
        assert archiving_store.tenant_bytes("bob") == kept - job_bytes


def test_archiving_makes_room_in_a_full_redis(tmp_path: Path) -> None:
    """Every write of the archiver's is allowed on a Redis past its maxmemory: archiving is
    what frees it."""
    private = Stack(tmp_path)  # a Redis of its own: this one is made full
    private.start_redis()
    archive = Archive(str(tmp_path / "archive"))
    store = Store.from_url(private.redis_url, archive)
    try:
        spec = JobSpec.model_validate({**SPECS["full batch, bias"], "steps": 5000})
        job_id, _ = store.create_job(spec, "cpu", "cpu", "test")
        run_job(store, job_id, "test-worker", torch.device("cpu"), get_settings())
        steps = stored_steps(store, job_id)
        store.redis.config_set("maxmemory", 1)
        with pytest.raises(StorageFull):
            store.create_job(spec, "cpu", "cpu", "test")

        assert archive_due(store, archive, hot_retention_s=0) == [job_id]

        assert not store.redis.exists(steps_key(job_id))  # room made (bench/archive.py: how much)
        assert stored_steps(store, job_id) == steps
    finally:
        store.redis.close()
        private.kill_redis()  # nothing of it is needed again: no clean shutdown to wait for
        private.stop()
