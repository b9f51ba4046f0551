"""History beyond Redis memory: what archiving saves, and what reading an archived job costs.

    .venv/bin/python bench/archive.py [--jobs 1000] [--steps 10000] [--read-steps 100000]

(a) Redis memory (INFO used_memory) with N finished jobs of S steps each: hot (their streams
    in Redis), then past the hot window once the archiver (services/archiver.py, the code a
    worker's archiver thread runs, here in this process with a hot retention of 0) moved every
    stream to Parquet files. Baselines in the same run: an empty Redis, and the same N jobs'
    records with no step history at all (finished with no steps) — what a job costs in Redis
    whatever becomes of its steps, since its record stays.
(b) A full read of a job of R steps through GET /steps (pages of 5 000, a real API over
    HTTP): archived vs. in Redis. Jobs with the same rows, one left in Redis and one archived
    per round; each round reads the one in Redis, then a new archived one twice: its first read
    (its file opened, its row groups decoded), then again (the API's cache warm). Medians over
    the rounds; apart, the API process's first archived read of all (which also pays pyarrow's
    start in that process).

Jobs are written through the store's own scripts (create, claim, flush in chunks of 4 096
steps as a worker does, finish), with random float32 rows of the tutorial's width (one
feature: loss, gradient, parameter) for (a) and of ten features and a bias for (b).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.stack import Stack
from services.archive import Archive
from services.archiver import archive_due
from services.records import Chunk, row_width
from services.schemas import JobSpec, JobStatus
from services.store import Checkpoint, Store

CHUNK_STEPS = 4096
TENANT = "local"  # the stack's own tenant: the API reads its jobs


def spec(features: int, bias: bool, steps: int) -> JobSpec:
    return JobSpec.model_validate(
        {
            "data": {"synthetic": {"n": 100, "d": features, "seed": 0}},
            "bias": bias,
            "optimizer": {"name": "sgd", "lr": 0.01},
            "steps": steps,
            "device": "cpu",
        }
    )


def finished_job(store: Store, job_spec: JobSpec, rows: bytes) -> str:
    """A job that ran `rows` (float32 rows of its width) as a worker would have stored them."""
    job_id, _ = store.create_job(job_spec, "cpu", "cpu", "bench", tenant=TENANT)
    claim = store.claim_job(job_id, "bench", lease_s=60, max_attempts=3)
    assert claim.attempt is not None
    features, bias = job_spec.data.features, job_spec.bias
    width = 4 * row_width(features, bias)
    steps = len(rows) // width
    theta = bytes(4 * (features + int(bias)))
    result = {
        "params": {"w": [0.5] * features, **({"b": 0.1} if bias else {})},
        "loss": 0.01,
        "stopped": "ran all its steps",
        "full_loss": 0.01,
        "r2": 0.99,
        "stepper": "eager",
    }
    for first in range(0, max(steps, 1), CHUNK_STEPS):
        count = min(CHUNK_STEPS, steps - first)
        chunk = None
        if count > 0:
            part = rows[first * width : (first + count) * width]
            chunk = Chunk(first, count, features, bias, part)
        last = first + count >= steps
        store.flush_steps(
            job_id,
            claim.attempt,
            chunk,
            Checkpoint(first + count, theta, b"", 0.01),
            60,
            finish=JobStatus.SUCCEEDED if last else None,
            result=result if last else None,
        )
    return job_id


def used_memory(client: "redis.Redis") -> int:
    return int(client.info("memory")["used_memory"])


def memory_case(stack: Stack, jobs: int, steps: int) -> None:
    client = redis.Redis.from_url(stack.redis_url)
    archive = Archive(str(stack.archive_dir))
    store = Store(client, archive)
    rng = np.random.default_rng(0)
    job_spec = spec(1, False, steps)
    empty = used_memory(client)

    for _ in range(jobs):
        finished_job(store, job_spec, b"")
    records = used_memory(client)
    client.flushall()

    started = time.perf_counter()
    for _ in range(jobs):
        rows = rng.standard_normal(steps * row_width(1, False), dtype=np.float32).tobytes()
        finished_job(store, job_spec, rows)
    hot = used_memory(client)
    written = time.perf_counter() - started

    started = time.perf_counter()
    archived_jobs = archive_due(store, archive, hot_retention_s=0)
    took = time.perf_counter() - started
    assert len(archived_jobs) == jobs, f"{len(archived_jobs)} of {jobs} archived"
    archived = used_memory(client)
    files = sum(p.stat().st_size for p in stack.archive_dir.rglob("*.parquet"))
    mib = 1024 * 1024
    print(f"(a) {jobs} finished jobs x {steps} steps (written in {written:.1f} s)")
    print(f"    empty Redis                         {empty / mib:8.1f} MiB")
    print(f"    their records, no steps (baseline)  {records / mib:8.1f} MiB")
    print(f"    hot: streams in Redis               {hot / mib:8.1f} MiB  {hot / records:6.2f}x")
    print(
        f"    archived (took {took:.1f} s, {jobs / took:.0f} jobs/s)  {archived / mib:8.1f} MiB  "
        f"{archived / records:6.2f}x the baseline  ({archived / empty:.2f}x empty Redis)"
    )
    print(f"    Parquet files: {files / mib:.1f} MiB")
    client.flushall()
    client.close()


def full_read(http: httpx.Client, job_id: str) -> float:
    started = time.perf_counter()
    after: int | None = -1
    steps = 0
    while after is not None:
        page = http.get(f"/v1/jobs/{job_id}/steps", params={"after": after, "limit": 5000})
        page.raise_for_status()
        body = page.json()
        steps += len(body["steps"])
        after = body["next"]
    return time.perf_counter() - started


def read_case(stack: Stack, steps: int, rounds: int) -> None:
    client = redis.Redis.from_url(stack.redis_url)
    archive = Archive(str(stack.archive_dir))
    store = Store(client, archive)
    job_spec = spec(10, True, steps)
    rng = np.random.default_rng(1)
    rows = rng.standard_normal(steps * row_width(10, True), dtype=np.float32).tobytes()
    in_redis = finished_job(store, job_spec, rows)
    client.zrem("gs:archive:due", in_redis)  # this one stays hot
    archived = [finished_job(store, job_spec, rows) for _ in range(rounds + 1)]
    assert sorted(archive_due(store, archive, hot_retention_s=0)) == sorted(archived)

    with httpx.Client(base_url=stack.api_url, headers=stack.auth(), timeout=120) as http:
        full_read(http, in_redis)  # warm the API process (imports, first JSON renders)
        first_s = full_read(http, archived[0])
        hot, cold, warm = [], [], []
        for job_id in archived[1:]:  # each round: Redis, a new archived job twice
            hot.append(full_read(http, in_redis))
            cold.append(full_read(http, job_id))
            warm.append(full_read(http, job_id))
    hot_s = statistics.median(hot)
    print(f"(b) full /steps read of a {steps}-step job (10 features + bias), median of {rounds}")
    for name, took in [
        ("from Redis", hot_s),
        ("archived", statistics.median(warm)),
        ("archived, its first read", statistics.median(cold)),
        ("the process's first archived read", first_s),
    ]:
        print(
            f"    {name:34s} {took * 1000:6.0f} ms {steps / took:8.0f} steps/s"
            f"  {hot_s / took:5.2f}x Redis's speed"
        )
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--read-steps", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gradstream-archive-") as run_dir:
        stack = Stack(Path(run_dir))
        try:
            stack.start_redis()
            stack.start_api()
            memory_case(stack, args.jobs, args.steps)
            read_case(stack, args.read_steps, args.rounds)
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
