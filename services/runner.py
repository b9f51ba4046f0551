"""One attempt at a job: claim it, train, flush step chunks to the store, finish. No Celery here.

The step loop never waits on Redis per step: each step's record is written into a preallocated
buffer on the device, and the buffer is flushed as one chunk when it is full or when
`flush_interval_s` has passed. Each flush is one fenced script (Store.flush_steps) that appends
the chunk, writes the matching checkpoint and renews the lease; it is also where a cancel
request and a newer attempt are noticed. A thread renews the lease between flushes, so a step
longer than the lease does not lose the job.
"""

import concurrent.futures
import contextvars
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch
from pydantic import ValidationError

from services import metrics
from services.attempts import (
    CHUNK_BUDGET_BYTES,
    Attempt,
    AttemptResult,
    Outcome,
    choose_stepper,
    diverged_error,
    finished_result,
    make_fast,
    note_recent_shape,
    run_attempt,
    uploaded_data,
)
from services.config import Settings
from services.errors import StorageFull
from services.group_runner import GroupAttempt, warm_group_block
from services.logs import attempt_context
from services.queue import estimated_seconds
from services.records import (
    Chunk,
    finite_steps,
    first_not_finite,
    settle_validation,
    sparse_rows,
)
from services.schemas import JobSpec, JobStatus, StopSpec
from services.store import Checkpoint, Claim, SentFlush, Store
from services.store.sweeps import GROUP_SPEC_PREFIX
from services.training import (
    CompiledSteps,
    CudaGraphStep,
    FitReference,
    Layout,
    Trainer,
    block_shape,
    parse_shape,
    recent_shapes,
    recent_shapes_file,
    serialize_state,
    supports_compiled_steps,
    supports_cuda_graph,
)

log = logging.getLogger(__name__)


# Row views made at a time (StepRecorder.next_row): one call for a block instead of one per step.
VIEWS_BLOCK = 256


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
        # An eager step's row views, made as first needed and then reused by each chunk of the
        # half: a chunk flushed by time holds far fewer rows than its capacity (4 096), and
        # making all 8 192 views up front cost 2 % of a 10 000-step job.
        self._views: list[torch.Tensor | None] = [None] * (2 * self.capacity)
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
        index = self._offset + self.count
        row = self._views[index]
        if row is None:
            row = self._make_views(index)
        self.count += 1
        return row

    def _make_views(self, index: int) -> torch.Tensor:
        """The views of rows `index` on, a block of them (to the end of the half at most), and
        the first of them."""
        end = min(index + VIEWS_BLOCK, self._offset + self.capacity)
        views = self.storage[index:end].unbind(0)
        self._views[index:end] = views
        return views[0]

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
    recorded: Recorded,
    layout: Layout,
    batches: int = 1,
    evaluation: tuple[int, int] = (0, 0),
    every: int = 1,
    last: bool = False,
) -> Packed:
    """The rows as one chunk, cut after the first non-finite step; `batches` per epoch;
    `evaluation` (every, last step) for a job with eval, whose rows end with the validation
    loss. With record.every `every` > 1 the chunk is sparse (services/records.py): the device
    wrote full rows, and only here, on the host, are the gradients and parameters of the
    steps not kept left out; `last`: the rows end the job (its last row keeps them too, as a
    diverged step's does)."""
    recorded.wait()
    host = recorded.rows
    if layout.evaluated:
        settle_validation(host[:, -1].numpy(), recorded.first, *evaluation)
    diverged_at = None
    rows = len(host)
    bad = first_not_finite(finite_steps(host.numpy(), layout.params))
    if bad is not None:
        diverged_at, rows = recorded.first + bad, bad + 1
    ends = last or diverged_at is not None
    rows_bytes = sparse_rows(host[:rows].numpy(), recorded.first, every, layout.evaluated, ends)
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
        every,
    )
    return Packed(chunk, diverged_at, float(host[rows - 1, 0]))


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


def shapes_to_warm(settings: Settings) -> list[str]:
    """The shapes a pool process compiles when it starts: GRADSTREAM_COMPILE_WARM_SHAPES,
    then the `compile_recent_shapes` latest shapes this worker's cache has seen, once each."""
    shapes = [s.strip() for s in settings.compile_warm_shapes.split(",") if s.strip()]
    if settings.compile_recent_shapes:
        recent = recent_shapes(recent_shapes_file(settings.compile_cache_dir))
        shapes += recent[: settings.compile_recent_shapes]
    return list(dict.fromkeys(shapes))


def warm_compiled(settings: Settings, shapes: list[str] | None = None) -> list[str]:
    """Compile the blocks of `shapes` (by default `shapes_to_warm`: "1x1", "1000x10+b+v200",
    "1000x10+bs100+adam": samples x features, +b with a bias, +vN with N validation rows, +bsN
    mini-batches of N rows, the update unless plain SGD; "1000x10+group": a sweep group's
    block) in this process, with the recorder a job (or a group) of each shape gets, so that
    such jobs start at once and the cost model counts their compile as done. The shapes done;
    one that fails is logged and skipped."""
    block, done = settings.compile_block_steps, []
    cpu = torch.device("cpu")
    for text in shapes_to_warm(settings) if shapes is None else shapes:
        try:
            shape = parse_shape(text, block)
            samples, features, validation = shape.samples, shape.features, shape.validation
            optimizer: dict[str, Any] = {"name": shape.update}
            if shape.update in ("momentum", "nesterov"):  # any momentum: it is a tensor
                optimizer = {"name": "sgd", "momentum": 0.9, "nesterov": shape.update != "momentum"}
            fields: dict[str, Any] = {
                "data": {"synthetic": {"n": samples, "d": features}},
                "bias": shape.bias,
                "optimizer": optimizer,
                "batch_size": shape.batch or None,
                "steps": block,
            }
            if validation:  # an explicit validation set of that many rows
                zeros = {"x": [[0.0] * features] * validation, "y": [0.0] * validation}
                fields["eval"] = {"data": zeros}
            spec = JobSpec.model_validate(fields)
            if shape.group:
                warm_group_block(spec, settings)
                done.append(text.strip())
                continue
            trainer = Trainer(spec, cpu)
            recorder = StepRecorder(trainer.layout, settings.flush_max_steps, cpu, 0, block)
            CompiledSteps(trainer, recorder.storage, recorder.cursor, block)
        except Exception:
            log.warning("compiling the steps of shape %r failed; skipped", text, exc_info=True)
            continue
        done.append(text.strip())
    return done


def run_job(
    store: Store,
    job_id: str,
    worker: str,
    device: torch.device,
    settings: Settings,
    drain: threading.Event | None = None,
) -> AttemptResult:
    """Claim `job_id` (a job, or a sweep's group: the same message, the same scripts) and run
    one attempt of it on `device` until it ends, or until `drain` is set (then it is
    checkpointed and handed back). Every outcome is recorded on the job itself."""
    try:
        claim = store.claim_job(job_id, worker, settings.lease_s, settings.max_attempts)
    except StorageFull:
        # The job stays queued; the reaper's orphan check sends it again once Redis has room.
        log.warning("job %s not claimed: Redis is full", job_id)
        return AttemptResult(Outcome.SKIPPED)
    if claim.outcome != "claimed":
        log.info("job %s not run: %s %s", job_id, claim.outcome, claim.status)
        return AttemptResult(Outcome.SKIPPED)
    kind = GroupAttempt if claim.spec_json.startswith(GROUP_SPEC_PREFIX) else JobAttempt
    with attempt_context(job_id, claim.attempt):
        attempt = kind(store, job_id, claim, worker, settings, drain or threading.Event())
        result = run_attempt(attempt, device)
    metrics.JOBS.labels(result.outcome.value).inc()
    return result


@dataclass(frozen=True)
class Flushed:
    """What a flush script answered (`ok`, `finished`, `cancelled`, `fenced`, `gap`, or
    `full`: Redis refused it for memory), and for a finishing flush whether the job diverged."""

    reply: str
    diverged: str | None = None  # the error naming the first non-finite step


class JobAttempt(Attempt):
    """The step loop of one attempt of a job, on one thread of control: set up, run steps,
    flush chunks, and finish or hand the job back.

    Chunks are flushed one at a time while the loop records into the other buffer; the loop
    reads a flush's reply when it hands over the next chunk (so it never waits on Redis unless
    a flush takes longer than a whole chunk of steps), and it alone decides what a reply
    means: go on, stop, or hand the job back. On the CPU the loop packs a chunk and sends its
    script itself, without waiting for the reply (Store.send_flush_steps): a flush thread that
    waited for Redis would take the GIL back from the loop after each reply, and the loop
    lost 20 % of its steps to that convoy (bench/RESULTS.md, issue 23). On a GPU a flush
    thread packs and flushes, since packing waits for the rows' copy from the device."""

    def __init__(
        self,
        store: Store,
        job_id: str,
        claim: Claim,
        worker: str,
        settings: Settings,
        drain: threading.Event,
    ) -> None:
        super().__init__(store, job_id, claim, worker, settings, drain)
        self.job_id = job_id
        self.last_loss: float | None = None
        self._flushing: Callable[[], Flushed] | None = None  # reads the reply of the flush sent
        self._unread: SentFlush | None = None  # the script sent whose reply is not read yet
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None  # a GPU's flusher
        self.recorder: StepRecorder | None = None

    def progress(self) -> int:
        recorder = self.recorder
        return -1 if recorder is None else recorder.first + recorder.count

    def run(self, device: torch.device) -> AttemptResult:
        """Run the attempt from the claim's checkpoint; the stepper is the one an earlier
        attempt recorded, if any."""
        self.device = device
        if device.type == "cuda":
            self._executor = concurrent.futures.ThreadPoolExecutor(1, f"flush-{self.job_id}")
        checkpoint, recorded = self.claim.checkpoint, self.claim.stepper
        try:
            spec = JobSpec.model_validate_json(self.claim.spec_json)
        except ValidationError as exc:
            error = f"invalid job record: {exc.error_count()} error(s): {exc}"
            self.store.fail_job(self.job_id, self.attempt, error, self.worker)
            return AttemptResult(Outcome.FAILED, reason=error)
        validation_set = spec.eval.data if spec.eval is not None else None
        if spec.data.dataset_id is not None or (validation_set and validation_set.dataset_id):
            self.keeper.start()  # loading a dataset takes time: leased from now on
        data, validation = uploaded_data(self.store, spec, device, self.settings)
        trainer = Trainer(spec, device, data, validation)
        start = 0
        if checkpoint is not None:
            trainer.load_state(checkpoint.theta, checkpoint.optimizer, checkpoint.step)
            start = checkpoint.step
            self.last_loss = checkpoint.loss
        self.layout, self.batches = trainer.layout, trainer.batches_per_epoch
        self.evaluation = (trainer.eval_every, trainer.last_step)
        self.every = spec.record.every
        # The stepper the job's first attempt recorded is every later attempt's, whatever
        # this worker's cost model says: a resumed job then rounds as its first attempt did.
        kind = recorded or self._stepper_kind(spec, trainer, spec.steps - start)
        self._keep_lease(spec, device, kind)
        block = self.settings.compile_block_steps if kind == "compiled" else 1
        # No more rows than the attempt has steps (a short job should not pay for 2 x 4096),
        # but for compiled blocks: their code is specialised to the buffer's shape, which
        # must then depend on the problem's shape only, so that one compile serves all jobs.
        rows = self.settings.flush_max_steps
        if block == 1:
            rows = min(rows, spec.steps - start)
        recorder = self.recorder = StepRecorder(trainer.layout, rows, device, start, block)
        fast, self.stepper = self._fast_steps(kind, spec, trainer, recorder, spec.steps - start)
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
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            if self._unread is not None:  # the attempt ended by an error, before the reply
                self._unread.close()
            self.loop_s = time.perf_counter() - started
            self.steps_run = recorder.first + recorder.count - start

    def _keep_lease(self, spec: JobSpec, device: torch.device, kind: str) -> None:
        """Start the lease keeper (if a dataset's load has not) before the steps and anything
        else that takes time (compiling), unless the job is tutorial-sized: nothing to compile,
        and the cost model expects all its steps to take less than a third of the lease. Such
        a job's final flush comes long before the lease needs renewing, and one that takes
        longer after all is safe anyway (if the reaper requeued it, its flush takes it back).
        `kind` is the stepper the attempt runs: chosen knowing where a compiled block is found
        (`compiled_at`), or recorded by the first attempt."""
        if self.keeper.started:
            return
        settings = self.settings
        if kind != "compiled":
            device_kind = "cpu" if device.type == "cpu" else "cuda"
            elements = spec.data.samples * spec.data.features
            if (
                estimated_seconds(device_kind, elements, spec.steps, settings)
                < settings.lease_s / 3
            ):
                return
        self.keeper.start()

    def _stepper_kind(self, spec: JobSpec, trainer: Trainer, steps: int) -> str:
        """The cost model's stepper (`choose_stepper`) for a job no attempt has recorded one
        for; `steps`: those left. A job that could run compiled puts its shape first among
        the worker's recent shapes, which its next start compiles."""
        can_compile = self._can_run("compiled", spec, trainer)
        shape = block_shape(trainer, self.settings.compile_block_steps)
        if can_compile and spec.steps >= self.settings.compile_block_steps:
            note_recent_shape(self.settings, shape)
        return choose_stepper(
            spec,
            self.settings,
            steps,
            self._can_run("cuda-graph", spec, trainer),
            can_compile,
            shape=shape,
        )

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
        block = self.settings.compile_block_steps
        if kind == "compiled" and steps < block:
            return None, kind
        fast: CudaGraphStep | CompiledSteps | None
        if kind == "cuda-graph":
            fast = make_fast(
                self.name, kind, lambda: CudaGraphStep(trainer, recorder.storage, recorder.cursor)
            )
        else:
            fast = make_fast(
                self.name,
                kind,
                lambda: CompiledSteps(trainer, recorder.storage, recorder.cursor, block),
            )
        return fast, "eager" if fast is None else kind

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
                self._hand_over(recorded)
                last_flush = time.perf_counter()

        if stopped := self._previous_flush():
            return stopped
        # The last chunk (at least the last step) and the finish go in one flush.
        recorded = recorder.swap(trainer.theta, trainer.optimizer_snapshot())
        started = time.perf_counter()
        reference = FitReference(trainer.x, trainer.y, spec, trainer.val)
        layout = trainer.layout
        theta = trainer.params()
        result = finished_result(reference, theta, layout.features, spec.bias, reason, self.stepper)
        self.result_s = time.perf_counter() - started
        return self._outcome(self._flush(recorded, result)) or AttemptResult(Outcome.SUCCEEDED)

    def _started_at(self) -> float:
        """When the job's first attempt started (epoch seconds): max_seconds counts from it."""
        started = self.store.job_fields(self.job_id).get(b"started_at")
        return datetime.fromisoformat(started.decode()).timestamp() if started else time.time()

    def _hand_over(self, recorded: Recorded | None) -> None:
        """Start flushing `recorded`; the loop reads the reply at its next hand-over
        (`_previous_flush`)."""
        if self._executor is None:
            self._flushing = self._send(recorded)
            return
        context = contextvars.copy_context()  # the flush logs with the job's ids
        self._flushing = self._executor.submit(context.run, self._flush, recorded).result

    def _previous_flush(self) -> AttemptResult | None:
        """The reply of the flush in flight, if any (waiting for it if it has not come yet):
        an AttemptResult if the attempt must stop."""
        if self._flushing is None:
            return None
        flushed = self._flushing()  # raises what the flush raised
        self._flushing = None
        return self._outcome(flushed)

    def _outcome(self, flushed: Flushed) -> AttemptResult | None:
        """What a flush's reply means for the attempt (`ended_by`); a finishing flush of
        steps that diverged ends it diverged."""
        if flushed.reply == "finished" and flushed.diverged:
            log.info("%s diverged: %s", self.name, flushed.diverged)
            return AttemptResult(Outcome.DIVERGED, reason=flushed.diverged)
        return self.ended_by(flushed.reply)

    def _flush(self, recorded: Recorded | None, result: dict[str, Any] | None = None) -> Flushed:
        """Pack and flush recorded rows (with `result`, finish the job), and wait for the reply,
        on whichever thread calls it; the caller decides what the reply means (`_outcome`)."""
        return self._send(recorded, result)()

    def _send(
        self, recorded: Recorded | None, result: dict[str, Any] | None = None
    ) -> Callable[[], Flushed]:
        """Pack recorded rows (with `result`, finish the job) and send their flush script
        without waiting for Redis: what it returns reads the reply (retried through an outage:
        `Attempt.write`)."""
        if self.keeper.lost.is_set():
            return lambda: Flushed("fenced")
        started = time.perf_counter()
        chunk, checkpoint, status, error = None, None, None, None
        if recorded is not None:
            # A finishing flush's rows end the job: its last step keeps its gradients.
            packed = pack(
                recorded, self.layout, self.batches, self.evaluation, self.every, result is not None
            )
            chunk = packed.chunk
            self.last_loss = packed.last_loss
            checkpoint = dataclasses.replace(recorded.checkpoint, loss=packed.last_loss)
            if packed.diverged_at is not None:
                status, result = JobStatus.DIVERGED, None
                error = diverged_error(packed.diverged_at)
        if status is None and result is not None:
            status = JobStatus.SUCCEEDED
            result["loss"] = self.last_loss
        # Flushes run one at a time: the first takes the attempt's environment along.
        sent = self._unread = self.store.send_flush_steps(
            self.job_id,
            self.attempt,
            chunk,
            checkpoint,
            self.settings.lease_s,
            finish=status,
            result=result,
            error=error,
            worker=self.worker,
            environment=self.environment(),
        )
        sending_s = time.perf_counter() - started

        def receive() -> Flushed:
            self._unread = None
            steps = 0 if chunk is None else chunk.count
            return Flushed(self.write(sent.reply, steps, "full", sending_s), error)

        return receive
