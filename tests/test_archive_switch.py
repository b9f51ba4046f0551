"""No gap at the archive switch: a watcher that joined while its job ran, and fell behind,
gets every step exactly once, in order, then `done`, even when the job finished and was
archived (its Redis stream deleted) before the watcher read its backlog: every stream checks
that the next step it sends is its cursor + 1 and takes what the stream no longer holds from
the archive.

The watcher is a JobStreams stream in this process that the test stops reading after its
first event (the `status` of a running job) and resumes once the job is archived: the hold is
the consumer's, not a sleep. Archiving runs in-process right after the job ends (a hot window
of 0), as tests/test_archive.py does."""

import asyncio
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from api.client import Client, parse_sse
from api.routes.streams import sse_frame
from cli.stack import Stack, wait_until
from services.archive import Archive
from services.archiver import archive_job
from services.events import JobStreams
from services.store import Store
from tests.faults import endless_spec


@pytest.fixture
def archive(stack: Stack) -> Archive:
    return Archive(str(stack.archive_dir))


@pytest.fixture
def archiving_store(stack: Stack, archive: Archive) -> Iterator[Store]:
    store = Store.from_url(stack.redis_url, archive)
    yield store
    store.redis.close()


def _every_step_then_done(body: bytes, view: dict[str, Any]) -> list[Any]:
    """The stream's events, checked: every stored step of the job once, in order, then
    `done`."""
    events = list(parse_sse(iter(body.decode().splitlines())))
    steps = [event.data["step"] for event in events if event.event == "step"]
    assert steps == list(range(view["steps_done"]))
    assert events[-1].event == "done"
    return events


async def _rest(frames: AsyncGenerator[bytes, None]) -> bytes:
    return b"".join([frame async for frame in frames])


def test_a_watcher_held_behind_across_the_archive_switch_gets_every_step_then_done(
    stack: Stack, client: Client, archive: Archive, archiving_store: Store
) -> None:
    job_id = client.submit(endless_spec(seed=22))["id"]
    try:
        wait_until(lambda: client.get(job_id)["steps_done"] >= 50, 60, "steps stored")

        async def watch() -> bytes:
            connection = aioredis.Redis.from_url(stack.redis_url)
            streams = JobStreams(connection, 1.0, render=sse_frame, archive=archive)
            try:
                frames = await streams.open(job_id, -1, "alice")
                first = await anext(frames)  # joined while it runs: its backlog is not read yet
                assert b'"status":"running"' in first
                await asyncio.to_thread(client.cancel, job_id)
                # The tail reads the job to its end meanwhile, and stops.
                for _ in range(600):
                    if streams.readers == 0:
                        break
                    await asyncio.sleep(0.05)
                assert streams.readers == 0
                view = await asyncio.to_thread(client.get, job_id)
                assert view["status"] == "cancelled"
                outcome = await asyncio.to_thread(archive_job, archiving_store, archive, job_id)
                assert outcome == "ok"
                assert not await connection.exists(f"gs:{{{job_id}}}:steps")
                return first + await _rest(frames)  # resumed: the backlog is archived now
            finally:
                await connection.aclose()

        body = asyncio.run(watch())
    finally:
        client.cancel(job_id) if client.get(job_id)["status"] == "running" else None

    events = _every_step_then_done(body, client.get(job_id))
    assert events[-1].data["steps_done"] == client.get(job_id)["steps_done"]


class HeldReads(aioredis.Redis):  # type: ignore[misc]
    """A real client whose blocking reads (the tail's XREAD) wait while `gate` is clear: the
    test holds the tail behind, where no sleep could be sure to."""

    gate: asyncio.Event

    async def xread(self, *args: Any, **kwargs: Any) -> Any:
        await self.gate.wait()
        return await super().xread(*args, **kwargs)


def test_a_tail_held_behind_while_its_job_is_archived_still_ends_with_every_step(
    stack: Stack, client: Client, archive: Archive, archiving_store: Store
) -> None:
    # ARCHIVE deletes the streams the tail blocks on: before, the tail read nothing more and
    # its watchers got keep-alives forever.
    job_id = client.submit(endless_spec(seed=23))["id"]
    try:
        wait_until(lambda: client.get(job_id)["steps_done"] >= 50, 60, "steps stored")

        async def watch() -> bytes:
            connection = HeldReads.from_url(stack.redis_url)
            connection.gate = asyncio.Event()
            connection.gate.set()
            streams = JobStreams(connection, 0.5, render=sse_frame, archive=archive)
            try:
                frames = await streams.open(job_id, -1, "alice")
                body = [await anext(frames)]
                reader = asyncio.create_task(_rest(frames))
                connection.gate.clear()  # the tail's next read waits
                await asyncio.to_thread(client.cancel, job_id)
                await asyncio.to_thread(
                    wait_until,
                    lambda: client.get(job_id)["status"] == "cancelled",
                    60,
                    "cancelled",
                )
                outcome = await asyncio.to_thread(archive_job, archiving_store, archive, job_id)
                assert outcome == "ok"
                connection.gate.set()  # the tail reads on, from where it was
                return body[0] + await asyncio.wait_for(reader, 30)
            finally:
                await connection.aclose()

        body = asyncio.run(watch())
    finally:
        client.cancel(job_id) if client.get(job_id)["status"] == "running" else None

    events = _every_step_then_done(body, client.get(job_id))
    assert events[-1].data["status"] == "cancelled"
