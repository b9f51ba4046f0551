"""Fan-out memory and shared backlog reads, as a user's API process sees them.

    .venv/bin/python bench/fanout_memory.py [--watchers 1000] [--steps 500] [--new-watchers 100]

1. Memory per watcher: `--watchers` clients that stop reading (the smallest receive window)
   watch one wide job (about 4 KB of JSON a step) from before its first step; the job runs
   through services.runner in this process (the worker's code path minus Celery) against a
   real redis-server and a real API (`gradstream api`, uvicorn). Once the API's memory has
   settled, its resident memory over what it held before the watchers came, divided by the
   watchers, is the memory each costs (what it queued, and what the socket did not take of
   its writes; the kernel's socket buffers are not in it). The line ends with what the first
   watcher gets when it reads at last (the whole job and `done`, or a part: it was dropped).
2. Backlog reads: one watcher, then `--new-watchers` at once, read a finished job's whole
   history from an API whose pages are small (GRADSTREAM_MAX_PAGE_BYTES 64 KiB, so the job is
   many pages); XRANGE calls counted by the private redis-server's INFO commandstats.

On this 2-core machine (1 000 watchers of a 2 000-step job, 100 new watchers of a 20 000-step
job): before (main at 9412b30, whose streams are a207f27's) 3 251 KiB per watcher (API RSS
80 MiB -> 3.2 GiB), 98 XRANGEs for one watcher and 9 800 for 100, in 39.5 s; after, 171 KiB
per watcher (284 MiB), 95 XRANGEs for one watcher and 95 for 100, in 1.3 s.
"""

import argparse
import asyncio
import select
import socket
import sys
import time
from pathlib import Path

import httpx
import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.stack import Stack, child_pids, temporary_stack
from services.config import Settings
from services.runner import run_job
from services.schemas import JobSpec
from services.store import Store

WIDE = {
    "data": {"synthetic": {"n": 200, "d": 100, "seed": 3}},
    "optimizer": {"name": "sgd", "lr": 0.001},
    "device": "cpu",
}
LONG = {"data": {"x": [[1.0]], "y": [2.0]}, "init": {"w": [1.0]}, "optimizer": {"lr": 0.01}}


def _rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its children (uvicorn may serve from a child)."""
    total = 0
    for process in [pid, *child_pids(pid)]:
        for line in Path(f"/proc/{process}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def _stalled(stack: Stack, job_id: str) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(stack.api_url.rsplit(":", 1)[1])))
    sock.sendall(
        f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: bench\r\n"
        f"Authorization: Bearer {stack.api_key}\r\n\r\n".encode()
    )
    return sock


def memory_per_watcher(stack: Stack, settings: Settings, watchers: int, steps: int) -> str:
    store = Store.from_url(settings.redis_url)
    tenant = next(iter(stack.keys))
    spec = JobSpec.model_validate({**WIDE, "steps": steps})
    job_id, _ = store.create_job(spec, "cpu", "bench-no-consumer", "bench", tenant=tenant)
    pid = stack.api_process.pid
    before = _rss_bytes(pid)
    sockets = [_stalled(stack, job_id) for _ in range(watchers)]
    for sock in sockets:  # each has its first event: the API follows the job for it
        if not select.select([sock], [], [], 60)[0]:
            raise TimeoutError("a watcher got no first event")
    joined = _rss_bytes(pid)
    run_job(store, job_id, "bench", torch.device("cpu"), settings)
    # Until the API's memory settles: it queues, drops or writes the job for each watcher.
    settled, last, since = time.monotonic() + 300, -1, time.monotonic()
    while time.monotonic() < settled:
        now = _rss_bytes(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > 5:
            break
        time.sleep(0.5)
    after = _rss_bytes(pid)
    entries = store.redis.xrange(f"gs:{{{job_id}}}:steps")
    job_bytes = sum(len(v) for _, fields in entries for v in fields.values())
    # What the first of them gets once it reads: the whole job and `done`, or a part (dropped).
    sockets[0].settimeout(60)
    body = b""
    while chunk := sockets[0].recv(1 << 20):
        body += chunk
        if b"event: done" in body:
            break
    got = f"{body.count(b'event: step')} steps" + (", done" if b"event: done" in body else "")
    for sock in sockets:
        sock.close()
    store.redis.close()
    per_watcher = (after - joined) / watchers
    return (
        f"{watchers} stalled watchers of a {steps}-step wide job: API RSS {before / 2**20:.0f} MiB "
        f"before, {joined / 2**20:.0f} MiB joined, {after / 2**20:.0f} MiB settled; "
        f"{per_watcher / 1024:.0f} KiB per watcher (job: {job_bytes / 2**20:.1f} MiB stored, "
        f"float32); the first, reading at last: {got}"
    )


def backlog_reads(stack: Stack, settings: Settings, watchers: int, steps: int) -> str:
    store = Store.from_url(settings.redis_url)
    tenant = next(iter(stack.keys))
    spec = JobSpec.model_validate({**LONG, "steps": steps, "device": "cpu"})
    job_id, _ = store.create_job(spec, "cpu", "bench-no-consumer", "bench", tenant=tenant)
    run_job(store, job_id, "bench", torch.device("cpu"), settings)
    counter = redis.Redis.from_url(settings.redis_url)

    def xranges() -> int:
        return int(counter.info("commandstats").get("cmdstat_xrange", {}).get("calls", 0))

    async def watch(count: int) -> None:
        async def one(http: httpx.AsyncClient) -> None:
            async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                body = b"".join([chunk async for chunk in response.aiter_bytes()])
            assert body.count(b"event: step") == steps and b"event: done" in body

        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(
            base_url=stack.api_url, headers=stack.auth(), timeout=300, limits=limits
        ) as http:
            await asyncio.gather(*(one(http) for _ in range(count)))

    start = xranges()
    asyncio.run(watch(1))
    alone = xranges() - start
    start = xranges()
    began = time.perf_counter()
    asyncio.run(watch(watchers))
    together, took = xranges() - start, time.perf_counter() - began
    counter.close()
    store.redis.close()
    return (
        f"backlog of a finished {steps}-step job: 1 watcher {alone} XRANGEs; {watchers} new "
        f"watchers at once {together} XRANGEs ({together / alone:.1f} per page), {took:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=500, help="of the wide job")
    parser.add_argument("--new-watchers", type=int, default=100)
    parser.add_argument("--long-steps", type=int, default=20_000, help="of the backlog's job")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with temporary_stack("gradstream-bench-") as stack:
        settings = Settings(redis_url=stack.start_redis())
        limit = str(max(args.watchers, args.new_watchers) + 10)
        stack.start_api(GRADSTREAM_MAX_SSE_PER_TENANT=limit, GRADSTREAM_SSE_SEND_TIMEOUT_S="3600")
        print(memory_per_watcher(stack, settings, args.watchers, args.steps), flush=True)
        # A second API (the first, with its memory, is left as it is), small pages.
        stack.start_api(GRADSTREAM_MAX_SSE_PER_TENANT=limit, GRADSTREAM_MAX_PAGE_BYTES="65536")
        print(backlog_reads(stack, settings, args.new_watchers, args.long_steps), flush=True)


if __name__ == "__main__":
    main()
