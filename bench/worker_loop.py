"""What a user sees: a job's step rate in a real worker process (started as deployed,
`gradstream worker`, one torch thread), submitted over HTTP, against the loop the user would
write by hand, run in this process right before and after.

    .venv/bin/python bench/worker_loop.py [--repeat 3] [--cases ...]

The job's rate is steps / (finished_at - started_at) from its JobView: from its claim to its
last flush, every step recorded and flushed to Redis. The hand-written loops, each with one
torch thread, building the data as the job does:

- tutorial: the tutorial's update, `w.sub_(lr * w.grad)`, then `w.grad.zero_()`;
- torch.optim: `torch.optim.SGD`'s `step()` and `zero_grad()`.

Cases named `... eval` hold out 0.2 of the rows and evaluate every 10 steps (DESIGN §11); their
hand-written loops do the same (the validation loss every 10 steps, under no_grad), and a last
line per such case gives evaluation's cost: the job's rate over the same case's job without
eval, run right after it in each round (target: at most 10 % slower, i.e. >= 0.90).

Prints one line per case: the rates (medians over `repeat` rounds; each round runs tutorial,
job, torch.optim, tutorial), the job's rate over the tutorial loop's (the median of the
rounds' ratios, each against the mean of its two tutorial runs), how the job's steps ran
(eager, or compiled blocks for long jobs) and the rate of the first job of the case, which
warms the worker and, for a compiled one, includes compiling (from Inductor's on-disk cache
when an earlier worker compiled the shape).
"""

import argparse
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.client import Client
from cli.stack import temporary_stack
from services.schemas import JobSpec
from services.training import build_dataset, initial_theta, split_holdout

CASES = {
    "seed 1x1 (tutorial)": (
        {"data": {"x": [[1.0]], "y": [2.0]}, "init": {"w": [1.0]}, "optimizer": {"lr": 0.1}},
        20_000,
    ),
    "1000x10": ({"data": {"synthetic": {"n": 1000, "d": 10}}, "optimizer": {"lr": 0.01}}, 10_000),
    "100000x10": ({"data": {"synthetic": {"n": 100_000, "d": 10}}, "optimizer": {"lr": 0.01}}, 500),
    # Long jobs: the cost model compiles their step (blocks of 16 steps, Inductor).
    "seed 1x1 long": (
        {"data": {"x": [[1.0]], "y": [2.0]}, "init": {"w": [1.0]}, "optimizer": {"lr": 0.1}},
        100_000,
    ),
    "1000x10 long": (
        {"data": {"synthetic": {"n": 1000, "d": 10}}, "optimizer": {"lr": 0.01}},
        100_000,
    ),
}
EVAL = {"holdout": 0.2, "seed": 0, "every": 10}
for _name in ("1000x10", "1000x10 long"):
    _fields, _steps = CASES[_name]
    CASES[f"{_name} eval"] = ({**_fields, "eval": EVAL}, _steps)


def tutorial_loop(spec: JobSpec) -> float:
    """The tutorial's loop as its reader writes it (with eval, the validation loss every
    `every` steps): steps per second."""
    started = time.perf_counter()
    x, y = build_dataset(spec)
    if spec.eval is None:
        x_val = y_val = None
    else:
        assert spec.eval.holdout is not None
        x, y, x_val, y_val = split_holdout(x, y, spec.eval.holdout, spec.eval.seed)
    every = spec.eval.every if spec.eval is not None else 0
    w = initial_theta(spec).requires_grad_()
    lr = spec.optimizer.lr
    for step in range(spec.steps):
        loss = ((x @ w - y) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            if every and step % every == 0:
                val_loss = ((x_val @ w - y_val) ** 2).mean()  # noqa: F841 (as a user logs it)
            w.sub_(lr * w.grad)
        w.grad.zero_()  # type: ignore[union-attr]
    return spec.steps / (time.perf_counter() - started)


def optim_loop(spec: JobSpec) -> float:
    """The same loop through torch.optim.SGD: steps per second."""
    started = time.perf_counter()
    x, y = build_dataset(spec)
    w = initial_theta(spec).requires_grad_()
    optimizer = torch.optim.SGD([w], lr=spec.optimizer.lr)
    for _ in range(spec.steps):
        loss = ((x @ w - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return spec.steps / (time.perf_counter() - started)


def worker_job(api: Client, spec: JobSpec) -> tuple[float, str]:
    """A job over HTTP in the real worker: its steps per second and how its steps ran."""
    job = api.submit(spec.model_dump(mode="json"))
    view = api.wait(job["id"], timeout=600, poll=0.05)
    assert view["status"] == "succeeded", view
    started = datetime.fromisoformat(view["started_at"])
    finished = datetime.fromisoformat(view["finished_at"])
    return spec.steps / (finished - started).total_seconds(), view["result"]["stepper"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a worker runs (GRADSTREAM_TORCH_THREADS)
    with temporary_stack("gradstream-bench-") as stack:
        stack.start_redis()
        stack.start_api()
        stack.start_worker("cpu")
        stack.wait_for_workers({"cpu"})
        print(f"torch {torch.__version__}, 1 thread; a real worker, jobs over HTTP")
        with Client(stack.api_url, stack.api_key, timeout=30) as api:
            for name in args.cases:
                fields, steps = CASES[name]
                spec = JobSpec.model_validate({**fields, "steps": steps, "device": "cpu"})
                # The first job of a shape warms the worker (and compiles, for a long one):
                # its rate is shown apart.
                first, _ = worker_job(api, spec)
                tutorial, optim, jobs, ratios, costs = [], [], [], [], []
                how = ""
                for _ in range(args.repeat):
                    before = tutorial_loop(spec)
                    job, how = worker_job(api, spec)
                    optim.append(optim_loop(spec))
                    after = tutorial_loop(spec)
                    tutorial += [before, after]
                    jobs.append(job)
                    ratios.append(job / ((before + after) / 2))
                    if spec.eval is not None:  # the same job without eval, in the same round
                        plain, _ = worker_job(api, spec.model_copy(update={"eval": None}))
                        costs.append(job / plain)
                print(
                    f"{name:<20} steps {steps:>6}  tutorial {statistics.median(tutorial):>7.0f}"
                    f"  torch.optim {statistics.median(optim):>7.0f}"
                    f"  job {statistics.median(jobs):>7.0f} steps/s"
                    f"  job/tutorial {statistics.median(ratios):.2f}  ({how}; first job"
                    f" {first:.0f} steps/s)"
                )
                if costs:
                    cost = statistics.median(costs)
                    print(f"{'':<20} eval's cost: job with eval / job without {cost:.2f}")


if __name__ == "__main__":
    main()
