"""Running attempts in the test process, as a worker's pool child runs them (no Celery): for
checks of the step loop itself on any device, CPU here and CUDA in tests/gpu."""

import threading
from typing import Any

import torch

from services.config import Settings
from services.runner import AttemptResult, Outcome, run_job
from services.schemas import JobSpec
from services.store import Store


def stored_steps(store: Store, job_id: str) -> list[dict[str, Any]]:
    """Every stored step, page after page (a page is bounded in bytes too)."""
    steps: list[dict[str, Any]] = []
    after: int | None = -1
    while after is not None:
        records, after = store.read_steps(job_id, after, 10**9)
        steps += records
        if not records:
            break
    return steps


def run_once(
    store: Store, spec: JobSpec, device: torch.device, settings: Settings
) -> tuple[AttemptResult, list[dict[str, Any]]]:
    """One job in one attempt: the attempt's result and the steps it stored."""
    job_id, _ = store.create_job(spec, str(device), "test-nobody", "test")
    result = run_job(store, job_id, "test-worker", device, settings)
    return result, stored_steps(store, job_id)


def run_with_hand_back(
    store: Store, spec: JobSpec, device: torch.device, settings: Settings
) -> tuple[list[AttemptResult], list[dict[str, Any]]]:
    """One job in two attempts: the first is told to drain (as on a worker's shutdown), so it
    checkpoints and hands the job back at its first flush; the second resumes from there."""
    job_id, _ = store.create_job(spec, str(device), "test-nobody", "test")
    drain = threading.Event()
    drain.set()
    first = run_job(store, job_id, "test-worker", device, settings, drain)
    assert first.outcome is Outcome.RELEASED, first
    second = run_job(store, job_id, "test-worker", device, settings)
    return [first, second], stored_steps(store, job_id)
