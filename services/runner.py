"""One attempt at a job: claim it, train, flush step chunks to the store, finish. No Celery here.

The step loop never waits on Redis per step: each step's record is written into a preallocated
buffer on the device, and the buffer is flushed as one chunk when it is full or when
`flush_interval_s` has passed. Each flush is one fenced script (Store.flush_steps) that appends
the chunk, writes the matching checkpoint and renews the lease; it is also where a cancel
request and a newer attempt are noticed. A thread renews the lease between flushes, so a step
longer than the lease does not lose the job.
"""

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from pydantic import ValidationError

from services.config import Settings
from services.errors import StoreUnavailable
from services.records import Chunk, param_values
from services.schemas import JobSpec, JobStatus
from services.store import Checkpoint, Store
from services.training import Layout, Trainer

log = logging.getLogger(__name__)

# A chunk buffer holds at most this many bytes, so wide problems flush more often, not bigger.
CHUNK_BUDGET_BYTES = 8 * 1024 * 1024
# How long a flush keeps retrying while Redis is unreachable before the attempt gives up.
STORE_OUTAGE_S = 60.0


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    DIVERGED = "diverged"
    CANCELLED = "cancelled"
    FAILED = "failed"
    RELEASED = "released"  # handed back (worker shutting down, or Redis lost recent writes)
    FENCED = "fenced"  # a newer attempt owns the job; this one stopped without touching it
    SKIPPED = "skipped"  # nothing to run: missing, finished, or held by a live attempt


@dataclass(frozen=True)
class AttemptResult:
    outcome: Outcome
    requeue_to: str | None = None  # the queue to send the job to again (RELEASED)


class StepRecorder:
    """A device-side buffer of step records, handed out a row per step and drained per chunk."""

    def __init__(self, layout: Layout, max_steps: int, device: torch.device, first: int) -> None:
        self.layout = layout
        capacity = max(1, min(max_steps, CHUNK_BUDGET_BYTES // (4 * layout.width)))
        self.buffer = torch.empty(capacity, layout.width, dtype=torch.float32, device=device)
        self._rows = list(self.buffer.unbind(0))  # views made once, not once per step
        self.first = first  # step number of row 0
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


class LeaseKeeper:
    """Renews the attempt's lease every third of its length; `lost` is set once a newer
    attempt owns the job (this one must stop)."""

    def __init__(self, store: Store, job_id: str, attempt: int, lease_s: float) -> None:
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._args = (store, job_id, attempt, lease_s)
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        store, job_id, attempt, lease_s = self._args
        while not self._stop.wait(lease_s / 3):
            try:
                if not store.renew_lease(job_id, attempt, lease_s):
                    self.lost.set()
                    return
            except StoreUnavailable:
                log.warning(
                    "job %s attempt %d: lease renewal failed, Redis unreachable", job_id, attempt
                )


def run_job(
    store: Store,
    job_id: str,
    worker: str,
    device: torch.device,
    settings: Settings,
    drain: threading.Event | None = None,
) -> AttemptResult:
    """Run one attempt of `job_id` on `device` until it ends, or until `drain` is set (then
    the job is checkpointed and handed back). Every outcome is recorded on the job itself."""
    claim = store.claim_job(job_id, worker, settings.lease_s, settings.max_attempts)
    if claim.outcome != "claimed":
        log.info("job %s not run: %s %s", job_id, claim.outcome, claim.status)
        return AttemptResult(Outcome.SKIPPED)
    store.set_current_job(worker, job_id)
    attempt = _Attempt(store, job_id, claim.attempt, settings, drain or threading.Event())
    try:
        with LeaseKeeper(store, job_id, claim.attempt, settings.lease_s) as keeper:
            attempt.keeper = keeper
            return attempt.run(claim.spec_json, claim.checkpoint, device)
    except StoreUnavailable:
        raise  # nothing can be recorded; the lease lapses and the reaper requeues the job
    except Exception as exc:
        # Whatever the job did (bad record, out of memory, a bug), the worker survives it and
        # the job ends with the reason instead of staying `running`.
        log.exception("job %s attempt %d failed", job_id, claim.attempt)
        store.fail_job(job_id, claim.attempt, f"{type(exc).__name__}: {exc}")
        return AttemptResult(Outcome.FAILED)
    finally:
        with contextlib.suppress(StoreUnavailable):
            store.set_current_job(worker, None)


class _Attempt:
    """The step loop of one attempt and its flushes."""

    keeper: LeaseKeeper

    def __init__(
        self, store: Store, job_id: str, attempt: int, settings: Settings, drain: threading.Event
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.attempt = attempt
        self.settings = settings
        self.drain = drain

    def run(
        self, spec_json: str, checkpoint: Checkpoint | None, device: torch.device
    ) -> AttemptResult:
        try:
            spec = JobSpec.model_validate_json(spec_json)
        except ValidationError as exc:
            error = f"invalid job record: {exc.error_count()} error(s): {exc}"
            self.store.fail_job(self.job_id, self.attempt, error)
            return AttemptResult(Outcome.FAILED)
        trainer = Trainer(spec, device)
        start = 0
        if checkpoint is not None:
            trainer.load_state(checkpoint.theta, checkpoint.optimizer)
            start = checkpoint.step
        self.trainer = trainer
        recorder = StepRecorder(trainer.layout, self.settings.flush_max_steps, device, start)
        log.info(
            "job %s attempt %d: steps %d..%d on %s",
            self.job_id,
            self.attempt,
            start,
            spec.steps - 1,
            device,
        )

        interval = self.settings.flush_interval_s
        last_flush = time.perf_counter()
        for _ in range(start, spec.steps):
            trainer.step(recorder.next_row())
            if recorder.full or time.perf_counter() - last_flush >= interval:
                stopped = self._flush(recorder)
                if stopped is not None:
                    return stopped
                if self.drain.is_set():
                    return self._hand_back("its worker is shutting down")
                last_flush = time.perf_counter()

        # The last flush may carry no steps (a timed flush fired on the last step); it still
        # finishes the job.
        result: dict[str, Any] = {
            "params": param_values(
                trainer.params().cpu().tolist(), trainer.layout.features, spec.bias
            ),
            "loss": None,
        }
        return self._flush(recorder, finish=True, result=result) or AttemptResult(Outcome.SUCCEEDED)

    def _flush(
        self, recorder: StepRecorder, finish: bool = False, result: dict[str, Any] | None = None
    ) -> AttemptResult | None:
        """Flush the recorded steps; an AttemptResult if the attempt must stop, else None."""
        if self.keeper.lost.is_set():
            return self._stopped("fenced")
        chunk, diverged_at = recorder.drain()
        checkpoint = None
        if chunk is not None:
            theta, optimizer = self.trainer.state()
            checkpoint = Checkpoint(recorder.first, theta, optimizer)
        status, error = None, None
        if diverged_at is not None:
            status, result = JobStatus.DIVERGED, None
            error = f"diverged at step {diverged_at}: loss or gradients are not finite"
        elif finish:
            status = JobStatus.SUCCEEDED
            assert result is not None
            result["loss"] = recorder.last_loss
        reply = self._flush_with_retry(chunk, checkpoint, status, result, error)
        if reply == "finished":
            log.info("job %s attempt %d %s", self.job_id, self.attempt, error or "succeeded")
            return AttemptResult(Outcome.DIVERGED if error else Outcome.SUCCEEDED)
        if reply != "ok":
            return self._stopped(reply)
        return None

    def _flush_with_retry(
        self,
        chunk: Chunk | None,
        checkpoint: Checkpoint | None,
        finish: JobStatus | None,
        result: dict[str, Any] | None,
        error: str | None,
    ) -> str:
        # While Redis restarts, keep the chunk and retry; the steps are not lost, only late.
        deadline = time.monotonic() + STORE_OUTAGE_S
        pause = 0.05
        while True:
            try:
                return self.store.flush_steps(
                    self.job_id,
                    self.attempt,
                    chunk,
                    checkpoint,
                    self.settings.lease_s,
                    finish=finish,
                    result=result,
                    error=error,
                )
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                log.warning(
                    "job %s attempt %d: Redis unreachable, flush retried", self.job_id, self.attempt
                )
                time.sleep(pause)
                pause = min(1.0, pause * 2)

    def _stopped(self, reply: str) -> AttemptResult:
        if reply == "cancelled":
            log.info("job %s attempt %d cancelled", self.job_id, self.attempt)
            return AttemptResult(Outcome.CANCELLED)
        if reply == "gap":
            # Redis came back without its last writes (AOF fsyncs once a second): what it holds
            # is consistent up to its checkpoint, so the next attempt resumes from there.
            return self._hand_back(
                "Redis lost the attempt's latest steps; resuming from its checkpoint"
            )
        log.warning(
            "job %s attempt %d stopped: a newer attempt owns the job", self.job_id, self.attempt
        )
        return AttemptResult(Outcome.FENCED)

    def _hand_back(self, why: str) -> AttemptResult:
        queue = self.store.release_job(self.job_id, self.attempt, f"requeued: {why}")
        log.info("job %s attempt %d handed back: %s", self.job_id, self.attempt, why)
        if queue is None:
            return AttemptResult(Outcome.FENCED)
        if queue == "":
            return AttemptResult(Outcome.CANCELLED)
        return AttemptResult(Outcome.RELEASED, requeue_to=queue)
