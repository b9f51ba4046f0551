"""A sweep's event stream for its watchers (DESIGN §9): `status` on connect, a `progress`
event per flush of any of its groups (the members that moved: step, loss, status), resumable
by Last-Event-ID (the events' sequence numbers), then `done` with the final SweepView.

One connection watches a whole sweep, whatever its number of members. Like job streams
(services/events.py), each API process reads each watched sweep from Redis once: a
`_SweepTail` blocks on the sweep's event stream and fans each event, rendered once, out to
every watcher in memory; a watcher first reads its own backlog (the events after its cursor up
to where the tail was when it joined), then follows the tail.
"""

import asyncio
import json
import logging
import math
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from services.errors import REDIS_UNAVAILABLE, StoreUnavailable, SweepNotFound
from services.events import MAX_LAG, Render, StreamEvent, let_the_server_run
from services.store.keys import (
    job_key,
    step_entry_id,
    sweep_events_key,
    sweep_key,
    sweep_members_key,
)

log = logging.getLogger(__name__)

FinalView = Callable[[str], Awaitable[dict[str, Any]]]  # sweep id -> its SweepSummary as JSON
_GONE = object()  # the tail stopped (Redis lost): the watcher's stream ends, it resumes


class _SweepTail:
    """The one reader of a sweep's event stream in this process."""

    def __init__(self, streams: "SweepStreams", sweep_id: str, position: bytes) -> None:
        self.streams, self.sweep_id = streams, sweep_id
        self.position = position  # the last entry read
        self.watchers: set[asyncio.Queue[Any]] = set()
        self.task: asyncio.Task[None] | None = None

    def _send(self, item: Any) -> None:
        for queue in list(self.watchers):
            if queue.qsize() >= MAX_LAG:  # it stopped reading: it resumes by Last-Event-ID
                self.watchers.discard(queue)
                queue.put_nowait(_GONE)
            else:
                queue.put_nowait(item)

    def _render(self, seq: int, kind: str, data: Any) -> bytes:
        return self.streams.render(StreamEvent(kind, data, seq))

    async def frame(self, seq: int, kind: str, data: str) -> bytes:
        """An event of the stream as a watcher gets it (`done` carries the SweepView)."""
        if kind == "progress":
            return self._render(seq, kind, json.loads(data))
        if kind == "done":
            return self._render(seq, kind, await self.streams.final_view(self.sweep_id))
        return self._render(seq, kind, {"status": data})

    async def run(self) -> None:
        stream = sweep_events_key(self.sweep_id)
        block_ms = int(self.streams.keepalive_s * 1000)
        try:
            while self.watchers:
                reply = await self.streams.client.xread(
                    {stream: self.position}, count=100, block=block_ms
                )
                if not reply:
                    self._send(None)
                    continue
                for entry_id, fields in reply[0][1]:
                    seq = int(entry_id.split(b"-")[0])
                    kind = fields[b"type"].decode()
                    frame = await self.frame(seq, kind, fields[b"data"].decode())
                    self._send((seq, kind, frame))
                    # Moved on only once sent: a watcher that joins meanwhile reads this entry
                    # in its backlog or gets it here, never both.
                    self.position = entry_id
        except Exception:
            log.exception("tail of sweep %s stopped", self.sweep_id)
            self._send(_GONE)
        finally:
            if self.streams.tails.get(self.sweep_id) is self:
                del self.streams.tails[self.sweep_id]


class SweepStreams:
    """The sweep tails of one API process (one Redis reader per watched sweep)."""

    def __init__(
        self, client: "aioredis.Redis", keepalive_s: float, render: Render, final_view: FinalView
    ) -> None:
        self.client, self.keepalive_s = client, keepalive_s
        self.render, self.final_view = render, final_view
        self.tails: dict[str, _SweepTail] = {}

    async def open(self, sweep_id: str, tenant: str, after: int) -> AsyncGenerator[bytes, None]:
        """The rendered events of `tenant`'s sweep after sequence number `after` (-1: all).
        SweepNotFound (also for another tenant's sweep) or StoreUnavailable before the first
        event."""
        try:
            owner, status = await self.client.hmget(sweep_key(sweep_id), "tenant", "status")
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(REDIS_UNAVAILABLE) from exc
        if owner != tenant.encode():
            raise SweepNotFound(sweep_id)
        return self._follow(sweep_id, status.decode(), after)

    async def _tail(self, sweep_id: str) -> _SweepTail:
        tail = self.tails.get(sweep_id)
        if tail is None:
            last = await self.client.xrevrange(sweep_events_key(sweep_id), count=1)
            tail = self.tails.get(sweep_id)  # another watcher may have made one meanwhile
            if tail is None:
                tail = _SweepTail(self, sweep_id, last[0][0] if last else b"0-0")
                self.tails[sweep_id] = tail
        return tail

    async def _snapshot(self, sweep_id: str) -> tuple[int, bool, bytes]:
        """Every member's state now, as a progress event whose id is the sequence number it
        stands for; and whether the sweep had ended then."""
        ids = await self.client.zrange(sweep_members_key(sweep_id), 0, -1)
        pipe = self.client.pipeline(transaction=True)
        pipe.hmget(sweep_key(sweep_id), "seq", "status")
        for member_id in ids:
            pipe.hmget(job_key(member_id.decode()), "status", "steps_done", "loss")
        (seq, status), *rows = await pipe.execute()
        members: dict[str, dict[str, Any]] = {}
        for member_id, (member_status, steps, loss) in zip(ids, rows, strict=True):
            if member_status is None:
                continue  # deleted
            value = float(loss) if loss else None
            members[member_id.decode()] = {
                "step": int(steps or 0) - 1,
                "loss": value if value is not None and math.isfinite(value) else None,
                "status": member_status.decode(),
            }
        number = int(seq or 0)
        frame = self.render(StreamEvent("progress", {"members": members}, number))
        ended = status is None or status.decode() not in ("queued", "running")  # None: deleted
        return number, ended, frame

    async def _follow(self, sweep_id: str, status: str, after: int) -> AsyncGenerator[bytes, None]:
        yield self.render(StreamEvent("status", {"status": status}))
        tail = await self._tail(sweep_id)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        tail.watchers.add(queue)
        # Where the tail was at the join, read before any await: the queue holds all after it.
        joined_at = tail.position
        if tail.task is None:
            tail.task = asyncio.create_task(tail.run())
        try:
            # The stream keeps only its latest events (GRADSTREAM_SWEEP_EVENTS_KEEP): a cursor
            # older than the first one kept gets `reset`, then every member's state as one
            # progress event, and goes on from there.
            first = await self.client.xrange(sweep_events_key(sweep_id), count=1)
            kept_from = int(first[0][0].split(b"-")[0]) if first else 1  # sequence numbers: 1..
            if kept_from > max(after, 0) + 1:
                yield self.render(StreamEvent("reset", {"kept_from": kept_from}))
                seq, ended, frame = await self._snapshot(sweep_id)
                yield frame
                if ended:
                    yield await tail.frame(seq, "done", "")
                    return
                after = seq
            # The backlog: what came after the cursor up to where the tail was at the join;
            # the tail's queue holds everything after that.
            cursor = step_entry_id(after) if after >= 0 else "0-0"
            while joined_at != b"0-0":
                entries = await self.client.xrange(
                    sweep_events_key(sweep_id), f"({cursor}", joined_at, count=100
                )
                for entry_id, fields in entries:
                    cursor = entry_id.decode()
                    seq = int(entry_id.split(b"-")[0])
                    kind = fields[b"type"].decode()
                    yield await tail.frame(seq, kind, fields[b"data"].decode())
                    await let_the_server_run()
                    if kind == "done":
                        return
                if len(entries) < 100:
                    break
            while True:
                item = await queue.get()
                if item is _GONE:
                    return
                if item is None:
                    yield self.render(None)
                    continue
                seq, kind, frame = item
                if seq <= after and kind != "done":
                    continue  # a snapshot after a reset had it already
                yield frame
                if kind == "done":
                    return
        finally:
            tail.watchers.discard(queue)
