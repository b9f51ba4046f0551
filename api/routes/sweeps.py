"""Sweep routes (contract v2, DESIGN §9): submit, list, read, events, cancel, delete."""

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from api.deps import (
    MAX_STEP,
    IdempotencyKey,
    SettingsDep,
    StoreDep,
    SweepIdDep,
    TenantDep,
    problems,
)
from api.routes.streams import EventStreamResponse, StreamSlots, _never_null
from services import sweeps
from services.schemas import (
    MAX_SWEEP_MEMBERS_PAGE,
    SWEEP_MEMBERS_PAGE,
    SweepList,
    SweepSpec,
    SweepView,
)
from services.sweep_events import SweepStreams

router = APIRouter(
    prefix="/v1/sweeps", tags=["sweeps"], responses=problems(401, 404, 409, 413, 429, 503, 507)
)

SequenceCursor = Annotated[int | None, Query(ge=-1, le=MAX_STEP, json_schema_extra=_never_null)]


@router.post("", status_code=201, responses=problems(400))
def submit_sweep(
    tenant: TenantDep,
    spec: SweepSpec,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> SweepView:
    """Submit a sweep: its members are jobs, trained in groups with one batched step each."""
    view = sweeps.submit_sweep(store, spec, settings, tenant, idempotency=idempotency_key)
    response.headers["Location"] = f"/v1/sweeps/{view.id}"
    return view


@router.get("")
def list_sweeps(
    tenant: TenantDep,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> SweepList:
    """List the caller's sweeps, newest first, as summaries (no members, no inline data); pass
    `next` back as `cursor` for the next page."""
    views, next_cursor = store.list_sweeps(tenant, limit, cursor)
    return SweepList(sweeps=views, next=next_cursor)


@router.get("/{sweep_id}")
def get_sweep(
    tenant: TenantDep,
    sweep_id: SweepIdDep,
    store: StoreDep,
    members_limit: Annotated[int, Query(ge=1, le=MAX_SWEEP_MEMBERS_PAGE)] = SWEEP_MEMBERS_PAGE,
    members_cursor: Annotated[
        str | None, Query(pattern=r"^\d{1,9}$", description="`members_next` of the last page")
    ] = None,
) -> SweepView:
    """The sweep: counts per status, its groups and best member (of all members), and a page
    of members with their values, steps and losses; pass `members_next` back as
    `members_cursor` for the next page."""
    return store.get_sweep(sweep_id, tenant, members_limit, members_cursor)


@router.post("/{sweep_id}/cancel", status_code=202)
def cancel_sweep(tenant: TenantDep, sweep_id: SweepIdDep, store: StoreDep) -> SweepView:
    """Cancel every unfinished member (queued ones at once, running ones at their next flush)."""
    store.cancel_sweep(sweep_id, tenant)
    return store.get_sweep(sweep_id, tenant)


@router.delete("/{sweep_id}", status_code=204)
def delete_sweep(tenant: TenantDep, sweep_id: SweepIdDep, store: StoreDep) -> Response:
    """Delete an ended sweep and all its members (409 while it runs: cancel it first)."""
    store.delete_sweep(sweep_id, tenant)
    return Response(status_code=204)


@router.get(
    "/{sweep_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def sweep_events(
    tenant: TenantDep,
    sweep_id: SweepIdDep,
    store: StoreDep,
    settings: SettingsDep,
    request: Request,
    last_event_id: Annotated[
        int | None, Header(ge=-1, le=MAX_STEP, json_schema_extra=_never_null)
    ] = None,
    after: SequenceCursor = None,
) -> StreamingResponse:
    """Stream the sweep: `status`, then a `progress` event per flush of any of its groups
    (resumable by Last-Event-ID or `after`; `reset` and every member's state when the cursor
    is older than what is kept), then `done` with the sweep's summary."""
    cursor = last_event_id if last_event_id is not None else after
    streams: SweepStreams = request.app.state.sweep_streams
    frames = await streams.open(sweep_id, tenant, -1 if cursor is None else cursor)
    slots: StreamSlots = request.app.state.stream_slots
    slots.take(tenant)

    return EventStreamResponse(
        frames,
        settings.sse_send_timeout_s,
        on_close=lambda: slots.give_back(tenant),
        job_id=sweep_id,
    )
