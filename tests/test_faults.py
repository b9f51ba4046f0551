"""Nothing lost, nothing twice: real workers, Redis and the API killed, paused and restarted
mid-job. Each test checks the invariant (tests/faults.py) against an uninterrupted run.

A job interrupted mid-job is an endless one: it is still running when the fault comes,
however fast the machine; once it has gone on past the fault, the test cancels it and checks
the steps it stored (0 .. n-1, each once, as an uninterrupted run's first n)."""

import asyncio
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection

from api.client import AsyncClient, Client, Event
from cli.stack import Stack, stop_process, wait_until
from services.store.keys import lease_key
from services.store.recovery import message_job_id
from tests.faults import (
    FAULT_ENV,
    assert_cancelled_exactly,
    cancel,
    endless_spec,
    holder_of,
    kill_group,
    kill_pool_child,
    long_spec,
    redis_and_api,
    send_duplicate,
    wait_for_steps,
)

LEASE_S = float(FAULT_ENV["GRADSTREAM_LEASE_S"])
REAPER_S = float(FAULT_ENV["GRADSTREAM_REAPER_INTERVAL_S"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with redis_and_api(tmp_path_factory.mktemp("faults"), FAULT_ENV) as local:
        yield local


@pytest.fixture
def api(stack: Stack) -> Iterator[Client]:
    with Client(stack.api_url, stack.api_key, timeout=10) as client:
        yield client


class Workers:
    """CPU workers started for one test, all stopped at its end."""

    def __init__(self, stack: Stack, api: Client) -> None:
        self.stack, self.api, self.started = stack, api, []  # type: ignore[var-annotated]

    def start(self, concurrency: int = 1, **env: str) -> "subprocess.Popen[bytes]":
        worker = self.stack.start_worker("cpu", concurrency, **env)
        self.started.append(worker)
        wait_until(
            lambda: any(w["name"].startswith(f"cpu-{worker.pid}@") for w in self.api.workers()),
            60,
            f"worker {worker.pid} registered",
        )
        return worker

    def log(self, worker: "subprocess.Popen[bytes]") -> str:
        # Stack names each worker's log after its place among the stack's processes.
        for name, process in self.stack.processes:
            if process is worker:
                return (self.stack.run_dir / f"{name}.log").read_text(errors="replace")
        raise LookupError(worker.pid)

    def stop_all(self) -> None:
        for worker in self.started:
            with_group = worker.poll() is None
            if with_group:
                # A paused worker must run again to shut down.
                kill_group(worker, signal.SIGCONT)
            stop_process(worker)


@pytest.fixture
def workers(stack: Stack, api: Client) -> Iterator[Workers]:
    started = Workers(stack, api)
    try:
        yield started
    finally:
        started.stop_all()


STATEFUL = {
    # Mini-batches of 10 (7 per epoch: a kill lands mid-epoch 6 times in 7; the resume from a
    # checkpoint mid-epoch for certain is in tests/test_optimizers.py), and optimizers whose
    # state is in the checkpoint.
    "sgd-nesterov": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True},
    "adam-cosine": {"name": "adam", "lr": 0.01, "schedule": {"name": "cosine"}},
}


@pytest.mark.parametrize("optimizer", [None, *STATEFUL])
def test_sigkill_of_pool_child_resumes_from_checkpoint(
    api: Client, workers: Workers, optimizer: str | None
) -> None:
    worker = workers.start()
    spec = endless_spec(seed=1)
    if optimizer is not None:
        spec = {**spec, "optimizer": STATEFUL[optimizer], "batch_size": 10, "shuffle_seed": 3}
    job = api.submit(spec)
    wait_for_steps(api, job["id"], 1000)
    kill_pool_child(worker)
    killed_at = api.get(job["id"])["steps_done"]  # nothing stores steps until attempt 2
    wait_for_steps(api, job["id"], killed_at + 1000)
    assert cancel(api, job["id"])["attempt"] == 2
    assert_cancelled_exactly(api, job["id"], spec)


def lease_lapsed(stack: Stack, job_id: str) -> bool:
    """Whether the job's lease has run out: its key expires with it, by Redis's clock."""
    client = redis.Redis.from_url(stack.redis_url)
    try:
        return not client.exists(lease_key(job_id))
    finally:
        client.close()


def test_sigkill_of_whole_worker_then_new_worker_resumes_within_lease(
    stack: Stack, api: Client, workers: Workers
) -> None:
    first = workers.start()
    spec = endless_spec(seed=2)
    job = api.submit(spec)
    wait_for_steps(api, job["id"], 1000)
    kill_group(first)
    # Nothing runs the job now; its lease lapses, but no worker is there to notice.
    stopped_at = api.get(job["id"])["steps_done"]
    wait_until(lambda: lease_lapsed(stack, job["id"]), LEASE_S + 5, "the lease lapsed")
    assert api.get(job["id"])["steps_done"] == stopped_at
    assert api.get(job["id"])["status"] == "running"
    workers.start()
    ready = time.monotonic()
    wait_until(lambda: api.get(job["id"])["attempt"] == 2, LEASE_S + REAPER_S + 2, "resume")
    # README: a job whose worker died resumes within lease_s + reaper_interval_s of a live
    # worker being there (here 2.5 s; 12 s with the default settings).
    assert time.monotonic() - ready <= LEASE_S + REAPER_S + 2
    wait_for_steps(api, job["id"], stopped_at + 1000)
    cancel(api, job["id"])
    assert_cancelled_exactly(api, job["id"], spec)


def test_same_job_handed_to_two_workers_is_written_by_one(
    stack: Stack, api: Client, workers: Workers
) -> None:
    # A broker redelivers a running job's message once its visibility timeout passes
    # (celery#5935). Kombu only scans for such messages on a slow timer (10 s, then every
    # 100 s), so the test hands the second worker the job's message directly: the same
    # event as far as the workers can tell.
    first, second = workers.start(), workers.start()
    spec = endless_spec(seed=3)
    job = api.submit(spec)
    wait_for_steps(api, job["id"], 500)
    send_duplicate(stack.redis_url, job["id"])
    skipped = f"job {job['id']} not run: busy running"
    wait_until(lambda: skipped in workers.log(first) + workers.log(second), 15, "duplicate seen")
    wait_for_steps(api, job["id"], api.get(job["id"])["steps_done"] + 500)
    assert cancel(api, job["id"])["attempt"] == 1
    assert_cancelled_exactly(api, job["id"], spec)


def test_worker_paused_past_its_lease_has_its_writes_refused(api: Client, workers: Workers) -> None:
    pair = [workers.start(), workers.start()]
    spec = endless_spec(seed=4)
    job = api.submit(spec)
    wait_for_steps(api, job["id"], 500)
    paused = holder_of(api, job["id"], pair)
    kill_group(paused, signal.SIGSTOP)
    # The other worker's reaper sees the lapsed lease; the other worker takes the job over.
    wait_until(lambda: api.get(job["id"])["attempt"] == 2, 30, "takeover")
    kill_group(paused, signal.SIGCONT)
    wait_until(lambda: "fenced" in workers.log(paused), 15, "paused attempt fenced")
    wait_for_steps(api, job["id"], api.get(job["id"])["steps_done"] + 500)
    cancel(api, job["id"])
    assert_cancelled_exactly(api, job["id"], spec)


def test_sigterm_checkpoints_and_hands_the_job_back(api: Client, workers: Workers) -> None:
    worker = workers.start()
    spec = endless_spec(seed=5)
    job = api.submit(spec)
    wait_for_steps(api, job["id"], 1000)
    worker.send_signal(signal.SIGTERM)
    worker.wait(15)  # a warm shutdown that does not wait for the whole job
    view = api.get(job["id"])
    assert view["status"] == "queued", view
    assert "shutting down" in view["route_reason"]
    assert 1000 <= view["steps_done"] < spec["steps"]
    assert view["finished_at"] is None and view["error"] is None
    workers.start()
    wait_for_steps(api, job["id"], view["steps_done"] + 1000)
    assert cancel(api, job["id"])["attempt"] == 2
    assert_cancelled_exactly(api, job["id"], spec)


def test_redis_killed_with_aof_and_restarted_mid_job(
    stack: Stack, api: Client, workers: Workers
) -> None:
    workers.start()
    spec = endless_spec(seed=6)
    job = api.submit(spec)
    # A client watching the job's stream across the outage: its reconnects meet refused
    # connections and 503s (the API cannot reach Redis) until Redis is back, then resume.
    watched: list[int] = []
    failed: list[BaseException] = []

    def watch() -> None:
        try:
            with Client(stack.api_url, stack.api_key, timeout=10) as watcher:
                for event in watcher.stream(job["id"]):
                    if event.event == "step":
                        watched.append(event.data["step"])
        except BaseException as exc:  # reported by the test below
            failed.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    wait_for_steps(api, job["id"], 2000)
    port = stack.kill_redis()
    wait_until(lambda: api.http.get("/readyz").status_code == 503, 10, "the API sees no Redis")
    stack.start_redis(port)
    view = wait_for_steps(api, job["id"], 2000, timeout=120, outage=True)
    wait_for_steps(api, job["id"], view["steps_done"] + 1000, timeout=120, outage=True)
    cancel(api, job["id"])
    stored = assert_cancelled_exactly(api, job["id"], spec)
    watcher.join(60)
    assert not watcher.is_alive() and not failed, failed
    assert watched == list(range(stored))


def test_redis_down_at_submit_is_503_and_writes_nothing(stack: Stack, api: Client) -> None:
    client = redis.Redis.from_url(stack.redis_url)
    jobs_before = client.zcard("gs:jobs")
    port = stack.kill_redis()
    try:
        response = api.http.post("/v1/jobs", json=long_spec(steps=10))
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
        assert api.http.get("/readyz").status_code == 503
    finally:
        stack.start_redis(port)
    wait_until(lambda: api.http.get("/readyz").status_code == 200, 10, "ready again")
    assert client.zcard("gs:jobs") == jobs_before
    client.close()


def test_idempotency_key_makes_a_retried_submit_return_the_same_job(
    stack: Stack, api: Client
) -> None:
    client = redis.Redis.from_url(stack.redis_url)
    jobs_before = client.zcard("gs:jobs")
    headers = {"Idempotency-Key": f"retry-{time.time_ns()}"}
    first = api.http.post("/v1/jobs", json=long_spec(steps=10), headers=headers)
    again = api.http.post("/v1/jobs", json=long_spec(steps=10), headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    assert client.zcard("gs:jobs") == jobs_before + 1
    other = api.http.post("/v1/jobs", json=long_spec(steps=10), headers={"Idempotency-Key": "x y"})
    assert other.status_code == 422
    api.cancel(first.json()["id"])
    client.close()


def test_cancelled_jobs_are_never_resumed_by_a_redelivery(
    stack: Stack, api: Client, workers: Workers
) -> None:
    worker = workers.start()
    waiting = api.submit({**long_spec(steps=100), "device": "cuda"})  # no gpu worker: queued
    assert api.http.post(f"/v1/jobs/{waiting['id']}/cancel").json()["status"] == "cancelled"

    running = api.submit(endless_spec(seed=7))
    wait_for_steps(api, running["id"], 500)
    api.cancel(running["id"])
    view = api.wait(running["id"], timeout=10)
    assert view["status"] == "cancelled"

    for job in (waiting, running):
        send_duplicate(stack.redis_url, job["id"])
        wait_until(
            lambda job=job: f"job {job['id']} not run: finished cancelled" in workers.log(worker),
            15,
            "duplicate delivery skipped",
        )
    assert api.get(waiting["id"])["steps_done"] == 0
    after = api.get(running["id"])
    assert after["status"] == "cancelled" and after["steps_done"] == view["steps_done"]


def test_poison_job_that_kills_its_worker_fails_after_max_attempts(
    api: Client, workers: Workers
) -> None:
    worker = workers.start()
    job = api.submit(endless_spec(seed=8))
    killed = 0
    deadline = time.monotonic() + 90
    while api.get(job["id"])["status"] != "failed":
        assert time.monotonic() < deadline, api.get(job["id"])
        view = api.get(job["id"])
        if view["status"] == "running" and view["attempt"] > killed and view["steps_done"] > 0:
            kill_pool_child(worker)  # every attempt of this job "crashes" its worker
            killed = view["attempt"]
        time.sleep(0.1)
    view = api.get(job["id"])
    assert view["attempt"] == 3 and killed == 3
    assert "worker lost 3 time(s)" in view["error"]
    # The worker itself survived all of it and runs the next job.
    healthy = api.submit(long_spec(steps=50))
    assert api.wait(healthy["id"], timeout=30)["status"] == "succeeded"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_sse_client_misses_nothing_across_an_api_restart(
    stack: Stack, api: Client, workers: Workers, kind: str
) -> None:
    workers.start()
    spec = endless_spec(seed=9)
    job = api.submit(spec)
    port = int(stack.api_url.rsplit(":", 1)[1])
    steps: list[dict[str, object]] = []
    restarted = False

    def on_event(event: Event) -> None:
        nonlocal restarted
        if event.event == "step":
            steps.append(event.data)
            if len(steps) == 1000 and not restarted:
                stop_process(stack.api_process)
                stack.start_api(port)
                restarted = True
            elif len(steps) == 2000:  # well after the reconnect: the stream ends with `done`
                api.cancel(job["id"])
        elif event.event == "done":
            assert event.data["status"] == "cancelled"

    if kind == "sync":
        with Client(stack.api_url, stack.api_key, timeout=10) as watcher:
            for event in watcher.stream(job["id"], retries=20):
                on_event(event)
    else:

        async def follow() -> None:
            async with AsyncClient(stack.api_url, stack.api_key, timeout=10) as watcher:
                async for event in watcher.stream(job["id"], retries=20):
                    on_event(event)

        asyncio.run(follow())
    assert restarted
    stored = assert_cancelled_exactly(api, job["id"], spec)
    assert [s["step"] for s in steps] == list(range(stored))
    assert steps == list(api.steps(job["id"]))


def _unacked_delivery(client: "redis.Redis", job_id: str) -> str:
    """The delivery tag under which kombu's Redis transport keeps the job's unacknowledged
    message (`unacked`: tag -> [message, exchange, routing key])."""
    for tag, entry in client.hgetall("unacked").items():
        message = json.loads(entry)[0]
        if message_job_id(json.dumps(message).encode()) == job_id:
            return str(tag.decode())
    raise LookupError(f"no unacked message for {job_id}")


def test_a_redelivery_while_the_job_runs_is_skipped_and_recovery_rests_on_the_lease(
    stack: Stack, api: Client, workers: Workers
) -> None:
    # What the broker does when a running job's visibility timeout passes (kombu's
    # restore_visible): the same message (same delivery tag) goes back to the queue, and
    # another worker receives it while the first still runs the job.
    pair = [workers.start(), workers.start()]
    spec = endless_spec(seed=21)
    job = api.submit(spec)
    wait_for_steps(api, job["id"], 500)
    first = holder_of(api, job["id"], pair)
    second = next(w for w in pair if w is not first)
    client = redis.Redis.from_url(stack.redis_url)
    tag = _unacked_delivery(client, job["id"])
    with Connection(stack.redis_url) as broker:
        broker.default_channel.qos.restore_by_tag(tag, leftmost=True)
    skipped = f"job {job['id']} not run: busy running"
    wait_until(lambda: skipped in workers.log(second), 15, "redelivery skipped")
    # The skip acknowledged the message, and with it the one unacked record both deliveries
    # shared: the broker no longer knows the first delivery.
    wait_until(lambda: tag.encode() not in client.hkeys("unacked"), 10, "redelivery acked")
    # So when the first worker dies, the broker has nothing to deliver again; the job's
    # lease lapses and the reaper sends it again.
    assert api.get(job["id"])["status"] == "running"
    kill_pool_child(first)
    killed_at = api.get(job["id"])["steps_done"]
    wait_for_steps(api, job["id"], killed_at + 1000)
    assert cancel(api, job["id"])["attempt"] == 2
    assert_cancelled_exactly(api, job["id"], spec)
    client.close()
