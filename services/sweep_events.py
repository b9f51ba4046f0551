"""A sweep's event stream for its watchers (DESIGN §9): `status` on connect, a `progress`
event per flush of any of its groups (the members that moved: step, loss, status), resumable
by Last-Event-ID (the events' sequence numbers), then `done` with the final SweepView.

One connection watches a whole sweep, whatever its number of members. Each watcher reads the
sweep's event stream with blocking XREADs of its own; the stream holds one entry per group
flush, not per member or step.
"""

import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from services.errors import StoreUnavailable, SweepNotFound
from services.events import Render, StreamEvent
from services.store.keys import step_entry_id, sweep_events_key, sweep_key

ENDED = ("succeeded", "failed", "cancelled")


async def sweep_event_frames(
    client: "aioredis.Redis",
    sweep_id: str,
    tenant: str,
    after: int,
    keepalive_s: float,
    render: Render,
    final_view: Callable[[], Awaitable[dict[str, Any]]],
) -> AsyncGenerator[bytes, None]:
    """The rendered events of `tenant`'s sweep after sequence number `after` (-1: all).
    SweepNotFound (also for another tenant's sweep) or StoreUnavailable before the first
    event; `final_view` gives the SweepView that `done` carries."""
    try:
        owner, status = await client.hmget(sweep_key(sweep_id), "tenant", "status")
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"Redis unavailable: {exc}") from exc
    if owner != tenant.encode():
        raise SweepNotFound(sweep_id)
    return _follow(client, sweep_id, status.decode(), after, keepalive_s, render, final_view)


async def _follow(
    client: "aioredis.Redis",
    sweep_id: str,
    status: str,
    after: int,
    keepalive_s: float,
    render: Render,
    final_view: Callable[[], Awaitable[dict[str, Any]]],
) -> AsyncGenerator[bytes, None]:
    yield render(StreamEvent("status", {"status": status}))
    cursor = step_entry_id(after) if after >= 0 else "0-0"
    stream = sweep_events_key(sweep_id)
    while True:
        reply = await client.xread({stream: cursor}, count=100, block=int(keepalive_s * 1000))
        if not reply:
            yield render(None)
            continue
        for entry_id, fields in reply[0][1]:
            cursor = entry_id
            kind, data = fields[b"type"].decode(), fields[b"data"].decode()
            seq = int(entry_id.split(b"-")[0])
            if kind == "progress":
                yield render(StreamEvent("progress", json.loads(data), seq))
            elif kind == "status":
                yield render(StreamEvent("status", {"status": data}, seq))
            elif kind == "done":
                yield render(StreamEvent("done", await final_view(), seq))
                return
