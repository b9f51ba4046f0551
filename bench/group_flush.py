"""A sweep group's flush alone (diagnosis for issue 14's GPU target, which a group meets only if
storing keeps up): one FLUSH_GROUP script per chunk for K members against a bare loop that
writes the same entries with pipelined XADDs, on a real Redis, no training.

    .venv/bin/python bench/group_flush.py [--members 64 1024] [--flushes 20]

Per K: member-steps per second through the flush (rows per chunk as the group runner's chunk
budget gives them), the same through bare XADDs, their ratio, and the script's time inside
Redis per flush and per member (`INFO commandstats`).
"""

import argparse
import os
import sys
import time
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


def group_flushes(store: Store, members: int, flushes: int, rows: int) -> tuple[float, float]:
    """Member-steps per second through `flushes` flushes of a claimed K-member group, and the
    script's microseconds inside Redis per flush."""
    lrs = [0.001 * (1 + k / members) for k in range(members)]
    base = {"data": {"synthetic": {"n": 1000, "d": FEATURES}}, "steps": rows * flushes + 1}
    spec = SweepSpec.model_validate(
        {"base": {**base, "device": "cpu"}, "grid": {"optimizer.lr": lrs}}
    )
    settings = Settings(max_sweep_members=8192, max_group_members=8192)
    sweep = submit_sweep(store, spec, settings, "bench", enqueue=lambda *_: None)
    [group] = store.redis.hget(keys.sweep_key(sweep.id), "groups").decode().split()
    claim = store.claim_job(group, "bench-worker", 60, 3)
    ids = [m.id for m in store.get_sweep(sweep.id).members]
    environment = attempt_environment(claim.attempt, torch.device("cpu"), "eager", "bench-worker")
    blob = os.urandom(rows * WIDTH * 4)
    store.redis.config_resetstat()
    started = time.perf_counter()
    for i in range(flushes):
        chunk = Chunk(i * rows, rows, FEATURES, False, b"")
        flush = [MemberFlush(member, blob, 0.5, rows) for member in ids]
        first = environment if i == 0 else None  # sent with an attempt's first flush
        reply = store.flush_group(group, claim.attempt, chunk, flush, b"", 60, environment=first)
        assert reply.reply == "ok", reply
    elapsed = time.perf_counter() - started
    usec = store.redis.info("commandstats")["cmdstat_evalsha"]["usec"]
    return members * rows * flushes / elapsed, usec / flushes


def bare_xadds(url: str, members: int, flushes: int, rows: int, width: int = WIDTH) -> float:
    """Member-steps per second of pipelined XADDs of a group's entries (`rows` rows of `width`
    float32 each), K per round trip, `flushes` times (also bench/gpu_sweeps.py's baseline)."""
    client = redis.Redis.from_url(url)
    blob = os.urandom(rows * width * 4)
    started = time.perf_counter()
    for i in range(flushes):
        pipe = client.pipeline(transaction=False)
        for member in range(members):
            pipe.xadd(f"bench:xadd:{member}", {"rows": blob, "count": rows}, id=f"{i + 1}-1")
        pipe.execute()
    elapsed = time.perf_counter() - started
    client.delete(*(f"bench:xadd:{member}" for member in range(members)))
    client.close()
    return members * rows * flushes / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", nargs="*", type=int, default=[64, 1024])
    parser.add_argument("--flushes", type=int, default=20)
    args = parser.parse_args()
    with temporary_stack("gradstream-group-flush-") as stack:
        url = stack.start_redis()
        store = Store.from_url(url)
        for members in args.members:
            rows = max(1, CHUNK_BUDGET_BYTES // (4 * members * WIDTH))
            ours, usec = group_flushes(store, members, args.flushes, rows)
            bare = bare_xadds(url, members, args.flushes, rows)
            print(
                f"K={members:<5} {rows} rows a chunk: group flush {ours:>12,.0f} member-steps/s"
                f"  bare XADD {bare:>12,.0f}/s  flush/XADD {ours / bare:5.2f}"
                f"  script in Redis {usec / 1000:6.1f} ms a flush,"
                f" {usec / members:5.1f} us a member",
                flush=True,
            )


if __name__ == "__main__":
    main()
