"""Server-Sent Events: a job's steps and status, live, resumable by Last-Event-ID."""

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from api.deps import (
    MAX_STEP,
    JobIdDep,
    JobStreamsDep,
    SettingsDep,
    StoreDep,
    StreamTenantDep,
    StreamTokensDep,
    TenantDep,
    problems,
)
from services.errors import LimitExceeded
from services.events import StreamEvent
from services.schemas import UtcTime

# Step cursors are 64-bit integers, as where steps are kept (Redis stream ids).
StepCursor = Annotated[int | None, Field(ge=-1, le=MAX_STEP)]


def _never_null(schema: dict[str, Any]) -> None:
    """An optional cursor's schema without null: left out when there is none (a header or a
    query parameter has no null, and "null" names no step)."""
    schema.update(next(s for s in schema.pop("anyOf") if s.get("type") != "null"))


router = APIRouter(prefix="/v1/jobs", tags=["streams"], responses=problems(401, 404, 413, 429, 503))
log = logging.getLogger(__name__)


def sse_frame(event: StreamEvent | None) -> bytes:
    """One SSE frame; `None` is a keep-alive comment. Only step frames carry an id."""
    if event is None:
        return b": keep-alive\n\n"
    lines = [f"event: {event.event}"]
    if event.id is not None:
        lines.append(f"id: {event.id}")
    lines.append("data: " + json.dumps(event.data, separators=(",", ":"), allow_nan=False))
    return ("\n".join(lines) + "\n\n").encode()


class SlowReader(OSError):
    """The client took nothing for the send timeout (it resumes by Last-Event-ID)."""


class EventStreamResponse(StreamingResponse):
    """An SSE response: `retry: 1000`, then the frames, each bytes object one write.

    It drops a client which stops reading: a send that waits longer than `send_timeout_s` for
    the client to take data ends the response, instead of holding the connection and the
    events queued for it. However the response ends (done, client gone, dropped, or never
    started), the frames are closed and `on_close` runs.

    With a thousand clients the writes are the API's main work, so a write costs no more than
    it must: the frames are sent as they come (no wrapping generator), and the send timeout is
    one timer per client that checks the send in progress, not a timer set and cancelled per
    write."""

    def __init__(
        self,
        frames: AsyncGenerator[bytes, None],
        send_timeout_s: float,
        on_close: Callable[[], None],
        job_id: str = "",
    ) -> None:
        super().__init__(
            frames,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.frames, self.send_timeout_s, self.on_close = frames, send_timeout_s, on_close
        self.job_id = job_id
        self.ended = False  # the frames ran out: the stream reached its end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        slow = False
        try:
            await super().__call__(scope, receive, send)
        except SlowReader:
            slow = True  # returning unfinished makes the server close the connection
        except ClientDisconnect:
            pass
        finally:
            await self.frames.aclose()
            self.on_close()
        if not self.ended and not slow:
            # One line however much of the stream was left (it resumes by Last-Event-ID).
            log.warning("SSE client of job %s went away mid-stream", self.job_id)

    async def stream_response(self, send: Send) -> None:
        watchdog = _SendWatchdog(self.send_timeout_s)
        try:
            start = {"type": "http.response.start", "status": self.status_code}
            await watchdog.send(send, {**start, "headers": self.raw_headers})
            await watchdog.send(send, _body(b"retry: 1000\n\n"))
            async for frame in self.frames:
                await watchdog.send(send, _body(frame))
            self.ended = True
            await watchdog.send(send, _body(b"", more=False))
        finally:
            watchdog.stop()


def _body(data: bytes, more: bool = True) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


class _SendWatchdog:
    """Ends a response whose send has waited `timeout_s` for the client (SlowReader): one
    timer per response, due when the send in progress (if any) would time out."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.sending_since: float | None = None
        self.fired = False
        self.timer = self.loop.call_later(timeout_s, self._check)

    def _check(self) -> None:
        now = self.loop.time()
        if self.sending_since is not None and now - self.sending_since >= self.timeout_s:
            self.fired = True
            self.task.cancel()  # type: ignore[union-attr]
            return
        since = now if self.sending_since is None else self.sending_since
        self.timer = self.loop.call_at(since + self.timeout_s, self._check)

    async def send(self, send: Send, message: Message) -> None:
        self.sending_since = self.loop.time()
        try:
            await send(message)
        except asyncio.CancelledError:
            if self.fired and self.task.uncancel() == 0:  # type: ignore[union-attr]
                log.warning("SSE client took nothing for %.0f s: dropped", self.timeout_s)
                raise SlowReader("SSE client stopped reading") from None
            raise
        finally:
            self.sending_since = None

    def stop(self) -> None:
        self.timer.cancel()


class StreamSlots:
    """SSE connections per tenant in this API process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    def take(self, tenant: str) -> None:
        if self.open.get(tenant, 0) >= self.limit:
            raise LimitExceeded(
                "max_sse_per_tenant",
                f"tenant {tenant!r} has {self.limit} event streams open; "
                f"max_sse_per_tenant is {self.limit}",
            )
        self.open[tenant] = self.open.get(tenant, 0) + 1

    def give_back(self, tenant: str) -> None:
        self.open[tenant] -= 1


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def job_events(
    tenant: StreamTenantDep,
    job_id: JobIdDep,
    streams: JobStreamsDep,
    settings: SettingsDep,
    request: Request,
    last_event_id: Annotated[StepCursor, Header(json_schema_extra=_never_null)] = None,
    after: Annotated[
        StepCursor,
        Query(
            description="as Last-Event-ID, for a client that cannot set headers",
            json_schema_extra=_never_null,
        ),
    ] = None,
) -> StreamingResponse:
    """Stream the job's steps after Last-Event-ID or `after` (or from step 0), live ones, then
    `done`. Authenticated by an API key, or by `?token=` from POST /v1/jobs/{id}/stream-token."""
    cursor = last_event_id if last_event_id is not None else after
    after = -1 if cursor is None else cursor
    events = await streams.open(job_id, after, tenant)
    slots: StreamSlots = request.app.state.stream_slots
    slots.take(tenant)

    return EventStreamResponse(
        events,
        settings.sse_send_timeout_s,
        on_close=lambda: slots.give_back(tenant),
        job_id=job_id,
    )


class StreamToken(BaseModel):
    token: str
    expires_at: UtcTime


@router.post("/{job_id}/stream-token")
def stream_token(
    tenant: TenantDep, job_id: JobIdDep, store: StoreDep, tokens: StreamTokensDep
) -> StreamToken:
    """A short-lived token that streams this job's events as `?token=` (EventSource cannot send
    an Authorization header); accepted by the events route only."""
    store.job_fields(job_id, tenant)  # 404 unless it is the caller's job
    token, expires_at = tokens.issue(job_id, tenant)
    return StreamToken(token=token, expires_at=datetime.fromtimestamp(expires_at, UTC))
