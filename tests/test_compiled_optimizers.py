"""Compiled blocks of stateful optimizers and mini-batches on the CPU: SGD with momentum,
Adam and AdamW, and mini-batches in `batch_order` (with nesterov), each against its eager
steps (relative 1e-5 of each quantity's scale) and resumed from its checkpoint bit for bit;
their optimizer state checkpointed in the eager steps' format; and a job through a real
worker that runs compiled. Blocks of 4 steps, one small shape per update: each is a compile
of its own (seconds here), made once in this process and reused by every test."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from api.client import Client
from cli.stack import Stack, stop_process
from services.attempts import Outcome
from services.config import Settings
from services.queue import compiles
from services.runner import StepRecorder
from services.schemas import JobSpec
from services.store import Store
from services.training import (
    CompiledSteps,
    Trainer,
    block_shape,
    serialize_state,
    supports_compiled_steps,
)
from tests.attempts import run_once, run_with_hand_back, step_values
from tests.faults import redis_and_api

CPU = torch.device("cpu")
BLOCK = 4
# The cost model compiles any job of a block or more; flushes by count only, so that a
# hand-back comes at step 64 however long the steps take.
COMPILING = Settings(
    cpu_compile_s=0, compile_block_steps=BLOCK, flush_max_steps=64, flush_interval_s=60
)
EAGER = Settings(compile_steps=False, flush_max_steps=64, flush_interval_s=60)
# 240 rows in mini-batches of 48: 5 a epoch, so blocks of 4 straddle epochs and the hand-back
# after step 63 falls in the middle of epoch 12.
DATA = {"synthetic": {"n": 240, "d": 4, "noise": 0.1, "seed": 3}}
# Adam at lr 0.01: well-conditioned over these steps. At lr 0.05 it reaches the optimum of this
# problem within 300 steps and hovers there, where its step (m / sqrt(v), with both near 0)
# amplifies rounding: compiled and eager went from 1e-6 apart at step 269 to 1e-2 at 300.
CASES: dict[str, dict[str, Any]] = {
    "adam": {"optimizer": {"name": "adam", "lr": 0.01, "betas": [0.8, 0.99], "weight_decay": 0.01}},
    "adamw": {"optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1}},
    "momentum": {"optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}},
    "mini-batch": {
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.8, "nesterov": True},
        "batch_size": 48,
        "shuffle_seed": 7,
    },
}


# Plain SGD keeps no state: its checkpoint has none, whichever stepper wrote it.
PLAIN = {"optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 0.01}}


def case_spec(name: str, steps: int) -> JobSpec:
    case = PLAIN if name == "plain" else CASES[name]
    fields = {"data": DATA, "bias": True, "steps": steps, "device": "cpu", **case}
    return JobSpec.model_validate(fields)


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_steps_agree_with_eager_steps(store: Store, name: str) -> None:
    # 303 steps: 75 blocks of 4, then 3 eager steps.
    spec = case_spec(name, 303)
    compiled, compiled_steps = run_once(store, spec, CPU, COMPILING)
    eager, eager_steps = run_once(store, spec, CPU, EAGER)
    assert (compiled.stepper, eager.stepper) == ("compiled", "eager")
    # The same steps, and for mini-batches the same epochs and batches.
    places = [(s["step"], s.get("epoch"), s.get("batch")) for s in compiled_steps]
    assert places == [(s["step"], s.get("epoch"), s.get("batch")) for s in eager_steps]
    assert [p[0] for p in places] == list(range(303))
    # To float32 rounding: each value within 1e-5 of its quantity's scale over the run.
    ours, theirs = step_values(compiled_steps), step_values(eager_steps)
    scale = np.abs(theirs).max(axis=0)
    assert np.all(np.abs(ours - theirs) <= 1e-5 * scale), np.abs(ours - theirs).max(axis=0)


@pytest.mark.parametrize("name", list(CASES))
def test_a_compiled_job_resumes_bit_for_bit(store: Store, name: str) -> None:
    spec = case_spec(name, 203)
    whole_result, whole = run_once(store, spec, CPU, COMPILING)
    attempts, resumed = run_with_hand_back(store, spec, CPU, COMPILING)
    assert [a.stepper for a in (whole_result, *attempts)] == ["compiled"] * 3
    assert attempts[0].steps == 64 and attempts[1].steps == 139
    assert resumed == whole


def snapshot_form(snapshot: Any) -> Any:
    """A snapshot with each tensor replaced by its dtype and shape."""
    if isinstance(snapshot, torch.Tensor):
        return (snapshot.dtype, tuple(snapshot.shape))
    if isinstance(snapshot, dict):
        return {k: snapshot_form(v) for k, v in snapshot.items()}
    if isinstance(snapshot, list | tuple):
        return [snapshot_form(v) for v in snapshot]
    return snapshot


@pytest.mark.parametrize("name", ["adam", "momentum", "plain"])
def test_the_compiled_optimizer_state_is_the_eager_steps_own(name: str) -> None:
    # 32 steps each way: the checkpoint's optimizer state has the eager steps' keys, dtypes
    # and shapes, values to float32 rounding, and eager steps continue from it.
    spec = case_spec(name, 64)
    compiled = Trainer(spec, CPU)
    recorder = StepRecorder(compiled.layout, 64, CPU, 0, BLOCK)
    steps = CompiledSteps(compiled, recorder.storage, recorder.cursor, BLOCK)
    for _ in range(32 // BLOCK):
        steps.replay()
    eager = Trainer(spec, CPU)
    row = torch.empty(eager.layout.width)
    for _ in range(32):
        eager.step(row)
    ours, theirs = compiled.optimizer_snapshot(), eager.optimizer_snapshot()
    if name == "plain":
        assert ours is None and theirs is None
        return
    assert ours is not None and theirs is not None
    assert snapshot_form(ours) == snapshot_form(theirs)
    for key, value in theirs["optimizer"]["state"][0].items():
        torch.testing.assert_close(ours["optimizer"]["state"][0][key], value, rtol=1e-5, atol=0)
    resumed = Trainer(spec, CPU)
    theta = compiled.params().numpy().tobytes()
    resumed.load_state(theta, serialize_state(ours), 32)
    resumed.step(row)
    assert snapshot_form(resumed.optimizer_snapshot()) == snapshot_form(theirs)


def test_what_stays_eager_and_what_the_cost_model_compiles() -> None:
    def trainer(name: str, **fields: Any) -> Trainer:
        spec = case_spec(name, 100).model_dump(mode="json")
        return Trainer(JobSpec.model_validate({**spec, **fields}), CPU)

    assert all(supports_compiled_steps(trainer(name)) for name in CASES)
    scheduled = {"name": "adam", "lr": 0.05, "schedule": {"name": "step", "step_size": 10}}
    assert not supports_compiled_steps(trainer("adam", optimizer=scheduled))
    assert not supports_compiled_steps(trainer("mini-batch", batch_size=50))  # 40 rows left
    # A shape each: the update and the mini-batch are part of what a block is compiled for.
    shapes = {block_shape(trainer(name), BLOCK) for name in CASES}
    assert {(s.update, s.batch) for s in shapes} == {
        ("adam", 0),
        ("adamw", 0),
        ("momentum", 0),
        ("nesterov", 48),
    }
    # An optimizer's state makes an eager step dearer, not a compiled one: with a step's
    # costs given, 30 000 Adam steps repay a 10 s compile, as many plain SGD steps do not.
    costs = Settings(
        cpu_step_fixed_s=250e-6,
        cpu_compiled_step_fixed_s=10e-6,
        cpu_stateful_update_s=200e-6,
        cpu_compile_s=10.0,
    )
    seed = {"data": {"x": [[1.0]], "y": [2.0]}, "steps": 30_000, "device": "cpu"}
    adam = {**seed, "optimizer": {"name": "adam", "lr": 0.01}}
    assert compiles(JobSpec.model_validate(adam), costs)
    assert not compiles(JobSpec.model_validate(seed), costs)


def test_mini_batches_split_the_training_rows_of_a_holdout(store: Store) -> None:
    # 240 rows, 48 held out: 192 training rows in 4 batches of 48 an epoch (counted with the
    # held-out rows there were 5, the last of them empty), and they run compiled.
    fields = case_spec("mini-batch", 40).model_dump(mode="json")
    spec = JobSpec.model_validate({**fields, "eval": {"holdout": 0.2, "seed": 1, "every": 10}})
    trainer = Trainer(spec, CPU)
    assert (trainer.batches_per_epoch, len(trainer.y)) == (4, 192)
    assert supports_compiled_steps(trainer)
    result, steps = run_once(store, spec, CPU, EAGER)
    assert result.outcome is Outcome.SUCCEEDED and len(steps) == 40
    assert [(s["epoch"], s["batch"]) for s in steps[3:6]] == [(0, 3), (1, 0), (1, 1)]


@pytest.fixture(scope="module")
def compiling_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own whose worker compiles every job a block long, in blocks of 4."""
    run_dir: Path = tmp_path_factory.mktemp("compiled-optimizers")
    env = {"GRADSTREAM_CPU_COMPILE_S": "0", "GRADSTREAM_COMPILE_BLOCK_STEPS": str(BLOCK)}
    with redis_and_api(run_dir, env) as local:
        yield local


def test_an_adam_job_runs_compiled_in_a_worker(compiling_stack: Stack) -> None:
    worker = compiling_stack.start_worker("cpu")
    try:
        with Client(compiling_stack.api_url, compiling_stack.api_key, timeout=10) as api:
            compiling_stack.wait_for_workers({"cpu"})
            spec = case_spec("adam", 203)
            job = api.submit(spec.model_dump(mode="json"))
            view = api.wait(job["id"], timeout=300)
            stored = list(api.steps(job["id"]))
    finally:
        stop_process(worker)
    assert view["status"] == "succeeded"
    assert view["stepper"] == "compiled" and view["result"]["stepper"] == "compiled"
    # The worker's steps are this process's compiled steps (one torch thread, the same CPU).
    store = Store.from_url(compiling_stack.redis_url)
    try:
        result, reference = run_once(store, spec, CPU, COMPILING)
    finally:
        store.redis.close()
    assert result.stepper == "compiled" and stored == reference
