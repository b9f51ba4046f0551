"""Compiled blocks of steps on the CPU (torch.compile, Inductor), in this process: they agree
with the eager step, resume bit for bit, and a failed compile falls back to eager steps. The
real worker's case (a pool process SIGKILLed mid-job, Inductor's cache found by the next
process) is in tests/test_resume.py. One shape throughout: it compiles once per process."""

import logging
from typing import Any

import numpy as np
import pytest
import torch

import services.runner
import services.training
from services.config import Settings
from services.queue import compiles
from services.runner import warm_compiled
from services.schemas import JobSpec
from services.store import Store
from services.training import graphs_compiled
from tests.attempts import run_once, run_with_hand_back, step_values

CPU = torch.device("cpu")
COMPILED_SHAPE = {"synthetic": {"n": 16384, "d": 8, "noise": 0.1, "seed": 3}}
ALWAYS = Settings(cpu_compile_s=0)  # the cost model then compiles any job of a block or more
NEVER = Settings(compile_steps=False)


def compiled_spec(steps: int, **optimizer: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "data": COMPILED_SHAPE,
            "bias": True,
            "optimizer": {"name": "sgd", "lr": 0.05, **optimizer},
            "steps": steps,
            "device": "cpu",
        }
    )


def test_compiled_blocks_agree_with_eager_steps(store: Store) -> None:
    # 1 003 steps: 62 blocks of 16, then 11 eager steps; weight decay through the tensors.
    spec = compiled_spec(1003, weight_decay=0.01)
    compiled, compiled_steps = run_once(store, spec, CPU, ALWAYS)
    eager, eager_steps = run_once(store, spec, CPU, NEVER)
    assert (compiled.stepper, eager.stepper) == ("compiled", "eager")
    assert [s["step"] for s in compiled_steps] == list(range(1003))
    # To float32 rounding: each value within 1e-5 of its quantity's scale over the run (a
    # gradient is a sum over 16 384 samples; summed in another order, a small one moves by
    # more than 1e-5 of itself, never by more than 1e-5 of the sum's terms).
    ours, theirs = step_values(compiled_steps), step_values(eager_steps)
    scale = np.abs(theirs).max(axis=0)
    assert np.all(np.abs(ours - theirs) <= 1e-5 * scale), np.abs(ours - theirs).max(axis=0)


def test_a_compiled_job_resumes_bit_for_bit_from_its_checkpoint(store: Store) -> None:
    spec = compiled_spec(700)
    # Flushes by count only: the hand-back comes at step 64 however long the steps take (by
    # the 20 ms timer it came at step 32 with ATEN_CPU_CAPABILITY=default).
    settings = Settings(cpu_compile_s=0, flush_max_steps=64, flush_interval_s=60)
    whole_result, whole = run_once(store, spec, CPU, settings)
    attempts, resumed = run_with_hand_back(store, spec, CPU, settings)
    assert [a.stepper for a in (whole_result, *attempts)] == ["compiled"] * 3
    assert attempts[0].steps == 64 and attempts[1].steps == 636
    assert resumed == whole


def test_a_failed_compile_falls_back_to_eager_steps_and_is_not_tried_again(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Inductor failing to build the block (a stand-in for torch.compile's result that raises
    # when called, as a failed compile does), for a shape of its own.
    built = []

    def failing_block(*_: Any) -> Any:
        def compiled(*__: Any) -> None:
            raise RuntimeError("Inductor could not build the kernel (a test's stand-in)")

        built.append(compiled)
        return compiled

    monkeypatch.setattr(services.training, "_block_of_steps", failing_block)
    spec = JobSpec.model_validate(
        {"data": {"synthetic": {"n": 40, "d": 3}}, "steps": 100, "device": "cpu"}
    )
    with caplog.at_level(logging.WARNING, logger="services.attempts"):
        result, steps = run_once(store, spec, CPU, ALWAYS)
        again, _ = run_once(store, spec, CPU, ALWAYS)
    assert result.stepper == again.stepper == "eager" and len(steps) == 100
    assert caplog.text.count("no compiled step; eager steps") == 2
    assert len(built) == 1  # the second job knew the shape had failed
    assert steps == run_once(store, spec, CPU, NEVER)[1]


def test_the_cost_model_compiles_long_plain_sgd_jobs_only() -> None:
    settings = Settings()  # a compile costs cpu_compile_s (10 s), a step ~250 µs eager
    seed = {"data": {"x": [[1.0]], "y": [2.0]}, "device": "cpu"}
    assert not compiles(JobSpec.model_validate({**seed, "steps": 10_000}), settings)
    assert compiles(JobSpec.model_validate({**seed, "steps": 100_000}), settings)
    assert not compiles(JobSpec.model_validate({**seed, "steps": 10}), ALWAYS)  # under a block
    assert not compiles(JobSpec.model_validate({**seed, "steps": 100_000}), NEVER)


def test_the_job_view_says_how_its_steps_ran(store: Store) -> None:
    job_id, _ = store.create_job(compiled_spec(64), "cpu", "test-nobody", "test")
    services.runner.run_job(store, job_id, "test-worker", CPU, ALWAYS)
    view = store.get_job(job_id)
    assert view.result is not None and view.result.stepper == "compiled"


def test_a_worker_can_compile_common_shapes_before_any_job(store: Store) -> None:
    # GRADSTREAM_COMPILE_WARM_SHAPES, as a pool process runs it when it starts: jobs of such a
    # shape, whatever their length, then compile nothing.
    settings = Settings(cpu_compile_s=0, compile_warm_shapes=" 16384x8+b, ")
    assert warm_compiled(settings) == ["16384x8+b"]
    compiled = graphs_compiled()
    for steps in (32, 700):
        result, _ = run_once(store, compiled_spec(steps), CPU, settings)
        assert result.stepper == "compiled"
    assert graphs_compiled() == compiled
