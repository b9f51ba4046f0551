"""A sweep group's cost model counts what is found of its compiled block, as a job's does
(services/group_runner.py, DESIGN §11): a group whose block this process compiled, or whose
marker lies in Inductor's cache, runs compiled where the same group without it runs eager;
the stepper a group's first attempt recorded is kept when it resumes. Groups run in this
process, as a worker's pool child runs them; each test has a problem shape of its own and an
empty Inductor cache, so nothing another test (or run) compiled counts here."""

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from services.attempts import Outcome
from services.batched import BatchedTrainer, group_block_shape
from services.config import Settings
from services.queue import CompiledAt, compiles
from services.runner import run_job, warm_compiled
from services.schemas import JobSpec
from services.store import Store, keys
from services.training import block_cached, block_compiled, graphs_compiled, mark_cached
from tests.attempts import assert_members_agree, members_steps, run_groups, store_sweep

CPU = torch.device("cpu")
BLOCK = Settings().compile_block_steps
# Only a block compiled in this process is free; one from Inductor's cache or from scratch
# never repays itself here.
LATER = Settings(cpu_compile_s=1e6, cpu_compile_cached_s=1e6)
# A worker that runs no compiled blocks.
NO_COMPILE = Settings(compile_steps=False)
# A compile from Inductor's cache is free, one from scratch never repays itself.
CACHED = Settings(cpu_compile_s=1e6, cpu_compile_cached_s=0)


def sweep(samples: int) -> dict[str, Any]:
    """Four plain-SGD members on `samples` x 6 with a bias, 160 steps (ten blocks)."""
    return {
        "base": {
            "data": {"synthetic": {"n": samples, "d": 6, "noise": 0.1, "seed": 2}},
            "bias": True,
            "optimizer": {"name": "sgd"},
            "steps": 160,
            "device": "cpu",
        },
        "grid": {"optimizer.lr": [0.01, 0.02, 0.03, 0.04]},
    }


def group_id(store: Store, sweep_id: str) -> str:
    [group] = store.redis.hget(keys.sweep_key(sweep_id), "groups").decode().split()
    return str(group)


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # no markers, no code


@pytest.mark.usefixtures("empty_cache")
def test_a_group_runs_compiled_once_this_process_compiled_its_block(store: Store) -> None:
    spec = sweep(3001)
    base = JobSpec.model_validate(spec["base"])
    assert compiles(base, LATER, 4, CompiledAt.PROCESS) and not compiles(base, LATER, 4)
    shape = group_block_shape(BatchedTrainer([base, base], CPU), BLOCK)
    assert not block_compiled(shape) and not block_cached(shape)

    # A worker's start compiles the group's block (its recent shapes): two members, here.
    # First, so that nothing slow (a compile) comes between the hand-back and the resume
    # below: a queued group with no message is an orphan to the session worker's reaper after
    # a few seconds, and that worker would take it.
    assert warm_compiled(LATER, ["3001x6+b+group"]) == ["3001x6+b+group"]
    assert block_compiled(shape) and block_cached(shape)

    # A first attempt on a worker that does not compile runs eager steps and hands the group
    # back ...
    eager = store_sweep(store, spec)
    drain = threading.Event()
    drain.set()
    first = run_job(store, group_id(store, eager.id), "test-worker", CPU, NO_COMPILE, drain)
    assert (first.outcome, first.stepper) == (Outcome.RELEASED, "eager")

    # ... and the resumed group keeps the eager steps it recorded (DESIGN §11), on a worker
    # whose cost model would now compile it ...
    resumed = run_job(store, group_id(store, eager.id), "test-worker", CPU, LATER)
    assert (resumed.outcome, resumed.stepper) == (Outcome.SUCCEEDED, "eager")
    # ... and a new group of that shape runs compiled, of four members on the block compiled
    # for two: no compile.
    compiled = store_sweep(store, spec)
    before = graphs_compiled()
    [result] = run_groups(store, compiled.id, CPU, LATER)
    assert result.stepper == "compiled" and graphs_compiled() == before
    for member in store.get_sweep(compiled.id).members:
        assert store.get_job(member.id).stepper == "compiled", member.id

    assert_members_agree(members_steps(store, compiled.id), members_steps(store, eager.id))


@pytest.mark.usefixtures("empty_cache")
def test_a_group_whose_block_is_marked_in_the_compile_cache_runs_compiled(store: Store) -> None:
    spec = sweep(3003)
    base = JobSpec.model_validate(spec["base"])
    shape = group_block_shape(BatchedTrainer([base, base], CPU), BLOCK)
    assert not block_compiled(shape)
    unmarked = store_sweep(store, spec)
    assert run_groups(store, unmarked.id, CPU, CACHED)[0].stepper == "eager"

    mark_cached(shape)  # as another process's compile of the block leaves it
    marked = store_sweep(store, spec)
    assert run_groups(store, marked.id, CPU, CACHED)[0].stepper == "compiled"
    assert block_compiled(shape)
    assert_members_agree(members_steps(store, marked.id), members_steps(store, unmarked.id))
