"""One attempt at a job: claim it, train, flush step chunks to the store, finish. No Celery here.

The step loop never waits on Redis per step: each step's record is written into a preallocated
buffer on the device, and the buffer is flushed as one chunk when it is full or when
`flush_interval_s` has passed. Each flush is one fenced script (see Store.flush_steps), which is
also where a cancel request and a newer attempt are noticed.
"""

import logging
import time
from enum import StrEnum
from typing import Any

import torch
from pydantic import ValidationError

from services.config import Settings
from services.errors import StoreUnavailable
from services.records import Chunk, param_values
from services.schemas import JobSpec, JobStatus
from services.store import Store
from services.training import Layout, Trainer

log = logging.getLogger(__name__)

# A chunk buffer holds at most this many bytes, so wide problems flush more often, not bigger.
CHUNK_BUDGET_BYTES = 8 * 1024 * 1024


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    DIVERGED = "diverged"
    CANCELLED = "cancelled"
    FAILED = "failed"
    FENCED = "fenced"  # another attempt owns the job; this one stopped without touching it
    SKIPPED = "skipped"  # nothing to run: job missing, finished, cancelled or running elsewhere


class StepRecorder:
    """A device-side ring of step records, handed out a row per step and drained per chunk."""

    def __init__(self, layout: Layout, max_steps: int, device: torch.device) -> None:
        self.layout = layout
        capacity = max(1, min(max_steps, CHUNK_BUDGET_BYTES // (4 * layout.width)))
        self.buffer = torch.empty(capacity, layout.width, dtype=torch.float32, device=device)
        self._rows = list(self.buffer.unbind(0))  # views made once, not once per step
        self.first = 0  # step number of row 0
        self.count = 0
        self.last_loss: float | None = None

    @property
    def full(self) -> bool:
        return self.count == len(self._rows)

    def next_row(self) -> torch.Tensor:
        row = self._rows[self.count]
        self.count += 1
        return row

    def drain(self) -> tuple[Chunk | None, int | None]:
        """The recorded steps as a chunk, cut after the first non-finite step (its number too)."""
        if self.count == 0:
            return None, None
        host = self.buffer[: self.count].cpu()
        finite = torch.isfinite(host[:, : 1 + self.layout.params]).all(dim=1)
        diverged_at = None
        rows = self.count
        if not bool(finite.all()):
            bad = int(torch.nonzero(~finite)[0, 0])
            diverged_at, rows = self.first + bad, bad + 1
        chunk = Chunk(
            first=self.first,
            count=rows,
            features=self.layout.features,
            bias=self.layout.bias,
            rows=host[:rows].numpy().tobytes(),
        )
        self.last_loss = float(host[rows - 1, 0])
        self.first += self.count
        self.count = 0
        return chunk, diverged_at


def run_job(
    store: Store, job_id: str, worker: str, device: torch.device, settings: Settings
) -> Outcome:
    """Run one attempt of `job_id` on `device`; every outcome is recorded on the job itself."""
    claim = store.claim_job(job_id, worker)
    if claim.outcome != "claimed":
        log.info("job %s not run: %s %s", job_id, claim.outcome, claim.status)
        return Outcome.SKIPPED
    store.set_current_job(worker, job_id)
    try:
        return _train(store, job_id, claim.attempt, claim.spec_json, device, settings)
    except StoreUnavailable:
        raise  # nothing can be recorded; the message is delivered again
    except Exception as exc:
        # Whatever the job did (bad record, out of memory, a bug), the worker survives it and
        # the job ends with the reason instead of staying `running`.
        log.exception("job %s attempt %d failed", job_id, claim.attempt)
        store.fail_job(job_id, claim.attempt, f"{type(exc).__name__}: {exc}")
        return Outcome.FAILED
    finally:
        store.set_current_job(worker, None)


def _train(
    store: Store,
    job_id: str,
    attempt: int,
    spec_json: str,
    device: torch.device,
    settings: Settings,
) -> Outcome:
    try:
        spec = JobSpec.model_validate_json(spec_json)
    except ValidationError as exc:
        store.fail_job(job_id, attempt, f"invalid job record: {exc.error_count()} error(s): {exc}")
        return Outcome.FAILED
    trainer = Trainer(spec, device)
    recorder = StepRecorder(trainer.layout, settings.flush_max_steps, device)
    log.info("job %s attempt %d: %d steps on %s", job_id, attempt, spec.steps, device)

    last_flush = time.perf_counter()
    for _ in range(spec.steps):
        trainer.step(recorder.next_row())
        if recorder.full or time.perf_counter() - last_flush >= settings.flush_interval_s:
            chunk, diverged_at = recorder.drain()
            if diverged_at is not None:
                return _finish_diverged(store, job_id, attempt, chunk, diverged_at)
            reply = store.flush_steps(job_id, attempt, chunk)
            if reply != "ok":
                return _stopped(job_id, attempt, reply)
            last_flush = time.perf_counter()

    # The last flush may carry no steps (a timed flush fired on the last step); it still
    # finishes the job.
    chunk, diverged_at = recorder.drain()
    if diverged_at is not None:
        return _finish_diverged(store, job_id, attempt, chunk, diverged_at)
    result: dict[str, Any] = {
        "params": param_values(trainer.params().cpu().tolist(), trainer.layout.features, spec.bias),
        "loss": recorder.last_loss,
    }
    reply = store.flush_steps(job_id, attempt, chunk, finish=JobStatus.SUCCEEDED, result=result)
    if reply != "finished":
        return _stopped(job_id, attempt, reply)
    log.info("job %s attempt %d succeeded", job_id, attempt)
    return Outcome.SUCCEEDED


def _finish_diverged(
    store: Store, job_id: str, attempt: int, chunk: Chunk | None, step: int
) -> Outcome:
    error = f"diverged at step {step}: loss or gradients are not finite"
    reply = store.flush_steps(job_id, attempt, chunk, finish=JobStatus.DIVERGED, error=error)
    if reply != "finished":
        return _stopped(job_id, attempt, reply)
    log.info("job %s attempt %d %s", job_id, attempt, error)
    return Outcome.DIVERGED


def _stopped(job_id: str, attempt: int, reply: str) -> Outcome:
    if reply == "cancelled":
        log.info("job %s attempt %d cancelled", job_id, attempt)
        return Outcome.CANCELLED
    log.warning("job %s attempt %d stopped: flush refused (%s)", job_id, attempt, reply)
    return Outcome.FENCED
