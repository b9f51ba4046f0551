"""Stored data is bounded (DESIGN §10): record width, page bytes, listings without data, a
full Redis, per-tenant storage, and deleting what was stored."""

import hashlib
import io
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch

from api.client import Client, GradstreamError
from cli.stack import Stack, wait_until
from services.attempts import Outcome
from services.config import Settings
from services.errors import DatasetNotFound
from services.runner import run_job
from services.schemas import JobSpec, JobStatus
from services.store import Store
from services.store.keys import job_keys, tenant_storage
from tests.attempts import stored_steps
from tests.conftest import SEED_EXAMPLE
from tests.faults import endless_spec, reference_run, send_duplicate
from tests.test_cli import _run

QUEUED = {**SEED_EXAMPLE, "device": "cuda"}  # no gpu worker: it stays queued


def test_a_job_wider_than_max_params_is_refused_naming_the_limit(client: Client) -> None:
    # 8 MB per step record: today's limit on samples x features alone let it through.
    wide = {"data": {"synthetic": {"n": 100, "d": 1_000_000}}, "steps": 10, "device": "cuda"}
    response = client.http.post("/v1/jobs", json=wide)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "data"] and "max_params is 10000" in error["msg"]
    # 9 999 features and a bias are 10 000 parameters: just under.
    under = {**wide, "data": {"synthetic": {"n": 1, "d": 9_999}}, "bias": True}
    accepted = client.http.post("/v1/jobs", json=under)
    assert accepted.status_code == 201, accepted.text
    client.cancel(accepted.json()["id"])


def test_pages_of_a_wide_job_are_bounded_in_bytes_and_follow_next(client: Client) -> None:
    # 10 000 parameters: each record is ~500 kB of JSON, so a page of the default 8 MiB holds
    # 16 of them, whatever `limit` asks for; `next` leads through the rest, entries included
    # that hold more steps than one page.
    spec = {
        "data": {"synthetic": {"n": 8, "d": 10_000}},
        "optimizer": {"lr": 1e-5},
        "steps": 40,
        "device": "cpu",
    }
    job = client.submit(spec)
    assert client.wait(job["id"], timeout=60)["status"] == "succeeded"
    response = client.http.get(f"/v1/jobs/{job['id']}/steps", params={"limit": 5000})
    page = response.json()
    assert len(response.content) <= 8 * 1024 * 1024
    assert [s["step"] for s in page["steps"]] == list(range(16)) and page["next"] == 15
    assert [s["step"] for s in client.steps(job["id"], page=5000)] == list(range(40))
    # The event stream replays the same steps, in reads of the same size.
    streamed = [e.data["step"] for e in client.stream(job["id"]) if e.event == "step"]
    assert streamed == list(range(40))


def test_listings_show_inline_data_as_its_shape_and_never_read_the_spec(
    client: Client, redis_client: "redis.Redis"
) -> None:
    x = [[float(i), 1.0] for i in range(1000)]
    spec = {**QUEUED, "data": {"x": x, "y": [0.0] * 1000}, "init": None}
    job = client.submit(spec)
    listed = next(j for j in client.jobs(limit=10) if j["id"] == job["id"])
    assert listed["spec"]["data"] == {"inline": {"samples": 1000, "features": 2}}
    assert listed["spec"]["steps"] == spec["steps"] and listed["status"] == "queued"
    assert client.get(job["id"])["spec"]["data"]["x"] == x
    # A listing does not validate (or even read) whole specs: a record whose spec could no
    # longer be read back is still listed.
    redis_client.hset(job_keys(job["id"])[0], "spec", '{"data": "unreadable"}')
    assert job["id"] in [j["id"] for j in client.jobs(limit=10)]
    redis_client.hset(job_keys(job["id"])[0], "status", "cancelled")  # out of the live indexes
    redis_client.zrem("gs:jobs:queued", job["id"])


@pytest.fixture
def full_redis(redis_client: "redis.Redis") -> Iterator["redis.Redis"]:
    """The session's Redis with a maxmemory below what it holds: every write that may grow
    memory is refused, as on a full deployment, until the test ends."""
    before = redis_client.config_get("maxmemory")["maxmemory"]
    assert redis_client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    assert int(before) > 0  # every Redis the project starts has a ceiling
    redis_client.config_set("maxmemory", 1)
    try:
        yield redis_client
    finally:
        redis_client.config_set("maxmemory", before)


def test_a_full_redis_is_a_507_with_nothing_half_written(
    client: Client, redis_client: "redis.Redis", full_redis: "redis.Redis"
) -> None:
    jobs_before = redis_client.zcard("gs:jobs")
    keys_before = redis_client.dbsize()
    headers = {"Idempotency-Key": f"full-{time.time_ns()}"}
    response = client.http.post("/v1/jobs", json=QUEUED, headers=headers)
    assert response.status_code == 507, response.text
    assert "storage is full" in response.json()["detail"]
    upload = client.http.post("/v1/datasets", content=b"a,y\n1,2\n3,4\n")
    assert upload.status_code == 507, upload.text
    assert redis_client.zcard("gs:jobs") == jobs_before
    assert redis_client.dbsize() <= keys_before + 1  # the submit counter of this minute
    assert client.http.get("/v1/jobs").status_code == 200  # reads go on


def test_a_flush_refused_for_memory_hands_the_job_back_to_resume_later(
    store: Store, redis_client: "redis.Redis"
) -> None:
    # An endless job, run in this process: it is still running when Redis fills up, however
    # fast the machine; its second attempt is cancelled once it has gone on from the checkpoint.
    spec = endless_spec()
    job_id, _ = store.create_job(JobSpec.model_validate(spec), "cpu", "test-nobody", "test")
    cpu = torch.device("cpu")

    def attempt(results: list[Any]) -> threading.Thread:
        run = threading.Thread(
            target=lambda: results.append(run_job(store, job_id, "test-worker", cpu, Settings()))
        )
        run.start()
        return run

    first: list[Any] = []
    before = redis_client.config_get("maxmemory")["maxmemory"]
    running = attempt(first)
    try:
        wait_until(lambda: store.get_job(job_id).steps_done > 0, 30, "first steps stored")
        redis_client.config_set("maxmemory", 1)
        running.join(60)
    finally:
        redis_client.config_set("maxmemory", before)
    assert [result.outcome for result in first] == [Outcome.RELEASED]
    view = store.get_job(job_id)
    assert view.status is JobStatus.QUEUED and "Redis is full" in view.route_reason
    assert view.steps_done > 0 and view.error is None

    second: list[Any] = []
    running = attempt(second)
    wait_until(
        lambda: store.get_job(job_id).steps_done > view.steps_done + 100, 30, "steps resumed"
    )
    store.cancel_job(job_id)
    running.join(60)
    assert [result.outcome for result in second] == [Outcome.CANCELLED]
    stored = stored_steps(store, job_id)
    assert [s["step"] for s in stored] == list(range(len(stored)))
    assert stored == reference_run(spec, len(stored)).steps


@pytest.fixture(scope="module")
def small_storage(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API of its own (on the session's Redis) whose tenants keep at most 100 kB each."""
    api = Stack(tmp_path_factory.mktemp("storage"), tenants=("kaori",))
    api.redis_url = stack.redis_url
    try:
        api.start_api(GRADSTREAM_TENANT_STORAGE_BYTES="100000")
        yield api
    finally:
        api.stop()


def test_tenant_storage_is_counted_up_front_and_deleting_frees_it(
    small_storage: Stack, redis_client: "redis.Redis"
) -> None:
    def used() -> int:
        return int(redis_client.get(tenant_storage("kaori")) or 0)

    assert used() == 0
    with Client(small_storage.api_url, small_storage.keys["kaori"], timeout=10) as kaori:
        # The seed's record is 3 float32 values: 5 000 steps reserve 60 000 bytes.
        first = kaori.submit({**QUEUED, "steps": 5000})
        assert 60_000 < used() < 61_000
        refused = kaori.http.post("/v1/jobs", json={**QUEUED, "steps": 5000})
        assert refused.status_code == 429, refused.text
        assert refused.json()["limit"] == "tenant_storage_bytes"
        assert "100000" in refused.json()["detail"]
        # Cancelled before it ran, it keeps its spec only; deleted, nothing.
        kaori.cancel(first["id"])
        assert 0 < used() < 1000
        second = kaori.submit({**QUEUED, "steps": 5000})
        kaori.cancel(second["id"])
        kaori.delete(first["id"])
        kaori.delete(second["id"])
        assert used() == 0


def test_deleting_a_job_removes_everything_stored_of_it(
    stack: Stack, client: Client, redis_client: "redis.Redis"
) -> None:
    headers = {"Idempotency-Key": f"delete-{time.time_ns()}"}
    queued = client.http.post("/v1/jobs", json=QUEUED, headers=headers).json()
    refused = client.http.delete(f"/v1/jobs/{queued['id']}")
    assert refused.status_code == 409 and refused.json()["status"] == "queued"
    client.cancel(queued["id"])
    with Client(stack.api_url, stack.keys["bob"], timeout=10) as bob:
        assert bob.http.delete(f"/v1/jobs/{queued['id']}").status_code == 404
    assert client.http.delete(f"/v1/jobs/{queued['id']}").status_code == 204
    assert client.http.get(f"/v1/jobs/{queued['id']}").status_code == 404
    assert client.http.delete(f"/v1/jobs/{queued['id']}").status_code == 404
    # The idempotency key is free again: the same submit makes a new job.
    again = client.http.post("/v1/jobs", json=QUEUED, headers=headers).json()
    assert again["id"] != queued["id"]
    client.cancel(again["id"])

    ran = client.submit({**SEED_EXAMPLE, "steps": 50})
    client.wait(ran["id"], timeout=30)
    out = _run(stack, "delete", ran["id"])
    assert out.returncode == 0 and ran["id"] in out.stdout, out.stderr
    assert not any(redis_client.exists(key) for key in job_keys(ran["id"]))
    assert ran["id"] not in [j["id"] for j in client.jobs(limit=500)]
    with pytest.raises(GradstreamError) as missing:
        client.delete(ran["id"])
    assert missing.value.status_code == 404


_npz_bytes: dict[str, bytes] = {}  # the uploads made, by dataset id


def _npz(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    np.savez(buffer, x=rng.normal(size=(20, 2)), y=rng.normal(size=20))
    content = buffer.getvalue()
    _npz_bytes[hashlib.sha256(content).hexdigest()] = content
    return content


def test_deleting_a_dataset_drops_the_tenants_reference_and_the_last_one_the_bytes(
    stack: Stack, client: Client, redis_client: "redis.Redis"
) -> None:
    content = _npz(seed=time.time_ns() % 2**32)
    dataset = client.upload_dataset(content)
    key = f"gs:dataset:{dataset['id']}"
    with Client(stack.api_url, stack.keys["bob"], timeout=10) as bob:
        assert bob.upload_dataset(content)["id"] == dataset["id"]
        job = client.submit({**QUEUED, "data": {"dataset_id": dataset["id"]}, "init": None})
        busy = client.http.delete(f"/v1/datasets/{dataset['id']}")
        assert busy.status_code == 409 and busy.json()["job"] == job["id"]
        client.cancel(job["id"])
        assert client.http.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
        assert client.http.get(f"/v1/datasets/{dataset['id']}").status_code == 404
        assert redis_client.exists(key)  # bob still refers to it
        assert bob.http.get(f"/v1/datasets/{dataset['id']}").status_code == 200
        bob.delete_dataset(dataset["id"])
        assert not redis_client.exists(key)


def test_a_lost_message_is_resent_even_behind_a_backlog(stack: Stack, store: Store) -> None:
    queue = f"test-orphans-{time.time_ns()}"
    spec = JobSpec.model_validate(SEED_EXAMPLE)
    lost, _ = store.create_job(spec, "cpu", queue, "test")
    waiting, _ = store.create_job(spec, "cpu", queue, "test")
    # A backlog: messages for other jobs, and one for `waiting`; none for `lost`.
    for job_id in ("a" * 32, "b" * 32, waiting):
        send_duplicate(stack.redis_url, job_id, queue)
    old = int(store.redis_time()) - 100
    for job_id in (lost, waiting):
        store.redis.hset(job_keys(job_id)[0], "queued_at", old)
    orphans = store.orphaned_jobs(older_than_s=30)
    assert (lost, queue) in orphans and (waiting, queue) not in orphans
    # Checked once per `older_than_s`: the next look is that long away.
    assert (lost, queue) not in store.orphaned_jobs(older_than_s=30)
    for job_id in (lost, waiting):
        store.cancel_job(job_id)
    store.redis.delete(queue)


def test_the_local_redis_runs_with_a_memory_ceiling(redis_client: "redis.Redis") -> None:
    assert int(redis_client.config_get("maxmemory")["maxmemory"]) > 0
    assert redis_client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"


def test_a_page_of_steps_is_json_the_client_reads_as_before(client: Client) -> None:
    job = client.submit({**SEED_EXAMPLE, "steps": 30})
    client.wait(job["id"], timeout=30)
    page = httpx.get(
        f"{client.http.base_url}/v1/jobs/{job['id']}/steps",
        params={"after": 9, "limit": 5},
        headers=client.http.headers,
    ).json()
    assert [s["step"] for s in page["steps"]] == [10, 11, 12, 13, 14] and page["next"] == 14
    assert json.loads(json.dumps(page)) == page


def test_a_live_watcher_of_a_wide_job_gets_every_step_on_one_connection(
    stack: Stack, client: Client
) -> None:
    # 1 000 features: a chunk flushed every 20 ms holds megabytes of JSON. The tail reads and
    # hands them to its watchers a page at a time, so a watcher that keeps reading is never
    # dropped for lag (no reconnect here: one connection from status to done).
    spec = {
        "data": {"synthetic": {"n": 8, "d": 1000}},
        "optimizer": {"lr": 1e-4},
        "steps": 3000,
        "device": "cpu",
    }
    job = client.submit(spec)
    steps, done = [], False
    url = f"{stack.api_url}/v1/jobs/{job['id']}/events"
    with httpx.stream("GET", url, headers=stack.auth(), timeout=60) as events:
        for line in events.iter_lines():
            if line.startswith("id: "):
                steps.append(int(line[4:]))
            if line.startswith("event: done"):
                done = True
                break
    assert done and steps == list(range(3000))


def test_a_load_of_a_dropped_dataset_leaves_nothing_behind(client: Client, store: Store) -> None:
    dataset = client.upload_dataset(_npz(seed=time.time_ns() % 2**32))
    client.delete_dataset(dataset["id"])
    with pytest.raises(DatasetNotFound):
        store.load_dataset(dataset["id"])
    assert not store.redis.exists(f"gs:dataset:{dataset['id']}")
    # The same bytes uploaded again are stored again, whole.
    again = client.upload_dataset(_npz_bytes[dataset["id"]])
    assert again["id"] == dataset["id"] and store.load_dataset(dataset["id"])[2] == 20
    client.delete_dataset(dataset["id"])
