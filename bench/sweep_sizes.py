"""What one large sweep costs to keep and to read (issue "Sweeps at scale"): a 1 024-member
sweep over inline data run to its end by a real worker (`gradstream worker`, one pool
process) and read over HTTP, as a user would. Sizes, not rates: nothing here is timed
against a loop.

    .venv/bin/python bench/sweep_sizes.py [--members 1024] [--samples 2000] [--steps 200]

Prints: the request body; one member's stored spec; what the submit reserved in the
tenant's storage and what the tenant keeps after the run; the bytes of GET /v1/sweeps (the
listing), GET /v1/sweeps/{id} (its first page of members) and GET /v1/jobs?sweep= (a page of
members); the sweep's event stream (entries kept, Redis's MEMORY USAGE, bytes counted in the
tenant's storage); and each member's attempts (all 1 when no lease lapsed).
"""

import argparse
import json
import random
import sys
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.client import Client
from cli.stack import temporary_stack
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
    args = parser.parse_args()
    lrs = [1e-3 * (0.3 / 1e-3) ** (k / max(1, args.members - 1)) for k in range(args.members)]
    spec = {
        "base": {
            "data": inline_data(args.samples, 10),
            "optimizer": {"name": "sgd"},
            "steps": args.steps,
            "device": "cpu",
        },
        "grid": {"optimizer.lr": lrs},
    }
    body = len(json.dumps(spec))
    with temporary_stack("gradstream-sizes-") as stack:
        stack.start_redis()
        stack.start_api()
        stack.start_worker("cpu")
        stack.wait_for_workers({"cpu"})
        store = redis.Redis.from_url(stack.redis_url)
        tenant_bytes = keys.tenant_storage("local")  # the stack's own tenant
        with Client(stack.api_url, stack.api_key, timeout=120) as api:
            sweep = api.submit_sweep(spec)
            reserved = int(store.get(tenant_bytes) or 0)
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
            after = int(store.get(tenant_bytes) or 0)
    print(
        f"{args.members} members, {args.samples}x10 inline data, {args.steps} steps, "
        f"{view['status']} {view['counts']}\n"
        f"request body {body:,} B; one member's stored spec {member_spec:,} B\n"
        f"tenant storage: reserved at submit {reserved:,} B, kept after the run {after:,} B\n"
        f"GET /v1/sweeps {listing:,} B; GET /v1/sweeps/{{id}} {page:,} B (first page of "
        f"members); GET /v1/jobs?sweep= {members_page:,} B\n"
        f"event stream: {kept:,} entries kept, MEMORY USAGE {usage:,} B, counted "
        f"{counted:,} B\n"
        f"attempts of the first 64 members: {sorted(attempts)}",
        flush=True,
    )


def _member_ids(api: Client, sweep_id: str) -> list[str]:
    return [member["id"] for member in api.sweep_page(sweep_id)["members"]]


if __name__ == "__main__":
    main()
