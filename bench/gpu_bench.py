"""GPU step rate: gradstream's runner on a CUDA device (every step recorded and flushed to a real
Redis) against the bare torch loop on the same problem, eager and captured in a CUDA graph, in
the same process and run. Needs a GPU; bench/gpu_check.sh runs it on the GPU machine.

    python bench/gpu_bench.py [--cases 1000x10 100000x10 10000000x100]

Prints one line per case: microseconds per step of each loop and the ratios the targets are
stated in (gradstream / bare graph; bare eager / gradstream), and for the largest case the
memory-bandwidth bound of a step (X read twice: forward and backward) measured on this card.
"""

import argparse
import logging
import sys
import time
from collections.abc import Callable
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

CUDA = torch.device("cuda", 0)
# name: (n, d, steps for the graph loops, steps for the eager loops)
CASES = {
    "1000x10": (1000, 10, 20_000, 2_000),
    "100000x10": (100_000, 10, 20_000, 2_000),
    "10000000x100": (10_000_000, 100, 300, 100),
}


def _timed(run: Callable[[int], None], steps: int) -> float:
    """Seconds per step of `run(steps)`, after a warm-up, device work included."""
    run(10)
    torch.cuda.synchronize()
    started = time.perf_counter()
    run(steps)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def bare_loops(spec: JobSpec, graph_steps: int, eager_steps: int) -> tuple[float, float]:
    """The tutorial's step in plain torch on the GPU, nothing recorded: seconds per step run
    eagerly, and captured once in a CUDA graph (torch's whole-step recipe) and replayed."""
    x, y = (t.to(CUDA) for t in build_dataset(spec))
    theta = initial_theta(spec).to(CUDA).requires_grad_()
    optimizer = torch.optim.SGD([theta], lr=spec.optimizer.lr)

    def step() -> None:
        loss = ((x @ theta - y) ** 2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    def eager(steps: int) -> None:
        for _ in range(steps):
            step()
            optimizer.zero_grad(set_to_none=True)

    eager_s = _timed(eager, eager_steps)
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager(3)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step()

    def replay(steps: int) -> None:
        for _ in range(steps):
            graph.replay()

    return eager_s, _timed(replay, graph_steps)


def gradstream_step(store: Store, spec: JobSpec, settings: Settings) -> tuple[float, float, str]:
    """Seconds per step of one attempt through services.runner on the GPU (from its first step
    to its last flush; the result's fit quality, computed once per job, left out), seconds of
    set-up before the first step (claim, building the data, capturing the graph), and the
    attempt's stepper."""
    job_id, _ = store.create_job(spec, "cuda", "bench-no-consumer", "bench")
    started = time.perf_counter()
    result = run_job(store, job_id, "bench", CUDA, settings)
    setup = time.perf_counter() - started - result.loop_s - result.result_s
    assert result.outcome is Outcome.SUCCEEDED, result
    assert store.get_job(job_id).steps_done == spec.steps == result.steps
    return result.loop_s / result.steps, setup, result.stepper


def bandwidth_bound(n: int, d: int) -> float:
    """Seconds a step needs at least: X (n x d float32) read twice, at the bandwidth a large
    device-to-device copy reaches on this card (bytes read + written)."""
    source = torch.empty(n * d, device=CUDA).uniform_()
    target = torch.empty_like(source)

    def copies(times: int) -> None:
        for _ in range(times):
            target.copy_(source)

    per_copy = _timed(copies, 20)
    bandwidth = 2 * source.nbytes / per_copy
    return 2 * n * d * 4 / bandwidth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    with temporary_stack("gradstream-gpu-bench-") as stack:
        settings = Settings(redis_url=stack.start_redis())
        store = Store.from_url(settings.redis_url)
        for name in args.cases:
            n, d, graph_steps, eager_steps = CASES[name]
            fields = {"data": {"synthetic": {"n": n, "d": d}}, "optimizer": {"lr": 0.01}}
            spec = JobSpec.model_validate({**fields, "steps": graph_steps, "device": "cuda"})
            eager_s, graph_s = bare_loops(spec, graph_steps, eager_steps)
            ours_s, setup_s, stepper = gradstream_step(store, spec, settings)
            line = (
                f"{name:<13} bare eager {eager_s * 1e6:8.1f} us  bare graph {graph_s * 1e6:8.1f} us"
                f"  gradstream ({stepper}) {ours_s * 1e6:8.1f} us"
                f"  gradstream/graph {ours_s / graph_s:5.2f}"
                f"  eager/gradstream {eager_s / ours_s:6.1f}  set-up {setup_s * 1e3:.0f} ms"
            )
            if n * d >= 10**8:
                bound = bandwidth_bound(n, d)
                line += f"  bandwidth bound {bound * 1e6:8.1f} us"
                line += f"  gradstream/bound {ours_s / bound:5.2f}"
            else:  # gradstream's own eager path, for what the graph buys
                eager_spec = spec.model_copy(update={"steps": eager_steps})
                no_graph = settings.model_copy(update={"cuda_graphs": False})
                ours_eager_s, eager_setup_s, _ = gradstream_step(store, eager_spec, no_graph)
                line += f"  gradstream eager {ours_eager_s * 1e6:8.1f} us"
                line += f" (set-up {eager_setup_s * 1e3:.0f} ms)"
            print(line, flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
