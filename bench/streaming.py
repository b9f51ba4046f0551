"""Step -> SSE client delay, and fan-out: how long after a step is computed its event reaches
the watchers of the job (p50, p99), and how many Redis reads the API makes per flush.

    .venv/bin/python bench/streaming.py [--cases 1 1000]

The job runs through services.runner in this process (the worker's code path minus Celery),
against a real redis-server and a real API (uvicorn); each step's wall-clock time is noted as
it is computed. The watchers run in a separate process (httpx, asyncio) and note when each
step event arrives. Both clocks are this machine's wall clock.
"""

import argparse
import asyncio
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import services.runner
from cli.stack import Stack, temporary_stack
from services.config import Settings
from services.schemas import JobSpec
from services.store import Store
from services.training import Trainer

CASES = {
    # watchers: (spec fields, steps)
    1: (
        {"data": {"x": [[1.0]], "y": [2.0]}, "init": {"w": [1.0]}, "optimizer": {"lr": 0.01}},
        3000,
    ),
    1000: ({"data": {"synthetic": {"n": 100_000, "d": 20}}, "optimizer": {"lr": 0.01}}, 150),
}


async def _watch_all(
    url: str, key: str, job_id: str, watchers: int, ready: Any
) -> list[tuple[int, float]]:
    arrivals: list[tuple[int, float]] = []
    connected = 0
    all_connected = asyncio.Event()

    async def one(http: httpx.AsyncClient) -> None:
        # Light parsing, so that a thousand watchers in one process keep up: the step number
        # is the event id, and the arrival time is the time its chunk arrived.
        nonlocal connected
        async with http.stream("GET", f"{url}/v1/jobs/{job_id}/events") as response:
            first = True
            async for data in response.aiter_raw():
                now = time.time()
                if first:
                    first = False
                    connected += 1
                    if connected == watchers:
                        all_connected.set()
                for line in data.split(b"\n"):
                    if line.startswith(b"id: "):
                        arrivals.append((int(line[4:]), now))
                    elif line == b"event: done":
                        return

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=headers) as http:
        tasks = [asyncio.create_task(one(http)) for _ in range(watchers)]
        await all_connected.wait()
        ready.set()
        await asyncio.gather(*tasks)
    return arrivals


def _watchers_process(url: str, key: str, job_id: str, watchers: int, ready: Any, out: Any) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out.put(asyncio.run(_watch_all(url, key, job_id, watchers, ready)))


def run_case(stack: Stack, store: Store, settings: Settings, watchers: int) -> str:
    fields, steps = CASES[watchers]
    spec = JobSpec.model_validate({**fields, "steps": steps, "device": "cpu"})
    tenant = next(iter(stack.keys))
    job_id, _ = store.create_job(spec, "cpu", "bench-no-consumer", "bench", tenant=tenant)
    computed: dict[int, float] = {}

    class TimedTrainer(Trainer):
        def step(self, record: torch.Tensor) -> None:
            super().step(record)
            computed[len(computed)] = time.time()

    context = multiprocessing.get_context("spawn")
    ready, out = context.Event(), context.Queue()
    process = context.Process(
        target=_watchers_process,
        args=(stack.api_url, stack.api_key, job_id, watchers, ready, out),
    )
    process.start()
    if not ready.wait(120):
        raise TimeoutError("watchers did not connect")
    client = redis.Redis.from_url(stack.redis_url)
    reads_before = client.info("commandstats").get("cmdstat_xread", {}).get("calls", 0)
    services.runner.Trainer = TimedTrainer  # type: ignore[misc]
    try:
        services.runner.run_job(store, job_id, "bench", torch.device("cpu"), settings)
    finally:
        services.runner.Trainer = Trainer  # type: ignore[misc]
    arrivals = out.get(timeout=300)
    process.join(60)
    reads = client.info("commandstats").get("cmdstat_xread", {}).get("calls", 0) - reads_before
    flushes = client.xlen(f"gs:{{{job_id}}}:steps")
    client.close()
    delays = sorted((arrived - computed[step]) * 1000 for step, arrived in arrivals)
    assert len(delays) == watchers * steps, (len(delays), watchers * steps)
    p50 = statistics.median(delays)
    p99 = delays[int(0.99 * (len(delays) - 1))]
    return (
        f"{watchers:>5} watcher(s) {steps:>5} steps  step->client delay p50 {p50:6.1f} ms  "
        f"p99 {p99:6.1f} ms  Redis XREADs per flush {reads / flushes:.2f} ({flushes} flushes)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", type=int, default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with temporary_stack("gradstream-bench-") as stack:
        settings = Settings(redis_url=stack.start_redis())
        stack.start_api(GRADSTREAM_MAX_SSE_PER_TENANT="2000")
        store = Store.from_url(settings.redis_url)
        for watchers in args.cases:
            print(run_case(stack, store, settings, watchers), flush=True)


if __name__ == "__main__":
    main()
