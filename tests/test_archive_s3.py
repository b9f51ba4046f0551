"""History beyond Redis memory on an object store: a stack whose workers archive to `s3://` on a
real S3-compatible server process (moto's server mode, on a free port), a job and a sweep's
members kept hot by the worker that trained them, archived by a worker whose hot window is 0
and read back byte for byte, and deletes that remove their objects.

The archive's file system is configured as in a deployment: GRADSTREAM_ARCHIVE_URL and
GRADSTREAM_ARCHIVE_OPTIONS (s3fs's endpoint and credentials, as JSON)."""

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import s3fs

from api.client import Client
from cli.stack import Stack, free_port, stop_process, wait_until
from services.archive import ArchivedFile
from services.store.keys import job_key, steps_key
from tests.conftest import TEST_ENV
from tests.test_archive import SPECS, served
from tests.test_metrics import _scrape

BUCKET = "gradstream-archive"
# The worker that trains keeps finished jobs hot for an hour: the test reads them from Redis
# first, whatever the time that takes. Then a worker with the stack's hot window, 0, archives.
TRAINER_HOT_RETENTION_S = "3600"


@pytest.fixture(scope="module")
def s3_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, Any]]]:
    """A moto S3 server process with one bucket, and a stack whose workers archive there (the
    one it starts keeps jobs hot for an hour): the stack, and the options s3fs needs to reach
    the server. All start at once (the worker, the slowest, first)."""
    run_dir = Path(tmp_path_factory.mktemp("s3-stack"))
    port = free_port()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "test", "secret": "test"}
    env = {
        **TEST_ENV,
        "GRADSTREAM_ARCHIVE_URL": f"s3://{BUCKET}/history",
        "GRADSTREAM_ARCHIVE_OPTIONS": json.dumps(options),
        "GRADSTREAM_HOT_RETENTION_S": "0",
        "GRADSTREAM_ARCHIVE_INTERVAL_S": "0.2",
    }
    local = Stack(run_dir, env=env, tenants=("alice",))
    log = (run_dir / "moto.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        local.start_redis()
        local.start_worker("cpu", GRADSTREAM_HOT_RETENTION_S=TRAINER_HOT_RETENTION_S)
        local.start_api()
        wait_until(
            lambda: httpx.get(options["endpoint_url"], timeout=1).status_code < 500, 30, "moto"
        )
        s3fs.S3FileSystem(**options).mkdir(BUCKET)
        local.wait_for_workers({"cpu"})
        yield local, options
    finally:
        local.stop()
        stop_process(server)
        log.close()


def _archived(client: "redis.Redis", job_id: str) -> ArchivedFile:
    wait_until(lambda: client.hexists(job_key(job_id), "archived"), 60, f"job {job_id} archived")
    return ArchivedFile.from_json(client.hget(job_key(job_id), "archived") or b"")


def test_the_worker_archives_jobs_and_sweep_members_to_s3(
    s3_stack: tuple[Stack, dict[str, Any]],
) -> None:
    stack, s3_options = s3_stack
    bucket = s3fs.S3FileSystem(**s3_options)
    store = redis.Redis.from_url(stack.redis_url)
    sweep_spec = {
        "base": {**SPECS["full batch, bias"], "steps": 400},
        "grid": {"optimizer.lr": [0.01, 0.02]},
    }
    with Client(stack.api_url, stack.api_key, timeout=10) as client:
        job_id = client.submit(SPECS["mini-batch"])["id"]
        sweep = client.submit_sweep(sweep_spec)
        client.wait(job_id, timeout=60)
        members = [m["id"] for m in client.wait_sweep(sweep["id"], timeout=60)["members"]]
        before = {}
        for some_id in [job_id, *members]:
            assert store.exists(steps_key(some_id))  # hot: read from Redis
            before[some_id] = served(stack, some_id, client.get(some_id)["steps_done"])

        stack.start_worker("cpu")  # the stack's hot window: it archives every finished job
        for some_id in [job_id, *members]:
            archived = _archived(store, some_id)
            assert not store.exists(steps_key(some_id))
            assert served(stack, some_id, archived.rows) == before[some_id]
        job_url = _archived(store, job_id).url
        assert job_url == f"s3://{BUCKET}/history/alice/{job_id}.parquet"
        member_folder = f"{BUCKET}/history/alice/sweeps/{sweep['id']}"
        bucket.invalidate_cache()
        assert sorted(bucket.ls(member_folder)) == sorted(
            f"{member_folder}/{m}.parquet" for m in members
        )

        metrics = _scrape(stack)
        assert metrics[("gradstream_unarchived_jobs", ())] == 0
        assert metrics[("gradstream_archive_overdue_jobs", ())] == 0

        client.delete(job_id)
        client.delete_sweep(sweep["id"])
    bucket.invalidate_cache()
    assert bucket.find(f"{BUCKET}/history") == []
    store.close()
