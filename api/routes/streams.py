"""Server-Sent Events: a job's steps and status, live, resumable by Last-Event-ID."""

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse

from api.deps import JobIdDep, JobStreamsDep
from services.events import StreamEvent

router = APIRouter(prefix="/v1/jobs", tags=["streams"])


def sse_frame(event: StreamEvent | None) -> bytes:
    """One SSE frame; `None` is a keep-alive comment. Only step frames carry an id."""
    if event is None:
        return b": keep-alive\n\n"
    lines = [f"event: {event.event}"]
    if event.id is not None:
        lines.append(f"id: {event.id}")
    lines.append("data: " + json.dumps(event.data, separators=(",", ":"), allow_nan=False))
    return ("\n".join(lines) + "\n\n").encode()


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    job_id: JobIdDep,
    streams: JobStreamsDep,
    last_event_id: Annotated[int | None, Header(ge=-1)] = None,
) -> StreamingResponse:
    """Stream the job's steps after Last-Event-ID (or from step 0), live ones, then `done`."""
    after = -1 if last_event_id is None else last_event_id
    events = await streams.open(job_id, after)

    async def frames() -> AsyncIterator[bytes]:
        yield b"retry: 1000\n\n"
        async for frame in events:
            yield frame

    return StreamingResponse(
        frames(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
