"""What one large sweep costs to keep and to read (issue "Sweeps at scale"): a 1 024-member
sweep over inline data run to its end by a real worker (`gradstream worker`, one pool
process) and read over HTTP, as a user would. Sizes, not rates: nothing here is timed
against a loop.

    .venv/bin/python bench/sweep_sizes.py [--members 1024] [--samples 2000] [--steps 200]
                                          [--every 1,100]

For each record.every N in `--every` (issue 23, sparse recording: gradients and parameters
kept every N steps and at the last), one sweep with that N in its base, run in the same
stack one after the other (each deleted before the next). Prints: the request body; one
member's stored spec; what the submit reserved in the tenant's storage and what the tenant
keeps after the run; the bytes of GET /v1/sweeps (the listing), GET /v1/sweeps/{id} (its
first page of members) and GET /v1/jobs?sweep= (a page of members); the sweep's event
stream (entries kept, Redis's MEMORY USAGE, bytes counted in the tenant's storage); each
member's attempts (all 1 when no lease lapsed); and the member streams' bytes per
member-step: Redis's MEMORY USAGE of all of them, and the step records the tenant's storage
counts for them.
"""

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.client import Client
from cli.stack import Stack, temporary_stack
from services.store import keys


def inline_data(samples: int, features: int) -> dict[str, list[list[float]] | list[float]]:
    rows = random.Random(0)
    x = [[rows.uniform(-1, 1) for _ in range(features)] for _ in range(samples)]
    y = [sum(row) + rows.gauss(0, 0.1) for row in x]
    return {"x": x, "y": y}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", default="1,100", help="record.every of each sweep, e.g. 1,100")
    args = parser.parse_args()
    lrs = [1e-3 * (0.3 / 1e-3) ** (k / max(1, args.members - 1)) for k in range(args.members)]
    data = inline_data(args.samples, 10)
    with temporary_stack("gradstream-sizes-") as stack:
        stack.start_redis()
        stack.start_api()
        stack.start_worker("cpu")
        stack.wait_for_workers({"cpu"})
        store = redis.Redis.from_url(stack.redis_url)
        with Client(stack.api_url, stack.api_key, timeout=120) as api:
            for every in (int(n) for n in args.every.split(",")):
                spec = {
                    "base": {
                        "data": data,
                        "optimizer": {"name": "sgd"},
                        "steps": args.steps,
                        "device": "cpu",
                        "record": {"every": every},
                    },
                    "grid": {"optimizer.lr": lrs},
                }
                measure(stack, store, api, spec, args)


def measure(stack: Stack, store: redis.Redis, api: Client, spec: dict[str, Any], args: Any) -> None:
    """Run one sweep, print what it keeps, and delete it."""
    body = len(json.dumps(spec))
    tenant_bytes = keys.tenant_storage("local")  # the stack's own tenant
    before = int(store.get(tenant_bytes) or 0)
    sweep = api.submit_sweep(spec)
    reserved = int(store.get(tenant_bytes) or 0) - before
    member_id = sweep["members"][0]["id"]
    member_spec = len(store.hget(keys.job_key(member_id), "spec") or b"")
    view = api.wait_sweep(sweep["id"], timeout=1800)
    headers = {"Authorization": f"Bearer {stack.api_key}"}

    def size(path: str) -> int:
        response = httpx.get(stack.api_url + path, headers=headers, timeout=60)
        response.raise_for_status()
        return len(response.content)

    listing = size("/v1/sweeps")
    page = size(f"/v1/sweeps/{sweep['id']}")
    members_page = size(f"/v1/jobs?sweep={sweep['id']}")
    events = keys.sweep_events_key(sweep["id"])
    kept = store.xlen(events)
    usage = store.memory_usage(events) or 0
    counted = int(store.hget(keys.sweep_key(sweep["id"]), "events_bytes") or 0)
    attempts = {api.get(m)["attempt"] for m in _member_ids(api, sweep["id"])[:64]}
    after = int(store.get(tenant_bytes) or 0) - before
    # The member streams: Redis's own count (SAMPLES 0: every entry of the stream), and what
    # the tenant's storage counts as their step records (a member's bytes less its spec).
    members = [m.decode() for m in store.zrange(keys.sweep_members_key(sweep["id"]), 0, -1)]
    pipe = store.pipeline(transaction=False)
    for member in members:
        pipe.execute_command("MEMORY", "USAGE", keys.steps_key(member), "SAMPLES", "0")
        pipe.hmget(keys.job_key(member), "bytes", "spec_bytes", "steps_done")
    replies = pipe.execute()
    streams = sum(int(usage or 0) for usage in replies[0::2])
    records = sum(int(b) - int(s) for b, s, _ in replies[1::2])
    member_steps = sum(int(done) for _, _, done in replies[1::2])
    every = spec["base"]["record"]["every"]
    print(
        f"record.every {every}: {args.members} members, {args.samples}x10 inline data, "
        f"{args.steps} steps, {view['status']} {view['counts']}\n"
        f"request body {body:,} B; one member's stored spec {member_spec:,} B\n"
        f"tenant storage: reserved at submit {reserved:,} B, kept after the run {after:,} B\n"
        f"GET /v1/sweeps {listing:,} B; GET /v1/sweeps/{{id}} {page:,} B (first page of "
        f"members); GET /v1/jobs?sweep= {members_page:,} B\n"
        f"event stream: {kept:,} entries kept, MEMORY USAGE {usage:,} B, counted "
        f"{counted:,} B\n"
        f"attempts of the first 64 members: {sorted(attempts)}\n"
        f"member streams, {member_steps:,} member-steps: MEMORY USAGE {streams:,} B "
        f"({streams / member_steps:.2f} B per member-step), step records counted "
        f"{records:,} B ({records / member_steps:.2f} B per member-step)",
        flush=True,
    )
    api.delete_sweep(sweep["id"])


def _member_ids(api: Client, sweep_id: str) -> list[str]:
    return [member["id"] for member in api.sweep_page(sweep_id)["members"]]


if __name__ == "__main__":
    main()
