"""Stateful optimizers: torch.optim's step (its default, foreach and fused implementations)
against the same update written by hand, in one process, one torch thread. Decides whether
gradstream keeps torch.optim for them (it keeps it where torch.optim is as fast).

    .venv/bin/python bench/optimizer_step.py [--steps 20000] [--repeat 5]

Prints one line per problem and optimizer: µs per whole step (forward, backward, update)
for each implementation, and each one's time over the hand-written one's (medians).
"""

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.schemas import JobSpec
from services.training import build_dataset

PROBLEMS = {
    "seed 1x1": {"x": [[1.0]], "y": [2.0]},
    "1000x10": {"synthetic": {"n": 1000, "d": 10}},
}
LR, BETAS, EPS, MOMENTUM = 0.01, (0.9, 0.999), 1e-8, 0.9

Update = Callable[[torch.Tensor], None]


def by_hand(kind: str, theta: torch.Tensor) -> Update:
    """The update as torch.optim documents it, written out with in-place ops."""
    if kind == "sgd-momentum":
        buffer = torch.zeros_like(theta)

        def sgd(grad: torch.Tensor) -> None:
            buffer.mul_(MOMENTUM).add_(grad)
            theta.sub_(buffer, alpha=LR)

        return sgd
    m, v, step = torch.zeros_like(theta), torch.zeros_like(theta), [0]

    def adam(grad: torch.Tensor) -> None:
        step[0] += 1
        m.lerp_(grad, 1 - BETAS[0])
        v.mul_(BETAS[1]).addcmul_(grad, grad, value=1 - BETAS[1])
        step_size = LR / (1 - BETAS[0] ** step[0])
        denom = (v.sqrt() / math.sqrt(1 - BETAS[1] ** step[0])).add_(EPS)
        theta.addcdiv_(m, denom, value=-step_size)

    return adam


def with_torch(kind: str, theta: torch.Tensor, implementation: str) -> Update:
    flags = {"foreach": {"foreach": True}, "fused": {"fused": True}}.get(implementation, {})
    optimizer: torch.optim.Optimizer
    if kind == "sgd-momentum":
        optimizer = torch.optim.SGD([theta], lr=LR, momentum=MOMENTUM, **flags)
    else:
        optimizer = torch.optim.Adam([theta], lr=LR, betas=BETAS, eps=EPS, **flags)

    def step(_: torch.Tensor) -> None:
        optimizer.step()

    return step


def seconds_per_step(
    x: torch.Tensor, y: torch.Tensor, make: Callable[[torch.Tensor], Update], steps: int
) -> float:
    theta = torch.zeros(x.shape[1], requires_grad=True)
    update = make(theta)
    started = time.perf_counter()
    for _ in range(steps):
        theta.grad = None
        loss = ((x @ theta - y) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            update(theta.grad)  # type: ignore[arg-type]
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {args.steps} steps, median of {args.repeat}")
    for problem, data in PROBLEMS.items():
        x, y = build_dataset(JobSpec.model_validate({"data": data}))
        for kind in ("sgd-momentum", "adam"):
            makers: dict[str, Callable[[torch.Tensor], Update]] = {
                "by hand": lambda theta, kind=kind: by_hand(kind, theta),
            }
            for implementation in ("default", "foreach", "fused"):
                makers[f"torch.optim {implementation}"] = (
                    lambda theta, kind=kind, impl=implementation: with_torch(kind, theta, impl)
                )
            times: dict[str, list[float]] = {name: [] for name in makers}
            for _ in range(args.repeat):  # interleaved: the VM's drift touches all alike
                for name, make in makers.items():
                    times[name].append(seconds_per_step(x, y, make, args.steps))
            hand = statistics.median(times["by hand"])
            line = "  ".join(
                f"{name} {statistics.median(t) * 1e6:6.1f} us ({statistics.median(t) / hand:.2f}x)"
                for name, t in times.items()
            )
            print(f"{problem:<9} {kind:<13} {line}")


if __name__ == "__main__":
    main()
