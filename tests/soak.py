"""Soak run (`make soak`, not part of `make test`): N jobs while workers are killed at random.

    .venv/bin/python -m tests.soak --jobs 40 --workers 2 --seconds 300

Starts a private stack (redis-server with AOF, the API, CPU workers), submits the jobs, and
until they all finish keeps killing a random worker's pool child, or a whole worker (then
starting a new one), every few seconds. Prints jobs completed, steps checked, duplicates and
gaps found (both must be 0), and exits non-zero otherwise.
"""

import argparse
import random
import signal
import sys
import time

from api.client import TERMINAL, Client
from cli.stack import temporary_stack, wait_until
from tests.faults import FAULT_ENV, check_invariant, kill_group, kill_pool_child, long_spec


def main() -> int:
    parser = argparse.ArgumentParser(description="gradstream soak run")
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=600, help="give up after this long")
    parser.add_argument("--kill-every", type=float, default=3.0, help="mean seconds between kills")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    # Kills here are random, not caused by the job: let every job retry as often as it takes.
    env = {**FAULT_ENV, "GRADSTREAM_MAX_ATTEMPTS": "1000"}
    with temporary_stack("gradstream-soak-", env=env) as stack:
        stack.start_redis()
        stack.start_api()
        workers = [stack.start_worker("cpu") for _ in range(args.workers)]
        stack.wait_for_workers({"cpu"})
        with Client(stack.api_url, stack.api_key, timeout=10) as client:
            specs = {}
            for i in range(args.jobs):
                spec = long_spec(steps=rng.choice([500, 2000, 6000, 12000]), seed=i)
                specs[client.submit(spec)["id"]] = spec
            print(f"submitted {len(specs)} jobs to {args.workers} workers")
            deadline = time.monotonic() + args.seconds
            kills = 0
            while True:
                statuses = [client.get(job_id)["status"] for job_id in specs]
                done = sum(status in TERMINAL for status in statuses)
                if done == len(specs) or time.monotonic() > deadline:
                    break
                time.sleep(rng.expovariate(1 / args.kill_every))
                victim = rng.randrange(len(workers))
                try:
                    if rng.random() < 0.5:
                        kill_pool_child(workers[victim])
                        what = "pool child"
                    else:
                        kill_group(workers[victim], signal.SIGKILL)
                        workers[victim] = stack.start_worker("cpu")
                        what = "whole worker"
                    kills += 1
                    print(f"[{done}/{len(specs)} done] killed a {what} (kill {kills})")
                except (ValueError, OSError):
                    pass  # the worker was between pool children; try again later
                wait_until(lambda: bool(client.workers()), 60, "a live worker")

            completed = checked = duplicates = gaps = mismatches = 0
            failed = []
            for job_id, spec in specs.items():
                view = client.get(job_id)
                if view["status"] != "succeeded":
                    failed.append((job_id, view["status"], view["error"]))
                    continue
                completed += 1
                report = check_invariant(client, job_id, spec)
                checked += report.steps_checked
                duplicates += report.duplicates
                gaps += report.gaps
                mismatches += report.mismatches
            print(
                f"jobs completed {completed}/{len(specs)}, steps checked {checked}, "
                f"duplicates {duplicates}, gaps {gaps}, differences from an "
                f"uninterrupted run {mismatches}, kills {kills}"
            )
            for job_id, status, error in failed:
                print(f"  not succeeded: {job_id} {status} {error}")
            ok = duplicates == gaps == mismatches == 0 and completed == len(specs)
            return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
