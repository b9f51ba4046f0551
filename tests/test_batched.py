"""The batched step of a sweep's group (services/batched.py) against each member's JobSpec run
alone by `Trainer`, and successive halving's arithmetic (services/sweeps_math.py)."""

import io
import math
from typing import Any

import pytest
import torch

from services.batched import BatchedTrainer
from services.schemas import JobSpec
from services.sweeps_math import halving_cut, halving_rungs, rank_by_loss
from services.training import Trainer

CPU = torch.device("cpu")
STEPS = 1000
DATA = {"synthetic": {"n": 64, "d": 3, "noise": 0.1, "seed": 4}}
INITS: list[dict[str, Any]] = [
    {},
    {"w": [0.5, -0.25, 1.0], "b": 0.5},
    {"w": [-1.0, 0.0, 2.0], "b": -1.5},
]
# Per case: the optimizer every member shares, then each member's own numbers. The lrs keep
# each run well-conditioned: still converging at step 1000, not yet down at the rounding-noise
# floor, where Adam's normalised update turns a last-bit difference (the batched matmul sums
# in another order than a single job's matrix-vector product) into a visible one.
CASES: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    "sgd": ({"name": "sgd"}, [{"lr": 0.001}, {"lr": 0.002}, {"lr": 0.003}]),
    "sgd-momentum": (
        {"name": "sgd"},
        [{"lr": 0.001, "momentum": 0.5}, {"lr": 0.0005, "momentum": 0.9}, {"lr": 0.002}],
    ),
    "sgd-nesterov-decay": (
        {"name": "sgd", "nesterov": True},
        [
            {"lr": 0.001, "momentum": 0.5, "weight_decay": 0.01},
            {"lr": 0.0005, "momentum": 0.8, "weight_decay": 0.0},
            {"lr": 0.0002, "momentum": 0.9, "weight_decay": 0.1},
        ],
    ),
    "adam": (
        {"name": "adam"},
        [
            {"lr": 0.001},
            {"lr": 0.002, "betas": [0.8, 0.99], "eps": 1e-6},
            {"lr": 0.0005, "betas": [0.95, 0.995], "weight_decay": 0.01},
        ],
    ),
    "adamw": (
        {"name": "adamw"},
        [
            {"lr": 0.001, "weight_decay": 0.0},
            {"lr": 0.002, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.05},
            {"lr": 0.0005, "betas": [0.95, 0.995], "weight_decay": 0.2},
        ],
    ),
    "sgd-step": (
        {"name": "sgd", "schedule": {"name": "step"}},
        [
            {"lr": 0.003, "schedule": {"name": "step", "step_size": 100, "gamma": 0.5}},
            {"lr": 0.002, "schedule": {"name": "step", "step_size": 333, "gamma": 0.9}},
            {"lr": 0.001, "momentum": 0.5, "schedule": {"name": "step", "step_size": 1}},
        ],
    ),
    "adam-cosine": (
        {"name": "adam", "schedule": {"name": "cosine"}},
        [
            {"lr": 0.002, "schedule": {"name": "cosine", "eta_min": 0.0}},
            {"lr": 0.001, "schedule": {"name": "cosine", "eta_min": 0.0005}},
            {"lr": 0.003, "betas": [0.8, 0.99], "schedule": {"name": "cosine", "eta_min": 1e-4}},
        ],
    ),
}


def _spec(optimizer: dict[str, Any], init: dict[str, Any], **fields: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "data": DATA,
            "bias": True,
            "init": init,
            "optimizer": optimizer,
            "steps": STEPS,
            "device": "cpu",
            "shuffle_seed": 7,
            **fields,
        }
    )


def _specs(case: str, batch_size: int | None = None) -> list[JobSpec]:
    shared, members = CASES[case]
    return [
        _spec({**shared, **own}, INITS[i % len(INITS)], batch_size=batch_size)
        for i, own in enumerate(members)
    ]


def run_batched(trainer: BatchedTrainer, steps: int) -> torch.Tensor:
    """(steps, len(live), width): the rows of `steps` batched steps."""
    rows = torch.empty(steps, len(trainer.live), trainer.layout.width)
    for i in range(steps):
        trainer.step(rows[i])
    return rows


def run_alone(spec: JobSpec, steps: int = STEPS) -> torch.Tensor:
    """(steps, width): the spec's rows as a single job computes them."""
    trainer = Trainer(spec, CPU)
    rows = torch.empty(steps, trainer.layout.width)
    for i in range(steps):
        trainer.step(rows[i])
    return rows


def assert_same_numbers(batched: torch.Tensor, alone: torch.Tensor) -> None:
    """Relative 1e-5: each loss against itself; each gradient and parameter against its
    largest size over the run (a value crossing zero has no relative error of its own)."""
    loss, alone_loss = batched[:, 0], alone[:, 0]
    assert ((loss - alone_loss).abs() <= 1e-5 * alone_loss.abs()).all()
    scale = alone[:, 1:].abs().max(dim=0).values
    assert ((batched[:, 1:] - alone[:, 1:]).abs() <= 1e-5 * scale).all()


@pytest.mark.parametrize("batch_size", [None, 16], ids=["full-batch", "mini-batch"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_member_equals_its_spec_run_alone(case: str, batch_size: int | None) -> None:
    specs = _specs(case, batch_size)
    batched = run_batched(BatchedTrainer(specs, CPU), STEPS)
    for k, spec in enumerate(specs):
        assert_same_numbers(batched[:, k], run_alone(spec))


def test_seed_member_step_zero_is_the_tutorials_record() -> None:
    """The seed's example (x = 1, y = 2, w = 1, lr 0.1) as one member among others: its step 0
    is loss 1, gradient -2, parameter 1, exactly."""
    seed = {"data": {"x": [[1.0]], "y": [2.0]}, "steps": 20, "device": "cpu"}
    specs = [
        JobSpec.model_validate({**seed, "init": {"w": [w]}, "optimizer": {"lr": lr}})
        for w, lr in [(0.0, 0.01), (1.0, 0.1), (3.0, 0.5)]
    ]
    batched = run_batched(BatchedTrainer(specs, CPU), 20)
    assert batched[0, 1].tolist() == [1.0, -2.0, 1.0]
    # The tutorial's next step: w = 1 - 0.1 * (-2) = 1.2.
    assert batched[1, 1, 2].item() == pytest.approx(1.2)
    for k, spec in enumerate(specs):
        assert_same_numbers(batched[:, k], run_alone(spec, 20))


def test_a_diverging_member_leaves_the_others_alone() -> None:
    specs = _specs("sgd")
    specs.insert(1, _spec({"name": "sgd", "lr": 10.0}, {}))
    trainer = BatchedTrainer(specs, CPU)
    batched = run_batched(trainer, 300)
    assert not batched[:, 1].isfinite().all()
    for k in (0, 2, 3):
        assert_same_numbers(batched[:, k], run_alone(specs[k], 300))
    # The runner drops it; the others go on.
    trainer.keep([0, 2, 3])
    assert trainer.live == [0, 2, 3]
    assert run_batched(trainer, 10).isfinite().all()


@pytest.mark.parametrize("case", ["sgd-nesterov-decay", "adamw", "adam-cosine"])
def test_keep_leaves_the_survivors_numbers_unchanged(case: str) -> None:
    specs = _specs(case, batch_size=16)
    whole = run_batched(BatchedTrainer(specs, CPU), 200)
    pruned = BatchedTrainer(specs, CPU)
    before = run_batched(pruned, 100)
    pruned.keep([2, 0])
    assert pruned.live == [0, 2]
    assert pruned.params().shape == (2, 4)
    after = run_batched(pruned, 100)
    assert torch.equal(before, whole[:100])
    # Bit for bit: every op works per member (row or column), a member's sums run over the
    # same samples in the same order whatever the member count.
    assert torch.equal(after, whole[100:, [0, 2]])
    with pytest.raises(ValueError, match="not live"):
        pruned.keep([1])


@pytest.mark.parametrize("case", ["sgd-momentum", "adam"])
def test_keep_of_nobody_leaves_no_member_live(case: str) -> None:
    trainer = BatchedTrainer(_specs(case), CPU)
    run_batched(trainer, 10)
    trainer.keep([])  # a rung's cut, or cancels, ended every member
    assert trainer.live == [] and trainer.params().shape == (0, 4)
    assert all(buffer.shape[1] == 0 for buffer in trainer.state.values())


@pytest.mark.parametrize("case", ["sgd-momentum", "adam-cosine", "sgd-step"])
def test_a_checkpoint_resumes_bit_for_bit(case: str) -> None:
    specs = _specs(case, batch_size=24)  # epochs of 3 batches, the last one short
    uninterrupted = BatchedTrainer(specs, CPU)
    first = run_batched(uninterrupted, 150)
    uninterrupted.keep([1, 2])
    rest = run_batched(uninterrupted, 150)

    interrupted = BatchedTrainer(specs, CPU)
    run_batched(interrupted, 150)
    interrupted.keep([1, 2])
    run_batched(interrupted, 50)
    state = interrupted.state_bytes()
    torch.load(io.BytesIO(state), weights_only=True)  # tensors only

    resumed = BatchedTrainer(specs, CPU)  # a fresh process would build it from the specs
    resumed.load_state(state, 200)
    assert resumed.live == [1, 2] and resumed.steps_done == 200
    assert torch.equal(run_batched(resumed, 100), rest[50:])
    assert torch.equal(resumed.params(), uninterrupted.params())
    assert first.isfinite().all()


def test_a_group_shares_all_but_the_numbers() -> None:
    sgd = _spec({"name": "sgd"}, {})
    with pytest.raises(ValueError, match="differs from member 0"):
        BatchedTrainer([sgd, _spec({"name": "adam"}, {})], CPU)
    with pytest.raises(ValueError, match="differs from member 0"):
        BatchedTrainer([sgd, _spec({"name": "sgd"}, {}, batch_size=8)], CPU)
    other_data = JobSpec.model_validate(
        {**sgd.model_dump(), "data": {"synthetic": {"n": 9, "d": 3}}}
    )
    with pytest.raises(ValueError, match="other data"):
        BatchedTrainer([sgd, other_data], CPU)
    with pytest.raises(ValueError, match="at least one"):
        BatchedTrainer([], CPU)


def test_halving_rungs() -> None:
    assert halving_rungs(10, 3, 810) == [10, 30, 90, 270]
    assert halving_rungs(10, 3, 811) == [10, 30, 90, 270, 810]
    assert halving_rungs(10, 2, 10) == []
    assert halving_rungs(1, 2, 9) == [1, 2, 4, 8]
    with pytest.raises(ValueError):
        halving_rungs(10, 1, 100)


def test_halving_cut_keeps_the_best_third_lowest_first_ties_by_position() -> None:
    losses = [0.5, 0.1, 0.3, 0.1, 0.9, 0.2, 0.7, 0.8, 0.3]
    assert halving_cut(losses, 3) == ([1, 3, 5], 0.2)
    # ceil(n / eta): 7 members, eta 3, three go on; the tie at the cut goes by position.
    assert halving_cut([0.4, 0.2, 0.4, 0.4, 0.9, 0.1, 0.5], 3) == ([0, 1, 5], 0.4)
    assert rank_by_loss([0.4, 0.2, 0.4, 0.4]) == [1, 0, 2, 3]


def test_halving_cut_ranks_missing_and_non_finite_losses_last() -> None:
    losses: list[float | None] = [None, 0.3, math.nan, 0.2, math.inf, 0.1]
    assert rank_by_loss(losses) == [5, 3, 1, 0, 2, 4]
    assert halving_cut(losses, 2) == ([1, 3, 5], 0.3)
    # More going on than finite losses: the cut-off is not a number.
    assert halving_cut([None, 0.5, None], 2) == ([0, 1], None)


def test_halving_cut_prunes_nobody_below_eta() -> None:
    assert halving_cut([0.9, 0.1], 3) == ([0, 1], None)
    assert halving_cut([], 3) == ([], None)
    assert halving_cut([0.9, 0.1, 0.5], 3) == ([1], 0.1)
