"""The training task: thin, as a view is. The logic lives in services.runner; this maps how an
attempt ended onto the task states that Flower and other Celery monitors show."""

import logging

from celery.exceptions import Ignore, Reject

from services.attempts import Outcome
from services.config import get_settings
from services.queue import TRAIN_TASK, celery_app
from services.runner import run_job
from worker.app import child_context

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """The job failed or diverged: the task ends in FAILURE, its message the job's error."""


class HandedBack(Exception):
    """The job was handed back to be resumed: the reason a retried task shows."""


@celery_app.task(
    name=TRAIN_TASK,
    bind=True,
    # Expected: logged in one line at INFO, not as a worker error with a traceback.
    throws=(JobFailed,),
    # A job may be handed back any number of times (each worker shutdown, each time Redis is
    # full); how often a job may run is the store's max_attempts, counted when it is claimed.
    max_retries=None,
)
def train(self, job_id: str) -> str:  # type: ignore[no-untyped-def]
    """Run one attempt of a job; the job record, not Celery's result, holds what happened."""
    context = child_context()
    result = run_job(
        context.store, job_id, self.request.hostname, context.device, get_settings(), context.drain
    )
    if result.outcome in (Outcome.FAILED, Outcome.DIVERGED):
        raise JobFailed(result.reason or result.outcome.value)
    if result.outcome is Outcome.CANCELLED:
        # What a worker sends for a revoked task; Ignore acknowledges the message and sends
        # nothing after it, so monitors keep the task REVOKED.
        self.send_event("task-revoked", terminated=False, signum=None, expired=False)
        raise Ignore()
    if result.requeue_to is not None:
        # Handed back (this worker is shutting down, or Redis lost writes or is full): a new
        # message (the same task, RETRY meanwhile) lets any worker resume it. Should the send
        # fail, Celery rejects this message; the job is queued with no message, and the
        # reaper's orphan check sends one later.
        try:
            raise self.retry(queue=result.requeue_to, countdown=0, exc=HandedBack(result.reason))
        except Reject:
            log.warning("job %s handed back but not sent again; the reaper will", job_id)
            raise
    return result.outcome.value
