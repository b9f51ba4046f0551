"""Scale-out (issue 15): N worker processes (N workers of one pool process each, as N nodes or
N GPUs run them, one torch thread each) for N = 1, 2, 4, 8, measured in one run against trivial
Celery tasks on N workers alike, the same broker and settings:

- tutorial jobs per second: 200 x N seed-example jobs (10 steps) submitted over HTTP while no
  worker runs, then the workers started; counted, as the jobs' own records say, from the
  moment the last of the N workers claimed its first job to the last job's end (the worker
  tier in steady state: not the API's submits, not the workers' staggered start-up);
- trivial tasks per second: 1 000 x N tasks sent first, then their worker started; from the
  first task done to the last;
- long-job steps per second: N jobs (1000x10, eager steps, every step recorded and flushed)
  trained at once, their stored steps counted over a 5 s window.

    .venv/bin/python bench/scale_out.py [--workers 1 2 4 8]

Prints per N the rates, each as a multiple of its N = 1 rate (the goal: >= 0.8 x N up to 8,
where the machine has the cores: run it on 16), and jobs against trivial tasks.
"""

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.client import Client
from cli.main import SEED_EXAMPLE
from cli.stack import Stack, stop_process, temporary_stack, wait_until
from services.config import get_settings
from services.store import keys

LONG_JOB = {
    "data": {"synthetic": {"n": 1000, "d": 10}},
    "optimizer": {"lr": 0.001},
    "steps": 1_000_000,
    "device": "cpu",
}
WINDOW_S = 5.0
# The bench submits thousands of jobs at once, past any real tenant's limits; long jobs train
# eagerly (no compile: its seconds would fall in the window).
ENV = {
    "GRADSTREAM_MAX_ACTIVE_JOBS_PER_TENANT": "1000000",
    "GRADSTREAM_SUBMITS_PER_MINUTE": "1000000",
    "GRADSTREAM_COMPILE_STEPS": "false",
}


def trivial_rate(stack: Stack, processes: int) -> float:
    """Trivial tasks per second on `processes` pool processes (all sent before the worker)."""
    count = 1000 * processes
    counter = f"done-{processes}"
    os.environ["GRADSTREAM_REDIS_URL"] = stack.redis_url  # the sending side's broker
    get_settings.cache_clear()
    from bench.trivial_app import app

    client = redis.Redis.from_url(stack.redis_url)
    for _ in range(count):
        app.send_task("bench.trivial", args=[counter], queue="trivial")
    workers = []
    for index in range(processes):
        argv = [sys.executable, "-m", "celery", "-A", "bench.trivial_app", "worker"]
        argv += ["-Q", "trivial", "-c", "1", "-P", "prefork", "--without-gossip"]
        argv += ["--without-mingle", "-n", f"trivial{processes}-{index}@%h", "-l", "warning"]
        workers.append(stack.spawn(f"trivial-{processes}-{index}", argv, stack.env()))
    try:
        wait_until(lambda: client.get(counter) is not None, 120, "first trivial task", 0.001)
        started = time.perf_counter()
        first = int(client.get(counter) or 0)
        wait_until(lambda: int(client.get(counter) or 0) >= count, 300, "trivial tasks", 0.001)
        return (count - first) / (time.perf_counter() - started)
    finally:
        stop_all(workers)
        client.close()


def job_rates(stack: Stack, api: Client, processes: int) -> tuple[float, float]:
    """Tutorial jobs per second and long-job steps per second on `processes` pool processes."""
    count = 200 * processes
    with ThreadPoolExecutor(16) as pool:  # queued: no worker runs yet
        ids = list(pool.map(lambda _: api.submit(SEED_EXAMPLE)["id"], range(count)))
    workers = [stack.start_worker("cpu") for _ in range(processes)]
    try:
        client = redis.Redis.from_url(stack.redis_url)

        def records() -> list[list[str]]:
            """Each job's status, worker, started_at and finished_at."""
            pipe = client.pipeline(transaction=False)
            for job_id in ids:
                pipe.hmget(keys.job_key(job_id), "status", "worker", "started_at", "finished_at")
            return [[(value or b"").decode() for value in row] for row in pipe.execute()]

        # Poll one job until the last one queued is done (the queue is first in, first out),
        # then all: the times come from the records, and a poll of all 200 x N records every
        # few milliseconds would take a core of its own from the workers.
        last = keys.job_key(ids[-1])
        wait_until(lambda: client.hget(last, "status") == b"succeeded", 600, "last job", 0.05)
        wait_until(lambda: all(r[0] == "succeeded" for r in records()), 600, "jobs", 0.5)
        rows = [
            (w, datetime.fromisoformat(a), datetime.fromisoformat(b)) for _, w, a, b in records()
        ]
        first_claims: dict[str, datetime] = {}
        for worker, started, _ in rows:
            first_claims[worker] = min(started, first_claims.get(worker, started))
        all_running = max(first_claims.values())
        counted = [finished for _, started, finished in rows if started >= all_running]
        jobs_per_s = len(counted) / (max(counted) - all_running).total_seconds()

        long_ids = [api.submit(LONG_JOB)["id"] for _ in range(processes)]

        def stored() -> list[int]:
            return [api.get(job_id)["steps_done"] for job_id in long_ids]

        wait_until(lambda: min(stored()) > 0, 120, "long jobs running", 0.05)
        before, started = sum(stored()), time.perf_counter()
        time.sleep(WINDOW_S)
        steps_per_s = (sum(stored()) - before) / (time.perf_counter() - started)
        for job_id in long_ids:
            api.cancel(job_id)
        wait_until(lambda: all(api.get(i)["status"] == "cancelled" for i in long_ids), 30, "")
        client.close()
        return jobs_per_s, steps_per_s
    finally:
        stop_all(workers)


def stop_all(workers: "list[subprocess.Popen[bytes]]") -> None:
    """SIGTERM them all at once, then wait for each."""
    for worker in workers:
        worker.terminate()
    for worker in workers:
        stop_process(worker)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", nargs="*", type=int, default=[1, 2, 4, 8])
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores", flush=True)
    with temporary_stack("gradstream-scale-out-", env=ENV) as stack:
        stack.start_redis()
        stack.start_api()
        base: tuple[float, float, float] | None = None
        with Client(stack.api_url, stack.api_key, timeout=30) as api:
            for n in args.workers:
                trivial = trivial_rate(stack, n)
                jobs, steps = job_rates(stack, api, n)
                base = base or (trivial, jobs, steps)
                print(
                    f"N={n}  trivial {trivial:7.0f} tasks/s ({trivial / base[0]:4.1f}x)"
                    f"  tutorial jobs {jobs:6.0f}/s ({jobs / base[1]:4.1f}x)"
                    f"  long-job steps {steps:8.0f}/s ({steps / base[2]:4.1f}x)"
                    f"  jobs/trivial {jobs / trivial:5.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
