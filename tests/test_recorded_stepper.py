"""One stepper per job (DESIGN §11, "What bit for bit means"): a job's (or a sweep group's)
first attempt chooses how its steps run -- eager, compiled, cuda-graph -- and records it with
its first flush, with what it ran on; every later attempt runs the recorded stepper whatever its
own worker's cost model says, and the JobView shows each attempt's environment and says when a
resume was not bit for bit. Attempts run in this process, as a worker's pool child runs them,
on the session's Redis; the JobView over HTTP comes from the session's worker."""

import logging
import threading

import pytest
import torch

from api.client import Client
from cli.main import SEED_EXAMPLE
from services.attempts import Outcome
from services.config import Settings
from services.environment import attempt_environment, cpu_model
from services.queue import compiles
from services.runner import run_job
from services.schemas import AttemptEnvironment, JobSpec, JobStatus
from services.store import Store, keys
from tests.attempts import (
    hand_back_and_resume,
    members_steps,
    run_groups,
    run_once,
    store_sweep,
    stored_steps,
)
from tests.faults import long_spec
from tests.test_compiled import compiled_spec
from tests.test_group_steps import SWEEP

CPU = torch.device("cpu")
# The first attempt's worker compiles whatever is a block long; the resuming one compiles
# nothing of its own accord (GRADSTREAM_COMPILE_STEPS=0). Both flush every 32 steps, by count
# only, so that the first hands back at step 32 however fast the steps run: a job early, and
# a group before its first rung, 40 (the compiled block's buffer is the same shape in both).
COMPILING = Settings(cpu_compile_s=0, flush_max_steps=32, flush_interval_s=60)
NOT_COMPILING = Settings(compile_steps=False, flush_max_steps=32, flush_interval_s=60)
NOT_BIT_FOR_BIT = "the job's records agree with an uninterrupted run to float32 rounding"


def environment_field(attempt: int) -> str:
    return f"{keys.ENVIRONMENT_FIELD_PREFIX}{attempt}"


def test_a_compiled_job_resumes_compiled_where_the_cost_model_would_not_compile(
    store: Store,
) -> None:
    spec = compiled_spec(700)
    assert compiles(spec, COMPILING) and not compiles(spec, NOT_COMPILING)
    _, uninterrupted = run_once(store, spec, CPU, COMPILING)
    job_id, _ = store.create_job(spec, "cpu", "test-nobody", "test")
    attempts = hand_back_and_resume(store, job_id, CPU, COMPILING, NOT_COMPILING)
    assert [a.stepper for a in attempts] == ["compiled", "compiled"]
    assert attempts[0].steps == 32 and attempts[1].steps == 668
    assert stored_steps(store, job_id) == uninterrupted
    view = store.get_job(job_id)
    assert view.stepper == "compiled" and view.resume is None
    assert [(a.attempt, a.stepper) for a in view.attempts] == [(1, "compiled"), (2, "compiled")]


def test_a_compiled_group_resumes_compiled_where_the_cost_model_would_not_compile(
    store: Store,
) -> None:
    uninterrupted = store_sweep(store, SWEEP)
    run_groups(store, uninterrupted.id, CPU, COMPILING)
    resumed = store_sweep(store, SWEEP)
    [second] = run_groups(
        store, resumed.id, CPU, COMPILING, drain=True, resume_settings=NOT_COMPILING
    )
    assert second.stepper == "compiled"
    assert members_steps(store, resumed.id) == members_steps(store, uninterrupted.id)
    # Members are what users look at: each one's JobView shows its group's stepper and the
    # attempts that trained it (both: the first handed the group back before any rung).
    for member in store.get_sweep(resumed.id).members:
        view = store.get_job(member.id)
        assert view.stepper == "compiled" and view.resume is None, member.id
        assert [(a.attempt, a.stepper) for a in view.attempts] == [
            (1, "compiled"),
            (2, "compiled"),
        ]


def test_the_job_view_shows_what_each_attempt_ran_on(client: Client) -> None:
    job = client.submit({**SEED_EXAMPLE, "steps": 20})
    view = client.wait(job["id"], timeout=30)
    assert view["status"] == "succeeded" and view["stepper"] == "eager"
    assert view["attempts"] == [
        {
            "attempt": 1,
            "device": "cpu",
            "device_name": cpu_model(),
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": 1,  # as workers run (GRADSTREAM_TORCH_THREADS)
            "stepper": "eager",
            "worker": view["worker"],
        }
    ]
    assert view["resume"] is None


def test_a_resume_on_another_cpu_instruction_set_says_so(store: Store) -> None:
    spec = JobSpec.model_validate(long_spec(steps=300))
    job_id, _ = store.create_job(spec, "cpu", "test-nobody", "test")
    drain = threading.Event()
    drain.set()
    settings = Settings(flush_max_steps=64)
    first = run_job(store, job_id, "test-worker", CPU, settings, drain)
    assert first.outcome is Outcome.RELEASED
    # A fake of another machine: the first attempt's environment rewritten as a CPU with
    # another instruction set would have recorded it.
    here = torch.backends.cpu.get_cpu_capability()
    there = "AVX512" if here != "AVX512" else "AVX2"
    recorded = store.redis.hget(keys.job_key(job_id), environment_field(1))
    elsewhere = AttemptEnvironment.model_validate_json(recorded).model_copy(
        update={"cpu_capability": there}
    )
    store.redis.hset(keys.job_key(job_id), environment_field(1), elsewhere.model_dump_json())
    assert run_job(store, job_id, "test-worker", CPU, settings).outcome is Outcome.SUCCEEDED
    view = store.get_job(job_id)
    assert [a.cpu_capability for a in view.attempts] == [there, here]
    assert view.resume == (
        f"attempt 2 ran with another CPU instruction set {here} (attempt 1: {there}): "
        f"from attempt 2 on, {NOT_BIT_FOR_BIT}, not bit for bit"
    )


def test_a_recorded_stepper_this_worker_cannot_run_falls_back_to_eager_steps(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    spec = JobSpec.model_validate({**SEED_EXAMPLE, "steps": 100})
    job_id, _ = store.create_job(spec, "cpu", "test-nobody", "test")
    # A fake of a first attempt on a GPU (that stored no steps: the job is still queued): it
    # recorded a CUDA graph, and this worker computes on the CPU (as a GPU worker with
    # GRADSTREAM_CUDA_FALLBACK_CPU does).
    on_gpu = attempt_environment(1, CPU, "cuda-graph", "gpu-worker").model_copy(
        update={"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}
    )
    store.redis.hset(
        keys.job_key(job_id),
        mapping={
            "attempt": 1,
            "stepper": "cuda-graph",
            environment_field(1): on_gpu.model_dump_json(),
        },
    )
    with caplog.at_level(logging.WARNING, logger="services.runner"):
        result = run_job(store, job_id, "test-worker", CPU, Settings())
    assert result.outcome is Outcome.SUCCEEDED and result.stepper == "eager"
    assert "cuda-graph steps cannot run here; eager steps" in caplog.text
    assert stored_steps(store, job_id) == run_once(store, spec, CPU, Settings())[1]
    view = store.get_job(job_id)
    assert view.stepper == "cuda-graph"  # still the job's: a later attempt tries it again
    assert [(a.attempt, a.device, a.stepper) for a in view.attempts] == [
        (1, "cuda", "cuda-graph"),
        (2, "cpu", "eager"),
    ]
    assert view.resume == (
        "attempt 2 ran with another device type cpu (attempt 1: cuda), stepper eager "
        f"(attempt 1: cuda-graph): from attempt 2 on, {NOT_BIT_FOR_BIT}, not bit for bit"
    )


def test_the_environment_and_stepper_are_written_by_the_owning_attempt_only(
    store: Store,
) -> None:
    spec = JobSpec.model_validate(SEED_EXAMPLE)
    job_id, _ = store.create_job(spec, "cpu", "test-nobody", "test")
    claim = store.claim_job(job_id, "test-worker", lease_s=10, max_attempts=3)
    assert claim.stepper is None  # nothing recorded: the cost model chooses
    stale = attempt_environment(claim.attempt + 1, CPU, "compiled", "test-worker")
    assert store.flush_steps(job_id, claim.attempt + 1, None, None, 10, environment=stale) == (
        "fenced"
    )
    assert store.get_job(job_id).attempts == [] and store.get_job(job_id).stepper is None
    environment = attempt_environment(claim.attempt, CPU, "eager", "test-worker")
    assert store.flush_steps(job_id, claim.attempt, None, None, 10, environment=environment) == (
        "ok"
    )
    assert store.release_job(job_id, claim.attempt, "requeued: test") == "test-nobody"
    later = store.claim_job(job_id, "test-worker", lease_s=10, max_attempts=3)
    assert later.stepper == "eager"  # the first attempt's, for this one to run
    # The handed-back attempt writes nothing more, and a later attempt's stepper never
    # replaces the first's.
    assert store.flush_steps(job_id, claim.attempt, None, None, 10, environment=stale) == "fenced"
    compiled = attempt_environment(later.attempt, CPU, "compiled", "test-worker")
    assert store.flush_steps(job_id, later.attempt, None, None, 10, environment=compiled) == "ok"
    view = store.get_job(job_id)
    assert view.stepper == "eager" and [a.stepper for a in view.attempts] == ["eager", "compiled"]
    store.cancel_job(job_id)
    assert store.flush_steps(job_id, later.attempt, None, None, 10) == "cancelled"
    assert store.get_job(job_id).status is JobStatus.CANCELLED
