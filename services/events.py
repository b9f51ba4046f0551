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

Bounded: a write is at most WRITE_BYTES (a client's unsent rest of a write is its only copy of
the shared bytes), and a watcher holding more than its byte budget (queued and in flight) is
dropped. Backlogs are read in pages shared by the job's watchers, as the tail is. Continuous:
the next step a watcher gets is always its cursor + 1; whatever the stream no longer holds
(the job was archived under a watcher, or under the tail) comes from the archive.
"""

import asyncio
import logging
import time
from array import array
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from services.archive import Archive, archived_file
from services.errors import (
    REDIS_UNAVAILABLE,
    ArchivedStepsLost,
    JobNotFound,
    StoreUnavailable,
    archived_file_missing,
)
from services.records import Chunk, expand_chunk
from services.schemas import JobStatus
from services.store.jobs import job_view
from services.store.keys import events_key, job_key, step_entry_id, steps_key
from services.store.steps import entries_per_read, entry_json_bytes, page_steps

log = logging.getLogger(__name__)

# A watcher that falls this many items, or its byte budget (GRADSTREAM_SSE_WATCHER_BYTES:
# what is queued for it and the write in flight), behind the tail is disconnected; it resumes
# by Last-Event-ID from Redis, instead of holding an unbounded queue in this process.
MAX_LAG = 10_000
LAG_GRACE_S = 2.0
# The most bytes one write to a watcher carries. What the client has not taken of a write sits
# in its connection's transport buffer, a private copy per watcher (uvicorn waits for that
# buffer to drain below its high-water mark before the next write): a write is never a page
# of a wide job, nor everything a lagging watcher has queued.
WRITE_BYTES = 64 * 1024
# Rendered backlog pages kept per process for the next watcher of the same job (besides the
# reads in flight, which every watcher that needs one waits on together).
BACKLOG_PAGES_KEPT = 4
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
    through: int = -1  # with `done`: the job's last step; a watcher short of it fills the gap

    @property
    def events(self) -> int:
        return len(self.starts) or 1

    @property
    def last(self) -> int | None:
        return None if self.first is None else self.first + len(self.starts) - 1

    def after(self, cursor: int) -> bytes | memoryview:
        """What a watcher that has had every step up to `cursor` still needs: all of it, but
        for a watcher whose own backlog read overlapped the tail's latest steps (a view of the
        shared bytes, not a copy)."""
        if self.first is None or self.first > cursor:
            return self.data
        skip = cursor + 1 - self.first
        return memoryview(self.data)[self.starts[skip] :] if skip < len(self.starts) else b""


def _pieces(data: bytes | memoryview) -> Iterator[bytes]:
    """`data` in writes of at most WRITE_BYTES (the shared bytes themselves when they fit)."""
    if len(data) <= WRITE_BYTES:
        yield data if isinstance(data, bytes) else bytes(data)
        return
    view = memoryview(data)
    for offset in range(0, len(view), WRITE_BYTES):
        yield bytes(view[offset : offset + WRITE_BYTES])


@dataclass(frozen=True, eq=False)
class _BacklogPage:
    """One read of a job's stored steps, rendered once for every watcher that reads its
    backlog through it."""

    delivery: Delivery
    last_entry: bytes | None  # the last entry read; None: there was none
    more: bool  # the read was full: more entries may follow
    next_count: int  # entries for the next read, sized by this page's last entry


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
        max_bytes = self.streams.watcher_bytes
        for watcher in list(self.watchers):
            if watcher.queued_events >= MAX_LAG or watcher.queued_bytes + size > max_bytes:
                watcher.queue.put_nowait(_OVERFLOW)
                self.leave(watcher)
            else:
                watcher.queue.put_nowait(item)
                watcher.queued_bytes += size
                watcher.queued_events += events

    def _send_event(self, event: StreamEvent) -> None:
        done = event.event == "done"
        through = self.steps_done - 1 if done else -1
        self._send(Delivery(self.streams.render(event), ends=done, through=through))

    async def _send_steps(self, entries: list[Any]) -> None:
        """The steps of `entries`, each rendered once, to every watcher: one Delivery per page
        of frames (one per read, unless the read is wider than a page)."""
        page_bytes = self.streams.page_bytes
        delivery_bytes = self.streams.delivery_bytes
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
                if size >= delivery_bytes:
                    self._send(Delivery(b"".join(frames), first, starts))
                    frames, starts, size = [], array("q"), 0
                    await self._let_watchers_catch_up()
        if frames:
            self._send(Delivery(b"".join(frames), first, starts))
            await self._let_watchers_catch_up()

    async def _let_watchers_catch_up(self) -> None:
        """The watchers take a delivery before the next is made: a wide chunk does not pile up
        in their queues (nor drop them for lag) within one read. One more than half its byte
        budget behind gets a moment to catch up first: a watcher that keeps reading is never
        dropped, however fast the job; one that stalls is, at its budget, after LAG_GRACE_S
        per delivery."""
        await asyncio.sleep(0)
        deadline = time.monotonic() + LAG_GRACE_S
        while time.monotonic() < deadline and any(
            w.queued_bytes > self.streams.watcher_bytes // 2 for w in self.watchers
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

    async def _check_finished(self) -> None:
        """After a read that found nothing: a job that finished and was archived before this
        tail read its last events has no streams left to block on (ARCHIVE deleted them), so
        the record says it ended; the watchers take the steps they miss from the archive."""
        status, steps_done = await self.streams.client.hmget(
            job_key(self.job_id), "status", "steps_done"
        )
        if status is not None and JobStatus(status.decode()).finished:
            self.status, self.steps_done = JobStatus(status.decode()), int(steps_done)
            self._send_event(
                StreamEvent("status", {"status": self.status.value, "steps_done": self.steps_done})
            )

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
                    await self._check_finished()
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
            self.steps_done = final.steps_done
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
        watcher_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.client = client
        self.keepalive_s = keepalive_s
        self.render = render
        self.page_bytes = page_bytes  # the most step bytes one read takes from Redis
        self.archive = archive  # where archived jobs' steps are read from
        # What one watcher may hold: the deliveries queued for it and its write in flight.
        # The deliveries are shared by every watcher; its own copy is a write's unsent rest.
        self.watcher_bytes = watcher_bytes
        self.delivery_bytes = max(WRITE_BYTES, min(page_bytes, watcher_bytes // 4))
        self._tails: dict[str, _Tail] = {}
        # Backlog reads by (job, first entry, entries): in flight, or kept (BACKLOG_PAGES_KEPT).
        self._pages: OrderedDict[tuple[str, str, int], asyncio.Future[_BacklogPage]] = OrderedDict()
        self.backlog_reads = 0  # XRANGEs of backlog pages made by this process

    @property
    def readers(self) -> int:
        """How many jobs this process is reading from Redis now."""
        return len(self._tails)

    def connections(self) -> tuple[int, int]:
        """The Redis connections this process's streams hold now, and the most they may."""
        pool = self.client.connection_pool
        in_use = getattr(pool, "_in_use_connections", ())  # redis-py keeps no public count
        return len(in_use), pool.max_connections

    def forget(self, tail: _Tail) -> None:
        if self._tails.get(tail.job_id) is tail:
            del self._tails[tail.job_id]

    def watching(self) -> tuple[int, int, int]:
        """Watchers in this process, the most events one of them has queued (its lag), and the
        most bytes one holds (queued and in flight). Called from another thread (a metrics
        scrape) while the event loop changes the sets: a snapshot that raced with a change is
        taken again."""
        for _ in range(10):
            try:
                watchers = [w for tail in list(self._tails.values()) for w in list(tail.watchers)]
                return (
                    len(watchers),
                    max((w.queued_events for w in watchers), default=0),
                    max((w.queued_bytes for w in watchers), default=0),
                )
            except RuntimeError:  # changed size during iteration
                continue
        return 0, 0, 0

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
            async with aclosing(
                self._events(tail, watcher, status, steps_done, joined_at, after)
            ) as events:
                async for data in events:
                    yield data
        except ArchivedStepsLost as exc:
            # Permanent, unlike a dropped stream: the client is told why and does not retry.
            log.error("%s", exc)
            yield self.render(StreamEvent("gone", {"status": 410, "detail": str(exc)}))
        finally:
            tail.leave(watcher)

    async def _events(
        self,
        tail: _Tail,
        watcher: _Watcher,
        status: JobStatus,
        steps_done: int,
        joined_at: bytes,
        after: int,
    ) -> AsyncGenerator[bytes, None]:
        """One watcher's frames: status, its backlog, then what the tail queues for it."""
        job_id = tail.job_id
        yield self.render(StreamEvent("status", {"status": status.value, "steps_done": steps_done}))
        # The backlog: all of a finished job's steps (the tail may have stopped mid-way),
        # a running job's up to where the tail was when this watcher joined (none when
        # nothing was stored then), in pages read and rendered once for every watcher of
        # the job in this process, sent a write of at most WRITE_BYTES at a time.
        if status.finished:
            stop = steps_done - 1
        else:
            stop = -1 if joined_at == b"0-0" else int(joined_at.split(b"-")[0])
        cursor = after
        start, count = step_entry_id(after + 1), 1  # one entry, until its size is known
        while cursor < stop:
            page = await self._backlog_page(job_id, start, count, status.finished)
            for data in _pieces(page.delivery.after(cursor)):
                yield data
                await let_the_server_run()
            cursor = max(cursor, page.delivery.last if page.delivery.last is not None else -1)
            if not page.more or page.last_entry is None:
                break
            start, count = "(" + page.last_entry.decode(), page.next_count
        if status.finished:
            if cursor < stop:  # the stream ended short: archived before or during the reads
                async for data, last in self._writes(self._steps_after(job_id, cursor, stop)):
                    cursor = last
                    yield data
                    await let_the_server_run()
            if cursor < stop:
                log.warning("job %s: steps after %d are gone; stream ended", job_id, cursor)
                return
            final = job_view(await self.client.hgetall(job_key(tail.job_id)))
            yield self.render(StreamEvent("done", final.model_dump(mode="json")))
            return
        held: Any = None  # taken from the queue, but too big to join the write before it
        while True:
            # Whatever has queued up goes out together, up to WRITE_BYTES a write (a bigger
            # delivery goes alone, in pieces); the bytes stay counted against the watcher
            # until written.
            batch = [held if held is not None else await watcher.queue.get()]
            held = None
            size = len(batch[0].data) if isinstance(batch[0], Delivery) else 0
            while size < WRITE_BYTES and not watcher.queue.empty():
                item = watcher.queue.get_nowait()
                if isinstance(item, Delivery) and size + len(item.data) > WRITE_BYTES:
                    held = item
                    break
                batch.append(item)
                size += len(item.data) if isinstance(item, Delivery) else 0
            parts: list[bytes | memoryview] = []
            ended = False
            for item in batch:
                if item is _OVERFLOW:
                    ended = True
                    break
                # Continuity: the next step this watcher gets is cursor + 1. The tail may be
                # ahead of it (the backlog read found the stream archived under it) or end
                # the job past it: the steps between come from the stream or the archive.
                needed = item.first - 1 if item.first is not None else item.through
                if needed > cursor:
                    if parts:
                        yield b"".join(parts)
                        parts = []
                    missing = self._steps_after(tail.job_id, cursor, needed)
                    async for data, last in self._writes(missing):
                        cursor = last
                        yield data
                        await let_the_server_run()
                    if cursor < needed:
                        # Neither stored nor archived (deleted meanwhile): no `done` after a
                        # gap; the client resumes by Last-Event-ID and learns why.
                        log.warning("job %s: steps after %d are gone", job_id, cursor)
                        ended = True
                        break
                parts.append(item.after(cursor))
                if item.last is not None:
                    cursor = max(cursor, item.last)
                if item.ends:
                    ended = True
                    break
            for data in _pieces(parts[0] if len(parts) == 1 else b"".join(parts)):
                if data:
                    yield data
            for item in batch:
                if isinstance(item, Delivery):
                    watcher.queued_bytes -= len(item.data)
                    watcher.queued_events -= item.events
            if ended:
                return

    async def _backlog_page(
        self, job_id: str, start: str, count: int, finished: bool
    ) -> _BacklogPage:
        """The stored entries of `job_id` from `start`, `count` of them, rendered: one read for
        every watcher of this process that needs the same page at about the same time (a
        thousand dashboards opening one job read each page once). Full pages, and a finished
        job's last one, are kept for the next watchers; a running job's last page is not
        (entries are still being added)."""
        key = (job_id, start, count)
        page = self._pages.get(key)
        if page is None:
            page = asyncio.ensure_future(self._read_page(job_id, start, count))
            self._pages[key] = page

            def kept(read: "asyncio.Future[_BacklogPage]") -> None:
                if (
                    read.cancelled()
                    or read.exception() is not None
                    or not (finished or read.result().more)
                ):
                    if self._pages.get(key) is read:
                        del self._pages[key]
                    return
                done = [k for k, f in self._pages.items() if f.done()]
                for old in done[: max(0, len(done) - BACKLOG_PAGES_KEPT)]:
                    del self._pages[old]

            page.add_done_callback(kept)
        else:
            self._pages.move_to_end(key)
        # A watcher that goes away does not cancel the read the others wait on.
        return await asyncio.shield(page)

    async def _read_page(self, job_id: str, start: str, count: int) -> _BacklogPage:
        self.backlog_reads += 1
        entries = await self.client.xrange(steps_key(job_id), start, "+", count=count)
        frames: list[bytes] = []
        starts, size, first = array("q"), 0, None
        next_count = count
        for _, fields in entries:
            chunk = Chunk.from_fields(fields)
            next_count = entries_per_read(entry_json_bytes(chunk), self.page_bytes)
            for records in record_pages(chunk, -1, self.page_bytes):
                for record in records:
                    first = record["step"] if first is None else first
                    frame = self.render(StreamEvent("step", record, record["step"]))
                    frames.append(frame)
                    starts.append(size)
                    size += len(frame)
                await asyncio.sleep(0)  # a wide page does not hold the event loop whole
        return _BacklogPage(
            Delivery(b"".join(frames), first, starts),
            entries[-1][0] if entries else None,
            len(entries) == count,
            next_count,
        )

    async def _writes(
        self, events: AsyncGenerator[StreamEvent, None]
    ) -> AsyncIterator[tuple[bytes, int]]:
        """`events` rendered, about WRITE_BYTES a write, each with the last step it
        carries."""
        async with aclosing(events):
            pending: list[bytes] = []
            size = cursor = 0
            async for event in events:
                cursor = event.id if event.id is not None else cursor
                frame = self.render(event)
                pending.append(frame)
                size += len(frame)
                if size >= WRITE_BYTES:
                    yield b"".join(pending), cursor
                    pending, size = [], 0
            if pending:
                yield b"".join(pending), cursor

    async def _stored_steps(
        self, job_id: str, after: int, until: bytes
    ) -> AsyncGenerator[StreamEvent, None]:
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

    async def _steps_after(
        self, job_id: str, after: int, through: int
    ) -> AsyncGenerator[StreamEvent, None]:
        """Steps `after + 1` … `through` (as far as they exist): those the job's stream holds,
        then, when the stream ends short (the job was archived, before this read or during it),
        the rest from its archived file, a row group at a time off the event loop."""
        async with aclosing(self._stored_steps(job_id, after, b"+")) as stored:
            async for event in stored:
                if event.id is None or event.id > through:
                    return
                after = event.id
                yield event
        if after >= through:
            return
        archived = await self.client.hget(job_key(job_id), "archived")
        if archived is None:
            return
        archive, location = archived_file(self.archive, archived)
        while after < through:
            try:
                chunk = await asyncio.to_thread(archive.chunk_after, location, after)
            except StoreUnavailable as exc:
                if archived_file_missing(exc):
                    raise ArchivedStepsLost(job_id) from exc
                raise
            if chunk is None:
                return
            for page in record_pages(chunk, after, self.page_bytes):
                for record in page:
                    if record["step"] > through:
                        return
                    yield StreamEvent("step", record, record["step"])
            after = chunk.last
