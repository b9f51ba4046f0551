"""An event stream's client retries what may pass and stops on what will not: it counts the
connections in a row that gave no new step (each begins with a `status` event, which does not
count), backs off with jitter between them, and a job whose archived file is missing is a 410
(`/steps`) or a `gone` event (a stream), which no client retries. The API reports its Redis
connections for streams (in use, and the most: GRADSTREAM_SSE_REDIS_CONNECTIONS)."""

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.client import (
    AsyncClient,
    Client,
    ServiceUnavailable,
    StreamError,
    _pause,
)
from cli.stack import Stack, wait_until
from services.archive import Archive, ArchivedFile
from services.archiver import archive_job
from services.store import Store
from services.store.keys import job_key
from tests.conftest import SEED_EXAMPLE, TEST_ENV
from tests.faults import running_blocker

STATUS_ONLY = b'event: status\ndata: {"status":"running","steps_done":3}\n\n'


def _within(seconds: float, call: Callable[[], Any]) -> Any:
    """`call()`'s result, or AssertionError if it has not returned within `seconds` (a client
    that retries forever would never return)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still retrying after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _serving(answer: Callable[[httpx.Request], httpx.Response]) -> tuple[Client, list[int]]:
    """A client whose HTTP goes to `answer` (a fake at the transport boundary), and the list
    that counts its connections."""
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return answer(request)

    client = Client("http://api.test", "key")
    client.http = httpx.Client(base_url="http://api.test", transport=httpx.MockTransport(handler))
    return client, calls


def test_a_stream_that_never_gives_a_new_step_stops_retrying() -> None:
    # Each connection gives its `status` and ends: before, that reset the count, forever.
    client, calls = _serving(
        lambda _: httpx.Response(
            200, content=STATUS_ONLY, headers={"content-type": "text/event-stream"}
        )
    )
    events = _within(30, lambda: list(client.stream("j", retries=3)))
    assert [e.event for e in events] == ["status"] * 4 and len(calls) == 4


def test_a_stream_that_keeps_getting_503_raises_after_its_retries() -> None:
    client, calls = _serving(lambda _: httpx.Response(503, json={"detail": "Redis unavailable"}))
    with pytest.raises(ServiceUnavailable):
        _within(30, lambda: list(client.stream("j", retries=2)))
    assert len(calls) == 3


def test_reconnects_back_off_exponentially_with_jitter() -> None:
    first, third = [_pause(1) for _ in range(50)], [_pause(3) for _ in range(50)]
    assert all(0.2 <= d <= 0.6 for d in first) and all(0.8 <= d <= 2.4 for d in third)
    assert len(set(third)) > 1  # not every client at the same moment
    assert sum(third) / len(third) > 2 * sum(first) / len(first)


@pytest.fixture
def archive(stack: Stack) -> Archive:
    return Archive(str(stack.archive_dir))


@pytest.fixture
def archiving_store(stack: Stack, archive: Archive) -> Iterator[Store]:
    store = Store.from_url(stack.redis_url, archive)
    yield store
    store.redis.close()


def test_a_job_whose_archived_file_is_missing_is_gone_and_not_retried(
    stack: Stack, client: Client, archive: Archive, archiving_store: Store
) -> None:
    job_id = client.submit({**SEED_EXAMPLE, "steps": 40, "device": "cpu"})["id"]
    assert client.wait(job_id, timeout=60)["status"] == "succeeded"
    assert archive_job(archiving_store, archive, job_id) == "ok"
    archived = ArchivedFile.from_json(
        archiving_store.redis.hget(job_key(job_id), "archived") or b""
    )
    Path(archived.url.removeprefix("file://")).unlink()

    # Permanent: a 410 that says so, with no Retry-After (a 503 would be retried).
    with httpx.Client(base_url=stack.api_url, headers=stack.auth(), timeout=30) as http:
        page = http.get(f"/v1/jobs/{job_id}/steps")
    assert page.status_code == 410 and "Retry-After" not in page.headers
    assert "archived steps are missing" in page.json()["detail"]

    with pytest.raises(StreamError) as raised:
        _within(30, lambda: list(client.stream(job_id)))
    assert raised.value.status_code == 410

    async def watch() -> None:
        async with AsyncClient(stack.api_url, stack.api_key) as api:
            async for _ in api.stream(job_id):
                pass

    with pytest.raises(StreamError):
        asyncio.run(asyncio.wait_for(watch(), 30))


def _connections(api: Stack) -> dict[str, float]:
    text = httpx.get(f"{api.api_url}/metrics", timeout=10).text
    prefix = 'gradstream_sse_redis_connections{state="'
    return {
        line[len(prefix) :].split('"')[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


def test_the_api_reports_its_stream_connections(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    api = Stack(tmp_path_factory.mktemp("pool"), env=TEST_ENV, tenants=("poo",))
    api.redis_url = stack.redis_url
    try:
        api.start_api(GRADSTREAM_SSE_REDIS_CONNECTIONS="16")
        assert _connections(api)["max"] == 16
        with Client(api.api_url, api.api_key, timeout=10) as poo:
            blocker = running_blocker(poo)
            queued = [
                poo.submit({**SEED_EXAMPLE, "steps": 5, "device": "cpu"})["id"] for _ in range(3)
            ]

            async def watch_all() -> None:
                async with AsyncClient(api.api_url, api.api_key) as watcher:
                    streams = [watcher.stream(job_id) for job_id in queued]
                    for stream in streams:  # each has begun: its tail blocks on Redis
                        assert (await anext(stream)).event == "status"
                    # Each watched queued job's tail holds a connection in its blocking read.
                    await asyncio.to_thread(
                        wait_until, lambda: _connections(api)["in_use"] >= 3, 30, "3 in use"
                    )
                    for stream in streams:
                        await stream.aclose()  # type: ignore[attr-defined]

            asyncio.run(watch_all())
            for job_id in [blocker, *queued]:
                poo.cancel(job_id)
    finally:
        api.stop()
