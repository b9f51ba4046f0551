"""A sweep group's flush alone (issue 23: a group stores at the speed Redis ingests): K
members' chunks per flush, through the old path (one FLUSH_GROUP script whose arguments carry
every row) and the new one (the rows as XADDs in a MULTI block with COMMIT_GROUP, under a
WATCH), against a bare loop that writes the same entries with pipelined XADDs, on a real
Redis, no training.

    .venv/bin/python bench/group_flush.py [--members 64 1024] [--flushes 20] [--repeat 3]

Per K and repeat (the cases alternate, each flush path on a group of its own): member-steps
per second through each path (rows per chunk as the group runner's chunk budget gives them),
the bare XADDs' (of the same entries: the fields a flush writes; and of the rows and their
count alone, the baseline before issue 23), each path's ratio to the former, and the CPU each
costs per flush (this process's `process_time`, then the Redis server's `INFO cpu`), with
bare's CPU over the path's: on a shared machine the CPU ratio moves less with the load than
the rates do. Prints `uptime` before and after.
"""

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.stack import temporary_stack
from services.attempts import CHUNK_BUDGET_BYTES
from services.config import Settings
from services.environment import attempt_environment
from services.records import Chunk
from services.schemas import SweepSpec
from services.store import Store, keys
from services.store.sweeps import MemberFlush
from services.sweeps import submit_sweep

FEATURES = 10
WIDTH = 1 + 2 * FEATURES  # loss, dLoss/dw, w (no bias)


def group_flushes(
    store: Store, members: int, flushes: int, rows: int, rows_in_script: bool
) -> "Cost":
    """Member-steps per second through `flushes` flushes of a claimed K-member group (the old
    script path with `rows_in_script`), and the CPU they cost."""
    lrs = [0.001 * (1 + k / members) for k in range(members)]
    base = {"data": {"synthetic": {"n": 1000, "d": FEATURES}}, "steps": rows * flushes + 1}
    spec = SweepSpec.model_validate(
        {"base": {**base, "device": "cpu"}, "grid": {"optimizer.lr": lrs}}
    )
    settings = Settings(max_sweep_members=8192, max_group_members=8192)
    sweep = submit_sweep(store, spec, settings, "bench", enqueue=lambda *_: None)
    [group] = store.redis.hget(keys.sweep_key(sweep.id), "groups").decode().split()
    claim = store.claim_job(group, "bench-worker", 60, 3)
    ids = [m.id for m in store.get_sweep(sweep.id, members_limit=members).members]
    assert len(ids) == members
    environment = attempt_environment(claim.attempt, torch.device("cpu"), "eager", "bench-worker")
    blob = os.urandom(rows * WIDTH * 4)
    redis_cpu = _redis_cpu(store.redis)
    cpu = time.process_time()
    started = time.perf_counter()
    for i in range(flushes):
        chunk = Chunk(i * rows, rows, FEATURES, False, b"")
        flush = [MemberFlush(member, blob, 0.5, rows) for member in ids]
        first = environment if i == 0 else None  # sent with an attempt's first flush
        reply = store.flush_group(
            group,
            claim.attempt,
            chunk,
            flush,
            b"",
            60,
            environment=first,
            rows_in_script=rows_in_script,
        )
        assert reply.reply == "ok", reply
    elapsed = time.perf_counter() - started
    cost = Cost(
        members * rows * flushes / elapsed,
        (time.process_time() - cpu) / flushes,
        (_redis_cpu(store.redis) - redis_cpu) / flushes,
    )
    store.discard_sweep(sweep.id)
    return cost


@dataclass(frozen=True)
class Cost:
    """Member-steps per second, and CPU seconds per flush in this process and in Redis."""

    rate: float
    client_s: float
    redis_s: float

    def line(self, bare: "Cost") -> str:
        """Its rate and its ratio to `bare`'s, and CPU ms per flush (client + Redis)."""
        cpu = self.client_s + self.redis_s
        bare_cpu = bare.client_s + bare.redis_s
        return (
            f"{self.rate:>11,.0f}/s {self.rate / bare.rate:5.2f}x,"
            f" CPU {self.client_s * 1000:5.1f}+{self.redis_s * 1000:5.1f} ms a flush"
            f" ({bare_cpu / cpu:4.2f}x bare's)"
        )


def _redis_cpu(client: "redis.Redis") -> float:
    """CPU seconds the Redis server has used (its main thread and the others)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"] + info["used_cpu_sys"])


def bare_xadds(url: str, members: int, flushes: int, rows: int, width: int = WIDTH) -> float:
    """Member-steps per second of pipelined XADDs of a group's rows (`rows` rows of `width`
    float32 each, with their count), K per round trip, `flushes` times (also
    bench/gpu_sweeps.py's baseline)."""
    return bare_cost(url, members, flushes, rows, width).rate


def bare_cost(
    url: str, members: int, flushes: int, rows: int, width: int = WIDTH, same: bool = False
) -> Cost:
    """bare_xadds, with the CPU it costs; with `same`, each entry has the fields a group's
    flush gives it (its count and rows, then the chunk's first step, features and bias), not
    only the rows and their count."""
    client = redis.Redis.from_url(url)
    blob = os.urandom(rows * width * 4)
    redis_cpu = _redis_cpu(client)
    cpu = time.process_time()
    started = time.perf_counter()
    for i in range(flushes):
        pipe = client.pipeline(transaction=False)
        for member in range(members):
            fields: dict[str, bytes | int] = {"rows": blob, "count": rows}
            if same:
                fields = {"n": rows, "rows": blob, "first": i * rows, "d": FEATURES, "b": 0}
            pipe.xadd(f"bench:xadd:{member}", fields, id=f"{i + 1}-1")  # type: ignore[arg-type]
        pipe.execute()
    elapsed = time.perf_counter() - started
    cost = Cost(
        members * rows * flushes / elapsed,
        (time.process_time() - cpu) / flushes,
        (_redis_cpu(client) - redis_cpu) / flushes,
    )
    client.delete(*(f"bench:xadd:{member}" for member in range(members)))
    client.close()
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", nargs="*", type=int, default=[64, 1024])
    parser.add_argument("--flushes", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    with temporary_stack("gradstream-group-flush-") as stack:
        url = stack.start_redis()
        store = Store.from_url(url)
        for members in args.members:
            rows = max(1, CHUNK_BUDGET_BYTES // (4 * members * WIDTH))
            for _ in range(args.repeat):
                old = group_flushes(store, members, args.flushes, rows, True)
                new = group_flushes(store, members, args.flushes, rows, False)
                rows_only = bare_cost(url, members, args.flushes, rows)
                bare = bare_cost(url, members, args.flushes, rows, same=True)
                print(
                    f"K={members:<5} {rows} rows a chunk: bare XADD of the same entries"
                    f" {bare.rate:>10,.0f} member-steps/s, CPU {bare.client_s * 1000:5.1f}+"
                    f"{bare.redis_s * 1000:5.1f} ms a flush (rows and count only:"
                    f" {rows_only.rate:>10,.0f}/s) | script (before) {old.line(bare)}"
                    f" | WATCH+MULTI (after) {new.line(bare)}; after/before"
                    f" {new.rate / old.rate:4.2f}x",
                    flush=True,
                )
        print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
