"""Job use cases behind the API: submit (check limits, route, store, enqueue) and cancel."""

import logging

from services.config import Settings
from services.errors import (
    DatasetNotFound,
    JobNotFinished,
    LimitExceeded,
    SpecRejected,
    StoreUnavailable,
)
from services.queue import enqueue_training, route_job
from services.records import finite_or_none
from services.schemas import DataSpec, JobSpec, JobStatus, JobView
from services.store import Store

log = logging.getLogger(__name__)


def check_limits(spec: JobSpec, settings: Settings) -> None:
    """Refuse a spec that breaks a configured limit, naming the field."""
    if spec.steps > settings.max_steps:
        raise SpecRejected(("steps",), f"steps must be at most {settings.max_steps}")
    params = spec.data.features + int(spec.bias)
    if params > settings.max_params:
        raise SpecRejected(
            ("data",),
            f"the model has {params} parameters ({spec.data.features} features"
            f"{' and a bias' if spec.bias else ''}); max_params is {settings.max_params}",
        )
    elements = spec.data.samples * spec.data.features
    if elements > settings.max_elements:
        raise SpecRejected(
            ("data",),
            f"data has {elements} samples x features; the limit is {settings.max_elements}",
        )
    validation = spec.eval.data if spec.eval is not None else None
    if validation is not None and validation.known:
        elements = validation.samples * validation.features
        if elements > settings.max_elements:
            raise SpecRejected(
                ("eval", "data"),
                f"the validation set has {elements} samples x features; the limit is "
                f"{settings.max_elements}",
            )


def resolve_dataset(store: Store, spec: JobSpec, tenant: str) -> None:
    """Look up the job's uploaded datasets (the tenant's: the training data, and an explicit
    validation set), give the spec their shapes, and check what depends on the shapes; each
    problem a SpecRejected naming the field."""
    sources: list[tuple[tuple[str, ...], DataSpec]] = [(("data",), spec.data)]
    if spec.eval is not None and spec.eval.data is not None:
        sources.append((("eval", "data"), spec.eval.data))
    for field, data in sources:
        if data.dataset_id is None or data.known:
            continue
        try:
            info = store.dataset_info(tenant, data.dataset_id)
        except DatasetNotFound as exc:
            raise SpecRejected(
                (*field, "dataset_id"), f"{exc}: upload it with POST /v1/datasets"
            ) from exc
        if info.sweep is not None:
            # It goes with its sweep: a job or another sweep on it would lose its data then.
            raise SpecRejected(
                (*field, "dataset_id"),
                f"dataset {data.dataset_id!r} is the inline data of sweep {info.sweep!r}, for "
                "its members only: upload the data with POST /v1/datasets to train on it",
            )
        data.resolve(info.samples, info.features)
    for field_name, problem in spec.fit_problems():
        raise SpecRejected(tuple(field_name.split(".")), problem)


def check_rate(store: Store, tenant: str, settings: Settings) -> None:
    """Count a submit of `tenant`; LimitExceeded (with when to retry) past the per-minute limit."""
    count, retry_after = store.count_submit(tenant)
    if count > settings.submits_per_minute:
        raise LimitExceeded(
            "submits_per_minute",
            f"tenant {tenant!r} submitted {settings.submits_per_minute} jobs this minute; "
            f"submits_per_minute is {settings.submits_per_minute}",
            retry_after_s=retry_after,
        )


def submit_job(
    store: Store,
    spec: JobSpec,
    settings: Settings,
    tenant: str,
    idempotency: str | None = None,
) -> JobView:
    """Store a new job of `tenant` and enqueue it on the queue its device routes to; a retried
    submit with the same idempotency key returns the job the first one made."""
    check_rate(store, tenant, settings)
    if not spec.data.known or (spec.eval is not None and spec.eval.data is not None):
        resolve_dataset(store, spec, tenant)
    check_limits(spec, settings)
    route = route_job(spec, store.live_queues(), settings, live_memory=store.live_memory())
    job_id, created = store.create_job(
        spec,
        route.device,
        route.queue,
        route.reason,
        idempotency,
        tenant=tenant,
        max_active=settings.max_active_jobs_per_tenant,
        storage_limit=settings.tenant_storage_bytes,
    )
    if not created:
        log.info("job %s returned again for its idempotency key", job_id)
        return store.get_job(job_id)
    # The view as created (queued): read before the message goes out, since a worker can
    # finish a small job before a read after it.
    view = store.get_job(job_id)
    try:
        enqueue_training(job_id, route.queue)
    except Exception as exc:
        # Never leave a job record that no message will ever run. (Should this delete fail
        # too, the reaper's orphan check sends the message later.)
        log.warning("enqueue of job %s failed: %s", job_id, exc)
        store.discard_job(job_id)
        raise StoreUnavailable("could not enqueue the job: the broker is unavailable") from exc
    log.info("job %s queued on %s (%s)", job_id, route.queue, route.reason)
    return view


def cancel_job(store: Store, job_id: str, tenant: str) -> JobView:
    """Cancel a queued job of `tenant` at once, or a running one at its next step boundary."""
    store.cancel_job(job_id, tenant)
    return store.get_job(job_id, tenant)


def predict(store: Store, job_id: str, tenant: str, x: list[list[float]]) -> list[float | None]:
    """ŷ = x @ w (+ b) with the final parameters of a succeeded job of `tenant`, in float64;
    null where that is not finite (rows whose products overflow)."""
    view = store.get_job(job_id, tenant)
    if view.status is not JobStatus.SUCCEEDED or view.result is None:
        raise JobNotFinished(job_id, view.status.value)
    w = view.result.params["w"]
    b = view.result.params.get("b", 0.0)
    assert isinstance(w, list)
    if len(x[0]) != len(w):
        raise SpecRejected(("x",), f"x rows have {len(x[0])} values; the job has {len(w)} features")
    weights = [float(v) for v in w if v is not None]
    if b is None or len(weights) != len(w):  # a parameter that is not finite
        return [None] * len(x)
    assert isinstance(b, float | int)
    return [
        finite_or_none(sum(wi * xi for wi, xi in zip(weights, row, strict=True)) + b) for row in x
    ]
