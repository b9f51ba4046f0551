"""Every resume is exact: each optimizer with each lr schedule, and a job running compiled
blocks, killed mid-job by a real SIGKILL of its pool process, resumes from its checkpoint and
stores exactly the steps of an uninterrupted run (compared bit for bit). The jobs are endless
(tests/faults.py), so they are still running when the kill comes however fast the machine;
once they have gone on past it, the test cancels them and compares what they stored."""

import os
import signal
import subprocess
from collections.abc import Iterator

import pytest
import torch

from api.client import Client
from cli.stack import Stack, child_pids, stop_process, wait_until
from services.config import Settings
from services.schemas import JobSpec
from services.store import Store
from tests.attempts import run_once
from tests.faults import (
    FAULT_ENV,
    assert_cancelled_exactly,
    cancel,
    endless_spec,
    redis_and_api,
    reference_run,
    thinned,
    wait_for_steps,
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with redis_and_api(tmp_path_factory.mktemp("resume"), FAULT_ENV) as local:
        yield local


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
    # Each optimizer with this schedule, all killed mid-job at once: every step equals the
    # uninterrupted run's (the lr a schedule computes next comes from the optimizer's current
    # lr, which the checkpoint must carry even for plain SGD).
    base = endless_spec(seed=20)
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
    killed_at = {name: api.get(job)["steps_done"] for name, job in jobs.items()}
    for name, job in jobs.items():
        wait_for_steps(api, job, killed_at[name] + 300, timeout=90)
    for name, job in jobs.items():
        assert cancel(api, job)["attempt"] == 2, name
        assert_cancelled_exactly(api, job, specs[name])


def test_a_sparse_job_killed_mid_job_keeps_every_step_once_and_grads_at_the_kept_steps(
    api: Client, four_at_once: "subprocess.Popen[bytes]"
) -> None:
    # record.every 50: the resumed attempt's chunks start wherever the checkpoint was, not
    # at a multiple of 50, and still keep gradients and parameters at exactly those steps.
    spec = {**endless_spec(seed=21), "record": {"every": 50}}
    job = api.submit(spec)["id"]
    wait_for_steps(api, job, 300, timeout=60)
    for child in child_pids(four_at_once.pid):
        os.kill(child, signal.SIGKILL)
    killed_at = api.get(job)["steps_done"]
    wait_for_steps(api, job, killed_at + 300, timeout=90)
    assert cancel(api, job)["attempt"] == 2
    stored = list(api.steps(job))
    assert [s["step"] for s in stored] == list(range(len(stored)))
    # Cancelled, not ended by itself: its last step keeps its gradients only if it is a
    # multiple of 50.
    assert [s["step"] for s in stored if "grads" in s] == list(range(0, len(stored), 50))
    dense = {key: value for key, value in spec.items() if key != "record"}
    assert stored == thinned(reference_run(dense, len(stored)).steps, 50, last=False)


@pytest.fixture(scope="module")
def compiling_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own whose worker compiles every job's step (a compile costs nothing in
    its cost model), with Inductor's on-disk cache in a new folder."""
    run_dir = tmp_path_factory.mktemp("compiled")
    env = {
        **FAULT_ENV,
        "GRADSTREAM_COMPILE_STEPS": "true",
        "GRADSTREAM_CPU_COMPILE_S": "0",
        "GRADSTREAM_COMPILE_CACHE_DIR": str(run_dir / "inductor"),
    }
    with redis_and_api(run_dir, env) as local:
        yield local


# Plain SGD on the full batch, compiled, for the most steps a job may have: a million steps of
# 65 536 x 16 take minutes even at a core's peak (4 MFLOP a step).
ENDLESS_COMPILED = {
    "data": {"synthetic": {"n": 65_536, "d": 16, "noise": 0.1, "seed": 3}},
    "bias": True,
    "optimizer": {"name": "sgd", "lr": 0.05},
    "steps": Settings().max_steps,
    "device": "cpu",
}


def test_a_compiled_job_resumes_bit_for_bit_and_the_next_process_finds_the_cache(
    compiling_stack: Stack,
) -> None:
    worker = compiling_stack.start_worker("cpu")
    log = compiling_stack.run_dir / f"worker-cpu-{len(compiling_stack.processes) - 1}.log"
    with Client(compiling_stack.api_url, compiling_stack.api_key, timeout=10) as api:
        compiling_stack.wait_for_workers({"cpu"})
        job = api.submit(ENDLESS_COMPILED)
        wait_for_steps(api, job["id"], 4000, timeout=120)
        (child,) = child_pids(worker.pid)
        os.kill(child, signal.SIGKILL)
        # Compared over whole blocks of 16, well past where attempt 2 began: an uninterrupted
        # run of that many steps in this process, compiled alike, is the reference.
        compared = (api.get(job["id"])["steps_done"] // 16 + 64) * 16
        wait_for_steps(api, job["id"], compared, timeout=120)
        assert cancel(api, job["id"])["attempt"] == 2
        stored = list(api.steps(job["id"]))
    stop_process(worker)
    store = Store.from_url(compiling_stack.redis_url)
    spec = JobSpec.model_validate({**ENDLESS_COMPILED, "steps": compared})
    result, reference = run_once(store, spec, torch.device("cpu"), Settings(cpu_compile_s=0))
    store.redis.close()
    assert result.stepper == "compiled"
    assert [s["step"] for s in stored] == list(range(len(stored)))
    assert stored[:compared] == reference
    # Both attempts ran compiled blocks.
    starts = [line for line in log.read_text().splitlines() if f"{job['id']} attempt" in line]
    starts = [line for line in starts if ": steps " in line]
    assert len(starts) == 2 and all("(compiled)" in line for line in starts), starts
    # The first pool process compiled the shape into the new cache; the one that replaced it
    # (a new process: nothing compiled in its memory) found every graph there.
    compiled = [line for line in log.read_text().splitlines() if "compiled step" in line]
    assert len(compiled) == 2, compiled
    assert "0 miss(es)" not in compiled[0] and "0 miss(es)" in compiled[1]
