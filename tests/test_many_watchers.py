"""Many watchers of one job: each API process reads the job from Redis once and sends each
watcher whatever has queued up for it as one write (several flushes in one write for a watcher
that lags), every step exactly once, in order, with its id; a watcher that stops reading holds
up no other; and `gradstream api --workers N` runs N such processes on one port."""

import asyncio
import bisect
import io
import itertools
import socket
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from api.client import Client, Event, parse_sse
from api.routes.streams import sse_frame
from cli.stack import Stack, child_pids, wait_until
from services.events import Delivery, StreamEvent
from tests.conftest import SEED_EXAMPLE, TEST_ENV
from tests.faults import running_blocker

# About 4 KB of JSON per step, 8 MB in all: far more than the socket buffers between the API
# and a client that does not read, so the API's writes to it wait and its steps queue up.
WIDE = {
    "data": {"synthetic": {"n": 200, "d": 100, "seed": 3}},
    "optimizer": {"name": "sgd", "lr": 0.001},
    "steps": 2000,
    "device": "cpu",
}
FAST_WATCHERS = 5
# The page budget of the `paged` API: WIDE's 8 MB span ~120 pages, so a watcher more than two
# pages behind is waited for (catch-up) and one four pages behind is dropped (lag), on any
# machine: both are counted in bytes, not time.
SMALL_PAGE_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def patient(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API of its own on the session's Redis (and so its worker) that waits as long as it
    takes for a client that does not read (instead of dropping it after 30 s): a test that
    outlasts the send timeout sees whether others were held up, not when one was dropped."""
    api = Stack(tmp_path_factory.mktemp("patient"), env=TEST_ENV, tenants=("pat",))
    api.redis_url = stack.redis_url
    try:
        api.start_api(GRADSTREAM_SSE_SEND_TIMEOUT_S="3600")
        yield api
    finally:
        api.stop()


@pytest.fixture(scope="module")
def paged(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Like `patient`, with small pages: a wide job is many pages, so the tail's catch-up
    wait and its drop of a watcher that lags four pages run."""
    api = Stack(tmp_path_factory.mktemp("paged"), env=TEST_ENV, tenants=("page",))
    api.redis_url = stack.redis_url
    try:
        api.start_api(
            GRADSTREAM_SSE_SEND_TIMEOUT_S="3600", GRADSTREAM_MAX_PAGE_BYTES=str(SMALL_PAGE_BYTES)
        )
        yield api
    finally:
        api.stop()


@pytest.fixture
def pat(patient: Stack) -> Iterator[Client]:
    with Client(patient.api_url, patient.api_key, timeout=10) as client:
        yield client


class RawStream:
    """An SSE request on a plain socket: the test decides when (and whether) it reads, and sees
    each of the server's writes (one HTTP chunk per write)."""

    def __init__(
        self, api: Stack, job_id: str, last_event_id: int | None = None, stalled: bool = False
    ) -> None:
        self.sock = socket.socket()
        if stalled:  # the smallest receive window: the server's writes soon wait for it
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        port = int(api.api_url.rsplit(":", 1)[1])
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(60)
        resume = "" if last_event_id is None else f"Last-Event-ID: {last_event_id}\r\n"
        self.sock.sendall(
            f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: test\r\n{resume}"
            f"Authorization: Bearer {api.api_key}\r\n\r\n".encode()
        )

    def wait_until_following(self) -> None:
        """Until its first event has come (peeked, left to read): the API follows the job for
        it from then on."""
        wait_until(
            lambda: b"event: status" in self.sock.recv(4096, socket.MSG_PEEK), 30, "first event"
        )

    def writes(self, pause_s: float = 0.0) -> list[bytes]:
        """Read the whole response: the body of each of the server's writes. With `pause_s`,
        a slow reader: it waits that long before each receive (of at most 16 KiB)."""
        raw = _SlowSocket(self.sock, pause_s)
        with self.sock, io.BufferedReader(raw, 16 * 1024) as body:
            while body.readline() not in (b"\r\n", b""):  # the status line and headers
                pass
            writes = []
            while size := int(body.readline(), 16):
                writes.append(body.read(size))
                body.readline()
            return writes


class _SlowSocket(io.RawIOBase):
    """A socket read `pause_s` after `pause_s`: a client that keeps reading, slowly."""

    def __init__(self, sock: socket.socket, pause_s: float) -> None:
        self.sock, self.pause_s = sock, pause_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        time.sleep(self.pause_s)
        return self.sock.recv_into(buffer)


def events_of(writes: list[bytes]) -> list[Event]:
    return list(parse_sse(iter(b"".join(writes).decode().splitlines())))


def check_steps(events: list[Event], stored: list[dict[str, Any]]) -> None:
    """Each stored step once, in order, each with its step number as id; only steps carry an
    id; the stream ends with `done`."""
    steps = [e for e in events if e.event == "step"]
    assert [e.data for e in steps] == stored
    assert [e.id for e in steps] == [str(s["step"]) for s in stored]
    assert all(e.id is None for e in events if e.event != "step")
    assert events[-1].event == "done" and events[-1].data["status"] == "succeeded"


def queued_behind_a_running_job(client: Client, spec: dict[str, Any]) -> tuple[str, str]:
    """A job of `spec` that stays queued (the one CPU worker is busy with an endless job until
    the test cancels it): watchers can join before its first step. Its id, and the other's."""
    blocker = running_blocker(client)
    return client.submit(spec)["id"], blocker


async def _watch(api: Stack, job_id: str, following: asyncio.Semaphore) -> list[Event]:
    """The job's events, to the end; `following` is released once the first has come (the
    API follows the job for this watcher from then on)."""
    url = f"{api.api_url}/v1/jobs/{job_id}/events"
    lines: list[str] = []
    async with (
        httpx.AsyncClient(timeout=60, headers=api.auth()) as http,
        http.stream("GET", url) as response,
    ):
        async for line in response.aiter_lines():
            if not lines:
                following.release()
            lines.append(line)
    return list(parse_sse(iter(lines)))


async def _watch_from_the_start(
    api: Stack, job_id: str, watchers: int, release: Callable[[], object]
) -> list[list[Event]]:
    """`watchers` watchers of a job held queued, each following it before `release` (run in
    a thread: it cancels what holds the job back) lets it start: each one's events."""
    following = asyncio.Semaphore(0)
    tasks = [asyncio.create_task(_watch(api, job_id, following)) for _ in range(watchers)]
    for _ in tasks:
        await asyncio.wait_for(following.acquire(), 30)
    await asyncio.to_thread(release)
    return await asyncio.gather(*tasks)


def test_a_lagging_watcher_gets_several_flushes_per_write_each_step_once_with_its_id(
    patient: Stack, pat: Client, redis_client: "redis.Redis"
) -> None:
    job_id, blocker = queued_behind_a_running_job(pat, WIDE)
    lagging = RawStream(patient, job_id, stalled=True)
    lagging.wait_until_following()
    pat.cancel(blocker)
    assert pat.wait(job_id, timeout=120)["status"] == "succeeded"
    writes = lagging.writes()  # only now read: it lagged the whole job

    stored = list(pat.steps(job_id))
    assert len(stored) == WIDE["steps"]
    check_steps(events_of(writes), stored)
    # The stream's entries (one per flush) end at these steps; a write whose steps run into a
    # second entry carried more than one flush.
    entry_ends = [int(i.split(b"-")[0]) for i, _ in redis_client.xrange(f"gs:{{{job_id}}}:steps")]
    assert len(entry_ends) > 2
    flushes_per_write = []
    for write in writes:
        ids = [int(e.id) for e in events_of([write]) if e.id is not None]
        if ids:
            first, last = (bisect.bisect_left(entry_ends, step) for step in (ids[0], ids[-1]))
            flushes_per_write.append(last - first + 1)
    assert max(flushes_per_write) > 1, flushes_per_write

    # Resuming from an id in the middle of a coalesced write: the rest, once.
    middle = next(
        write for write in writes if len([e for e in events_of([write]) if e.id is not None]) > 2
    )
    resume_at = int([e.id for e in events_of([middle]) if e.id is not None][1])
    rest = events_of(RawStream(patient, job_id, last_event_id=resume_at).writes())
    check_steps(rest, stored[resume_at + 1 :])


def test_a_delivery_skips_exactly_the_steps_a_watcher_already_had() -> None:
    # A watcher whose own backlog read went past where the tail was (it resumed from an id the
    # tail of this process had not reached) takes only the rest of a shared delivery.
    frames = [sse_frame(StreamEvent("step", {"step": s}, s)) for s in range(10, 14)]
    starts = array("q", itertools.accumulate((len(f) for f in frames[:-1]), initial=0))
    delivery = Delivery(b"".join(frames), 10, starts)
    assert (delivery.first, delivery.last, delivery.events) == (10, 13, 4)
    assert delivery.after(9) is delivery.data  # the common case: shared, not copied
    assert delivery.after(11) == frames[2] + frames[3]
    assert delivery.after(13) == delivery.after(20) == b""
    keep_alive = Delivery(sse_frame(None))
    assert keep_alive.after(20) == b": keep-alive\n\n" and keep_alive.last is None


def test_a_watcher_that_stops_reading_holds_up_no_other(patient: Stack, pat: Client) -> None:
    job_id, blocker = queued_behind_a_running_job(pat, WIDE)
    stalled = RawStream(patient, job_id, stalled=True)
    stalled.wait_until_following()

    # The others get the whole job, `done` included, while the stalled one has read nothing
    # (the API waits an hour for it before dropping it).
    others = asyncio.run(
        _watch_from_the_start(patient, job_id, FAST_WATCHERS, lambda: pat.cancel(blocker))
    )
    stored = list(pat.steps(job_id))
    for events in others:
        check_steps(events, stored)
    # It was neither dropped nor skipped: reading now, it gets the job too.
    check_steps(events_of(stalled.writes()), stored)


def test_on_a_job_of_many_pages_a_slow_watcher_is_waited_for_and_a_stalled_one_dropped(
    paged: Stack,
) -> None:
    with Client(paged.api_url, paged.api_key, timeout=10) as page:
        job_id, blocker = queued_behind_a_running_job(page, WIDE)
        stalled = RawStream(paged, job_id, stalled=True)
        slow = RawStream(paged, job_id)
        stalled.wait_until_following()
        slow.wait_until_following()
        # The slow one reads all along, a little at a time: whenever it is more than two pages
        # behind the tail waits for it, so it is never dropped, however fast the job.
        slow_writes: list[bytes] = []
        reader = threading.Thread(target=lambda: slow_writes.extend(slow.writes(pause_s=0.005)))
        reader.start()
        others = asyncio.run(
            _watch_from_the_start(paged, job_id, FAST_WATCHERS, lambda: page.cancel(blocker))
        )
        reader.join(120)
        assert not reader.is_alive()
        stored = list(page.steps(job_id))
        assert len(stored) == WIDE["steps"]
        for events in others:
            check_steps(events, stored)
        check_steps(events_of(slow_writes), stored)

        # The stalled one fell four pages behind and was dropped: its stream ends (no `done`)
        # after a prefix of the steps, each once and in order; by Last-Event-ID it gets the rest.
        dropped = events_of(stalled.writes())
        steps = [e for e in dropped if e.event == "step"]
        assert dropped[-1].event != "done"
        assert 0 < len(steps) < len(stored)
        assert [e.data for e in steps] == stored[: len(steps)]
        resumed = RawStream(paged, job_id, last_event_id=len(steps) - 1)
        check_steps(events_of(resumed.writes()), stored[len(steps) :])


def _serving_processes(api: Stack) -> list[int]:
    """uvicorn's worker processes (its other child is multiprocessing's resource tracker)."""
    children = child_pids(api.api_process.pid)
    return [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_gradstream_api_with_two_workers_serves_and_streams(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory, redis_client: "redis.Redis"
) -> None:
    api = Stack(tmp_path_factory.mktemp("two-workers"), env=TEST_ENV, tenants=("wes",))
    api.redis_url = stack.redis_url
    try:
        api.start_api(workers=2)
        assert len(_serving_processes(api)) == 2
        with Client(api.api_url, api.api_key, timeout=10) as wes:
            spec = {**SEED_EXAMPLE, "steps": 3000, "device": "cpu"}
            job_id, blocker = queued_behind_a_running_job(wes, spec)
            xreads_before = _xread_calls(redis_client)

            streams = asyncio.run(
                _watch_from_the_start(api, job_id, 20, lambda: wes.cancel(blocker))
            )
            stored = list(wes.steps(job_id))
            for events in streams:
                check_steps(events, stored)
            xreads = _xread_calls(redis_client) - xreads_before
            flushes = redis_client.xlen(f"gs:{{{job_id}}}:steps")
            # One reader of the job per API process, not one per watcher: at most one blocking
            # read per flush (or keep-alive) in each.
            assert xreads <= 2 * (flushes + 10), (xreads, flushes)
    finally:
        api.stop()


def _xread_calls(client: "redis.Redis") -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_xread", {}).get("calls", 0))
