"""What an operator's Celery monitor shows for each way a job ends: a real worker, and the task
events read as Flower reads them (an event receiver on the broker feeding
celery.events.state.State).

A succeeded job's task is SUCCESS; a diverged or failed one FAILURE with the job's error; a
cancelled one REVOKED; a handed-back one RETRY until another worker takes it up. Jobs that
must still be running when the test acts on them are endless (tests/faults.py)."""

import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from celery.events.receiver import EventReceiver
from celery.events.state import State, Task

from api.client import Client
from cli.stack import Stack, stop_process, wait_until
from services.store.keys import ckpt_key
from tests.conftest import SEED_EXAMPLE
from tests.faults import (
    FAULT_ENV,
    cancel,
    endless_spec,
    long_spec,
    redis_and_api,
    wait_for_steps,
)


class Monitor:
    """Flower's view of the cluster: task events from the broker, applied to a State."""

    def __init__(self, broker_url: str) -> None:
        # A bare app, as `celery --broker URL flower` has: no task of gradstream imported.
        self.app = Celery(broker=broker_url, set_as_current=False)
        self.state: State = self.app.events.State()
        self.receiver: EventReceiver | None = None
        self.thread = threading.Thread(target=self._capture, name="monitor", daemon=True)

    def _capture(self) -> None:
        with self.app.connection_for_read() as connection:
            self.receiver = self.app.events.Receiver(connection, handlers={"*": self.state.event})
            self.receiver.capture(limit=None, timeout=None, wakeup=True)

    def start(self) -> None:
        self.thread.start()
        # Events are published, not queued: only once a worker's heartbeat has come through
        # is the receiver known to be listening.
        wait_until(lambda: any(self.state.alive_workers()), 30, "a worker heartbeat event")

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(10)
        self.app.close()

    def task_of(self, job_id: str) -> Task:
        """The train task whose argument is `job_id`."""

        def found() -> Task | None:
            tasks = list(self.state.tasks.values())
            return next((t for t in tasks if t.args and job_id in t.args), None)

        wait_until(lambda: found() is not None, 30, f"the task of job {job_id}")
        task = found()
        assert task is not None
        return task

    def wait_for_state(self, job_id: str, state: str, timeout: float = 30) -> Task:
        task = self.task_of(job_id)
        wait_until(lambda: task.state == state, timeout, f"task of {job_id} in {state}")
        return task


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # No orphan check within a test: a worker that starts more than its interval after a
    # hand-back would find the job queued and its message in flight to itself, and send a
    # duplicate (harmless, but then another task may run the job).
    env = {**FAULT_ENV, "GRADSTREAM_ORPHAN_AFTER_S": "600"}
    with redis_and_api(tmp_path_factory.mktemp("task-states"), env) as local:
        yield local


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[Client]:
    with Client(stack.api_url, stack.api_key, timeout=10) as client:
        yield client


class Workers:
    """CPU workers of this module (one job at a time each), stopped at its end."""

    def __init__(self, stack: Stack, api: Client) -> None:
        self.stack, self.api = stack, api
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, **env: str) -> "subprocess.Popen[bytes]":
        worker = self.stack.start_worker("cpu", **env)
        self.started.append(worker)
        wait_until(
            lambda: any(w["name"].startswith(f"cpu-{worker.pid}@") for w in self.api.workers()),
            60,
            f"worker {worker.pid} registered",
        )
        return worker


@pytest.fixture(scope="module")
def workers(stack: Stack, api: Client) -> Iterator[Workers]:
    started = Workers(stack, api)
    try:
        yield started
    finally:
        for worker in started.started:
            stop_process(worker)


@pytest.fixture(scope="module")
def monitor(stack: Stack, workers: Workers) -> Iterator[Monitor]:
    workers.start()
    watching = Monitor(stack.redis_url)
    try:
        watching.start()
        yield watching
    finally:
        watching.stop()


def test_succeeded_and_stopped_jobs_are_successes(api: Client, monitor: Monitor) -> None:
    succeeded = api.wait(api.submit(SEED_EXAMPLE)["id"], timeout=30)
    assert succeeded["status"] == "succeeded"
    assert monitor.wait_for_state(succeeded["id"], "SUCCESS").result == "'succeeded'"
    # Stopped by a tolerance at its first step: a success too.
    stopped = api.wait(api.submit({**SEED_EXAMPLE, "stop": {"tol_grad": 1e6}})["id"], timeout=30)
    assert stopped["status"] == "succeeded" and stopped["steps_done"] == 1
    monitor.wait_for_state(stopped["id"], "SUCCESS")


def test_diverged_and_failed_jobs_are_failures_with_the_jobs_error(
    stack: Stack, api: Client, monitor: Monitor
) -> None:
    diverging = {**long_spec(steps=200), "optimizer": {"name": "sgd", "lr": 1e6}}
    diverged = api.wait(api.submit(diverging)["id"], timeout=30)
    assert diverged["status"] == "diverged", diverged
    failure = monitor.wait_for_state(diverged["id"], "FAILURE")
    assert "JobFailed" in failure.exception and diverged["error"] in failure.exception

    # A job given a checkpoint that does not fit it while it waits behind another fails when
    # it is run.
    running = api.submit(endless_spec())
    wait_for_steps(api, running["id"], 1)
    queued = api.submit(SEED_EXAMPLE)
    redis_client = redis.Redis.from_url(stack.redis_url)
    try:
        redis_client.hset(
            ckpt_key(queued["id"]), mapping={"step": 3, "theta": b"xy", "optimizer": b""}
        )
    finally:
        redis_client.close()
    api.cancel(running["id"])
    wait_until(lambda: api.jobs(status="failed") != [], 30, "the corrupted job failed")
    failed = api.jobs(status="failed")[0]
    assert failed["id"] == queued["id"] and "checkpoint holds 2 bytes" in failed["error"]
    failure = monitor.wait_for_state(queued["id"], "FAILURE")
    assert failed["error"] in failure.exception


def test_a_cancelled_job_is_revoked(api: Client, monitor: Monitor) -> None:
    job = api.submit(endless_spec())
    wait_for_steps(api, job["id"], 100)
    assert cancel(api, job["id"])["status"] == "cancelled"
    revoked = monitor.wait_for_state(job["id"], "REVOKED")
    # No later event makes it anything else: the worker (one job at a time) has sent every
    # event of that task before the next job's SUCCESS.
    after = api.wait(api.submit(SEED_EXAMPLE)["id"], timeout=30)
    monitor.wait_for_state(after["id"], "SUCCESS")
    assert revoked.state == "REVOKED"


def test_a_handed_back_job_is_retried_then_runs_on_as_the_same_task(
    api: Client, monitor: Monitor, workers: Workers
) -> None:
    job = api.submit(endless_spec(seed=7))
    wait_for_steps(api, job["id"], 500)
    first = workers.started[0]
    first.send_signal(signal.SIGTERM)  # a warm shutdown hands the job back
    first.wait(15)
    view = api.get(job["id"])
    assert view["status"] == "queued"
    retried = monitor.wait_for_state(job["id"], "RETRY")
    assert "HandedBack" in retried.exception and "shutting down" in retried.exception
    workers.start()
    wait_for_steps(api, job["id"], view["steps_done"] + 500)
    assert api.get(job["id"])["attempt"] == 2
    assert cancel(api, job["id"])["status"] == "cancelled"
    resumed = monitor.wait_for_state(job["id"], "REVOKED")
    assert resumed.uuid == retried.uuid and resumed.retries == 1


def test_a_worker_without_task_events_runs_jobs_and_sends_none(
    api: Client, monitor: Monitor, workers: Workers
) -> None:
    """GRADSTREAM_TASK_EVENTS=false, for a service without Flower (bench/job_cost.py counts
    what the events cost): the jobs run, Flower still sees the worker, and a task stays as
    the API's task-sent event left it."""
    for worker in workers.started:
        stop_process(worker)
    quiet = workers.start(GRADSTREAM_TASK_EVENTS="false")
    job = api.wait(api.submit(SEED_EXAMPLE)["id"], timeout=30)
    assert job["status"] == "succeeded"
    ended = time.time()

    def last_heartbeat() -> float:
        found = [
            w for name, w in monitor.state.workers.items() if name.startswith(f"cpu-{quiet.pid}@")
        ]
        return max(found[0].heartbeats, default=0.0) if found else 0.0

    # A task event sent as the job ended would come before the worker's heartbeats a couple
    # of seconds later: one dispatcher, one connection.
    wait_until(lambda: last_heartbeat() > ended + 2, 30, "the worker's heartbeats after the job")
    assert monitor.task_of(job["id"]).state == "PENDING"  # sent, and nothing since
