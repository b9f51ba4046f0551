"""The training task: thin, as a view is. The logic lives in services.runner."""

from services.config import get_settings
from services.queue import TRAIN_TASK, celery_app, enqueue_training
from services.runner import run_job
from worker.app import child_context


@celery_app.task(name=TRAIN_TASK, bind=True)
def train(self, job_id: str) -> str:  # type: ignore[no-untyped-def]
    """Run one attempt of a job; the job record, not Celery's result, holds what happened."""
    context = child_context()
    result = run_job(
        context.store, job_id, self.request.hostname, context.device, get_settings(), context.drain
    )
    if result.requeue_to is not None:
        # Handed back (this worker is shutting down): a new message lets any worker resume it.
        enqueue_training(job_id, result.requeue_to)
    return result.outcome.value
