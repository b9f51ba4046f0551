"""Fault harness: real processes killed, paused and restarted, and the invariant checked.

The invariant (DESIGN §5): a job that reached `succeeded` stored exactly steps 0 .. steps-1,
each once, in order, and its records and final parameters equal those of an uninterrupted
run of the same spec, bit for bit (same device type, one torch thread, as workers run).
A job a test interrupts is endless (`endless_spec`), so that it is still running when the fault
comes on any machine; cancelled once it has gone on past it, the steps it stored are checked
the same way against an uninterrupted run's first n (`assert_cancelled_exactly`). Used by
tests/test_faults.py and others, and by the soak run (tests/soak.py, `make soak`: finite jobs,
each checked whole by `check_invariant`).
"""

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from api.client import TERMINAL, Client, GradstreamError
from cli.stack import Stack, child_pids, wait_until
from services.config import Settings
from services.records import Chunk, expand_chunk, param_values
from services.schemas import JobSpec
from services.training import Trainer

# Faster than production so that recovery fits in a test: a lapsed lease is found in ~2.5 s.
# Eager steps only: the references (`reference_run`) are eager loops, and an endless job of
# plain SGD would otherwise run compiled blocks (tests/test_resume.py has a compiling stack).
FAULT_ENV = {
    "GRADSTREAM_COMPILE_STEPS": "false",
    "GRADSTREAM_LEASE_S": "2",
    "GRADSTREAM_REAPER_INTERVAL_S": "0.5",
    "GRADSTREAM_WORKER_HEARTBEAT_S": "0.5",
    "GRADSTREAM_WORKER_TTL_S": "3",
    "GRADSTREAM_SSE_KEEPALIVE_S": "1",
    "GRADSTREAM_ORPHAN_AFTER_S": "5",
}


@contextlib.contextmanager
def redis_and_api(run_dir: Path, env: dict[str, str]) -> Iterator[Stack]:
    """A stack of its own, a private Redis and an API, stopped on exit; the test starts the
    workers it needs."""
    local = Stack(run_dir, env=env)
    try:
        local.start_redis()
        local.start_api()
        yield local
    finally:
        local.stop()


def long_spec(steps: int = 8000, seed: int = 0) -> dict[str, Any]:
    """A CPU job of a few seconds here, far less on a fast machine: nothing may count on it
    still running after a client's round trip (that is `endless_spec`)."""
    return {
        "data": {"synthetic": {"n": 64, "d": 4, "noise": 0.1, "seed": seed}},
        "bias": True,
        "optimizer": {"name": "sgd", "lr": 0.01},
        "steps": steps,
        "device": "cpu",
    }


def endless_spec(seed: int = 0) -> dict[str, Any]:
    """A CPU job no test sees finish: the most steps a job may have (a million), each an
    eager step (an lr schedule runs no compiled blocks; momentum alone now does), ~20 µs of
    torch's dispatch even on the fastest CPU and ~300 µs here: 20 s at the very least, minutes
    here. For a job that must still be running after a client's round trip (holding the
    worker, interrupted mid-job, cancelled while it runs); the test cancels it at the end.
    The schedule's gamma of 1 keeps the lr constant."""
    schedule = {"name": "step", "step_size": 1000, "gamma": 1.0}
    return {
        **long_spec(steps=Settings().max_steps, seed=seed),
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "schedule": schedule},
    }


def running_blocker(client: Client) -> str:
    """The id of an endless job a worker of one pool process runs now: jobs submitted after
    it stay queued until the test cancels it, however fast the machine."""
    blocker = client.submit(endless_spec())["id"]
    wait_until(lambda: client.get(blocker)["status"] == "running", 60, "the blocker running")
    return blocker


@dataclass(frozen=True)
class Reference:
    steps: list[dict[str, Any]]
    params: dict[str, Any]


_references: dict[tuple[str, int], Reference] = {}


def reference_run(spec_fields: dict[str, Any], steps: int | None = None) -> Reference:
    """The same job run uninterrupted in this process, recorded as the service records it: its
    first `steps` steps (all of them by default), and the parameters after them."""
    spec = JobSpec.model_validate(spec_fields)
    count = spec.steps if steps is None else steps
    key = (spec.model_dump_json(), count)
    if key not in _references:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            trainer = Trainer(spec, torch.device("cpu"))
            rows = torch.empty(count, trainer.layout.width)
            for i in range(count):
                trainer.step(rows[i])
        finally:
            torch.set_num_threads(threads)
        batches = trainer.batches_per_epoch if trainer.batches_per_epoch > 1 else 0
        layout = trainer.layout
        chunk = Chunk(0, count, layout.features, spec.bias, rows.numpy().tobytes(), batches)
        params = param_values(trainer.params().tolist(), trainer.layout.features, spec.bias)
        _references[key] = Reference(expand_chunk(chunk), params)
    return _references[key]


def thinned(records: list[dict[str, Any]], every: int, last: bool) -> list[dict[str, Any]]:
    """Full records as a job with record.every `every` keeps them (DESIGN §10): gradients and
    parameters (and the explain view) at steps divisible by `every`, and at the last record
    if `last` (the job ended there by itself, not by a cancel)."""
    final = records[-1]["step"] if records and last else -1
    keep = ("grads", "params", "explain")
    return [
        r
        if r["step"] % every == 0 or r["step"] == final
        else {k: v for k, v in r.items() if k not in keep}
        for r in records
    ]


@dataclass
class InvariantReport:
    steps_checked: int = 0
    duplicates: int = 0
    gaps: int = 0
    mismatches: int = 0


def check_invariant(client: Client, job_id: str, spec: dict[str, Any]) -> InvariantReport:
    """Count duplicates, gaps and differences from the uninterrupted run (all must be 0)."""
    view = client.get(job_id)
    stored = list(client.steps(job_id))
    numbers = [s["step"] for s in stored]
    report = InvariantReport(steps_checked=len(stored))
    report.duplicates = len(numbers) - len(set(numbers))
    report.gaps = len(set(range(spec["steps"])) - set(numbers))
    reference = reference_run(spec)
    report.mismatches = sum(a != b for a, b in zip(stored, reference.steps, strict=False))
    if numbers != sorted(numbers):
        report.mismatches += 1
    if view["status"] != "succeeded" or view["result"]["params"] != reference.params:
        report.mismatches += 1
    return report


def assert_cancelled_exactly(client: Client, job_id: str, spec: dict[str, Any]) -> int:
    """The invariant for an endless job the test cancelled: it ended cancelled, and the steps
    it stored are 0 .. n-1, each once, in order, equal to an uninterrupted run's first n
    (bit for bit). n, the steps it stored."""
    view = client.get(job_id)
    assert view["status"] == "cancelled", view
    stored = list(client.steps(job_id))
    assert [s["step"] for s in stored] == list(range(len(stored)))
    assert view["steps_done"] == len(stored)
    assert stored == reference_run(spec, len(stored)).steps
    return len(stored)


def cancel(client: Client, job_id: str, timeout: float = 30) -> dict[str, Any]:
    """Cancel a job and wait until it has ended: its JobView."""
    client.cancel(job_id)
    return client.wait(job_id, timeout=timeout)


def kill_pool_child(worker: "subprocess.Popen[bytes]") -> int:
    """SIGKILL the Celery pool process of a worker started by Stack (it keeps its pid)."""
    (child,) = child_pids(worker.pid)
    os.kill(child, signal.SIGKILL)
    return child


def kill_group(process: "subprocess.Popen[bytes]", sig: int = signal.SIGKILL) -> None:
    os.killpg(process.pid, sig)
    if sig == signal.SIGKILL:
        process.wait(10)


def wait_for_steps(
    client: Client, job_id: str, at_least: int, timeout: float = 60, outage: bool = False
) -> dict[str, Any]:
    """Poll until the job stored `at_least` steps (or finished); its JobView. With `outage`,
    riding out 503s while Redis restarts or fails over."""
    deadline = time.monotonic() + timeout
    view: dict[str, Any] = {"steps_done": "no"}
    while True:
        try:
            view = client.get(job_id)
            if view["steps_done"] >= at_least or view["status"] in TERMINAL:
                return view
        except GradstreamError as exc:
            if not outage or exc.status_code != 503:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} has {view['steps_done']} steps after {timeout} s")
        time.sleep(0.05)


def holder_of(
    client: Client, job_id: str, workers: "list[subprocess.Popen[bytes]]"
) -> "subprocess.Popen[bytes]":
    """Which of `workers` (started by Stack) runs `job_id` now."""
    holder = worker_running(client, job_id)
    return next(w for w in workers if holder.startswith(f"cpu-{w.pid}@"))


def worker_running(client: Client, job_id: str) -> str:
    """Name of the worker whose registry entry says it runs `job_id` now."""
    for worker in client.workers():
        if worker["current_job"] == job_id:
            return str(worker["name"])
    raise LookupError(f"no live worker runs {job_id}")


def send_duplicate(redis_url: str, job_id: str, queue: str = "cpu") -> None:
    """Deliver the job's task message once more, as a broker redelivery would."""
    from services.queue import TRAIN_TASK, GradstreamCelery, celery_config

    app = GradstreamCelery("duplicate", set_as_current=False)
    app.conf.update(celery_config(Settings(redis_url=redis_url)))
    try:
        app.send_task(TRAIN_TASK, args=[job_id], queue=queue)
    finally:
        app.close()
