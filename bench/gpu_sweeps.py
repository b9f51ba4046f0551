"""A sweep's group on a GPU (issue 14's GPU target): K members of the 1000x10 problem trained
as one CUDA graph, every member-step recorded and flushed to a real Redis, against one graphed
job of the same spec and against the rate Redis itself ingests entries of the same size (a bare
pipelined XADD loop), in the same process and run. Needs a GPU; bench/gpu_check.sh runs it.

    python bench/gpu_sweeps.py [--members 64 1024 4096] [--steps 2000]

Per K: member-steps per second of the group (from its claim to its last flush: building the
data and capturing the graph included), that over the single job's steps per second (target at
K = 1024: >= 200), and that over Redis's own rate for the group's entries (target >= 0.7 where
storing is the limit).
"""

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.group_flush import bare_xadds
from cli.stack import temporary_stack
from services.attempts import CHUNK_BUDGET_BYTES, Outcome
from services.config import Settings
from services.runner import run_job
from services.schemas import JobSpec, SweepSpec
from services.store import Store, keys
from services.sweeps import submit_sweep

CUDA = torch.device("cuda", 0)
DATA = {"synthetic": {"n": 1000, "d": 10}}


def base(steps: int) -> dict[str, Any]:
    optimizer = {"name": "sgd", "lr": 0.01}
    return {"data": DATA, "optimizer": optimizer, "steps": steps, "device": "cuda"}


def single_job_rate(store: Store, steps: int, settings: Settings) -> tuple[float, str]:
    """One job's steps per second through services.runner (first step to last flush)."""
    job_id, _ = store.create_job(JobSpec.model_validate(base(steps)), "cuda", "bench-none", "b")
    result = run_job(store, job_id, "bench", CUDA, settings)
    assert result.outcome is Outcome.SUCCEEDED, result
    return result.steps / result.loop_s, result.stepper


def group_rate(store: Store, members: int, steps: int, settings: Settings) -> tuple[float, str]:
    """A K-member sweep's one group run by services.runner: member-steps per second from the
    claim to the last flush, and its stepper."""
    lrs = [0.001 * 10 ** (k / max(1, members - 1)) for k in range(members)]
    spec = SweepSpec.model_validate({"base": base(steps), "grid": {"optimizer.lr": lrs}})
    sweep = submit_sweep(store, spec, settings, "bench", enqueue=lambda *_: None)
    [group] = store.redis.hget(keys.sweep_key(sweep.id), "groups").decode().split()
    started = time.perf_counter()
    result = run_job(store, group, "bench", CUDA, settings)
    wall = time.perf_counter() - started
    assert result.outcome is Outcome.SUCCEEDED, result
    done = sum(m.steps_done for m in store.get_sweep(sweep.id).members)
    assert done == members * steps, done
    return done / wall, result.stepper


def redis_rate(url: str, members: int, steps: int, width: int) -> float:
    """Member-steps per second Redis ingests as bare XADDs of the group's entry size (one
    entry per member per chunk, a chunk's worth of members per round trip)."""
    rows = max(1, CHUNK_BUDGET_BYTES // (4 * members * width))
    return bare_xadds(url, members, -(-steps // rows), rows, width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", nargs="*", type=int, default=[64, 1024, 4096])
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
    with temporary_stack("gradstream-gpu-sweeps-") as stack:
        settings = Settings(
            redis_url=stack.start_redis(),
            max_sweep_members=8192,
            max_group_members=8192,  # each K one group
            tenant_storage_bytes=8 * 1024**3,
        )
        store = Store.from_url(settings.redis_url)
        single, single_stepper = single_job_rate(store, args.steps, settings)
        print(f"one job ({single_stepper}): {single:,.0f} steps/s", flush=True)
        width = 1 + 2 * 10  # loss, dLoss/dw, w: 1000x10 without a bias
        for members in args.members:
            rate, stepper = group_rate(store, members, args.steps, settings)
            ingest = redis_rate(settings.redis_url, members, args.steps, width)
            print(
                f"K={members:<5} group ({stepper}) {rate:>13,.0f} member-steps/s"
                f"  group/one job {rate / single:7.1f}x"
                f"  bare XADD {ingest:>13,.0f} member-steps/s  group/XADD {rate / ingest:5.2f}",
                flush=True,
            )
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
