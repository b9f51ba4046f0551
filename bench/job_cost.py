"""Where one tutorial job's cost is spent (issue 23): a real worker of one pool process runs
pre-queued seed-example jobs (10 steps), and per job the run counts

- the CPU time of the worker's main process (Celery's consumer) and of its pool child (the
  attempt), from /proc, between the worker's first claim and the last job's end;
- Redis's CPU time (`INFO cpu`) and the commands it ran (`INFO commandstats`: calls and
  usec per command) over the same span;

and the same for trivial Celery tasks (bench/trivial_app.py: one INCR each) on the same
broker and settings: the broker's share of a job. Redis is the one resource N workers share,
so its CPU per job bounds the jobs per second of any N (printed).

    .venv/bin/python bench/job_cost.py [--jobs 500] [--tasks 2000]
"""

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.client import Client
from cli.main import SEED_EXAMPLE
from cli.stack import Stack, child_pids, stop_process, temporary_stack, wait_until
from services.config import get_settings
from services.store import keys

ENV = {
    "GRADSTREAM_MAX_ACTIVE_JOBS_PER_TENANT": "1000000",
    "GRADSTREAM_SUBMITS_PER_MINUTE": "1000000",
    "GRADSTREAM_COMPILE_STEPS": "false",
}
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Snapshot:
    """CPU of the worker's processes and of Redis, and Redis's command counts, at one time."""

    def __init__(self, client: "redis.Redis", main: int, child: int | None) -> None:
        self.main = cpu_seconds(main)
        self.child = cpu_seconds(child) if child is not None else 0.0
        cpu = client.info("cpu")
        self.redis = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        stats = client.info("commandstats")
        self.commands = {
            name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
            for name, v in stats.items()
        }


def report(what: str, count: int, before: Snapshot, after: Snapshot, elapsed: float) -> float:
    """Print the per-unit costs between two snapshots; returns Redis's CPU per unit (s)."""
    redis_s = (after.redis - before.redis) / count
    print(f"{what}: {count} in {elapsed:.2f} s ({count / elapsed:.0f}/s)")
    print(f"  worker main process CPU {1e6 * (after.main - before.main) / count:8.0f} us each")
    print(f"  worker pool child   CPU {1e6 * (after.child - before.child) / count:8.0f} us each")
    print(f"  redis-server        CPU {1e6 * redis_s:8.0f} us each (INFO cpu)")
    calls_total, usec_total = 0, 0
    rows = []
    for name, (calls, usec) in after.commands.items():
        calls0, usec0 = before.commands.get(name, (0, 0))
        if calls > calls0:
            rows.append((name, (calls - calls0) / count, (usec - usec0) / count))
            calls_total += calls - calls0
            usec_total += usec - usec0
    # A script's own commands have lines of their own and are inside EVALSHA's time too.
    print(
        f"  redis commands {calls_total / count:5.1f} each, {usec_total / count:5.0f} us each"
        " inside them (commandstats; the commands scripts run count twice: on their own line"
        " and in evalsha's):"
    )
    for name, calls_each, usec_each in sorted(rows, key=lambda r: -r[2]):
        print(f"    {name:24s} {calls_each:6.2f} calls  {usec_each:7.1f} us")
    return redis_s


def worker_child(worker: "subprocess.Popen[bytes]") -> int:
    """The worker's one pool process (once it has run a job: before, the worker may still
    be running a short-lived subprocess of its start)."""
    (child,) = child_pids(worker.pid)
    return child


def tutorial_jobs(stack: Stack, count: int) -> float:
    """Run `count` pre-queued seed-example jobs on one worker of one pool process."""
    with Client(stack.api_url, stack.api_key, timeout=30) as api, ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: api.submit(SEED_EXAMPLE)["id"], range(count)))
    client = redis.Redis.from_url(stack.redis_url)
    worker = stack.start_worker("cpu")
    try:

        def status(job_id: str) -> bytes:
            return client.hget(keys.job_key(job_id), "status") or b""

        # The first job's end starts the span (the worker is warm); one HGET per poll only.
        wait_until(lambda: status(ids[0]) == b"succeeded", 120, "first job", 0.001)
        child = worker_child(worker)
        before, started = Snapshot(client, worker.pid, child), time.perf_counter()
        done_before = sum(status(i) == b"succeeded" for i in ids)
        wait_until(lambda: status(ids[-1]) == b"succeeded", 600, "last job", 0.01)
        elapsed = time.perf_counter() - started
        after = Snapshot(client, worker.pid, child)
        statuses = [status(i) for i in ids]
        assert all(s == b"succeeded" for s in statuses), "a job did not succeed"
        return report("tutorial jobs", count - done_before, before, after, elapsed)
    finally:
        stop_process(worker)
        client.close()


def trivial_tasks(stack: Stack, count: int) -> float:
    """Run `count` pre-queued trivial tasks on one worker of one pool process."""
    os.environ["GRADSTREAM_REDIS_URL"] = stack.redis_url  # the sending side's broker
    get_settings.cache_clear()
    from bench.trivial_app import app

    for _ in range(count):
        app.send_task("bench.trivial", args=["done"], queue="trivial")
    client = redis.Redis.from_url(stack.redis_url)
    argv = [sys.executable, "-m", "celery", "-A", "bench.trivial_app", "worker", "-Q", "trivial"]
    argv += ["-c", "1", "-P", "prefork", "--without-gossip", "--without-mingle", "-l", "warning"]
    worker = stack.spawn("trivial", argv, stack.env())
    try:
        wait_until(lambda: client.get("done") is not None, 120, "first task", 0.001)
        child = worker_child(worker)
        before, started = Snapshot(client, worker.pid, child), time.perf_counter()
        first = int(client.get("done") or 0)
        wait_until(lambda: int(client.get("done") or 0) >= count, 600, "tasks", 0.01)
        elapsed = time.perf_counter() - started
        after = Snapshot(client, worker.pid, child)
        return report("trivial tasks", count - first, before, after, elapsed)
    finally:
        stop_process(worker)
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--tasks", type=int, default=2000)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}", flush=True)
    with temporary_stack("gradstream-job-cost-", env=ENV) as stack:
        stack.start_redis()
        stack.start_api()
        trivial = trivial_tasks(stack, args.tasks)
        jobs = tutorial_jobs(stack, args.jobs)
    print(
        f"Redis's one thread bounds all workers together at {1 / jobs:.0f} tutorial jobs/s"
        f" ({1 / trivial:.0f} trivial tasks/s), whatever N; load {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
