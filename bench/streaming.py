"""Step -> SSE client delay, and fan-out: how long after a step is flushed to Redis its event
reaches each watcher of the job (p50, p95, p99), and how many Redis reads the API makes per
flush, with one API process and with several (`gradstream api --workers N`).

    .venv/bin/python bench/streaming.py [--watchers 1 1000] [--api-workers 1 2] [--steps 300]

The job runs through services.runner in this process (the worker's code path minus Celery),
against a real redis-server and a real API (`gradstream api`, uvicorn); the moment each flush
script returns is the flush time of its steps (the moment each step was computed is reported
too). The watchers are plain HTTP/1.1 connections in `--load-processes` separate processes
(asyncio protocols: a callback per read, which notes the time and scans for `id:` lines, so
that the load generator costs little beside the API); each checks that it got every step
once, in order. Both clocks are this machine's wall clock. The load generator's CPU time over
the stream is printed: far below one core per process, it timestamps reads as they come.

For many watchers, the same job is first watched by one watcher (the floor: a delay from the
flush of a millisecond or two). With several `--api-workers` values, the last lines are the
ratio of the many watchers' p99 to the first value's, in the same run.
"""

import argparse
import asyncio
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import services.runner
from cli.stack import Stack, child_pids, temporary_stack
from services.config import Settings
from services.records import Chunk
from services.schemas import JobSpec
from services.store import SentFlush, Store
from services.training import Trainer

TUTORIAL = {"data": {"x": [[1.0]], "y": [2.0]}, "init": {"w": [1.0]}, "optimizer": {"lr": 0.01}}
# Many watchers watch a wider job: a few steps per flush, each event about 1 KB.
WIDE = {"data": {"synthetic": {"n": 100_000, "d": 20}}, "optimizer": {"lr": 0.01}}


class _Watcher(asyncio.Protocol):
    """One SSE client: notes when each step's id line arrives and checks the order."""

    def __init__(self, request: bytes, group: "_Watchers") -> None:
        self.request, self.group = request, group
        self.rest = b""
        self.next_step = 0
        self.joined = self.ended = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.group.reads += 1
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            if line.startswith(b"id: "):
                step = int(line[4:])
                if step != self.next_step:
                    self.group.fail(f"step {step} after {self.next_step - 1}")
                self.next_step = step + 1
                self.group.steps.append(step)
                self.group.times.append(now)
            elif line == b"event: status" and not self.joined:
                self.joined = True  # the API sends it once the watcher follows the job
                self.group.joined()
            elif line == b"event: done":
                self.ended = True
                self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended:
            self.group.fail(f"connection lost before done ({exc})")
        self.group.ended()


class _Watchers:
    """The watchers of one load process: their arrivals, and when all joined or ended."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.steps, self.times = array("q"), array("d")
        self.errors: list[str] = []
        self.reads = 0  # data_received calls: about one per write of the API
        self.n_joined = self.n_ended = 0
        self.all_joined = asyncio.Event()
        self.all_ended = asyncio.Event()

    def fail(self, error: str) -> None:
        self.errors.append(error)

    def joined(self) -> None:
        self.n_joined += 1
        if self.n_joined == self.count:
            self.all_joined.set()

    def ended(self) -> None:
        self.n_ended += 1
        if self.n_ended == self.count:
            self.all_ended.set()


async def _watch(url: str, key: str, job_id: str, count: int, ready: Any, go: Any) -> Any:
    host, port = url.removeprefix("http://").split(":")
    request = (
        f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    group = _Watchers(count)
    loop = asyncio.get_running_loop()
    for _ in range(count):
        await loop.create_connection(lambda: _Watcher(request, group), host, int(port))
    await asyncio.wait_for(group.all_joined.wait(), 120)
    ready.set()
    await asyncio.to_thread(go.wait)
    cpu_before, wall_before, reads_before = time.process_time(), time.monotonic(), group.reads
    await asyncio.wait_for(group.all_ended.wait(), 300)
    cpu = (time.process_time() - cpu_before) / (time.monotonic() - wall_before)
    reads = group.reads - reads_before
    return group.steps.tobytes(), group.times.tobytes(), group.errors[:5], cpu, reads


def _watchers_process(
    url: str, key: str, job_id: str, count: int, ready: Any, go: Any, out: Any
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out.put(asyncio.run(_watch(url, key, job_id, count, ready, go)))


@dataclass
class Api:
    """One `gradstream api --workers N` of the bench's stack."""

    url: str
    process: "subprocess.Popen[bytes]"
    workers: int

    def pids(self) -> list[int]:
        return [self.process.pid, *child_pids(self.process.pid)]

    def workers_pids(self) -> list[int]:
        """The processes that serve requests: uvicorn's worker processes, or uvicorn itself."""
        children = child_pids(self.process.pid)
        spawned = [p for p in children if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        return spawned or [self.process.pid]

    def cpu_s(self) -> float:
        """CPU seconds its processes (uvicorn and its workers) have used so far."""
        total = 0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / os.sysconf("SC_CLK_TCK")

    def clients_per_process(self) -> list[int]:
        """Established connections to its port held by each of its processes."""
        port = int(self.url.rsplit(":", 1)[1])
        inodes = set()
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":  # ESTABLISHED
                inodes.add(f"socket:[{fields[9]}]")
        counts = []
        for pid in self.workers_pids():
            fds = Path(f"/proc/{pid}/fd")
            counts.append(sum(1 for fd in fds.iterdir() if _readlink(fd) in inodes))
        return counts


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed meanwhile
        return ""


class Result:
    """One run's delays (ms) from flush and from compute to arrival, per step event."""

    def __init__(self, from_flush: list[float], from_step: list[float], xreads: float) -> None:
        self.from_flush, self.from_step = sorted(from_flush), sorted(from_step)
        self.xreads_per_flush = xreads

    @staticmethod
    def percentile(delays: list[float], q: float) -> float:
        return delays[int(q * (len(delays) - 1))]

    @property
    def p99(self) -> float:
        return self.percentile(self.from_flush, 0.99)

    def line(self) -> str:
        flush = "  ".join(
            f"p{int(q * 100)} {self.percentile(self.from_flush, q):6.1f}" for q in (0.5, 0.95, 0.99)
        )
        step = "  ".join(
            f"p{int(q * 100)} {self.percentile(self.from_step, q):6.1f}" for q in (0.5, 0.99)
        )
        return f"flush->client ms {flush}  step->client ms {step}"


def run(
    stack: Stack,
    api: Api,
    settings: Settings,
    fields: dict[str, Any],
    steps: int,
    watchers: int,
    load_processes: int,
) -> tuple[Result, str]:
    """Run one job of `steps` steps watched by `watchers` clients; its delays, and a line."""
    spec = JobSpec.model_validate({**fields, "steps": steps, "device": "cpu"})
    tenant = next(iter(stack.keys))
    computed: dict[int, float] = {}
    flushed: dict[int, float] = {}

    class TimedTrainer(Trainer):
        def step(self, record: torch.Tensor) -> None:
            super().step(record)
            computed[len(computed)] = time.time()

    class TimedStore(Store):
        def flush_steps(
            self, job_id: str, attempt: int, chunk: Chunk | None, *a: Any, **k: Any
        ) -> str:
            reply = super().flush_steps(job_id, attempt, chunk, *a, **k)
            now = time.time()
            if chunk is not None:
                flushed.update((step, now) for step in range(chunk.first, chunk.last + 1))
            return reply

        def send_flush_steps(
            self, job_id: str, attempt: int, chunk: Chunk | None, *a: Any, **k: Any
        ) -> SentFlush:
            # The loop's flushes (all but the last): sent, and run by Redis, now; the loop
            # reads the reply later.
            sent = super().send_flush_steps(job_id, attempt, chunk, *a, **k)
            now = time.time()
            if chunk is not None:
                flushed.update((step, now) for step in range(chunk.first, chunk.last + 1))
            return sent

    store = TimedStore.from_url(settings.redis_url)
    job_id, _ = store.create_job(spec, "cpu", "bench-no-consumer", "bench", tenant=tenant)
    context = multiprocessing.get_context("spawn")
    go, out = context.Event(), context.Queue()
    shares = [
        watchers // load_processes + (i < watchers % load_processes) for i in range(load_processes)
    ]
    processes = []
    for share in filter(None, shares):
        ready = context.Event()
        process = context.Process(
            target=_watchers_process,
            args=(api.url, stack.api_key, job_id, share, ready, go, out),
        )
        process.start()
        processes.append((process, ready))
    for _, ready in processes:
        if not ready.wait(120):
            raise TimeoutError("watchers did not connect")
    client = redis.Redis.from_url(stack.redis_url)
    reads_before = client.info("commandstats").get("cmdstat_xread", {}).get("calls", 0)
    split = "/".join(str(n) for n in api.clients_per_process()) if api.workers > 1 else ""
    api_cpu = api.cpu_s()
    go.set()
    services.runner.Trainer = TimedTrainer  # type: ignore[misc]
    try:
        services.runner.run_job(store, job_id, "bench", torch.device("cpu"), settings)
    finally:
        services.runner.Trainer = Trainer  # type: ignore[misc]
    from_flush, from_step, cpu, errors, client_reads = [], [], [], [], 0
    for _ in processes:
        steps_bytes, times_bytes, process_errors, process_cpu, reads = out.get(timeout=300)
        client_reads += reads
        arrived_steps, arrived_at = array("q"), array("d")
        arrived_steps.frombytes(steps_bytes)
        arrived_at.frombytes(times_bytes)
        from_flush += [
            (t - flushed[s]) * 1000 for s, t in zip(arrived_steps, arrived_at, strict=True)
        ]
        from_step += [
            (t - computed[s]) * 1000 for s, t in zip(arrived_steps, arrived_at, strict=True)
        ]
        errors += process_errors
        cpu.append(process_cpu)
    for process, _ in processes:
        process.join(60)
    api_cpu = api.cpu_s() - api_cpu
    reads = client.info("commandstats").get("cmdstat_xread", {}).get("calls", 0) - reads_before
    flushes = client.xlen(f"gs:{{{job_id}}}:steps")
    client.close()
    store.redis.close()
    if errors or len(from_flush) != watchers * steps:
        raise AssertionError(f"{len(from_flush)} of {watchers * steps} step events: {errors}")
    readers = min(api.workers, watchers)
    result = Result(from_flush, from_step, reads / flushes / readers)
    load = " ".join(f"{c:.0%}" for c in cpu)
    return result, (
        f"{watchers:>5} watcher(s){' (' + split + ')' if split else ''} {steps:>5} steps  "
        f"{result.line()}  XREADs/flush/API process {result.xreads_per_flush:.2f} "
        f"({flushes} flushes)  API CPU {api_cpu:.1f} s, "
        f"{api_cpu / client_reads * 1e6:.0f} us per client read  load gen CPU {load}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watchers", nargs="*", type=int, default=[1, 1000])
    parser.add_argument("--api-workers", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=300, help="of the job many watch")
    parser.add_argument("--load-processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="the APIs take turns each round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    p99s: dict[tuple[int, int], list[float]] = {}
    with temporary_stack("gradstream-bench-") as stack:
        settings = Settings(redis_url=stack.start_redis())
        limit = str(max(args.watchers) + 10)
        apis = []
        for workers in args.api_workers:
            stack.start_api(workers=workers, GRADSTREAM_MAX_SSE_PER_TENANT=limit)
            apis.append(Api(stack.api_url, stack.api_process, workers))
        for round_ in range(1, args.rounds + 1):
            for api in apis:
                head = f"round {round_}  api workers {api.workers}"
                for watchers in args.watchers:
                    if watchers == 1:
                        _, line = run(stack, api, settings, TUTORIAL, 3000, 1, 1)
                        print(f"{head}  tutorial  {line}", flush=True)
                        continue
                    _, line = run(stack, api, settings, WIDE, args.steps, 1, 1)
                    print(f"{head}  wide      {line}", flush=True)
                    many, line = run(
                        stack, api, settings, WIDE, args.steps, watchers, args.load_processes
                    )
                    p99s.setdefault((api.workers, watchers), []).append(many.p99)
                    print(f"{head}  wide      {line}", flush=True)
    first = args.api_workers[0]
    for (workers, watchers), rounds in p99s.items():
        p99 = statistics.median(rounds)
        line = f"{watchers} watchers, api workers {workers}: flush->client p99 median {p99:.1f} ms"
        if workers != first:
            line += (
                f", {p99 / statistics.median(p99s[first, watchers]):.2f} x api workers {first}'s"
            )
        print(line)


if __name__ == "__main__":
    main()
