"""Annotated dependencies shared by the routes: settings, store, streams, the caller's tenant."""

import re
from typing import Annotated, Any

from fastapi import Depends, Header, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from services.auth import DEV_TENANT, KeyRing, StreamTokens
from services.config import Settings
from services.errors import JobNotFound, SweepNotFound, Unauthorized
from services.events import JobStreams
from services.store import Store

_JOB_ID = re.compile(r"[0-9a-f]{32}")
# The largest step a cursor (`after`, Last-Event-ID) may name: Redis stream ids, which hold
# the steps, are 64-bit.
MAX_STEP = 2**63 - 1
_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer <key>`")


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def get_job_streams(request: Request) -> JobStreams:
    streams: JobStreams = request.app.state.job_streams
    return streams


def get_stream_tokens(request: Request) -> StreamTokens:
    tokens: StreamTokens = request.app.state.stream_tokens
    return tokens


def job_id_path(job_id: Annotated[str, Path(description="the job's id")]) -> str:
    # A malformed id names no job: 404 like any other unknown id, never a 422.
    if not _JOB_ID.fullmatch(job_id):
        raise JobNotFound(job_id)
    return job_id


def sweep_id_path(sweep_id: Annotated[str, Path(description="the sweep's id")]) -> str:
    if not _JOB_ID.fullmatch(sweep_id):
        raise SweepNotFound(sweep_id)
    return sweep_id


def current_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The tenant whose API key the request carries (401 without a valid one)."""
    keyring: KeyRing | None = request.app.state.keyring
    if keyring is None:  # auth disabled for development
        return DEV_TENANT
    if credentials is None:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
    return keyring.tenant_for(credentials.credentials)


def stream_tenant(
    request: Request,
    job_id: Annotated[str, Path(description="the job's id")],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    token: Annotated[
        str | None,
        Query(description="a stream token from POST /v1/jobs/{id}/stream-token (for EventSource)"),
    ] = None,
) -> str:
    """The tenant of an events request: from a stream token for this job, or an API key."""
    if token is not None:
        return get_stream_tokens(request).tenant_for(token, job_id)
    return current_tenant(request, credentials)


class Problem(BaseModel):
    """An error: what went wrong, and for a 429 or 413 the setting whose limit was reached."""

    detail: str
    limit: str | None = None


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error responses a route can give (422 is FastAPI's own)."""
    return {code: {"model": Problem} for code in codes}


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
JobStreamsDep = Annotated[JobStreams, Depends(get_job_streams)]
StreamTokensDep = Annotated[StreamTokens, Depends(get_stream_tokens)]
JobIdDep = Annotated[str, Depends(job_id_path)]
SweepIdDep = Annotated[str, Depends(sweep_id_path)]
TenantDep = Annotated[str, Depends(current_tenant)]
StreamTenantDep = Annotated[str, Depends(stream_tenant)]
# POST /v1/jobs and POST /v1/sweeps: a retried submit with the same key (per tenant) returns
# what the first one made.
IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=200,
        pattern=r"^[\x21-\x7e]+$",
        description="a retried submit with the same key returns what the first one made "
        "(for a day)",
    ),
]
