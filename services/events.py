"""A job's event stream for its watchers: status, the stored steps after a cursor, live steps as
they are flushed, status changes, and finally `done` with the final JobView.

Async (redis.asyncio), so a watcher holds no thread while it waits. Each API process reads each
watched job from Redis once: a `_Tail` blocks on the job's step and event streams with one
XREAD and fans what it reads out to every watcher in memory, each read rendered once into one
shared Delivery. So Redis load does not grow with the number of watchers. A watcher first reads
its own backlog (the steps after its cursor up to where the tail was when it joined), then
follows the tail, sending whatever has queued up for it as one write: with many watchers (or a
slow one) a write carries several flushes, and the writes, not Redis, are what the process
spends its time on.
"""

import asyncio
import logging
import time
from array import array
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from services.archive import Archive, archived_file
from services.errors import REDIS_UNAVAILABLE, JobNotFound, StoreUnavailable
from services.records import Chunk, expand_chunk
from services.schemas import JobStatus
from services.store.jobs import job_view
from services.store.keys import events_key, job_key, step_entry_id, steps_key
from services.store.steps import entries_per_read, entry_json_bytes, page_steps

log = logging.getLogger(__name__)

# A watcher that falls this many items, or this many page budgets of frames, behind the tail
# is disconnected; it resumes by Last-Event-ID from Redis, instead of holding an unbounded
# queue in this process.
MAX_LAG = 10_000
MAX_LAG_PAGES = 4
LAG_GRACE_S = 2.0
BACKLOG_WRITE_BYTES = 64 * 1024
# A tail reads at most once per this much per watcher (80 ms for 1 000 watchers), below
# MIN_SPACING_S not at all: see _Tail._pace.
WRITE_SPACING_S = 80e-6
MIN_SPACING_S = 0.005


@dataclass(frozen=True)
class StreamEvent:
    """One event for a watcher; only steps carry an id (the step number)."""

    event: str  # step | status | done
    data: dict[str, Any]
    id: int | None = None


Render = Callable[["StreamEvent | None"], bytes]  # None: a keep-alive
_OVERFLOW = object()


@dataclass(frozen=True, eq=False)
class Delivery:
    """Frames rendered once and shared by every watcher of a job in this process: consecutive
    step frames (`first`, `first + 1`, …, each starting at its offset in `starts`), or one
    control frame (`first` None). A watcher sends what has queued up for it as one write, so
    the more watchers share a process (the longer each waits for its turn), the more steps
    each write carries, instead of one write per watcher per flush."""

    data: bytes
    first: int | None = None
    starts: "array[int]" = field(default_factory=lambda: array("q"))
    ends: bool = False  # it carries `done`

    @property
    def events(self) -> int:
        return len(self.starts) or 1

    @property
    def last(self) -> int | None:
        return None if self.first is None else self.first + len(self.starts) - 1

    def after(self, cursor: int) -> bytes:
        """What a watcher that has had every step up to `cursor` still needs: all of it, but
        for a watcher whose own backlog read overlapped the tail's latest steps."""
        if self.first is None or self.first > cursor:
            return self.data
        skip = cursor + 1 - self.first
        return self.data[self.starts[skip] :] if skip < len(self.starts) else b""


@dataclass(eq=False)  # identity: watchers live in a set
class _Watcher:
    queue: "asyncio.Queue[Any]" = field(default_factory=asyncio.Queue)
    queued_bytes: int = 0  # of the deliveries in `queue`
    queued_events: int = 0


class _Tail:
    """The one reader of a job's streams in this process."""

    def __init__(self, streams: "JobStreams", job_id: str, snapshot: list[Any]) -> None:
        fields, last_step, last_event = snapshot
        self.streams = streams
        self.job_id = job_id
        self.owner: bytes | None = fields.get(b"tenant")  # a job's owner never changes
        self.status = JobStatus(fields[b"status"].decode())
        self.steps_done = int(fields[b"steps_done"])
        self.steps_pos: bytes = last_step[0][0] if last_step else b"0-0"
        self.events_pos: bytes = last_event[0][0] if last_event else b"0-0"
        self.entries_per_read = 1  # step entries per XREAD, sized by the last entry's bytes
        self.read_at = 0.0  # the event loop's time of the last read
        self.watchers: set[_Watcher] = set()
        self.task: asyncio.Task[None] | None = None

    def join(self) -> tuple[_Watcher, JobStatus, int, bytes]:
        """A new watcher, and where the tail is: everything after that reaches its queue."""
        watcher = _Watcher()
        self.watchers.add(watcher)
        if self.task is None and not self.status.finished:
            self.task = asyncio.create_task(self._read(), name=f"tail-{self.job_id}")
        return watcher, self.status, self.steps_done, self.steps_pos

    def leave(self, watcher: _Watcher) -> None:
        self.watchers.discard(watcher)
        if not self.watchers:
            self.streams.forget(self)
            if self.task is not None:
                self.task.cancel()

    def _send(self, item: "Delivery | object") -> None:
        """Queue `item` (a Delivery, or _OVERFLOW) for every watcher; one that lags too far
        behind gets _OVERFLOW instead and leaves."""
        size = len(item.data) if isinstance(item, Delivery) else 0
        events = item.events if isinstance(item, Delivery) else 0
        max_bytes = MAX_LAG_PAGES * self.streams.page_bytes
        for watcher in list(self.watchers):
            if watcher.queued_events >= MAX_LAG or watcher.queued_bytes + size > max_bytes:
                watcher.queue.put_nowait(_OVERFLOW)
                self.leave(watcher)
            else:
                watcher.queue.put_nowait(item)
                watcher.queued_bytes += size
                watcher.queued_events += events

    def _send_event(self, event: StreamEvent) -> None:
        self._send(Delivery(self.streams.render(event), ends=event.event == "done"))

    async def _send_steps(self, entries: list[Any]) -> None:
        """The steps of `entries`, each rendered once, to every watcher: one Delivery per page
        of frames (one per read, unless the read is wider than a page)."""
        page_bytes = self.streams.page_bytes
        frames: list[bytes] = []
        starts, size, first = array("q"), 0, -1
        for entry_id, fields in entries:
            self.steps_pos = entry_id
            chunk = Chunk.from_fields(fields)
            self.steps_done = chunk.last + 1
            self.entries_per_read = entries_per_read(entry_json_bytes(chunk), page_bytes)
            for page in record_pages(chunk, -1, page_bytes):
                for record in page:
                    if not frames:
                        first = record["step"]
                    frame = self.streams.render(StreamEvent("step", record, record["step"]))
                    frames.append(frame)
                    starts.append(size)
                    size += len(frame)
                if size >= page_bytes:
                    self._send(Delivery(b"".join(frames), first, starts))
                    frames, starts, size = [], array("q"), 0
                    await self._let_watchers_catch_up()
        if frames:
            self._send(Delivery(b"".join(frames), first, starts))
            await self._let_watchers_catch_up()

    async def _let_watchers_catch_up(self) -> None:
        """The watchers take a page before the next is made: a wide chunk does not pile up in
        their queues (nor drop them for lag) within one read. One more than two pages behind
        gets a moment to catch up first: a watcher that keeps reading is never dropped,
        however fast the job; one that stalls is, at MAX_LAG_PAGES, after LAG_GRACE_S per
        page."""
        await asyncio.sleep(0)
        deadline = time.monotonic() + LAG_GRACE_S
        while time.monotonic() < deadline and any(
            w.queued_bytes > 2 * self.streams.page_bytes for w in self.watchers
        ):
            await asyncio.sleep(0.01)

    async def _pace(self) -> None:
        """With many watchers, wait until WRITE_SPACING_S per watcher has passed since the
        previous read: a read is a write to every watcher, so this bounds the share of the
        process that writes take (a write costs tens of microseconds, mostly the system call)
        and lets each write carry the flushes of that interval. Few watchers: no wait."""
        loop = asyncio.get_running_loop()
        spacing = len(self.watchers) * WRITE_SPACING_S
        if spacing > MIN_SPACING_S:
            await asyncio.sleep(self.read_at + spacing - loop.time())
        self.read_at = loop.time()

    async def _read(self) -> None:
        client = self.streams.client
        steps, events = steps_key(self.job_id).encode(), events_key(self.job_id).encode()
        block_ms = int(self.streams.keepalive_s * 1000)
        try:
            while not self.status.finished:
                await self._pace()
                reply = await client.xread(
                    {steps: self.steps_pos, events: self.events_pos},
                    block=block_ms,
                    count=self.entries_per_read,
                )
                if not reply:
                    self._send(Delivery(self.streams.render(None)))
                    continue
                new = dict(reply)
                await self._send_steps(new.get(steps, []))
                for entry_id, entry in new.get(events, []):
                    self.events_pos = entry_id
                    self.status = JobStatus(entry[b"status"].decode())
                    self.steps_done = int(entry[b"steps_done"])
                    if self.status.finished:
                        # This read may have stopped short of the last step entries: send the
                        # rest first, a bounded read at a time.
                        while rest := await client.xrange(
                            steps, b"(" + self.steps_pos, "+", count=self.entries_per_read
                        ):
                            await self._send_steps(rest)
                    self._send_event(
                        StreamEvent(
                            "status", {"status": self.status.value, "steps_done": self.steps_done}
                        )
                    )
                    if self.status.finished:
                        break
            final = job_view(await client.hgetall(job_key(self.job_id)))
            self._send_event(StreamEvent("done", final.model_dump(mode="json")))
        except Exception:
            # Redis lost, or a record that cannot be read: end every watcher's stream; each
            # reconnects and resumes by Last-Event-ID.
            log.exception("tail of job %s stopped", self.job_id)
            self._send(_OVERFLOW)
        finally:
            self.streams.forget(self)


async def let_the_server_run() -> None:
    """Between writes sent back to back: a write to a client that is gone does not suspend,
    and the server learns of the loss in a callback. Letting it run ends the stream at the next
    write, instead of rendering the rest of a backlog for nobody (and asyncio logging each
    write to the dead socket)."""
    await asyncio.sleep(0)


def record_pages(chunk: Chunk, after: int, page_bytes: int) -> Iterator[list[dict[str, Any]]]:
    """The chunk's records after `after`, a page (about `page_bytes` of JSON) at a time: an
    entry of a wide job never becomes all its Python floats at once."""
    per_page = page_steps(chunk, chunk.count, page_bytes)
    while records := expand_chunk(chunk, after, per_page):
        yield records
        after = records[-1]["step"]


class JobStreams:
    """The job tails of one API process (one Redis reader per watched job)."""

    def __init__(
        self,
        client: "aioredis.Redis",
        keepalive_s: float,
        render: Render,
        page_bytes: int = 8 * 1024 * 1024,
        archive: Archive | None = None,
    ) -> None:
        self.client = client
        self.keepalive_s = keepalive_s
        self.render = render
        self.page_bytes = page_bytes  # the most step bytes one read takes from Redis
        self.archive = archive  # where archived jobs' steps are read from
        self._tails: dict[str, _Tail] = {}

    @property
    def readers(self) -> int:
        """How many jobs this process is reading from Redis now."""
        return len(self._tails)

    def forget(self, tail: _Tail) -> None:
        if self._tails.get(tail.job_id) is tail:
            del self._tails[tail.job_id]

    def watching(self) -> tuple[int, int]:
        """Watchers in this process, and the most events one of them has queued (its lag).
        Called from another thread (a metrics scrape) while the event loop changes the sets:
        a snapshot that raced with a change is taken again."""
        for _ in range(10):
            try:
                watchers = [w for tail in list(self._tails.values()) for w in list(tail.watchers)]
                return len(watchers), max((w.queued_events for w in watchers), default=0)
            except RuntimeError:  # changed size during iteration
                continue
        return 0, 0

    async def open(self, job_id: str, after: int, tenant: str) -> AsyncGenerator[bytes, None]:
        """The rendered events of `job_id` (a job of `tenant`) after step `after` (-1: from
        step 0).

        Raises JobNotFound (also for another tenant's job) or StoreUnavailable before the
        first event.
        """
        # The owner comes with the tail: a thousand watchers of one job cost one Redis read.
        tail = self._tails.get(job_id)
        candidate = None if tail is not None else await self._new_tail(job_id)
        if (tail or candidate).owner != tenant.encode():  # type: ignore[union-attr]
            raise JobNotFound(job_id)
        return self._follow(job_id, candidate, after)

    async def _new_tail(self, job_id: str) -> _Tail:
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(job_key(job_id))
        pipe.xrevrange(steps_key(job_id), count=1)
        pipe.xrevrange(events_key(job_id), count=1)
        try:
            snapshot = await pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(REDIS_UNAVAILABLE) from exc
        if not snapshot[0]:
            raise JobNotFound(job_id)
        return _Tail(self, job_id, snapshot)

    async def _follow(
        self, job_id: str, candidate: _Tail | None, after: int
    ) -> AsyncGenerator[bytes, None]:
        # The watcher joins when its response starts (a client gone before that never joins),
        # the tail already reading this job if there is one. From the join on, everything
        # after the tail's position reaches the watcher's queue.
        tail = self._tails.get(job_id)
        if tail is None:
            tail = self._tails.setdefault(job_id, candidate or await self._new_tail(job_id))
        watcher, status, steps_done, joined_at = tail.join()
        try:
            yield self.render(
                StreamEvent("status", {"status": status.value, "steps_done": steps_done})
            )
            cursor = after
            # A finished job's backlog is all there is (the tail may have stopped mid-way).
            until = b"+" if status.finished else joined_at
            if until != b"0-0":  # else nothing was stored when it joined: no read
                # The backlog goes out in writes of about BACKLOG_WRITE_BYTES, not one per step.
                pending: list[bytes] = []
                size = 0
                backlog = self._stored_steps(tail.job_id, after, until)
                if status.finished:
                    backlog = self._with_archived(backlog, tail.job_id, after, steps_done)
                async for event in backlog:
                    cursor = event.id if event.id is not None else cursor
                    frame = self.render(event)
                    pending.append(frame)
                    size += len(frame)
                    if size >= BACKLOG_WRITE_BYTES:
                        yield b"".join(pending)
                        pending, size = [], 0
                        await let_the_server_run()
                if pending:
                    yield b"".join(pending)
            if status.finished:
                final = job_view(await self.client.hgetall(job_key(tail.job_id)))
                yield self.render(StreamEvent("done", final.model_dump(mode="json")))
                return
            while True:
                # Whatever has queued up goes out as one write.
                items = [await watcher.queue.get()]
                while not watcher.queue.empty():
                    items.append(watcher.queue.get_nowait())
                watcher.queued_bytes = watcher.queued_events = 0
                parts, ended = [], False
                for item in items:
                    if item is _OVERFLOW:
                        ended = True
                        break
                    parts.append(item.after(cursor))
                    if item.last is not None:
                        cursor = max(cursor, item.last)
                    if item.ends:
                        ended = True
                        break
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                if data:
                    yield data
                if ended:
                    return
        finally:
            tail.leave(watcher)

    async def _stored_steps(
        self, job_id: str, after: int, until: bytes
    ) -> AsyncIterator[StreamEvent]:
        """Stored steps after `after`, in entries up to and including the entry `until`; each
        read takes about `page_bytes` of entries at most, and each entry becomes records a
        page at a time."""
        start = step_entry_id(after + 1)
        count = 1  # until an entry's size is known
        while True:
            entries = await self.client.xrange(steps_key(job_id), start, until, count=count)
            for entry_id, fields in entries:
                chunk = Chunk.from_fields(fields)
                for page in record_pages(chunk, after, self.page_bytes):
                    for record in page:
                        yield StreamEvent("step", record, record["step"])
                start = "(" + entry_id.decode()
            if len(entries) < count:
                return
            count = entries_per_read(entry_json_bytes(chunk), self.page_bytes)

    async def _with_archived(
        self, stored: AsyncIterator[StreamEvent], job_id: str, after: int, steps_done: int
    ) -> AsyncIterator[StreamEvent]:
        """A finished job's stored steps: those its stream holds, then, when the stream ends
        short of its last step (it was archived, before this read or during it), the rest from
        its archived file, a row group at a time off the event loop."""
        async for event in stored:
            after = event.id if event.id is not None else after
            yield event
        if after >= steps_done - 1:
            return
        archived = await self.client.hget(job_key(job_id), "archived")
        if archived is None:
            return
        archive, location = archived_file(self.archive, archived)
        while chunk := await asyncio.to_thread(archive.chunk_after, location, after):
            for page in record_pages(chunk, after, self.page_bytes):
                for record in page:
                    yield StreamEvent("step", record, record["step"])
            after = chunk.last
