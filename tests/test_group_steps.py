"""How a sweep's group steps on the CPU (services/group_runner.py): compiled blocks
(torch.compile) where the cost model says they pay, agreeing with eager group steps, one
compile for every member count the group goes through, resuming bit for bit. Groups run in
this process, as a worker's pool child runs them."""

from typing import Any

import torch

from services.attempts import CHUNK_BUDGET_BYTES
from services.config import Settings
from services.store import Store
from services.sweeps_math import halving_rungs
from services.training import graphs_compiled
from tests.attempts import (
    assert_members_agree,
    assert_rungs_apart,
    members_steps,
    run_groups,
    store_sweep,
)

CPU = torch.device("cpu")
ALWAYS = Settings(cpu_compile_s=0)  # the cost model then compiles any group of a block or more
NEVER = Settings(compile_steps=False)
# Eight plain-SGD members, halved at steps 40, 80 and 160 of 203: 8 -> 4 -> 2 -> 1. The first
# rung falls inside a block of 16 (steps 32..39 run eagerly), the last member runs alone.
# Compiled and eager steps round differently, so the cuts are compared only because the
# members stay far apart at every rung by construction: all start at w = 0, far from the
# optimum (|w*| = 3.7), and the learning rates are small enough that none gets near it by the
# last rung (the two members there: losses 0.017 and 0.034 against 0.0101 at the optimum);
# each lr and weight decay moves a member's loss by 9 % or more (RANK_MARGIN is 2 %).
SWEEP: dict[str, Any] = {
    "base": {
        "data": {"synthetic": {"n": 4096, "d": 8, "noise": 0.1, "seed": 5}},
        "bias": True,
        "optimizer": {"name": "sgd"},
        "steps": 203,
        "device": "cpu",
    },
    "grid": {"optimizer.lr": [0.005, 0.008, 0.01, 0.012], "optimizer.weight_decay": [0.0, 2.0]},
    "early_stop": {"name": "successive_halving", "min_steps": 40, "eta": 2},
}
RUNGS = halving_rungs(40, 2, 203)

# Thirty-two plain-SGD members on 600x10 without a bias (records 21 floats wide), halved at
# steps 20, 40 and 80 of 100: 32 -> 16 -> 8 -> 4. A chunk's rows are what the buffer's budget
# in bytes holds, so they depend on the members' count here (3120 rows at 32 members, then
# flush_max_steps' 4096): the cut at 20 changes the buffer's rows as well as its members. Far
# apart at every rung by construction: all start at w = 0 (|w*|^2 = 7.3, the noise floor 0.01),
# and each lr is 0.0005 above the last, which moves its loss at step 19 by 3.6 % or more and
# by more at later rungs (RANK_MARGIN is 2 %); the last four end at 0.019 to 0.027.
WIDE_MEMBERS, WIDE_WIDTH = 32, 21
WIDE: dict[str, Any] = {
    "base": {
        "data": {"synthetic": {"n": 600, "d": 10, "noise": 0.1, "seed": 3}},
        "optimizer": {"name": "sgd"},
        "steps": 100,
        "device": "cpu",
    },
    "grid": {"optimizer.lr": [round(0.002 + 0.0005 * k, 4) for k in range(WIDE_MEMBERS)]},
    "early_stop": {"name": "successive_halving", "min_steps": 20, "eta": 2},
}
WIDE_RUNGS = halving_rungs(20, 2, 100)


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
    assert_rungs_apart(ours, RUNGS)
    assert_rungs_apart(theirs, RUNGS)
    assert_members_agree(ours, theirs)


def test_a_compiled_group_resumes_bit_for_bit(store: Store) -> None:
    settings = Settings(cpu_compile_s=0, flush_max_steps=64)
    whole = store_sweep(store, SWEEP)
    [uninterrupted] = run_groups(store, whole.id, CPU, settings)
    resumed = store_sweep(store, SWEEP)
    [second] = run_groups(store, resumed.id, CPU, settings, drain=True)
    assert uninterrupted.stepper == second.stepper == "compiled"
    assert members_steps(store, resumed.id) == members_steps(store, whole.id)


def test_one_compile_serves_a_group_whose_chunk_rows_change_at_its_cuts(store: Store) -> None:
    rows = [CHUNK_BUDGET_BYTES // (4 * k * WIDE_WIDTH) for k in (WIDE_MEMBERS, WIDE_MEMBERS // 2)]
    assert min(rows[0], ALWAYS.flush_max_steps) != min(rows[1], ALWAYS.flush_max_steps)
    compiled_sweep = store_sweep(store, WIDE)
    before = graphs_compiled()
    [compiled] = run_groups(store, compiled_sweep.id, CPU, ALWAYS)
    compiles = graphs_compiled() - before
    eager_sweep = store_sweep(store, WIDE)
    [eager] = run_groups(store, eager_sweep.id, CPU, NEVER)
    assert (compiled.stepper, eager.stepper) == ("compiled", "eager")
    # 32 members, then 16, 8 and 4, in buffers of 3120 rows and then 4096: one compile.
    assert compiles == 1, compiles

    ours, theirs = members_steps(store, compiled_sweep.id), members_steps(store, eager_sweep.id)
    assert sorted(len(steps) for _, steps in ours) == [20] * 16 + [40] * 8 + [80] * 4 + [100] * 4
    assert_rungs_apart(ours, WIDE_RUNGS)
    assert_rungs_apart(theirs, WIDE_RUNGS)
    assert_members_agree(ours, theirs)
