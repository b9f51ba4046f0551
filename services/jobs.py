"""Job use cases behind the API: submit (check limits, route, store, enqueue) and cancel."""

import logging

from services.config import Settings
from services.errors import SpecRejected, StoreUnavailable
from services.queue import enqueue_training, route_job
from services.schemas import JobSpec, JobView
from services.store import Store

log = logging.getLogger(__name__)


def check_limits(spec: JobSpec, settings: Settings) -> None:
    """Refuse a spec that breaks a configured limit, naming the field."""
    if spec.steps > settings.max_steps:
        raise SpecRejected(("steps",), f"steps must be at most {settings.max_steps}")
    elements = spec.data.samples * spec.data.features
    if elements > settings.max_elements:
        raise SpecRejected(
            ("data",),
            f"data has {elements} samples x features; the limit is {settings.max_elements}",
        )


def submit_job(
    store: Store, spec: JobSpec, settings: Settings, idempotency: str | None = None
) -> JobView:
    """Store a new job and enqueue it on the queue its device routes to; a retried submit
    with the same idempotency key returns the job the first one made."""
    check_limits(spec, settings)
    route = route_job(spec, store.live_queues(), settings)
    job_id, created = store.create_job(spec, route.device, route.queue, route.reason, idempotency)
    if not created:
        log.info("job %s returned again for its idempotency key", job_id)
        return store.get_job(job_id)
    try:
        enqueue_training(job_id, route.queue)
    except Exception as exc:
        # Never leave a job record that no message will ever run. (Should this delete fail
        # too, the reaper's orphan check sends the message later.)
        log.warning("enqueue of job %s failed: %s", job_id, exc)
        store.delete_job(job_id, idempotency)
        raise StoreUnavailable(f"could not enqueue the job: {exc}") from exc
    log.info("job %s queued on %s (%s)", job_id, route.queue, route.reason)
    return store.get_job(job_id)


def cancel_job(store: Store, job_id: str) -> JobView:
    """Cancel a queued job at once, or a running one at its next step boundary."""
    store.cancel_job(job_id)
    return store.get_job(job_id)
