"""Fan-out is bounded: a watcher's writes are at most WRITE_BYTES (what a client has not taken
of a write is that watcher's own copy), a watcher past its byte budget
(GRADSTREAM_SSE_WATCHER_BYTES: what is queued for it and its write in flight) is dropped and
resumes by Last-Event-ID, and new watchers of one job share its backlog reads: each page is
read from Redis and rendered once per API process, not once per watcher."""

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import torch

from api.client import Client, Event, parse_sse
from cli.stack import Stack, wait_until
from services.config import get_settings
from services.events import WRITE_BYTES
from services.runner import run_job
from services.schemas import JobSpec
from services.store import Store
from tests.conftest import SEED_EXAMPLE, TEST_ENV
from tests.faults import running_blocker

# About 4 KB of JSON per step, 16 MB in all: far more than the socket buffers between the API
# and a client that does not read, and than the tight API's budget per watcher.
WIDE = {
    "data": {"synthetic": {"n": 200, "d": 100, "seed": 7}},
    "optimizer": {"name": "sgd", "lr": 0.001},
    "steps": 4000,
    "device": "cpu",
}
TIGHT_BYTES = 1024 * 1024


class RawWatcher:
    """An SSE request on a plain socket that reads only when the test says so, and sees each
    of the server's writes (one HTTP chunk per write)."""

    def __init__(self, api: Stack, job_id: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", int(api.api_url.rsplit(":", 1)[1])))
        self.sock.settimeout(60)
        self.sock.sendall(
            f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: test\r\n"
            f"Authorization: Bearer {api.api_key}\r\n\r\n".encode()
        )
        wait_until(
            lambda: b"event: status" in self.sock.recv(4096, socket.MSG_PEEK), 30, "first event"
        )

    def writes(self) -> list[bytes]:
        with self.sock, self.sock.makefile("rb") as body:
            while body.readline() not in (b"\r\n", b""):
                pass
            writes = []
            while (line := body.readline()) and (size := int(line, 16)):
                writes.append(body.read(size))
                body.readline()
            return writes


def events_of(writes: list[bytes]) -> list[Event]:
    return list(parse_sse(iter(b"".join(writes).decode().splitlines())))


@pytest.fixture(scope="module")
def tight(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API on the session's Redis (and worker) with a 1 MiB budget per watcher, that waits
    as long as it takes for a client that does not read (no send timeout to hide the budget)."""
    api = Stack(tmp_path_factory.mktemp("tight"), env=TEST_ENV, tenants=("tia",))
    api.redis_url = stack.redis_url
    try:
        api.start_api(
            GRADSTREAM_SSE_SEND_TIMEOUT_S="3600", GRADSTREAM_SSE_WATCHER_BYTES=str(TIGHT_BYTES)
        )
        yield api
    finally:
        api.stop()


def test_a_lagging_watcher_gets_writes_of_at_most_write_bytes(stack: Stack, client: Client) -> None:
    # The session's API: its default budget (32 MiB) holds this whole job for a watcher that
    # reads only after the job ended; what it queued goes out in bounded writes, every step once.
    blocker = running_blocker(client)
    job_id = client.submit({**WIDE, "steps": 1500})["id"]
    lagging = RawWatcher(stack, job_id)
    client.cancel(blocker)
    assert client.wait(job_id, timeout=120)["status"] == "succeeded"
    writes = lagging.writes()
    events = events_of(writes)
    assert [e.data["step"] for e in events if e.event == "step"] == list(range(1500))
    assert events[-1].event == "done"
    assert max(len(w) for w in writes[:-1]) <= WRITE_BYTES, sorted(len(w) for w in writes)[-3:]


def test_a_watcher_past_its_byte_budget_is_dropped_and_resumes(tight: Stack) -> None:
    with Client(tight.api_url, tight.api_key, timeout=10) as tia:
        blocker = running_blocker(tia)
        job_id = tia.submit(WIDE)["id"]
        stalled = RawWatcher(tight, job_id)
        tia.cancel(blocker)
        # It reads nothing, and the API lets it go: no watcher left, while the job's 16 MB
        # are far more than the socket buffers and its budget hold.
        wait_until(lambda: _sse_clients(tight) == 0, 120, "the stalled watcher dropped")
        assert tia.wait(job_id, timeout=180)["status"] == "succeeded"
        events = events_of(stalled.writes())
        # Dropped (no `done`) once over its budget, with the steps it had, in order.
        assert events[-1].event != "done"
        got = [e.data["step"] for e in events if e.event == "step"]
        assert got == list(range(len(got))) and len(got) < WIDE["steps"]
        # It resumes where it stopped and gets the rest (the job has ended: a backlog read).
        rest = [e for e in tia.stream(job_id, last_event_id=got[-1]) if e.event == "step"]
        assert [e.data["step"] for e in rest] == list(range(len(got), WIDE["steps"]))


def _sse_clients(api: Stack) -> float:
    text = httpx.get(f"{api.api_url}/metrics", timeout=10).text
    line = next(line for line in text.splitlines() if line.startswith("gradstream_sse_clients "))
    return float(line.split()[1])


def _xrange_calls(client: "redis.Redis") -> int:
    return int(client.info("commandstats").get("cmdstat_xrange", {}).get("calls", 0))


def test_new_watchers_of_one_job_share_its_backlog_reads(tmp_path: Path) -> None:
    # A private Redis (its XRANGEs are this test's) and an API whose pages are small, so that
    # the job's backlog is many pages.
    private = Stack(tmp_path, env=TEST_ENV, tenants=("pia",))
    try:
        private.start_redis()
        private.start_api(GRADSTREAM_MAX_PAGE_BYTES="4096")
        store = Store.from_url(private.redis_url)
        spec = JobSpec.model_validate({**SEED_EXAMPLE, "steps": 3000, "device": "cpu"})
        job_id, _ = store.create_job(spec, "cpu", "cpu", "test", tenant="pia")
        run_job(store, job_id, "test-worker", torch.device("cpu"), get_settings())
        counter = redis.Redis.from_url(private.redis_url)

        async def watch(watchers: int) -> list[list[int]]:
            async def one(http: httpx.AsyncClient) -> list[int]:
                async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                    lines = [line async for line in response.aiter_lines()]
                events = list(parse_sse(iter(lines)))
                assert events[-1].event == "done"
                return [e.data["step"] for e in events if e.event == "step"]

            async with httpx.AsyncClient(
                base_url=private.api_url,
                headers=private.auth(),
                timeout=60,
                limits=httpx.Limits(max_connections=watchers),
            ) as http:
                return await asyncio.gather(*(one(http) for _ in range(watchers)))

        before = _xrange_calls(counter)
        assert asyncio.run(watch(1)) == [list(range(3000))]
        pages = _xrange_calls(counter) - before
        assert pages > 5  # the backlog is many pages

        before = _xrange_calls(counter)
        for steps in asyncio.run(watch(50)):
            assert steps == list(range(3000))
        reads = _xrange_calls(counter) - before
        assert reads <= 2 * pages, (reads, pages)  # about one read per page, not one per watcher
        counter.close()
        store.redis.close()
    finally:
        private.stop()
