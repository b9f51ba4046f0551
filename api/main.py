"""The API application: `uvicorn --factory api.main:create_app`."""

import asyncio
import logging
import math
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from api.limits import BodySizeLimit, UploadSlots
from api.metrics import registry as metrics_registry
from api.routes import dashboard, datasets, health, jobs, metrics, streams, sweeps, workers
from api.routes.streams import StreamSlots, sse_frame
from services.archive import Archive
from services.auth import KeyRing, StreamTokens, parse_api_keys
from services.config import Settings, get_settings
from services.datasets import DatasetInvalid
from services.errors import (
    ArchivedStepsLost,
    DatasetInUse,
    DatasetNotFound,
    JobActive,
    JobFinished,
    JobNotFinished,
    JobNotFound,
    LimitExceeded,
    MalformedJob,
    MemberOfSweep,
    SpecRejected,
    StorageFull,
    StoreUnavailable,
    SweepActive,
    SweepFinished,
    SweepNotFound,
    SweepRejected,
    Unauthorized,
)
from services.events import JobStreams
from services.redis_clients import async_redis_client, close_async_client, close_client
from services.store import Store
from services.sweep_events import SweepStreams

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API; settings come from the environment unless given.

    Refuses (ValueError) when no API keys are configured and auth is not explicitly disabled.
    """
    settings = settings or get_settings()
    pairs = parse_api_keys(settings.api_keys.get_secret_value())
    if not pairs and not settings.auth_disabled:
        raise ValueError(
            "no API keys configured: set GRADSTREAM_API_KEYS to tenant:key pairs separated "
            "by commas (or the path of a file of them), or GRADSTREAM_AUTH_DISABLED=1 for "
            "development only"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        # Archived jobs' steps are read (and deleted) through one archive per process, whose
        # cache the routes and the streams share.
        archive = Archive.from_settings(settings)
        app.state.store = Store.from_settings(settings, archive)
        app.state.store.load_scripts()  # a script Redis cannot compile stops the API here
        # Blocking XREADs wait up to the keep-alive interval: the socket must wait longer.
        # A burst of watchers waits for a connection instead of failing (redis-py's pool
        # refuses past 100 by default); each watched job's tail holds one.
        app.state.async_redis = async_redis_client(
            settings,
            max_connections=settings.sse_redis_connections,
            timeout=10,
            socket_timeout=settings.sse_keepalive_s + 10,
        )
        app.state.job_streams = JobStreams(
            app.state.async_redis,
            settings.sse_keepalive_s,
            render=sse_frame,
            page_bytes=settings.max_page_bytes,
            archive=archive,
            watcher_bytes=settings.watcher_bytes,
        )
        store = app.state.store

        async def final_view(sweep_id: str) -> dict[str, Any]:
            view = await asyncio.to_thread(store.sweep_summary, sweep_id)
            rendered: dict[str, Any] = view.model_dump(mode="json")
            return rendered

        app.state.sweep_streams = SweepStreams(
            app.state.async_redis, settings.sse_keepalive_s, render=sse_frame, final_view=final_view
        )
        app.state.stream_slots = StreamSlots(settings.max_sse_per_tenant)
        app.state.upload_slots = UploadSlots(settings.max_concurrent_uploads)
        app.state.metrics = metrics_registry(
            app.state.store, app.state.job_streams, settings.hot_retention_s
        )
        try:
            yield
        finally:
            await close_async_client(app.state.async_redis)
            close_client(app.state.store.redis)

    app = FastAPI(
        title="gradstream",
        version="1",
        summary="Linear-regression training jobs whose every step is stored and streamed.",
        lifespan=lifespan,
    )
    app.state.keyring = None if settings.auth_disabled else KeyRing.from_pairs(pairs)
    app.state.stream_tokens = StreamTokens.for_keys(
        pairs, settings.stream_token_ttl_s, settings.stream_token_secret.get_secret_value()
    )
    routers = [jobs.router, streams.router, sweeps.router, datasets.router, workers.router]
    for router in [*routers, health.router, metrics.router, dashboard.router]:
        app.include_router(router)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        paths={"/v1/datasets": ("max_dataset_bytes", settings.max_dataset_bytes)},
    )
    _add_error_handlers(app)
    return app


# A 422 reports this many errors at most, then one entry counting the rest.
MAX_ERRORS = 20
# An input echoed in a 422 holds at most this many values, and strings of at most this many
# characters; a bigger one is described instead (a body may be 8 MiB of one list).
ECHO_VALUES = 32
ECHO_CHARS = 256


def _too_big_to_echo(value: Any) -> bool:
    """Whether `value` holds more than ECHO_VALUES values or a string over ECHO_CHARS; stops
    as soon as it knows, whatever the size of `value`."""
    pending, seen = [value], 0
    while pending:
        item = pending.pop()
        seen += 1
        if seen > ECHO_VALUES or (isinstance(item, str) and len(item) > ECHO_CHARS):
            return True
        if isinstance(item, dict | list | tuple):
            if len(item) > ECHO_VALUES:
                return True
            pending.extend([*item.keys(), *item.values()] if isinstance(item, dict) else item)
    return False


def _echoed(value: Any) -> Any:
    """The input echoed in a 422: a description if it is big, and non-finite floats (which
    JSON cannot carry) as strings."""
    if _too_big_to_echo(value):
        size = f"{len(value)} characters" if isinstance(value, str) else f"{len(value)} items"
        return f"({type(value).__name__} of {size}, not echoed)"
    return _finite_only(value)


def _finite_only(value: Any) -> Any:
    """`value` with its non-finite floats as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_only(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_only(v) for v in value]
    return value


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method the published schema lists for `path`."""
    methods: set[str] = set()
    for template, operations in app.openapi()["paths"].items():
        parts = template.split("/")
        pattern = "/".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts)
        if re.fullmatch(pattern, path):
            methods.update(method.upper() for method in operations)
    return sorted(methods)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        # A 405's Allow names the methods of the one route the router tried; a path served by
        # several (GET and DELETE of a job) allows them all.
        if exc.status_code == 405 and (allowed := _allowed_methods(app, request.url.path)):
            exc = HTTPException(
                405, exc.detail, {**(exc.headers or {}), "Allow": ", ".join(allowed)}
            )
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes every error's `input`, whatever its size, and a NaN there
        # would make the 422 itself fail.
        all_errors = exc.errors()
        errors = []
        for error in all_errors[:MAX_ERRORS]:
            error = dict(error)
            error.pop("url", None)
            if "input" in error:
                error["input"] = _echoed(error["input"])
            if "ctx" in error:
                error["ctx"] = {k: str(v)[:ECHO_CHARS] for k, v in error["ctx"].items()}
            errors.append(error)
        if len(all_errors) > MAX_ERRORS:
            more = len(all_errors) - MAX_ERRORS
            errors.append(
                {
                    "type": "too_many_errors",
                    "loc": list(all_errors[MAX_ERRORS]["loc"][:1]),
                    "msg": f"{more} more errors not shown",
                }
            )
        return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})

    @app.exception_handler(SpecRejected)
    async def spec_rejected(_: Request, exc: SpecRejected) -> JSONResponse:
        detail = [{"type": "limit", "loc": ["body", *exc.field], "msg": exc.message}]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(SweepRejected)
    async def sweep_rejected(_: Request, exc: SweepRejected) -> JSONResponse:
        detail = [
            {"type": exc.error_type, "loc": ["body", *loc], "msg": msg} for loc, msg in exc.errors
        ]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(Unauthorized)
    async def unauthorized(_: Request, exc: Unauthorized) -> JSONResponse:
        return JSONResponse(
            status_code=401,
            content={"detail": str(exc)},
            headers={"WWW-Authenticate": 'Bearer realm="gradstream"'},
        )

    @app.exception_handler(LimitExceeded)
    async def limit_exceeded(_: Request, exc: LimitExceeded) -> JSONResponse:
        headers = {} if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
        return JSONResponse(
            status_code=429, content={"detail": str(exc), "limit": exc.limit}, headers=headers
        )

    @app.exception_handler(JobNotFound)
    async def job_not_found(_: Request, exc: JobNotFound) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @app.exception_handler(DatasetNotFound)
    async def dataset_not_found(_: Request, exc: DatasetNotFound) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @app.exception_handler(DatasetInvalid)
    async def dataset_invalid(_: Request, exc: DatasetInvalid) -> JSONResponse:
        detail = [{"type": "dataset", "loc": ["body"], "msg": str(exc)}]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(JobNotFinished)
    async def job_not_finished(_: Request, exc: JobNotFinished) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc), "status": exc.status})

    @app.exception_handler(JobFinished)
    async def job_finished(_: Request, exc: JobFinished) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc), "status": exc.status})

    @app.exception_handler(JobActive)
    async def job_active(_: Request, exc: JobActive) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc), "status": exc.status})

    @app.exception_handler(SweepNotFound)
    async def sweep_not_found(_: Request, exc: SweepNotFound) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @app.exception_handler(SweepFinished)
    @app.exception_handler(SweepActive)
    @app.exception_handler(MemberOfSweep)
    async def sweep_conflict(
        _: Request, exc: SweepFinished | SweepActive | MemberOfSweep
    ) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc), "status": exc.status})

    @app.exception_handler(DatasetInUse)
    async def dataset_in_use(_: Request, exc: DatasetInUse) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc), "job": exc.job_id})

    @app.exception_handler(StorageFull)
    async def storage_full(_: Request, exc: StorageFull) -> JSONResponse:
        # 507 Insufficient Storage: the request was fine, the service has no room for it.
        return JSONResponse(status_code=507, content={"detail": str(exc)})

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        # The client reads what is wrong; where Redis or the archive lives, and what the
        # driver said, go to the log.
        cause = exc.__cause__
        log.warning(
            "%s %s answered 503: %s (%s: %s)",
            request.method,
            request.url.path,
            exc,
            type(cause).__name__,
            cause,
        )
        return JSONResponse(
            status_code=503, content={"detail": str(exc)}, headers={"Retry-After": RETRY_AFTER_S}
        )

    @app.exception_handler(ArchivedStepsLost)
    async def archived_steps_lost(_: Request, exc: ArchivedStepsLost) -> JSONResponse:
        # 410 Gone, no Retry-After: the file is missing, no retry brings the steps back.
        return JSONResponse(status_code=410, content={"detail": str(exc)})

    @app.exception_handler(MalformedJob)
    async def malformed_job(_: Request, exc: MalformedJob) -> JSONResponse:
        return JSONResponse(status_code=500, content={"detail": str(exc)})
