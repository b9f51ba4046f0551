"""Every resume is exact: each optimizer with each lr schedule, killed mid-job by a real
SIGKILL of its pool process, resumes from its checkpoint and stores exactly the steps, and
ends with exactly the parameters, of an uninterrupted run (tests/faults.py compares them bit
for bit)."""

import os
import signal
import subprocess
from collections.abc import Iterator

import pytest

from api.client import Client
from cli.stack import Stack, child_pids, stop_process, wait_until
from tests.faults import FAULT_ENV, assert_invariant, long_spec


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    local = Stack(tmp_path_factory.mktemp("resume"), env=FAULT_ENV)
    try:
        local.start_redis()
        local.start_api()
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[Client]:
    with Client(stack.api_url, stack.api_key, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def four_at_once(stack: Stack) -> Iterator["subprocess.Popen[bytes]"]:
    """One CPU worker running four jobs at once (four pool processes)."""
    worker = stack.start_worker("cpu", concurrency=4)
    try:
        stack.wait_for_workers({"cpu"})
        yield worker
    finally:
        stop_process(worker)


OPTIMIZERS = {
    "sgd": {"name": "sgd", "lr": 0.01},
    "sgd-momentum": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
    "adam": {"name": "adam", "lr": 0.01},
    "adamw": {"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
}
SCHEDULES = {
    "constant": {"name": "constant"},
    "step": {"name": "step", "step_size": 250, "gamma": 0.7},
    "cosine": {"name": "cosine", "eta_min": 0.001},
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_every_optimizer_resumes_bit_for_bit_after_a_sigkill(
    api: Client, four_at_once: "subprocess.Popen[bytes]", schedule: str
) -> None:
    # Each optimizer with this schedule, all killed mid-job at once: every step, and the final
    # parameters, equal the uninterrupted run's (the lr a schedule computes next comes from
    # the optimizer's current lr, which the checkpoint must carry even for plain SGD).
    base = long_spec(steps=3000, seed=20)
    specs = {
        name: {**base, "optimizer": {**optimizer, "schedule": SCHEDULES[schedule]}}
        for name, optimizer in OPTIMIZERS.items()
    }
    jobs = {name: api.submit(spec)["id"] for name, spec in specs.items()}
    wait_until(
        lambda: all(
            (view := api.get(job))["status"] == "running" and view["steps_done"] >= 300
            for job in jobs.values()
        ),
        60,
        "all four jobs running with 300 steps stored",
    )
    for child in child_pids(four_at_once.pid):
        os.kill(child, signal.SIGKILL)
    for name, job in jobs.items():
        view = api.wait(job, timeout=90)
        assert view["attempt"] == 2, (name, view)
        assert_invariant(api, job, specs[name])
