"""Jobs per second end to end: 500 tutorial-sized jobs (10 steps) submitted over HTTP until all
succeed, against 500 trivial Celery tasks on the same broker, with the same worker settings
(one prefork worker, concurrency 1), in the same run.

    .venv/bin/python bench/throughput.py [--jobs 500]
"""

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.client import Client
from cli.main import SEED_EXAMPLE
from cli.stack import Stack, stop_process, temporary_stack, wait_until
from services.config import get_settings


def trivial_tasks(stack: Stack, count: int) -> float:
    """Seconds for `count` trivial tasks, from the first send to the last one done."""
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.trivial_app",
        "worker",
        "-Q",
        "cpu",
        "-c",
        "1",
        "-P",
        "prefork",
        "--without-gossip",
        "--without-mingle",
        "-n",
        "trivial@%h",
        "-l",
        "warning",
    ]
    worker = stack.spawn("trivial-worker", argv, stack.env())
    try:
        # The sending side reads the same settings as the workers: this run's Redis.
        os.environ["GRADSTREAM_REDIS_URL"] = stack.redis_url
        get_settings.cache_clear()
        from bench.trivial_app import app

        client = redis.Redis.from_url(stack.redis_url)
        app.send_task("bench.trivial", args=["warmup"], queue="cpu")
        wait_until(lambda: client.get("warmup") == b"1", 60, "trivial worker")
        started = time.perf_counter()
        for _ in range(count):
            app.send_task("bench.trivial", args=["done"], queue="cpu")
        wait_until(lambda: int(client.get("done") or 0) >= count, 300, "trivial tasks", 0.005)
        return time.perf_counter() - started
    finally:
        stop_process(worker)


def gradstream_jobs(stack: Stack, count: int) -> float:
    """Seconds for `count` seed-example jobs, from the first submit to the last success."""
    worker = stack.start_worker("cpu")
    try:
        stack.wait_for_workers({"cpu"})
        client = redis.Redis.from_url(stack.redis_url)
        with Client(stack.api_url, stack.api_key) as api:
            warm = api.submit(SEED_EXAMPLE)
            api.wait(warm["id"])
            before = client.zcard("gs:jobs:succeeded")
            started = time.perf_counter()
            # Submitting from 8 threads, as several clients would.
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda _: api.submit(SEED_EXAMPLE), range(count)))
            wait_until(
                lambda: client.zcard("gs:jobs:succeeded") - before >= count, 600, "jobs", 0.005
            )
            return time.perf_counter() - started
    finally:
        stop_process(worker)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    args = parser.parse_args()
    # Past the per-tenant limits a real tenant has: the bench submits 500 jobs at once.
    limits = {
        "GRADSTREAM_MAX_ACTIVE_JOBS_PER_TENANT": "100000",
        "GRADSTREAM_SUBMITS_PER_MINUTE": "100000",
    }
    with temporary_stack("gradstream-bench-", env=limits) as stack:
        stack.start_redis()
        stack.start_api()
        trivial = args.jobs / trivial_tasks(stack, args.jobs)
        ours = args.jobs / gradstream_jobs(stack, args.jobs)
        print(
            f"{args.jobs} tutorial jobs over HTTP  trivial celery {trivial:>6.0f} tasks/s  "
            f"gradstream {ours:>6.0f} jobs/s  ratio {ours / trivial:.3f}"
        )


if __name__ == "__main__":
    main()
