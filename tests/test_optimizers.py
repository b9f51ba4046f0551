"""Optimizers, lr schedules and mini-batches through the service's runner (real Redis), each
against the same thing done by torch directly in the test, step for step and bit for bit."""

from typing import Any

import pytest
import torch

from services.attempts import Outcome
from services.config import Settings
from services.schemas import JobSpec
from services.store import Store
from services.training import batch_order, build_dataset
from tests.attempts import run_once, run_with_hand_back

CPU = torch.device("cpu")
DATA = {"synthetic": {"n": 64, "d": 3, "noise": 0.1, "seed": 4}}
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"name": "sgd", "lr": 0.05},
    # Plain SGD (with or without weight decay) runs gradstream's own in-place update, which
    # must give torch.optim.SGD's numbers bit for bit.
    "sgd-decay": {"name": "sgd", "lr": 0.05, "weight_decay": 0.05},
    "sgd-momentum-decay": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
    "sgd-nesterov": {"name": "sgd", "lr": 0.05, "momentum": 0.8, "nesterov": True},
    "adam": {"name": "adam", "lr": 0.05, "betas": [0.8, 0.99]},
    "adamw-step": {
        "name": "adamw",
        "lr": 0.05,
        "weight_decay": 0.1,
        "schedule": {"name": "step", "step_size": 7, "gamma": 0.5},
    },
    "sgd-cosine": {"name": "sgd", "lr": 0.1, "schedule": {"name": "cosine", "eta_min": 0.001}},
}


def _spec(optimizer: dict[str, Any], **fields: Any) -> JobSpec:
    return JobSpec.model_validate(
        {"data": DATA, "bias": True, "optimizer": optimizer, "steps": 40, "device": "cpu", **fields}
    )


def torch_directly(spec: JobSpec) -> list[dict[str, Any]]:
    """The spec run with torch.optim in a plain loop, as a user would write it."""
    x, y = build_dataset(spec)
    w = torch.zeros(3, requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    o = spec.optimizer
    optimizer: torch.optim.Optimizer
    if o.name == "sgd":
        optimizer = torch.optim.SGD(
            [w, b], lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
        )
    else:
        kind = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        optimizer = kind([w, b], lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    scheduler: Any = None
    if o.schedule.name == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, o.schedule.step_size, o.schedule.gamma
        )
    elif o.schedule.name == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, spec.steps, o.schedule.eta_min
        )
    size = spec.batch_size or len(y)
    per_epoch = -(-len(y) // size)
    records = []
    for step in range(spec.steps):
        epoch, index = divmod(step, per_epoch)
        rows = batch_order(len(y), spec.shuffle_seed, epoch)[index * size : (index + 1) * size]
        xb, yb = (x, y) if per_epoch == 1 else (x[rows], y[rows])
        loss = ((xb @ w + b - yb) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        assert w.grad is not None and b.grad is not None
        record: dict[str, Any] = {
            "step": step,
            "loss": float(loss.detach()),
            "grads": {"w": w.grad.tolist(), "b": float(b.grad)},
            "params": {"w": w.tolist(), "b": float(b.detach())},
        }
        if per_epoch > 1:
            record["epoch"], record["batch"] = epoch, index
        records.append(record)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return records


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_matches_torch_step_for_step(store: Store, name: str) -> None:
    spec = _spec(OPTIMIZERS[name])
    result, steps = run_once(store, spec, CPU, Settings())
    assert result.outcome is Outcome.SUCCEEDED
    assert steps == torch_directly(spec)


def test_mini_batches_follow_a_reproducible_order(store: Store) -> None:
    spec = _spec(OPTIMIZERS["sgd"], batch_size=10, shuffle_seed=7)  # 7 batches: 6 of 10, 1 of 4
    _, first = run_once(store, spec, CPU, Settings())
    _, again = run_once(store, spec, CPU, Settings())
    assert first == again == torch_directly(spec)
    assert [(s["epoch"], s["batch"]) for s in first[5:9]] == [(0, 5), (0, 6), (1, 0), (1, 1)]
    _, other = run_once(store, spec.model_copy(update={"shuffle_seed": 8}), CPU, Settings())
    assert other[0]["loss"] != first[0]["loss"]
    # Each epoch visits every sample once.
    assert sorted(batch_order(64, 7, 3).tolist()) == list(range(64))


@pytest.mark.parametrize("name", ["sgd-nesterov", "adam", "adamw-step"])
def test_resume_mid_epoch_is_exact_with_optimizer_state(store: Store, name: str) -> None:
    spec = _spec(OPTIMIZERS[name], batch_size=10, steps=150)
    # Hand-overs only when a 64-row buffer is full: the first attempt stops after step 63,
    # in the middle of epoch 9 (7 batches per epoch).
    settings = Settings(flush_max_steps=64, flush_interval_s=60)
    _, whole = run_once(store, spec, CPU, settings)
    attempts, resumed = run_with_hand_back(store, spec, CPU, settings)
    assert attempts[0].steps == 64 and 64 % 7 != 0
    assert resumed == whole == torch_directly(spec)
