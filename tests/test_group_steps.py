"""How a sweep's group steps on the CPU (services/group_runner.py): compiled blocks
(torch.compile) where the cost model says they pay, agreeing with eager group steps, one
compile for every member count the group goes through, resuming bit for bit. Groups run in
this process, as a worker's pool child runs them."""

from typing import Any

import torch

from services.config import Settings
from services.store import Store
from services.training import graphs_compiled
from tests.attempts import assert_members_agree, members_steps, run_groups, store_sweep

CPU = torch.device("cpu")
ALWAYS = Settings(cpu_compile_s=0)  # the cost model then compiles any group of a block or more
NEVER = Settings(compile_steps=False)
# Eight plain-SGD members, halved at steps 40, 80 and 160 of 203: 8 -> 4 -> 2 -> 1. The first
# rung falls inside a block of 16 (steps 32..39 run eagerly), the last member runs alone.
SWEEP: dict[str, Any] = {
    "base": {
        "data": {"synthetic": {"n": 4096, "d": 8, "noise": 0.1, "seed": 5}},
        "bias": True,
        "optimizer": {"name": "sgd"},
        "steps": 203,
        "device": "cpu",
    },
    "grid": {"optimizer.lr": [0.01, 0.02, 0.05, 0.1], "optimizer.weight_decay": [0.0, 0.01]},
    "early_stop": {"name": "successive_halving", "min_steps": 40, "eta": 2},
}


def test_compiled_group_steps_agree_with_eager_ones_through_every_cut(store: Store) -> None:
    compiled_sweep = store_sweep(store, SWEEP)
    before = graphs_compiled()
    [compiled] = run_groups(store, compiled_sweep.id, CPU, ALWAYS)
    compiles = graphs_compiled() - before
    eager_sweep = store_sweep(store, SWEEP)
    [eager] = run_groups(store, eager_sweep.id, CPU, NEVER)
    assert (compiled.stepper, eager.stepper) == ("compiled", "eager")
    # Eight members, then four, then two: one compiled block serves them all.
    assert compiles <= 1, compiles

    ours, theirs = members_steps(store, compiled_sweep.id), members_steps(store, eager_sweep.id)
    assert sorted(len(steps) for _, steps in ours) == [40] * 4 + [80] * 2 + [160, 203]
    assert_members_agree(ours, theirs)


def test_a_compiled_group_resumes_bit_for_bit(store: Store) -> None:
    settings = Settings(cpu_compile_s=0, flush_max_steps=64)
    whole = store_sweep(store, SWEEP)
    [uninterrupted] = run_groups(store, whole.id, CPU, settings)
    resumed = store_sweep(store, SWEEP)
    [second] = run_groups(store, resumed.id, CPU, settings, drain=True)
    assert uninterrupted.stepper == second.stepper == "compiled"
    assert members_steps(store, resumed.id) == members_steps(store, whole.id)
