"""The batched step on a GPU (bench/gpu_check.sh runs tests/gpu): eager against each member
alone, the captured CUDA graph against the eager batched step, and a sweep's group through
the group runner as CUDA graphs (against eager group steps; resumed bit for bit)."""

import numpy as np
import pytest
import torch

from services.batched import BatchedCudaGraphStep, BatchedTrainer
from services.config import Settings
from services.schemas import JobSpec
from services.store import Store
from services.sweeps_math import halving_rungs
from services.training import Trainer, compute_device
from tests.attempts import (
    assert_members_agree,
    assert_rungs_apart,
    members_steps,
    run_groups,
    store_sweep,
)
from tests.test_eval import WEIGHT_DECAY_RUNGS, WEIGHT_DECAY_SWEEP

CUDA = compute_device("cuda")
STEPS = 300


def _specs(name: str) -> list[JobSpec]:
    return [
        JobSpec.model_validate(
            {
                "data": {"synthetic": {"n": 1000, "d": 10}},
                "bias": True,
                "optimizer": {"name": name, "lr": lr, "schedule": {"name": "cosine"}},
                "steps": STEPS,
                "device": "cuda",
            }
        )
        for lr in (0.001, 0.003, 0.01)
    ]


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_the_graph_replays_the_eager_batched_step(name: str) -> None:
    specs = _specs(name)
    eager = BatchedTrainer(specs, CUDA)
    expected = torch.empty(STEPS, len(specs), eager.layout.width, device=CUDA)
    for i in range(STEPS):
        eager.step(expected[i])

    graphed = BatchedTrainer(specs, CUDA)
    storage = torch.empty_like(expected)
    cursor = torch.zeros((), dtype=torch.int64, device=CUDA)
    step = BatchedCudaGraphStep(graphed, storage, cursor)
    for _ in range(STEPS):
        step.replay()
    assert graphed.steps_done == STEPS
    torch.testing.assert_close(storage, expected, rtol=1e-5, atol=1e-6)

    for k, spec in enumerate(specs):
        alone = Trainer(spec, CUDA)
        rows = torch.empty(STEPS, alone.layout.width, device=CUDA)
        for i in range(STEPS):
            alone.step(rows[i])
        scale = rows[:, 1:].abs().max(dim=0).values
        assert ((expected[:, k, 1:] - rows[:, 1:]).abs() <= 1e-5 * scale).all()
        assert ((expected[:, k, 0] - rows[:, 0]).abs() <= 1e-5 * rows[:, 0].abs()).all()


# A sweep's group through the group runner on the GPU: AdamW with a cosine schedule, halved at
# steps 50, 100 and 200 of 300 (8 -> 4 -> 2 -> 1 members, a graph captured for each). The graph
# and the eager step round differently, so their cuts are compared only because the members
# are far apart at every rung by construction: lr and (decoupled) weight decay each move a
# member's loss by 2.9 % or more at step 49 and far more later (on a CPU: 2.9 %, 32 % and 92 %
# apart at worst at the three rungs), and the two members left at step 200 are far from the
# optimum (0.15 and 1.8 against ~0.01).
SWEEP = {
    "base": {
        "data": {"synthetic": {"n": 1000, "d": 10, "noise": 0.1}},
        "bias": True,
        "optimizer": {"name": "adamw", "schedule": {"name": "cosine"}},
        "steps": STEPS,
        "device": "cuda",
    },
    "grid": {
        "optimizer.lr": [0.003, 0.006, 0.012, 0.025],
        "optimizer.weight_decay": [0.01, 4.0],
    },
    "early_stop": {"name": "successive_halving", "min_steps": 50, "eta": 2},
}
RUNGS = halving_rungs(50, 2, STEPS)


def test_a_group_steps_as_cuda_graphs_through_every_cut(store: Store) -> None:
    graphed = store_sweep(store, SWEEP)
    [ours] = run_groups(store, graphed.id, CUDA, Settings())
    eager = store_sweep(store, SWEEP)
    [theirs] = run_groups(store, eager.id, CUDA, Settings(cuda_graphs=False))
    assert (ours.stepper, theirs.stepper) == ("cuda-graph", "eager")
    got, want = members_steps(store, graphed.id), members_steps(store, eager.id)
    assert sorted(len(steps) for _, steps in got) == [50] * 4 + [100] * 2 + [200, STEPS]
    assert_rungs_apart(got, RUNGS)
    assert_rungs_apart(want, RUNGS)
    assert_members_agree(got, want)


def test_a_graphed_group_resumes_bit_for_bit(store: Store) -> None:
    settings = Settings(flush_max_steps=64)
    whole = store_sweep(store, SWEEP)
    [uninterrupted] = run_groups(store, whole.id, CUDA, settings)
    resumed = store_sweep(store, SWEEP)
    [second] = run_groups(store, resumed.id, CUDA, settings, drain=True)
    assert uninterrupted.stepper == second.stepper == "cuda-graph"
    assert members_steps(store, resumed.id) == members_steps(store, whole.id)


def test_graphed_and_eager_groups_keep_the_same_members_by_val_loss(store: Store) -> None:
    # The weight-decay sweep of tests/test_eval.py: its values at the rungs are far apart by
    # construction, so the graph (evaluating every step) and eager steps prune alike.
    sweep = {**WEIGHT_DECAY_SWEEP, "base": {**WEIGHT_DECAY_SWEEP["base"], "device": "cuda"}}
    graphed = store_sweep(store, sweep)
    [ours] = run_groups(store, graphed.id, CUDA, Settings())
    eager = store_sweep(store, sweep)
    [theirs] = run_groups(store, eager.id, CUDA, Settings(cuda_graphs=False))
    assert (ours.stepper, theirs.stepper) == ("cuda-graph", "eager")
    got, want = members_steps(store, graphed.id), members_steps(store, eager.id)
    assert_rungs_apart(got, WEIGHT_DECAY_RUNGS, "val_loss")
    assert_rungs_apart(want, WEIGHT_DECAY_RUNGS, "val_loss")
    assert [status for status, _ in got] == ["pruned", "pruned", "succeeded", "pruned"]
    assert [status for status, _ in got] == [status for status, _ in want]
    for (_, mine), (_, reference) in zip(got, want, strict=True):
        assert [s.get("val_loss") is None for s in mine] == [
            s.get("val_loss") is None for s in reference
        ]
        np.testing.assert_allclose(
            [s["val_loss"] for s in mine if "val_loss" in s],
            [s["val_loss"] for s in reference if "val_loss" in s],
            rtol=1e-5,
        )
