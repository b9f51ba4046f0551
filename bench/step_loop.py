"""In-worker step rate: gradstream's runner (every step recorded and flushed to a real Redis)
against the bare torch loop on the same problem, in the same process and run.

    .venv/bin/python bench/step_loop.py [--repeat 3]

Prints one line per case with both rates and their ratio (gradstream / bare; 1.0 = free).
Each side runs `repeat` times, interleaved in pairs; the ratio is the median of the pairs'
ratios (each pair ran back to back, so a change in the machine's speed, frequent on a shared
VM, affects both sides alike), the rates the medians of each side.
"""

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.stack import temporary_stack
from services.attempts import Outcome
from services.config import Settings
from services.runner import run_job
from services.schemas import JobSpec
from services.store import Store
from services.training import build_dataset, initial_theta

CASES = {
    "seed 1x1 (tutorial)": (
        {"data": {"x": [[1.0]], "y": [2.0]}, "init": {"w": [1.0]}, "optimizer": {"lr": 0.1}},
        10_000,
    ),
    "1000x10": ({"data": {"synthetic": {"n": 1000, "d": 10}}, "optimizer": {"lr": 0.01}}, 5_000),
    "100000x10": ({"data": {"synthetic": {"n": 100_000, "d": 10}}, "optimizer": {"lr": 0.01}}, 300),
    "1000000x100": (
        {"data": {"synthetic": {"n": 1_000_000, "d": 100}}, "optimizer": {"lr": 0.01}},
        10,
    ),
}


def bare_loop(spec: JobSpec) -> float:
    """The tutorial's loop in plain torch, nothing recorded: seconds for building the data and
    running spec.steps steps (gradstream's time includes building the data too)."""
    started = time.perf_counter()
    x, y = build_dataset(spec)
    theta = initial_theta(spec).requires_grad_()
    optimizer = torch.optim.SGD([theta], lr=spec.optimizer.lr)
    for _ in range(spec.steps):
        loss = ((x @ theta - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def gradstream_run(store: Store, spec: JobSpec, settings: Settings) -> float:
    """One attempt through services.runner, as a worker runs it: seconds from claim to finish,
    less the result's fit quality (R², least squares: once per job, not part of the step loop,
    and nothing the bare loop does)."""
    job_id, _ = store.create_job(spec, "cpu", "bench-no-consumer", "bench")
    started = time.perf_counter()
    result = run_job(store, job_id, "bench", torch.device("cpu"), settings)
    elapsed = time.perf_counter() - started - result.result_s
    assert result.outcome is Outcome.SUCCEEDED, result
    assert store.get_job(job_id).steps_done == spec.steps
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # as in a worker (GRADSTREAM_TORCH_THREADS)

    with temporary_stack("gradstream-bench-") as stack:
        settings = Settings(redis_url=stack.start_redis())
        store = Store.from_url(settings.redis_url)
        flush_ms = settings.flush_interval_s * 1000
        print(f"torch {torch.__version__}, 1 thread, flush every {flush_ms:.0f} ms")
        for name in args.cases:
            fields, steps = CASES[name]
            spec = JobSpec.model_validate({**fields, "steps": steps, "device": "cpu"})
            bare, ours = [], []
            for _ in range(args.repeat):
                bare.append(bare_loop(spec))
                ours.append(gradstream_run(store, spec, settings))
            bare_rate, our_rate = steps / statistics.median(bare), steps / statistics.median(ours)
            ratio = statistics.median(b / o for b, o in zip(bare, ours, strict=True))
            print(
                f"{name:<22} steps {steps:>6}  bare {bare_rate:>8.0f} steps/s  "
                f"gradstream {our_rate:>8.0f} steps/s  ratio {ratio:.3f}"
            )


if __name__ == "__main__":
    main()
