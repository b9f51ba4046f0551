"""Long Adam, momentum and mini-batch jobs as a user sees them: a real worker process (started
as deployed, `gradstream worker`, one torch thread), jobs over HTTP, against the loop the user
would write by hand with torch.optim (Adam, or SGD with momentum; mini-batches drawn by
`batch_order`, as the job draws them), run in this process right before and after each job.

    .venv/bin/python bench/optimizer_jobs.py [--repeat 2] [--cases ...]

Two stacks in turn, each a private Redis, an API and one CPU worker: `compiled`, whose worker
compiles the cases' shapes when it starts (GRADSTREAM_COMPILE_WARM_SHAPES: the cost model
then counts their compile as done), and `eager` (GRADSTREAM_COMPILE_STEPS=false: how these
jobs ran before compiled blocks took stateful optimizers and mini-batches).

Prints one line per case and stack: the rates (medians over `repeat` rounds; each round runs
hand loop, job, hand loop), the job's rate over the hand loop's (the median of the rounds'
ratios, each against the mean of its two hand-loop runs), how the job's steps ran, and the
rate of the first job of the case (shown apart: it may start before the warm-up is done).
The job's rate is steps / (finished_at - started_at) from its JobView.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.client import Client
from bench.worker_loop import worker_job
from cli.stack import temporary_stack, wait_until
from services.schemas import JobSpec
from services.training import batch_order, build_dataset, initial_theta

SEED = {"data": {"x": [[1.0]], "y": [2.0]}, "init": {"w": [1.0]}}
WIDE = {"data": {"synthetic": {"n": 1000, "d": 10}}}
ADAM = {"name": "adam", "lr": 0.01}
MOMENTUM = {"name": "sgd", "lr": 0.01, "momentum": 0.9}
# name: (spec fields, steps, the shape the compiled stack's worker warms)
CASES: dict[str, tuple[dict[str, Any], int, str]] = {
    "seed 1x1 adam": ({**SEED, "optimizer": ADAM}, 50_000, "1x1+adam"),
    "1000x10 adam": ({**WIDE, "optimizer": ADAM}, 20_000, "1000x10+adam"),
    "1000x10 bs100 momentum": (
        {**WIDE, "optimizer": MOMENTUM, "batch_size": 100},
        20_000,
        "1000x10+bs100+momentum",
    ),
    "1000x10 bs100 adam": (
        {**WIDE, "optimizer": ADAM, "batch_size": 100},
        20_000,
        "1000x10+bs100+adam",
    ),
}


def hand_loop(spec: JobSpec) -> float:
    """The loop a user writes with torch.optim (mini-batches in the job's order): steps/s."""
    started = time.perf_counter()
    x, y = build_dataset(spec)
    w = initial_theta(spec).requires_grad_()
    o = spec.optimizer
    optimizer: torch.optim.Optimizer
    if o.name == "adam":
        optimizer = torch.optim.Adam([w], lr=o.lr, betas=o.betas, eps=o.eps)
    else:
        optimizer = torch.optim.SGD([w], lr=o.lr, momentum=o.momentum)
    size = spec.batch_size or len(y)
    per_epoch = len(y) // size
    order = torch.arange(len(y))
    for step in range(spec.steps):
        epoch, index = divmod(step, per_epoch)
        if per_epoch > 1 and index == 0:
            order = batch_order(len(y), spec.shuffle_seed, epoch)
        rows = order[index * size : (index + 1) * size]
        xb, yb = (x, y) if per_epoch == 1 else (x[rows], y[rows])
        loss = ((xb @ w - yb) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return spec.steps / (time.perf_counter() - started)


def run_stack(mode: str, cases: list[str], repeat: int) -> None:
    # The machine's list of recent shapes neither read nor written: the worker compiles the
    # cases' shapes only, and leaves no shape for this machine's other workers to warm.
    env = {"GRADSTREAM_COMPILE_RECENT_SHAPES": "0", "GRADSTREAM_COMPILE_STEPS": "false"}
    if mode == "compiled":
        warm = ",".join(CASES[name][2] for name in cases)
        env = {"GRADSTREAM_COMPILE_RECENT_SHAPES": "0", "GRADSTREAM_COMPILE_WARM_SHAPES": warm}
    with temporary_stack("gradstream-bench-") as stack:
        stack.start_redis()
        stack.start_api()
        stack.start_worker("cpu", **env)
        stack.wait_for_workers({"cpu"})
        if mode == "compiled":  # every shape compiled before the first job
            log = stack.run_dir / f"worker-cpu-{len(stack.processes) - 1}.log"
            wait_until(lambda: "compiled steps warmed for" in log.read_text(), 900, "warm-up")
            warmed = [line for line in log.read_text().splitlines() if "warmed for" in line]
            print(f"worker: {json.loads(warmed[0])['msg']}")
        with Client(stack.api_url, stack.api_key, timeout=30) as api:
            for name in cases:
                fields, steps, _ = CASES[name]
                spec = JobSpec.model_validate({**fields, "steps": steps, "device": "cpu"})
                first, _ = worker_job(api, spec)
                hands, jobs, ratios = [], [], []
                how = ""
                for _ in range(repeat):
                    before = hand_loop(spec)
                    job, how = worker_job(api, spec)
                    after = hand_loop(spec)
                    hands += [before, after]
                    jobs.append(job)
                    ratios.append(job / ((before + after) / 2))
                print(
                    f"{name:<24} {mode:<8} steps {steps:>6}  hand loop"
                    f" {statistics.median(hands):>7.0f}  job {statistics.median(jobs):>7.0f}"
                    f" steps/s  job/hand {statistics.median(ratios):5.2f}  ({how}; first job"
                    f" {first:.0f} steps/s)",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a worker runs (GRADSTREAM_TORCH_THREADS)
    print(f"torch {torch.__version__}, 1 thread; a real worker, jobs over HTTP")
    print(f"load before: {os.getloadavg()[0]:.2f}")
    for mode in ("compiled", "eager"):
        run_stack(mode, args.cases, args.repeat)
        print(f"load: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
