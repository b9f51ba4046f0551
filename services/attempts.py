"""What every attempt shares, a job's (services/runner.py) or a sweep's group's
(services/group_runner.py): one lifecycle, two step loops. No Celery here.

An attempt is claimed (Store.claim_job, by `runner.run_job`), then `run_attempt` drives it:

1. `Attempt.run(device)` starts the lease keeper before anything that takes time (a data
   load, parsing members' specs, a compile), loads its data (`uploaded_data`: the worker's
   dataset cache), chooses its stepper (`choose_stepper`, or the one its first attempt
   recorded) and makes it (`make_fast`: a compile or a capture that fails leaves eager steps),
   then runs its step loop;
2. each chunk of steps goes to Redis by one fenced script (`Attempt.write`, retried through
   an outage, counted in the worker's metrics); what the script answers is read by
   `Attempt.ended_by` (go on, finished, cancelled, fenced, or hand back);
3. the attempt ends: finished by its last flush, handed back (`Attempt.hand_back`), fenced by
   a newer attempt, or failed by whatever it raised (`run_attempt` records the error on the
   job or group, so the worker survives it and nothing stays `running`).

The two loops differ where their work does: a job records one row per step and checks its
stop rules; a group records one row per member per step and ends members at rungs. Both
report the same figures (`AttemptResult`: steps, loop seconds, stepper).
"""

import contextlib
import contextvars
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import torch

from services import metrics
from services.config import Settings
from services.environment import attempt_environment
from services.errors import StorageFull, StoreUnavailable
from services.queue import CompiledAt, compiles, may_compile
from services.records import param_values
from services.schemas import AttemptEnvironment, JobSpec
from services.store import Claim, Store
from services.training import (
    BlockShape,
    DatasetCache,
    FitReference,
    block_cached,
    block_compiled,
    inductor_cache_counts,
    recent_shapes_file,
    remember_shape,
    shape_text,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Dataset = tuple[torch.Tensor, torch.Tensor]

# A chunk buffer holds at most this many bytes, so wide problems flush more often, not bigger.
CHUNK_BUDGET_BYTES = 8 * 1024 * 1024
FULL = "Redis is full (maxmemory): resuming from its checkpoint once there is room"


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
    reason: str | None = None  # why it failed, diverged or was handed back (the job's error)
    # How the steps ran: `steps` steps (a group's: member-steps) in `loop_s` seconds (from the
    # first step to the end of the last flush, less `result_s`, the time the results' fit
    # quality took), eagerly, in compiled blocks or by replaying a CUDA graph.
    steps: int = 0
    loop_s: float = 0.0
    stepper: str = "eager"
    result_s: float = 0.0


_datasets: DatasetCache | None = None


def datasets_cache(settings: Settings) -> DatasetCache:
    """This process's cache of uploaded datasets (a worker's pool process keeps it across
    jobs)."""
    global _datasets
    if _datasets is None:
        _datasets = DatasetCache(settings.dataset_cache_bytes)
    return _datasets


def uploaded_data(
    store: Store, spec: JobSpec, device: torch.device, settings: Settings
) -> tuple[Dataset | None, Dataset | None]:
    """The (x, y) on `device` of the spec's uploaded training data and validation set, each
    None where the spec gives no dataset id (from this process's cache, else from Redis)."""
    cache = datasets_cache(settings)

    def load(dataset_id: str | None) -> Dataset | None:
        if dataset_id is None:
            return None
        return cache.get(dataset_id, device, lambda: store.load_dataset(dataset_id))

    validation = spec.eval.data if spec.eval is not None else None
    return load(spec.data.dataset_id), load(validation.dataset_id if validation else None)


class LeaseKeeper:
    """Renews the attempt's lease every third of its length while the attempt makes progress.

    `lost` is set once a newer attempt owns the job (this one must stop), or once `progress()`
    has not moved for `stall_s`: a hung attempt (a deadlock, a stuck kernel) then lets its
    lease lapse, and the reaper gives the job to a new attempt.
    """

    def __init__(
        self,
        store: Store,
        job_id: str,
        attempt: int,
        lease_s: float,
        progress: Callable[[], int],
        stall_s: float,
    ) -> None:
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._args = (store, job_id, attempt, lease_s)
        self._progress, self._stall_s = progress, stall_s
        # Started in a copy of this context: its log lines carry the job id and attempt.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._run,), name=f"lease-{job_id}", daemon=True
        )

    def __enter__(self) -> "LeaseKeeper":
        self.start()
        return self

    def start(self) -> None:
        self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop renewing, and wait until a renew in progress has returned."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        store, job_id, attempt, lease_s = self._args
        seen, since = self._progress(), time.monotonic()
        while not self._stop.wait(lease_s / 3):
            if self._progress() != seen:
                seen, since = self._progress(), time.monotonic()
            elif time.monotonic() - since > self._stall_s:
                log.error(
                    "job %s attempt %d: no progress for %.0f s; letting its lease lapse",
                    job_id,
                    attempt,
                    self._stall_s,
                )
                self.lost.set()
                return
            try:
                if not store.renew_lease(job_id, attempt, lease_s):
                    self.lost.set()
                    return
            except StoreUnavailable:
                log.warning(
                    "job %s attempt %d: Redis unreachable, lease not renewed", job_id, attempt
                )


def retry_through_outage(write: Callable[[], T], what: str, outage_s: float) -> T:
    """`write()`, retried while Redis is unreachable (it restarts, or fails over) for up to
    `outage_s` (the redis_outage_s setting): the steps it carries are not lost, only late. A
    flush script recognises a retry of a flush it applied, so retrying is safe."""
    deadline = time.monotonic() + outage_s
    pause = 0.05
    while True:
        try:
            return write()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            log.warning("%s: Redis unreachable, flush retried", what)
            time.sleep(pause)
            pause = min(1.0, pause * 2)


def note_recent_shape(settings: Settings, shape: BlockShape) -> None:
    """Put `shape` (a job's block or a group's) first among the worker's recent shapes (kept
    if compile_recent_shapes), which its pool processes compile when they start."""
    if settings.compile_recent_shapes:
        path = recent_shapes_file(settings.compile_cache_dir)
        remember_shape(path, shape_text(shape), settings.compile_recent_shapes)


def compiled_at(shape: BlockShape | None) -> CompiledAt:
    """Where the compiled block of `shape` is found now: in this process (a job or the warm-up
    compiled it), in Inductor's on-disk cache (another process did), or nowhere (None: the
    shape is not known)."""
    if shape is not None and block_compiled(shape):
        return CompiledAt.PROCESS
    if shape is not None and block_cached(shape):
        return CompiledAt.DISK
    return CompiledAt.NOWHERE


def choose_stepper(
    spec: JobSpec,
    settings: Settings,
    steps: int,
    can_graph: bool,
    can_compile: bool,
    members: int = 1,
    shape: BlockShape | None = None,
) -> str:
    """The cost model's stepper for an attempt no earlier attempt recorded one for: a CUDA
    graph where the steps can be captured (`can_graph`: a GPU) and `steps` are enough to repay
    the capture; compiled blocks where they can run (`can_compile`: the CPU) and repay their
    compile over the whole job, a compile costing what is found of the block of `shape`
    (`compiled_at`; a group of `members` costs as one job on `members` times the data); else
    eager. The attempt records the choice with the job, and every later attempt runs it."""
    if can_graph and settings.cuda_graphs and steps >= settings.cuda_graph_min_steps:
        return "cuda-graph"
    # Where the block is found is looked up (a stat in Inductor's cache) only for a job that
    # may compile: not for each tutorial-sized job, shorter than a block.
    may = can_compile and may_compile(spec, settings)
    if may and compiles(spec, settings, members, compiled_at(shape)):
        return "compiled"
    return "eager"


def make_fast(what: str, kind: str, make: Callable[[], T]) -> T | None:
    """`make()`: a compiled block or a captured graph for `what` (a job's or a group's
    steps), or None (eager steps, with a warning) if compiling or capturing fails. A compile
    logs its time and Inductor's on-disk cache hits, which say whether it really compiled."""
    hits, misses = inductor_cache_counts()
    started = time.perf_counter()
    try:
        fast = make()
    except Exception:
        log.warning("%s: no %s step; eager steps", what, kind, exc_info=True)
        return None
    if kind == "compiled":
        new_hits, new_misses = inductor_cache_counts()
        log.info(
            "%s: compiled step ready in %.2f s (Inductor cache: %d hit(s), %d miss(es))",
            what,
            time.perf_counter() - started,
            new_hits - hits,
            new_misses - misses,
        )
    return fast


def diverged_error(step: int) -> str:
    """The error of a job (or member) whose step `step` is the first not finite."""
    return f"diverged at step {step}: loss or gradients are not finite"


def finished_result(
    reference: FitReference,
    theta: torch.Tensor,
    features: int,
    bias: bool,
    stopped: str,
    stepper: str,
) -> dict[str, Any]:
    """A finished job's result (a group's member's alike): its final parameters `theta`, why
    it stopped, how its steps ran, and their fit measured on its rows (`FitReference`: the
    loss and R² in float64, the least-squares reference, the train/val metrics). The final
    step's loss is added by the flush that carries that step."""
    return {
        "params": param_values(theta.tolist(), features, bias),
        "stopped": stopped,
        "stepper": stepper,
        **reference.quality(theta),
        **reference.metrics(theta),
    }


class Attempt:
    """One attempt of a claimed job or group: what both step loops share. A subclass runs
    the steps (`run`) and reports `progress()`, the steps recorded so far, which the lease
    keeper watches for a stall; it sets `stepper`, `steps_run`, `loop_s` and `result_s` as it
    goes, for the AttemptResult."""

    what = "job"  # how log lines name the unit: "job" or "group"

    def __init__(
        self,
        store: Store,
        unit_id: str,
        claim: Claim,
        worker: str,
        settings: Settings,
        drain: threading.Event,
    ) -> None:
        self.store, self.unit_id, self.claim = store, unit_id, claim
        self.attempt, self.worker, self.settings = claim.attempt, worker, settings
        self.drain = drain
        self.keeper = LeaseKeeper(
            store, unit_id, claim.attempt, settings.lease_s, self.progress, settings.attempt_stall_s
        )
        self.device = torch.device("cpu")  # run() sets it
        self.stepper = "eager"
        self.steps_run, self.loop_s, self.result_s = 0, 0.0, 0.0
        self._sent_stepper: str | None = None  # the stepper the last environment sent named

    @property
    def name(self) -> str:
        return f"{self.what} {self.unit_id} attempt {self.attempt}"

    def progress(self) -> int:
        """Steps recorded so far (read by the lease keeper's thread; -1 while setting up)."""
        raise NotImplementedError

    def run(self, device: torch.device) -> AttemptResult:
        raise NotImplementedError

    def environment(self) -> AttemptEnvironment | None:
        """What the attempt runs on, for the next flush if it is the attempt's first, or if
        the stepper changed since (a compile that failed later, in a group): else None."""
        if self.stepper == self._sent_stepper:
            return None
        self._sent_stepper = self.stepper
        return attempt_environment(self.attempt, self.device, self.stepper, self.worker)

    def write(self, flush: Callable[[], T], steps: int, full: T, sending_s: float = 0.0) -> T:
        """Run one flush script (`flush()`, or read the reply of one sent already), retried
        while Redis is unreachable; `full` when Redis refused it for memory (nothing of it was
        written). `steps`: the step records it carries, for the worker's metrics; `sending_s`:
        the time spent packing and sending it, for a flush whose reply is read later."""
        started = time.perf_counter()
        try:
            reply = retry_through_outage(flush, self.name, self.settings.redis_outage_s)
        except StorageFull:
            log.warning("%s: flush refused, Redis is full", self.name)
            return full
        metrics.FLUSH_SECONDS.observe(sending_s + time.perf_counter() - started)
        if steps:
            metrics.STEPS.inc(steps)
            metrics.FLUSHES.inc()
        return reply

    def ended_by(self, reply: str) -> AttemptResult | None:
        """What a flush's reply means for the attempt: None to go on (`ok`), else how it
        ended."""
        if reply == "ok":
            return None
        if reply == "finished":
            log.info("%s succeeded", self.name)
            return AttemptResult(Outcome.SUCCEEDED)
        if reply == "cancelled":
            log.info("%s cancelled", self.name)
            return AttemptResult(Outcome.CANCELLED)
        if reply == "gap":
            # Redis came back without its last writes (AOF fsyncs once a second): what it holds
            # is consistent up to its checkpoint, so the next attempt resumes from there.
            return self.hand_back(
                "Redis lost the attempt's latest steps; resuming from its checkpoint"
            )
        if reply == "full":
            # Nothing of the flush was written; the steps since the checkpoint run again later.
            return self.hand_back(FULL)
        log.warning("%s stopped: a newer attempt owns the %s", self.name, self.what)
        return AttemptResult(Outcome.FENCED)

    def hand_back(self, why: str) -> AttemptResult:
        """Queue the job (or group) again, to resume from its checkpoint. The lease keeper
        stops first, and the release script ends this attempt's ownership: nothing of it
        renews, takes back or fails the job afterwards."""
        self.keeper.stop()
        queue = self.store.release_job(self.unit_id, self.attempt, f"requeued: {why}", self.worker)
        log.info("%s handed back: %s", self.name, why)
        if queue is None:
            return AttemptResult(Outcome.FENCED)
        if queue == "":
            return AttemptResult(Outcome.CANCELLED)
        return AttemptResult(Outcome.RELEASED, requeue_to=queue, reason=why)


def run_attempt(attempt: Attempt, device: torch.device) -> AttemptResult:
    """Run `attempt` on `device` to its end, whatever happens in it: every outcome is recorded
    on the job or group itself, and the worker survives what the attempt raised."""
    result = AttemptResult(Outcome.FAILED)
    try:
        result = attempt.run(device)
        return dataclasses.replace(
            result,
            steps=attempt.steps_run,
            loop_s=attempt.loop_s - attempt.result_s,
            stepper=attempt.stepper,
            result_s=attempt.result_s,
        )
    except StoreUnavailable:
        raise  # nothing can be recorded; the lease lapses and the reaper requeues the job
    except StorageFull:
        # Redis refused a write for memory outside a flush (a flush hands back by itself):
        # the job waits for room, like after a refused flush; it is never failed for it.
        result = attempt.hand_back(FULL)
        return result
    except Exception as exc:
        # Whatever the job did (bad record, out of memory, a bug), the worker survives it and
        # the job ends with the reason instead of staying `running` (unless this attempt
        # handed it back already: then it is not this attempt's to fail). A group's members
        # fail with it.
        log.exception("%s failed", attempt.name)
        error = f"{type(exc).__name__}: {exc}"
        attempt.store.fail_job(attempt.unit_id, attempt.attempt, error, attempt.worker)
        if result.outcome is Outcome.FAILED:
            result = AttemptResult(Outcome.FAILED, reason=error)
        return result
    finally:
        attempt.keeper.stop()
        # The script that ended the attempt cleared the worker's current job, unless a newer
        # attempt had the job (or Redis could not be reached).
        if result.outcome in (Outcome.FENCED, Outcome.FAILED):
            with contextlib.suppress(StoreUnavailable):
                attempt.store.clear_current_job(attempt.worker, attempt.unit_id)
