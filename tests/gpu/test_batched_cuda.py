"""The batched step on a GPU (bench/gpu_check.sh runs tests/gpu): eager against each member
alone, and the captured CUDA graph against the eager batched step."""

import pytest
import torch

from services.batched import BatchedCudaGraphStep, BatchedTrainer
from services.schemas import JobSpec
from services.training import Trainer, compute_device

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
