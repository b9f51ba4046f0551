"""The batched step of a sweep's group against its members trained one at a time: in one
process, on the CPU, one torch thread (a diagnosis harness: bench/sweeps.py measures a real
worker end to end).

    .venv/bin/python bench/sweeps_step.py [--repeat 3]

Per problem, member-steps per second of
  - BatchedTrainer: all K members in one step, every row recorded (as a worker does);
  - BatchedCompiledSteps: the same step compiled in blocks of 16 (what a worker runs for long
    plain-SGD groups; its compile, seconds, is not timed);
  - Trainer: the same K specs as K single jobs, one after another, every row recorded;
  - the tutorial's loop for one job, written by hand (`w -= lr * w.grad`), nothing recorded;
and the batched rate over each of the other two. Each side runs `repeat` times, interleaved;
the rates are medians.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.batched import BatchedCompiledSteps, BatchedTrainer
from services.schemas import JobSpec
from services.training import Trainer, build_dataset, initial_theta

# name: (data, members, batched steps, steps per single job, lr range)
PROBLEMS: dict[str, tuple[dict[str, Any], int, int, int, tuple[float, float]]] = {
    "1000x10, K=64": ({"synthetic": {"n": 1000, "d": 10}}, 64, 2000, 200, (1e-3, 0.3)),
    "scalar (tutorial), K=512": ({"x": [[1.0]], "y": [2.0]}, 512, 2000, 40, (1e-3, 0.5)),
}


def member_specs(data: dict[str, Any], members: int, lrs: tuple[float, float]) -> list[JobSpec]:
    """Plain SGD, lrs spread log-uniformly, as a grid over optimizer.lr makes them."""
    low, high = lrs
    return [
        JobSpec.model_validate(
            {
                "data": data,
                "init": {"w": [1.0] * (10 if "synthetic" in data else 1)},
                "optimizer": {"name": "sgd", "lr": low * (high / low) ** (k / (members - 1))},
                "steps": 2000,
                "device": "cpu",
            }
        )
        for k in range(members)
    ]


def batched_rate(specs: list[JobSpec], steps: int) -> float:
    trainer = BatchedTrainer(specs, torch.device("cpu"))
    records = torch.empty(steps, len(specs), trainer.layout.width)
    trainer.step(records[0])  # the first step loads torch's lazy parts
    started = time.perf_counter()
    for i in range(1, steps):
        trainer.step(records[i])
    return len(specs) * (steps - 1) / (time.perf_counter() - started)


def compiled_rate(specs: list[JobSpec], steps: int) -> float:
    """The group's step as compiled blocks (compiled before the clock starts)."""
    trainer = BatchedTrainer(specs, torch.device("cpu"))
    block = 16
    storage = torch.empty(steps + block, len(specs), trainer.layout.width)
    cursor = torch.zeros((), dtype=torch.int64)
    compiled = BatchedCompiledSteps(trainer, storage, cursor, block)
    started = time.perf_counter()
    for _ in range(steps // block):
        compiled.replay()
    return len(specs) * (steps // block) * block / (time.perf_counter() - started)


def single_jobs_rate(specs: list[JobSpec], steps: int) -> float:
    """The specs as single jobs, one after another (each building its trainer, as a job does)."""
    warm = Trainer(specs[0], torch.device("cpu"))  # loads torch's lazy parts, not timed
    warm.step(torch.empty(warm.layout.width))
    started = time.perf_counter()
    for spec in specs:
        trainer = Trainer(spec, torch.device("cpu"))
        records = torch.empty(steps, trainer.layout.width)
        for i in range(steps):
            trainer.step(records[i])
    return len(specs) * steps / (time.perf_counter() - started)


def hand_loop_rate(spec: JobSpec, steps: int) -> float:
    """The tutorial's loop for one job: forward, loss, backward, w -= lr * w.grad."""
    x, y = build_dataset(spec)
    w = initial_theta(spec).requires_grad_()
    lr = spec.optimizer.lr
    started = time.perf_counter()
    for _ in range(steps):
        loss = ((x @ w - y) ** 2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        with torch.no_grad():
            assert w.grad is not None
            w -= lr * w.grad
            w.grad = None
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; member-steps per second, medians of {args.repeat}")
    for name, (data, members, steps, single_steps, lrs) in PROBLEMS.items():
        specs = member_specs(data, members, lrs)
        rates: dict[str, list[float]] = {"batched": [], "compiled": [], "single": [], "hand": []}
        for _ in range(args.repeat):
            rates["batched"].append(batched_rate(specs, steps))
            rates["compiled"].append(compiled_rate(specs, steps))
            rates["single"].append(single_jobs_rate(specs, single_steps))
            rates["hand"].append(hand_loop_rate(specs[members // 2], members * single_steps))
        batched, compiled, single, hand = (statistics.median(rates[key]) for key in rates)
        print(
            f"{name}: batched {batched:,.0f}/s, compiled {compiled:,.0f}/s, {members} single "
            f"jobs (Trainer) {single:,.0f}/s, hand-written loop {hand:,.0f}/s; batched / single "
            f"jobs {batched / single:.1f}x, compiled / single jobs {compiled / single:.1f}x, "
            f"batched / hand-written loop {batched / hand:.1f}x, compiled / batched "
            f"{compiled / batched:.2f}x"
        )


if __name__ == "__main__":
    main()
