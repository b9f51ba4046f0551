"""The training task: thin, as a view is. The logic lives in services.runner."""

import logging

from services.config import get_settings
from services.queue import TRAIN_TASK, celery_app, enqueue_training
from services.runner import run_job
from worker.app import child_context

log = logging.getLogger(__name__)


@celery_app.task(name=TRAIN_TASK, bind=True)
def train(self, job_id: str) -> str:  # type: ignore[no-untyped-def]
    """Run one attempt of a job; the job record, not Celery's result, holds what happened."""
    context = child_context()
    result = run_job(
        context.store, job_id, self.request.hostname, context.device, get_settings(), context.drain
    )
    if result.requeue_to is not None:
        # Handed back (this worker is shutting down, or Redis lost writes or is full): a new
        # message lets any worker resume it. Should the send fail too, the job is queued with
        # no message, and the reaper's orphan check sends one later.
        try:
            enqueue_training(job_id, result.requeue_to)
        except Exception:
            log.warning("job %s handed back but not sent again; the reaper will", job_id)
    return result.outcome.value
