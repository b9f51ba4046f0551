"""Many watchers, one reader: an API process tails each job from Redis once and fans the steps
out in memory, so Redis reads per flush do not grow with the number of SSE clients."""

import asyncio

import httpx
import redis

from api.client import Client, parse_sse
from cli.stack import Stack

WATCHERS = 40


def _spec(steps: int) -> dict[str, object]:
    return {
        "data": {"synthetic": {"n": 200, "d": 8, "seed": 5}},
        "bias": True,
        "optimizer": {"name": "sgd", "lr": 0.01},
        "steps": steps,
        "device": "cpu",
    }


async def _watch(stack: Stack, job_id: str, last_event_id: int | None = None) -> list[dict]:  # type: ignore[type-arg]
    headers = stack.auth()
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    steps = []
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream("GET", f"{stack.api_url}/v1/jobs/{job_id}/events", headers=headers) as response,
    ):
        lines = [line async for line in response.aiter_lines()]
    for event in parse_sse(iter(lines)):
        if event.event == "step":
            steps.append(event.data)
        elif event.event == "done":
            assert event.data["status"] == "succeeded"
            return steps
    raise AssertionError("stream ended without done")


def _xread_calls(client: "redis.Redis") -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_xread", {}).get("calls", 0))


def test_watchers_of_one_job_share_one_redis_reader(
    stack: Stack, client: Client, redis_client: "redis.Redis"
) -> None:
    job = client.submit(_spec(2000))
    xreads_before = _xread_calls(redis_client)

    async def everyone() -> list[list[dict]]:  # type: ignore[type-arg]
        watchers = [_watch(stack, job["id"]) for _ in range(WATCHERS)]
        late = _watch(stack, job["id"], last_event_id=99)
        return await asyncio.gather(*watchers, late)

    *streams, late = asyncio.run(everyone())
    stored = list(client.steps(job["id"]))
    assert [s["step"] for s in stored] == list(range(2000))
    for steps in streams:
        assert steps == stored
    assert late == stored[100:]

    flushes = redis_client.xlen(f"gs:{{{job['id']}}}:steps")
    xreads = _xread_calls(redis_client) - xreads_before
    # One blocking read per flush (or keep-alive) for the job, not one per watcher.
    assert xreads <= flushes + 10, (xreads, flushes)


def test_a_burst_of_watchers_reading_history_gets_all_of_it(stack: Stack, client: Client) -> None:
    # More watchers at once than redis-py's default pool has connections (100), each reading
    # the stored steps before following: they wait for a connection, none gets an error.
    job = client.submit(_spec(300))
    client.wait(job["id"])
    stored = list(client.steps(job["id"]))

    async def burst() -> list[list[dict]]:  # type: ignore[type-arg]
        return await asyncio.gather(
            *[_watch(stack, job["id"], last_event_id=i) for i in range(150)]
        )

    for after, steps in enumerate(asyncio.run(burst())):
        assert steps == stored[after + 1 :]
