"""Job routes: submit, list, read, steps, cancel."""

from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from fastapi.responses import JSONResponse

from api.deps import (
    MAX_STEP,
    IdempotencyKey,
    JobIdDep,
    SettingsDep,
    StoreDep,
    TenantDep,
    problems,
)
from services import jobs
from services.schemas import (
    JobList,
    JobSpec,
    JobStatus,
    JobView,
    Prediction,
    PredictRequest,
    StepsPage,
)

router = APIRouter(
    prefix="/v1/jobs", tags=["jobs"], responses=problems(401, 404, 409, 413, 429, 503, 507)
)


# A body that is not JSON at all is FastAPI's 400, before any validation.
_NOT_JSON = problems(400)


@router.post("", status_code=201, responses=_NOT_JSON)
def submit_job(
    tenant: TenantDep,
    spec: JobSpec,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobView:
    """Submit a training job; it is queued on the worker queue its device routes to."""
    view = jobs.submit_job(store, spec, settings, tenant, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{view.id}"
    return view


@router.get("")
def list_jobs(
    tenant: TenantDep,
    store: StoreDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
    sweep: Annotated[
        str | None, Query(pattern="^[0-9a-f]{32}$", description="a sweep's members, in order")
    ] = None,
) -> JobList:
    """List the caller's jobs, newest first (a sweep's members in member order), without
    inline data; pass `next` back as `cursor` for the next page."""
    if sweep is not None:
        views, next_cursor = store.list_members(sweep, tenant, status, limit, cursor)
    else:
        views, next_cursor = store.list_jobs(tenant, status, limit, cursor)
    return JobList(jobs=views, next=next_cursor)


@router.get("/{job_id}")
def get_job(tenant: TenantDep, job_id: JobIdDep, store: StoreDep) -> JobView:
    """Read one job."""
    return store.get_job(job_id, tenant)


@router.get("/{job_id}/steps", response_model=StepsPage)
def get_steps(
    tenant: TenantDep,
    job_id: JobIdDep,
    store: StoreDep,
    settings: SettingsDep,
    after: Annotated[
        int, Query(ge=-1, le=MAX_STEP, description="return steps after this one")
    ] = -1,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> JSONResponse:
    """Stored steps with `step > after`, in order, at most `limit` and about max_page_bytes of
    JSON; `next` is the `after` of the next page."""
    records, next_after = store.read_steps(job_id, after, limit, tenant, settings.max_page_bytes)
    # Records are plain dicts already checked by construction; skipping a pydantic round trip
    # per step keeps a 5 000-step page cheap.
    return JSONResponse({"steps": records, "next": next_after})


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_job(tenant: TenantDep, job_id: JobIdDep, store: StoreDep) -> Response:
    """Delete an ended job: its record, steps and checkpoint (409 while queued or running)."""
    store.delete_job(job_id, tenant)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{job_id}/cancel", status_code=202)
def cancel_job(tenant: TenantDep, job_id: JobIdDep, store: StoreDep) -> JobView:
    """Cancel a job: a queued one at once, a running one at its next step boundary."""
    return jobs.cancel_job(store, job_id, tenant)


@router.post("/{job_id}/predict", responses=_NOT_JSON)
def predict(
    tenant: TenantDep, job_id: JobIdDep, request: PredictRequest, store: StoreDep
) -> Prediction:
    """ŷ for new rows of x, from the final parameters of a succeeded job."""
    return Prediction(y_hat=jobs.predict(store, job_id, tenant, request.x))
