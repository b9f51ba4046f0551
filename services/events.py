"""A job's event stream for one watcher: its status, the stored steps after a cursor, live steps
as they are flushed, status changes, and finally `done` with the final JobView.

Async (redis.asyncio) so that a watcher holds no thread while it waits. Steps come from the
job's step stream and status changes from its event stream; one XREAD blocks on both, and as
the flush script writes a chunk before the status that ends the job, steps always come first.
"""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from services.errors import JobNotFound, StoreUnavailable
from services.records import Chunk, expand_chunk
from services.schemas import JobStatus
from services.store import events_key, job_key, job_view, step_entry_id, steps_key

_PAGE = 64


@dataclass(frozen=True)
class StreamEvent:
    """One event for a watcher; only steps carry an id (the step number)."""

    event: str  # step | status | done
    data: dict[str, Any]
    id: int | None = None


# What the stream yields when nothing happened for a keep-alive interval.
KEEPALIVE = None


async def open_job_events(
    client: "aioredis.Redis", job_id: str, after: int, keepalive_s: float
) -> AsyncIterator[StreamEvent | None]:
    """The events of `job_id` after step `after` (-1: from step 0). Raises JobNotFound at once."""
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(job_key(job_id))
    pipe.xrevrange(events_key(job_id), count=1)
    try:
        fields, last_event = await pipe.execute()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"Redis unavailable: {exc}") from exc
    if not fields:
        raise JobNotFound(job_id)
    events_from = last_event[0][0] if last_event else b"0-0"
    return _job_events(client, job_id, fields, events_from, after, keepalive_s)


class _StepCursor:
    """Where a watcher is in the step stream: the last step sent and the last entry read."""

    def __init__(self, after: int) -> None:
        self.step = after
        # Entry ids are a chunk's last step, so every entry before this one is already sent.
        self.entry: bytes | str = f"{after + 1}-0"

    def take(self, entry_id: bytes, fields: dict[bytes, bytes]) -> list[StreamEvent]:
        records = expand_chunk(Chunk.from_fields(fields), self.step)
        self.entry = entry_id
        if records:
            self.step = records[-1]["step"]
        return [StreamEvent("step", record, record["step"]) for record in records]


async def _stored_steps(
    client: "aioredis.Redis", job_id: str, cursor: _StepCursor
) -> AsyncIterator[StreamEvent]:
    start = step_entry_id(cursor.step + 1)
    while True:
        entries = await client.xrange(steps_key(job_id), start, "+", count=_PAGE)
        for entry_id, fields in entries:
            for event in cursor.take(entry_id, fields):
                yield event
            start = "(" + entry_id.decode()
        if len(entries) < _PAGE:
            return


async def _job_events(
    client: "aioredis.Redis",
    job_id: str,
    fields: dict[bytes, bytes],
    events_from: bytes,
    after: int,
    keepalive_s: float,
) -> AsyncIterator[StreamEvent | None]:
    status = JobStatus(fields[b"status"].decode())
    yield StreamEvent("status", {"status": status.value, "steps_done": int(fields[b"steps_done"])})
    cursor = _StepCursor(after)
    async for event in _stored_steps(client, job_id, cursor):
        yield event

    steps, events = steps_key(job_id).encode(), events_key(job_id).encode()
    while not status.finished:
        reply = await client.xread(
            {steps: cursor.entry, events: events_from},
            block=int(keepalive_s * 1000),
            count=_PAGE,
        )
        if not reply:
            yield KEEPALIVE
            continue
        new = dict(reply)
        for entry_id, entry in new.get(steps, []):
            for event in cursor.take(entry_id, entry):
                yield event
        for entry_id, entry in new.get(events, []):
            events_from = entry_id
            status = JobStatus(entry[b"status"].decode())
            if status.finished:
                # This read may have stopped at _PAGE step entries: send the rest first.
                async for event in _stored_steps(client, job_id, cursor):
                    yield event
            yield StreamEvent(
                "status", {"status": status.value, "steps_done": int(entry[b"steps_done"])}
            )
            if status.finished:
                break

    final = job_view(await client.hgetall(job_key(job_id)))
    yield StreamEvent("done", final.model_dump(mode="json"))
