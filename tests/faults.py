"""Fault harness: real processes killed, paused and restarted, and the invariant checked.

The invariant (DESIGN §5): a job that reached `succeeded` stored exactly steps 0 .. steps-1,
each once, in order, and its records and final parameters equal those of an uninterrupted
run of the same spec, bit for bit (same device type, one torch thread, as workers run).
Used by tests/test_faults.py and by the soak run (tests/soak.py, `make soak`).
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

from api.client import TERMINAL, Client
from cli.stack import Stack, child_pids
from services.records import Chunk, expand_chunk, param_values
from services.schemas import JobSpec
from services.training import Trainer

# Faster than production so that recovery fits in a test: a lapsed lease is found in ~2.5 s.
FAULT_ENV = {
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
    """A CPU job of a few seconds, long enough to be interrupted mid-way."""
    return {
        "data": {"synthetic": {"n": 64, "d": 4, "noise": 0.1, "seed": seed}},
        "bias": True,
        "optimizer": {"name": "sgd", "lr": 0.01},
        "steps": steps,
        "device": "cpu",
    }


@dataclass(frozen=True)
class Reference:
    steps: list[dict[str, Any]]
    params: dict[str, Any]


_references: dict[str, Reference] = {}


def reference_run(spec_fields: dict[str, Any]) -> Reference:
    """The same job run uninterrupted in this process, recorded as the service records it."""
    spec = JobSpec.model_validate(spec_fields)
    key = spec.model_dump_json()
    if key not in _references:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            trainer = Trainer(spec, torch.device("cpu"))
            rows = torch.empty(spec.steps, trainer.layout.width)
            for i in range(spec.steps):
                trainer.step(rows[i])
        finally:
            torch.set_num_threads(threads)
        batches = trainer.batches_per_epoch if trainer.batches_per_epoch > 1 else 0
        layout = trainer.layout
        chunk = Chunk(0, spec.steps, layout.features, spec.bias, rows.numpy().tobytes(), batches)
        params = param_values(trainer.params().tolist(), trainer.layout.features, spec.bias)
        _references[key] = Reference(expand_chunk(chunk), params)
    return _references[key]


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


def assert_invariant(client: Client, job_id: str, spec: dict[str, Any]) -> None:
    view = client.get(job_id)
    assert view["status"] == "succeeded", view
    stored = list(client.steps(job_id))
    assert [s["step"] for s in stored] == list(range(spec["steps"]))
    reference = reference_run(spec)
    assert stored == reference.steps
    assert view["result"]["params"] == reference.params
    assert view["steps_done"] == spec["steps"]


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
    client: Client, job_id: str, at_least: int, timeout: float = 60
) -> dict[str, Any]:
    """Poll until the job stored `at_least` steps (or finished); its JobView."""
    deadline = time.monotonic() + timeout
    while True:
        view = client.get(job_id)
        if view["steps_done"] >= at_least or view["status"] in TERMINAL:
            return view
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
    from services.config import Settings
    from services.queue import TRAIN_TASK, GradstreamCelery, celery_config

    app = GradstreamCelery("duplicate", set_as_current=False)
    app.conf.update(celery_config(Settings(redis_url=redis_url)))
    try:
        app.send_task(TRAIN_TASK, args=[job_id], queue=queue)
    finally:
        app.close()


def wait_through_outage(client: Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    """Wait for the job to finish, riding out 503s while Redis restarts."""
    from api.client import GradstreamError

    deadline = time.monotonic() + timeout
    while True:
        try:
            view = client.get(job_id)
            if view["status"] in TERMINAL:
                return view
        except GradstreamError as exc:
            if exc.status_code != 503:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not finished after {timeout} s")
        time.sleep(0.2)
