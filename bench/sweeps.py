"""Sweeps in a real worker (DESIGN §9, issue 14's targets): a worker process started as
deployed (cli.stack.Stack: `gradstream worker`, one torch thread, one pool process), sweeps
and jobs submitted over HTTP, every member-step recorded and flushed to Redis; ratios
measured in the same run.

    .venv/bin/python bench/sweeps.py [--quick] [--cases a b c d] [--repeat 1]

(a) member-steps per second of a K-member sweep (one group) against one job of the same spec
    (1000x10, K = 64; the tutorial's scalar problem, K = 512; 2 000 steps), and each against
    the tutorial's loop written by hand (`w -= lr * w.grad`, nothing recorded) run in this
    process for the same steps. A group's rate is its members' stored steps over the time from
    its claim to its last flush (read from its record in Redis, as a job's JobView gives its
    own: `started_at` at the claim, `finished_at` at the last flush).
(b) end to end over HTTP: a 64-member sweep's wall time from submit until the API says it
    ended, against the same 64 specs submitted at once as 64 jobs to the same worker (from
    the first submit until the last has ended).
(c) successive halving, 81 members, min_steps 10, eta 3, 810 steps: the member-steps
    computed (the sum of the members' steps_done) against the halving budget
    81*10 + 27*20 + 9*60 + 3*180 + 1*540 = 2 970.
(d) a compute-bound step (100 000x10, 27 members, 270 steps): the sweep's wall time with
    successive halving (min_steps 10, eta 3) against the same sweep without early stop.

`--quick` runs every case small, as a smoke test of the harness; its figures mean little.
`--repeat K` runs (a) K times in the same stack: its first run shares the new worker with the
worker's start-up compile of its recent shapes, the later ones do not.
"""

import argparse
import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.client import Client
from cli.stack import Stack, temporary_stack
from services.schemas import JobSpec
from services.store import keys
from services.training import build_dataset, initial_theta

POLL_S = 0.01
SYNTHETIC = {"synthetic": {"n": 1000, "d": 10}}
SCALAR = {"x": [[1.0]], "y": [2.0]}


def lr_grid(members: int, low: float, high: float) -> list[float]:
    """`members` lrs spread log-uniformly over [low, high] (all stable for the problem)."""
    return [low * (high / low) ** (k / max(1, members - 1)) for k in range(members)]


def base(data: dict[str, Any], steps: int, lr: float = 0.01) -> dict[str, Any]:
    return {"data": data, "optimizer": {"name": "sgd", "lr": lr}, "steps": steps, "device": "cpu"}


def sweep_spec(
    data: dict[str, Any], steps: int, lrs: list[float], early_stop: dict[str, Any] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"base": base(data, steps), "grid": {"optimizer.lr": lrs}}
    if early_stop is not None:
        spec["early_stop"] = early_stop
    return spec


def seconds(view: dict[str, Any]) -> float:
    started = datetime.fromisoformat(view["started_at"])
    return (datetime.fromisoformat(view["finished_at"]) - started).total_seconds()


def hand_loop_rate(spec_fields: dict[str, Any]) -> float:
    """The tutorial's loop for one job, written by hand, in this process: steps per second."""
    spec = JobSpec.model_validate(spec_fields)
    x, y = build_dataset(spec)
    w = initial_theta(spec).requires_grad_()
    lr = spec.optimizer.lr
    started = time.perf_counter()
    for _ in range(spec.steps):
        loss = ((x @ w - y) ** 2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        with torch.no_grad():
            assert w.grad is not None
            w -= lr * w.grad
            w.grad = None
    return spec.steps / (time.perf_counter() - started)


class Bench:
    def __init__(self, stack: Stack, api: Client) -> None:
        self.stack, self.api = stack, api
        self.redis = redis.Redis.from_url(stack.redis_url, decode_responses=True)

    def run_sweep(self, spec: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """A sweep over HTTP: its final view and the wall time from submit until ended."""
        started = time.perf_counter()
        sweep = self.api.submit_sweep(spec)
        view = self.api.wait_sweep(sweep["id"], timeout=900, poll=POLL_S)
        wall = time.perf_counter() - started
        assert view["status"] == "succeeded", view
        return view, wall

    def group_seconds(self, sweep_id: str) -> float:
        """Claim to last flush of the sweep's groups (one after another on one worker)."""
        total = 0.0
        for group in self.redis.hget(keys.sweep_key(sweep_id), "groups").split():
            started, finished = self.redis.hmget(keys.job_key(group), "started_at", "finished_at")
            total += (
                datetime.fromisoformat(finished) - datetime.fromisoformat(started)
            ).total_seconds()
        return total

    def run_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        job = self.api.submit(spec)
        view = self.api.wait(job["id"], timeout=900, poll=POLL_S)
        assert view["status"] == "succeeded", view
        return view

    def rates(self, name: str, data: dict[str, Any], members: int, steps: int) -> None:
        """(a): a K-member sweep's member-steps per second against one job, and both against
        the hand-written loop; the job and the loop measured before and after the sweep."""
        lrs = lr_grid(members, 1e-3, 0.3 if data is SYNTHETIC else 0.5)
        single = base(data, steps, lrs[members // 2])
        self.run_job(single)  # warms the worker's pool process for the shape
        before = self.run_job(single)
        hand_before = hand_loop_rate(single)
        view, _ = self.run_sweep(sweep_spec(data, steps, lrs))
        after = self.run_job(single)
        hand_after = hand_loop_rate(single)
        member_steps = sum(member["steps_done"] for member in view["members"])
        assert member_steps == members * steps
        swept = member_steps / self.group_seconds(view["id"])
        group = self.api.get(view["members"][0]["id"]).get("stepper", "?")  # the group's
        job = 2 * steps / (seconds(before) + seconds(after))
        hand = (hand_before + hand_after) / 2
        print(
            f"(a) {name}, K = {members}, {steps} steps: sweep {swept:,.0f} member-steps/s "
            f"({group}), "
            f"one job {job:,.0f} steps/s ({before['result'].get('stepper', '?')}), hand-written "
            f"loop {hand:,.0f} steps/s; sweep/job {swept / job:.1f}x, "
            f"sweep/hand {swept / hand:.1f}x, job/hand {job / hand:.2f}x",
            flush=True,
        )

    def end_to_end(self, members: int, steps: int) -> None:
        """(b): one sweep against the same specs as jobs, all submitted at once."""
        lrs = lr_grid(members, 1e-3, 0.3)
        _, sweep_wall = self.run_sweep(sweep_spec(SYNTHETIC, steps, lrs))
        started = time.perf_counter()
        jobs = [self.api.submit(base(SYNTHETIC, steps, lr))["id"] for lr in lrs]
        for job in jobs:
            assert self.api.wait(job, timeout=900, poll=POLL_S)["status"] == "succeeded"
        jobs_wall = time.perf_counter() - started
        print(
            f"(b) end to end over HTTP, 1000x10, {members} members, {steps} steps: sweep "
            f"{sweep_wall:.2f} s, {members} jobs {jobs_wall:.2f} s; the sweep "
            f"{jobs_wall / sweep_wall:.1f}x sooner",
            flush=True,
        )

    def halving_budget(self, members: int, min_steps: int, eta: int, steps: int) -> None:
        """(c): member-steps computed against successive halving's budget."""
        early = {"name": "successive_halving", "min_steps": min_steps, "eta": eta}
        view, wall = self.run_sweep(
            sweep_spec(SYNTHETIC, steps, lr_grid(members, 1e-3, 0.3), early)
        )
        computed = sum(member["steps_done"] for member in view["members"])
        budget, running, done = 0, members, 0
        rung = min_steps
        while running >= 1:
            end = rung if rung < steps else steps
            budget += running * (end - done)
            if end >= steps:
                break
            done = end
            if running >= eta:
                running = math.ceil(running / eta)
            rung *= eta
        print(
            f"(c) successive halving, {members} members, min_steps {min_steps}, eta {eta}, "
            f"{steps} steps: {computed} member-steps computed, budget {budget}; "
            f"{computed / budget:.3f}x the budget ({view['counts']}, {wall:.2f} s)",
            flush=True,
        )

    def compute_bound(self, n: int, members: int, steps: int) -> None:
        """(d): a compute-bound sweep with and without successive halving."""
        data = {"synthetic": {"n": n, "d": 10}}
        lrs = lr_grid(members, 1e-3, 0.3)
        early = {"name": "successive_halving", "min_steps": 10, "eta": 3}
        full, full_wall = self.run_sweep(sweep_spec(data, steps, lrs))
        halved, halved_wall = self.run_sweep(sweep_spec(data, steps, lrs, early))
        full_s, halved_s = self.group_seconds(full["id"]), self.group_seconds(halved["id"])
        print(
            f"(d) compute-bound, {n}x10, {members} members, {steps} steps: with successive "
            f"halving {halved_wall:.2f} s (group {halved_s:.2f} s), without early stop "
            f"{full_wall:.2f} s (group {full_s:.2f} s); halving/without "
            f"{halved_wall / full_wall:.2f} (groups {halved_s / full_s:.2f})",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small cases: a smoke test")
    parser.add_argument("--cases", nargs="*", default=list("abcd"), choices=list("abcd"))
    parser.add_argument("--repeat", type=int, default=1, help="runs of case (a)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a worker runs (GRADSTREAM_TORCH_THREADS)
    quick = args.quick
    with temporary_stack("gradstream-bench-") as stack:
        stack.start_redis()
        stack.start_api()
        stack.start_worker("cpu")
        stack.wait_for_workers({"cpu"})
        mode = " (--quick)" if quick else ""
        print(
            f"torch {torch.__version__}, 1 thread; a real worker (1 pool process), sweeps and "
            f"jobs over HTTP, every member-step recorded and flushed{mode}",
            flush=True,
        )
        with Client(stack.api_url, stack.api_key, timeout=60) as api:
            bench = Bench(stack, api)
            steps = 200 if quick else 2000
            for _ in range(args.repeat if "a" in args.cases else 0):
                bench.rates("1000x10", SYNTHETIC, 8 if quick else 64, steps)
                bench.rates("scalar (tutorial)", SCALAR, 32 if quick else 512, steps)
            if "b" in args.cases:
                bench.end_to_end(8 if quick else 64, steps)
            if "c" in args.cases:
                bench.halving_budget(*((9, 2, 3, 18) if quick else (81, 10, 3, 810)))
            if "d" in args.cases:
                bench.compute_bound(*((10_000, 9, 30) if quick else (100_000, 27, 270)))


if __name__ == "__main__":
    main()
