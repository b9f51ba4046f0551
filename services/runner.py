"""One attempt at a job: claim it, train, flush step chunks to the store, finish. No Celery here.

The step loop never waits on Redis per step: each step's record is written into a preallocated
buffer on the device, and the buffer is flushed as one chunk when it is full or when
`flush_interval_s` has passed. Each flush is one fenced script (Store.flush_steps) that appends
the chunk, writes the matching checkpoint and renews the lease; it is also where a cancel
request and a newer attempt are noticed. A thread renews the lease between flushes, so a step
longer than the lease does not lose the job.
"""

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

import torch
from pydantic import ValidationError

from services import metrics
from services.config import Settings
from services.environment import attempt_environment
from services.errors import StorageFull, StoreUnavailable
from services.logs import attempt_context
from services.queue import compiles, estimated_seconds
from services.records import Chunk, param_values, settle_validation
from services.schemas import AttemptEnvironment, JobSpec, JobStatus, StopSpec
from services.store import Checkpoint, Claim, Store
from services.store.sweeps import GROUP_SPEC_PREFIX
from services.training import (
    CompiledSteps,
    CudaGraphStep,
    DatasetCache,
    Layout,
    Trainer,
    fit_metrics,
    fit_quality,
    inductor_cache_counts,
    serialize_state,
    supports_compiled_steps,
    supports_cuda_graph,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Dataset = tuple[torch.Tensor, torch.Tensor]

# A chunk buffer holds at most this many bytes, so wide problems flush more often, not bigger.
CHUNK_BUDGET_BYTES = 8 * 1024 * 1024
# How long a flush keeps retrying while Redis is unreachable before the attempt gives up.
STORE_OUTAGE_S = 60.0
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
    # How the steps ran: `steps` steps in `loop_s` seconds (from the first step to the end of
    # the last flush, less `result_s`, the time the fit quality of the result took), eagerly
    # or by replaying a CUDA graph.
    steps: int = 0
    loop_s: float = 0.0
    stepper: str = "eager"
    result_s: float = 0.0


@dataclass(frozen=True)
class Recorded:
    """Rows `first .. first + len(rows) - 1` handed over for flushing, with the parameters
    after the last of them (the checkpoint). On a GPU both are copies into page-locked host
    memory that are still in flight until `ready` has passed."""

    rows: torch.Tensor  # (count, width), host memory
    theta: torch.Tensor  # (params,), host memory
    optimizer: dict[str, Any] | None  # Trainer.optimizer_snapshot(), host memory
    first: int
    ready: torch.cuda.Event | None  # None: nothing in flight (CPU)

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()

    @property
    def checkpoint(self) -> Checkpoint:
        """The state after the last row (only once `wait()` has returned)."""
        theta = self.theta.numpy().tobytes()
        return Checkpoint(self.first + len(self.rows), theta, serialize_state(self.optimizer))


class StepRecorder:
    """Two halves of one device-side buffer of step records: the step loop fills one half, a
    row per step, while the other is being flushed.

    An eager step writes into the row view `next_row()` gives; a captured CUDA graph writes at
    the device-side index `cursor` instead, and the loop calls `advance()`. On a GPU each half
    is copied out into page-locked host memory with a non-blocking copy when it is handed
    over, so the step loop never waits for the device.
    """

    def __init__(
        self, layout: Layout, max_steps: int, device: torch.device, first: int, block: int = 1
    ) -> None:
        """Room for `max_steps` rows (or the chunk budget), a whole number of `block`s, so that
        a compiled block never straddles two halves."""
        self.layout = layout
        rows = min(max_steps, CHUNK_BUDGET_BYTES // (4 * layout.width))
        self.capacity = max(block, rows // block * block)
        self.storage = torch.empty(2 * self.capacity, layout.width, device=device)
        self.cursor = torch.zeros((), dtype=torch.long, device=device)
        self._views = list(self.storage.unbind(0))  # made once: an eager step takes one each
        self._on_gpu = device.type == "cuda"
        if self._on_gpu:  # each half's host copy, and the parameters after its last step
            self._host_rows = torch.empty(2 * self.capacity, layout.width, pin_memory=True)
            self._host_theta = torch.empty(2, layout.params, pin_memory=True)
        self._offset = 0  # the active half's first row
        self.first = first  # step number of the active half's first row
        self.count = 0

    @property
    def full(self) -> bool:
        return self.count == self.capacity

    def next_row(self) -> torch.Tensor:
        row = self._views[self._offset + self.count]
        self.count += 1
        return row

    def advance(self, steps: int = 1) -> None:
        """Count `steps` rows that a graph or a compiled block wrote at `cursor`."""
        self.count += steps

    def swap(self, theta: torch.Tensor, optimizer: dict[str, Any] | None) -> Recorded | None:
        """Hand over the recorded rows, the parameters `theta` after the last of them and the
        optimizer's snapshot taken with them, and record into the other half from now on.
        Returns None if nothing was recorded."""
        if self.count == 0:
            return None
        rows = slice(self._offset, self._offset + self.count)
        ready: torch.cuda.Event | None = None
        if self._on_gpu:
            # Queued behind the steps that wrote the rows; the flusher thread waits for them.
            half = self._offset // self.capacity
            host_rows, host_theta = self._host_rows[rows], self._host_theta[half]
            host_rows.copy_(self.storage[rows], non_blocking=True)
            host_theta.copy_(theta.detach(), non_blocking=True)
            ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ready.record()
        else:
            # The rows are host memory already, and this half is not written again before
            # its flush is done (the loop waits for a flush before it hands over the next).
            host_rows, host_theta = self.storage[rows], theta.detach().clone()
        recorded = Recorded(host_rows, host_theta, optimizer, self.first, ready)
        self._offset = self.capacity - self._offset
        self.cursor.fill_(self._offset)
        self.first += self.count
        self.count = 0
        return recorded


@dataclass(frozen=True)
class Packed:
    chunk: Chunk
    diverged_at: int | None  # the first step whose loss or gradients are not finite
    last_loss: float


def pack(
    recorded: Recorded, layout: Layout, batches: int = 1, evaluation: tuple[int, int] = (0, 0)
) -> Packed:
    """The rows as one chunk, cut after the first non-finite step; `batches` per epoch;
    `evaluation` (every, last step) for a job with eval, whose rows end with the validation
    loss."""
    recorded.wait()
    host = recorded.rows
    if layout.evaluated:
        settle_validation(host[:, -1].numpy(), recorded.first, *evaluation)
    finite = torch.isfinite(host[:, : 1 + layout.params]).all(dim=1)
    diverged_at = None
    rows = len(host)
    if not bool(finite.all()):
        bad = int(torch.nonzero(~finite)[0, 0])
        diverged_at, rows = recorded.first + bad, bad + 1
    rows_bytes = host[:rows].numpy().tobytes()
    epochs = batches if batches > 1 else 0  # a full-batch job's records carry no epoch
    chunk = Chunk(
        recorded.first,
        rows,
        layout.features,
        layout.bias,
        rows_bytes,
        epochs,
        layout.explain_samples,
        layout.evaluated,
    )
    return Packed(chunk, diverged_at, float(host[rows - 1, 0]))


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


class StopRule:
    """A job's stop rules (`spec.stop`), checked after each step. The tolerances read the
    step's record row, on the host (a GPU job with a tolerance syncs once per step)."""

    def __init__(
        self, stop: StopSpec, started_at: float, trainer: Trainer, previous_loss: float | None
    ) -> None:
        """`previous_loss`: the loss of the step before the first this attempt runs (from the
        checkpoint), so that a resumed job stops where an uninterrupted one would."""
        self.stop = stop
        self.deadline = None if stop.max_seconds is None else started_at + stop.max_seconds
        self.params = trainer.layout.params
        self.previous_loss = previous_loss

    def check(self, step: int, row: torch.Tensor | None) -> str | None:
        """Why the job stops after `step`, or None to go on."""
        stop = self.stop
        if row is not None and stop.tol_loss is not None:
            loss = float(row[0])
            previous, self.previous_loss = self.previous_loss, loss
            if previous is not None and abs(loss - previous) < stop.tol_loss:
                change = abs(loss - previous)
                return (
                    f"tol_loss: the loss changed by {change:.3g} (< {stop.tol_loss}) at step {step}"
                )
        if row is not None and stop.tol_grad is not None:
            norm = float(row[1 : 1 + self.params].norm())
            if norm < stop.tol_grad:
                return (
                    f"tol_grad: the gradient norm was {norm:.3g} (< {stop.tol_grad}) at step {step}"
                )
        if self.deadline is not None and time.time() >= self.deadline:
            return f"max_seconds: {stop.max_seconds} s had passed at step {step}"
        return None


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


def warm_compiled(settings: Settings) -> list[str]:
    """Compile the blocks of the shapes in `settings.compile_warm_shapes` ("1x1,1000x10+b":
    samples x features, +b with a bias) in this process, with the recorder a job of each
    shape gets, so that such jobs start at once. The shapes done."""
    block, done = settings.compile_block_steps, []
    for shape in filter(None, (s.strip() for s in settings.compile_warm_shapes.split(","))):
        size, bias = shape.removesuffix("+b"), shape.endswith("+b")
        n, d = (int(v) for v in size.split("x"))
        spec = JobSpec.model_validate(
            {"data": {"synthetic": {"n": n, "d": d}}, "bias": bias, "steps": block}
        )
        trainer = Trainer(spec, torch.device("cpu"))
        cpu = torch.device("cpu")
        recorder = StepRecorder(trainer.layout, settings.flush_max_steps, cpu, 0, block)
        CompiledSteps(trainer, recorder.storage, recorder.cursor, block)
        done.append(shape)
    return done


def retry_through_outage(write: Callable[[], T], what: str) -> T:
    """`write()`, retried while Redis is unreachable (it restarts, say) for up to
    STORE_OUTAGE_S: the steps it carries are not lost, only late. A flush script recognises a
    retry of a flush it applied, so retrying is safe."""
    deadline = time.monotonic() + STORE_OUTAGE_S
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


def hand_back(
    store: Store, keeper: LeaseKeeper, unit_id: str, attempt: int, worker: str, why: str
) -> AttemptResult:
    """Queue a job (or a sweep's group) again, to resume from its checkpoint. The lease
    keeper stops first, and the release script ends this attempt's ownership: nothing of it
    renews, takes back or fails the job afterwards."""
    keeper.stop()
    queue = store.release_job(unit_id, attempt, f"requeued: {why}", worker)
    log.info("%s attempt %d handed back: %s", unit_id, attempt, why)
    if queue is None:
        return AttemptResult(Outcome.FENCED)
    if queue == "":
        return AttemptResult(Outcome.CANCELLED)
    return AttemptResult(Outcome.RELEASED, requeue_to=queue, reason=why)


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
    try:
        claim = store.claim_job(job_id, worker, settings.lease_s, settings.max_attempts)
    except StorageFull:
        # The job stays queued; the reaper's orphan check sends it again once Redis has room.
        log.warning("job %s not claimed: Redis is full", job_id)
        return AttemptResult(Outcome.SKIPPED)
    if claim.outcome != "claimed":
        log.info("job %s not run: %s %s", job_id, claim.outcome, claim.status)
        return AttemptResult(Outcome.SKIPPED)
    with attempt_context(job_id, claim.attempt):
        if claim.spec_json.startswith(GROUP_SPEC_PREFIX):
            # A sweep's group: its members train together. Imported here, as the group
            # runner builds on this module's attempt machinery (LeaseKeeper, AttemptResult).
            from services.group_runner import run_group

            result = run_group(store, job_id, claim, worker, device, settings, drain)
        else:
            result = _run_attempt(store, job_id, worker, device, settings, drain, claim)
    metrics.JOBS.labels(result.outcome.value).inc()
    return result


def _run_attempt(
    store: Store,
    job_id: str,
    worker: str,
    device: torch.device,
    settings: Settings,
    drain: threading.Event | None,
    claim: Claim,
) -> AttemptResult:
    attempt = _Attempt(store, job_id, claim.attempt, worker, settings, drain or threading.Event())
    result = AttemptResult(Outcome.FAILED)
    try:
        result = attempt.run(claim.spec_json, claim.checkpoint, device, claim.stepper)
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
        # handed it back already: then it is not this attempt's to fail).
        log.exception("job %s attempt %d failed", job_id, claim.attempt)
        error = f"{type(exc).__name__}: {exc}"
        store.fail_job(job_id, claim.attempt, error, worker)
        if result.outcome is Outcome.FAILED:
            result = AttemptResult(Outcome.FAILED, reason=error)
        return result
    finally:
        attempt.keeper.stop()
        # The script that ended the attempt cleared the worker's current job, unless a newer
        # attempt had the job (or Redis could not be reached).
        if result.outcome in (Outcome.FENCED, Outcome.FAILED):
            with contextlib.suppress(StoreUnavailable):
                store.clear_current_job(worker, job_id)


@dataclass(frozen=True)
class Flushed:
    """What a flush script answered (`ok`, `finished`, `cancelled`, `fenced`, `gap`, or
    `full`: Redis refused it for memory), and for a finishing flush whether the job diverged."""

    reply: str
    diverged: str | None = None  # the error naming the first non-finite step


class _Attempt:
    """The step loop of one attempt, on one thread of control: claim (done by run_job), set
    up, run steps, flush chunks, and finish or hand the job back.

    Chunks are packed and flushed on a thread of their own, one at a time, while the loop
    records into the other buffer; the loop reads a flush's reply when it hands over the next
    chunk (so it never waits on Redis unless a flush takes longer than a whole chunk of
    steps), and it alone decides what a reply means: go on, stop, or hand the job back."""

    def __init__(
        self,
        store: Store,
        job_id: str,
        attempt: int,
        worker: str,
        settings: Settings,
        drain: threading.Event,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.attempt = attempt
        self.worker = worker
        self.settings = settings
        # Started once the attempt knows its job is long enough to need one (`_keep_lease`).
        self.keeper = LeaseKeeper(
            store, job_id, attempt, settings.lease_s, self.progress, settings.attempt_stall_s
        )
        self.drain = drain
        self.last_loss: float | None = None
        self._flushing: concurrent.futures.Future[Flushed] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, f"flush-{job_id}")
        self.recorder: StepRecorder | None = None
        self.steps_run, self.loop_s, self.stepper, self.result_s = 0, 0.0, "eager", 0.0
        self.environment: AttemptEnvironment | None = None  # sent with the first flush

    def progress(self) -> int:
        """Steps recorded so far (read by the lease keeper's thread; -1 while setting up)."""
        recorder = self.recorder
        return -1 if recorder is None else recorder.first + recorder.count

    def run(
        self,
        spec_json: str,
        checkpoint: Checkpoint | None,
        device: torch.device,
        recorded: str | None = None,
    ) -> AttemptResult:
        """Run the attempt; `recorded` is the stepper an earlier attempt recorded, if any."""
        try:
            spec = JobSpec.model_validate_json(spec_json)
        except ValidationError as exc:
            error = f"invalid job record: {exc.error_count()} error(s): {exc}"
            self.store.fail_job(self.job_id, self.attempt, error, self.worker)
            return AttemptResult(Outcome.FAILED, reason=error)
        self._keep_lease(spec, device, recorded)
        data, validation = uploaded_data(self.store, spec, device, self.settings)
        trainer = Trainer(spec, device, data, validation)
        start = 0
        if checkpoint is not None:
            trainer.load_state(checkpoint.theta, checkpoint.optimizer, checkpoint.step)
            start = checkpoint.step
            self.last_loss = checkpoint.loss
        self.layout, self.batches = trainer.layout, trainer.batches_per_epoch
        self.evaluation = (trainer.eval_every, trainer.last_step)
        # The stepper the job's first attempt recorded is every later attempt's, whatever
        # this worker's cost model says: a resumed job then rounds as its first attempt did.
        kind = recorded or self._stepper_kind(spec, trainer, spec.steps - start)
        block = self.settings.compile_block_steps if kind == "compiled" else 1
        # No more rows than the attempt has steps (a short job should not pay for 2 x 4096),
        # but for compiled blocks: their code is specialised to the buffer's shape, which
        # must then depend on the problem's shape only, so that one compile serves all jobs.
        rows = self.settings.flush_max_steps
        if block == 1:
            rows = min(rows, spec.steps - start)
        recorder = self.recorder = StepRecorder(trainer.layout, rows, device, start, block)
        fast, self.stepper = self._fast_steps(kind, spec, trainer, recorder, spec.steps - start)
        self.environment = attempt_environment(self.attempt, device, self.stepper, self.worker)
        log.info(
            "job %s attempt %d: steps %d..%d on %s (%s)",
            self.job_id,
            self.attempt,
            start,
            spec.steps - 1,
            device,
            self.stepper,
        )
        started = time.perf_counter()
        try:
            return self._loop(spec, trainer, recorder, fast, start)
        finally:
            self._executor.shutdown(wait=True)
            self.loop_s = time.perf_counter() - started
            self.steps_run = recorder.first + recorder.count - start

    def _keep_lease(self, spec: JobSpec, device: torch.device, recorded: str | None) -> None:
        """Start the lease keeper before anything that takes time (loading a dataset,
        compiling), unless the job is tutorial-sized: no dataset to load, nothing to compile,
        and the cost model expects all its steps to take less than a third of the lease. Such
        a job's final flush comes long before the lease needs renewing, and one that takes
        longer after all is safe anyway (if the reaper requeued it, its flush takes it back)."""
        settings = self.settings
        # The dataset test first: a dataset's shape, which the cost model reads, is known only
        # once it is loaded.
        if spec.data.dataset_id is None and not (
            device.type == "cpu" and (recorded == "compiled" or compiles(spec, settings))
        ):
            kind = "cpu" if device.type == "cpu" else "cuda"
            elements = spec.data.samples * spec.data.features
            if estimated_seconds(kind, elements, spec.steps, settings) < settings.lease_s / 3:
                return
        self.keeper.start()

    def _stepper_kind(self, spec: JobSpec, trainer: Trainer, steps: int) -> str:
        """The cost model's stepper, for a job no attempt has recorded one for: a CUDA graph
        where that pays (a GPU, `steps` enough), compiled blocks where they repay their
        compile over the whole job's steps (the CPU), else eager."""
        settings = self.settings
        graph_pays = settings.cuda_graphs and steps >= settings.cuda_graph_min_steps
        if graph_pays and self._can_run("cuda-graph", spec, trainer):
            return "cuda-graph"
        if compiles(spec, settings) and self._can_run("compiled", spec, trainer):
            return "compiled"
        return "eager"

    def _can_run(self, kind: str, spec: JobSpec, trainer: Trainer) -> bool:
        """Whether the job's steps can run as `kind` here: a CUDA graph on a GPU, compiled
        blocks on the CPU, neither with a tolerance to check (that reads each step's row on
        the host, and a block runs past the step that would stop it)."""
        if kind == "eager":
            return True
        if spec.stop is not None and (spec.stop.tol_loss or spec.stop.tol_grad):
            return False
        if kind == "cuda-graph":
            return supports_cuda_graph(trainer)
        return kind == "compiled" and supports_compiled_steps(trainer)

    def _fast_steps(
        self, kind: str, spec: JobSpec, trainer: Trainer, recorder: StepRecorder, steps: int
    ) -> tuple[CudaGraphStep | CompiledSteps | None, str]:
        """What runs the `steps` left as `kind` (None: eager steps), and the stepper the
        attempt then runs: eager, with a warning, where `kind` cannot run here or its capture
        or compile fails. A compiled job with less than a block left runs its eager tail as
        an uninterrupted one does, compiling nothing."""
        if kind == "eager":
            return None, kind
        if not self._can_run(kind, spec, trainer):
            log.warning("job %s: %s steps cannot run here; eager steps", self.job_id, kind)
            return None, "eager"
        fast: CudaGraphStep | CompiledSteps | None
        if kind == "cuda-graph":
            fast = self._capture(trainer, recorder)
        elif steps < self.settings.compile_block_steps:
            return None, kind
        else:
            fast = self._compile(trainer, recorder, self.settings.compile_block_steps)
        return fast, "eager" if fast is None else kind

    def _compile(
        self, trainer: Trainer, recorder: StepRecorder, block: int
    ) -> CompiledSteps | None:
        """Compiled blocks of steps, or None (eager steps) if compiling fails."""
        hits, misses = inductor_cache_counts()
        started = time.perf_counter()
        try:
            compiled = CompiledSteps(trainer, recorder.storage, recorder.cursor, block)
        except Exception:
            log.warning(
                "job %s: compiling the step failed; eager steps", self.job_id, exc_info=True
            )
            return None
        new_hits, new_misses = inductor_cache_counts()
        log.info(
            "job %s: compiled step (blocks of %d) ready in %.2f s (Inductor cache: %d hit(s), "
            "%d miss(es))",
            self.job_id,
            block,
            time.perf_counter() - started,
            new_hits - hits,
            new_misses - misses,
        )
        return compiled

    def _capture(self, trainer: Trainer, recorder: StepRecorder) -> CudaGraphStep | None:
        """The step as a CUDA graph, or None (eager steps) if the capture fails."""
        try:
            return CudaGraphStep(trainer, recorder.storage, recorder.cursor)
        except RuntimeError:
            log.warning(
                "job %s: CUDA graph capture failed; eager steps", self.job_id, exc_info=True
            )
            return None

    def _loop(
        self,
        spec: JobSpec,
        trainer: Trainer,
        recorder: StepRecorder,
        fast: CudaGraphStep | CompiledSteps | None,
        start: int,
    ) -> AttemptResult:
        interval = self.settings.flush_interval_s
        last_flush = time.perf_counter()
        rule = None
        if spec.stop is not None:
            rule = StopRule(spec.stop, self._started_at(), trainer, self.last_loss)
        reason = f"ran all {spec.steps} steps"
        step = start  # the next step to run
        while step < spec.steps:
            row = None
            if fast is not None and spec.steps - step >= fast.block:
                # A graph or a compiled block writes its rows at recorder.cursor itself.
                fast.replay()
                recorder.advance(fast.block)
                step += fast.block
            else:  # eager, and a compiled job's last steps short of a block
                row = recorder.next_row()
                trainer.step(row)
                step += 1
            if rule is not None and (why := rule.check(step - 1, row)):
                reason = why
                break
            # After the last step the final flush below carries the rows: one script, not two.
            if step == spec.steps:
                break
            if recorder.full or time.perf_counter() - last_flush >= interval:
                if stopped := self._previous_flush():
                    return stopped
                recorded = recorder.swap(trainer.theta, trainer.optimizer_snapshot())
                if self.drain.is_set():
                    return self._outcome(self._flush(recorded)) or self.hand_back(
                        "its worker is shutting down"
                    )
                context = contextvars.copy_context()  # the flush logs with the job's ids
                self._flushing = self._executor.submit(context.run, self._flush, recorded)
                last_flush = time.perf_counter()

        if stopped := self._previous_flush():
            return stopped
        # The last chunk (at least the last step) and the finish go in one flush.
        recorded = recorder.swap(trainer.theta, trainer.optimizer_snapshot())
        params = trainer.params().cpu().tolist()
        started = time.perf_counter()
        quality = fit_quality(trainer, spec)
        theta = trainer.params()
        quality.update(fit_metrics((trainer.x, trainer.y), trainer.val, theta, spec.bias))
        self.result_s = time.perf_counter() - started
        result = {
            "params": param_values(params, trainer.layout.features, spec.bias),
            "stopped": reason,
            "stepper": self.stepper,
            **quality,
        }
        return self._outcome(self._flush(recorded, result)) or AttemptResult(Outcome.SUCCEEDED)

    def _started_at(self) -> float:
        """When the job's first attempt started (epoch seconds): max_seconds counts from it."""
        started = self.store.job_fields(self.job_id).get(b"started_at")
        return datetime.fromisoformat(started.decode()).timestamp() if started else time.time()

    def _previous_flush(self) -> AttemptResult | None:
        """Wait for the flush in flight, if any: an AttemptResult if the attempt must stop."""
        if self._flushing is None:
            return None
        flushed = self._flushing.result()  # re-raises what the flush raised
        self._flushing = None
        return self._outcome(flushed)

    def _outcome(self, flushed: Flushed) -> AttemptResult | None:
        """What a flush's reply means for the attempt: None to go on, else how it ended."""
        reply = flushed.reply
        if reply == "ok":
            return None
        if reply == "finished":
            log.info(
                "job %s attempt %d %s", self.job_id, self.attempt, flushed.diverged or "succeeded"
            )
            if flushed.diverged:
                return AttemptResult(Outcome.DIVERGED, reason=flushed.diverged)
            return AttemptResult(Outcome.SUCCEEDED)
        if reply == "cancelled":
            log.info("job %s attempt %d cancelled", self.job_id, self.attempt)
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
        log.warning(
            "job %s attempt %d stopped: a newer attempt owns the job", self.job_id, self.attempt
        )
        return AttemptResult(Outcome.FENCED)

    def _flush(self, recorded: Recorded | None, result: dict[str, Any] | None = None) -> Flushed:
        """Pack and flush recorded rows (with `result`, finish the job), on whichever thread
        calls it; the caller decides what the reply means (`_outcome`)."""
        if self.keeper.lost.is_set():
            return Flushed("fenced")
        chunk, checkpoint, status, error = None, None, None, None
        if recorded is not None:
            packed = pack(recorded, self.layout, self.batches, self.evaluation)
            chunk = packed.chunk
            self.last_loss = packed.last_loss
            checkpoint = dataclasses.replace(recorded.checkpoint, loss=packed.last_loss)
            if packed.diverged_at is not None:
                status, result = JobStatus.DIVERGED, None
                error = f"diverged at step {packed.diverged_at}: loss or gradients are not finite"
        if status is None and result is not None:
            status = JobStatus.SUCCEEDED
            result["loss"] = self.last_loss
        # Flushes run one at a time: the first takes the attempt's environment along.
        environment, self.environment = self.environment, None
        started = time.perf_counter()
        try:
            reply = self._flush_with_retry(chunk, checkpoint, status, result, error, environment)
        except StorageFull:
            log.warning(
                "job %s attempt %d: flush refused, Redis is full", self.job_id, self.attempt
            )
            return Flushed("full")
        metrics.FLUSH_SECONDS.observe(time.perf_counter() - started)
        if chunk is not None:
            metrics.STEPS.inc(chunk.count)
            metrics.FLUSHES.inc()
        return Flushed(reply, error)

    def _flush_with_retry(
        self,
        chunk: Chunk | None,
        checkpoint: Checkpoint | None,
        finish: JobStatus | None,
        result: dict[str, Any] | None,
        error: str | None,
        environment: AttemptEnvironment | None,
    ) -> str:
        return retry_through_outage(
            lambda: self.store.flush_steps(
                self.job_id,
                self.attempt,
                chunk,
                checkpoint,
                self.settings.lease_s,
                finish=finish,
                result=result,
                error=error,
                worker=self.worker,
                environment=environment,
            ),
            f"job {self.job_id} attempt {self.attempt}",
        )

    def hand_back(self, why: str) -> AttemptResult:
        """Queue the job again to resume from its checkpoint (`hand_back`)."""
        return hand_back(self.store, self.keeper, self.job_id, self.attempt, self.worker, why)
