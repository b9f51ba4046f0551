"""One attempt at a sweep's group (DESIGN §9): its running members trained together, one
batched step for all of them, flushed by one fenced write per chunk (the members' XADDs and a
commit script in one MULTI block: services/store/sweeps.py). No Celery here.

A group is claimed, leased, checkpointed and handed back like a job, by the same scripts and
the same attempt lifecycle (services/attempts.py); what differs is the step loop and the
flush, which appends each member's chunk and ends the members that end (the last step,
successive halving's cut at a rung, divergence), and which reports the members that a cancel
ended meanwhile, so that they leave the batched tensors.
"""

import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

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
    uploaded_data,
)
from services.batched import (
    BatchedCompiledSteps,
    BatchedCudaGraphStep,
    BatchedTrainer,
    group_block_shape,
    supports_batched_compile,
    supports_batched_cuda_graph,
)
from services.config import Settings
from services.queue import may_compile
from services.records import (
    Chunk,
    finite_steps,
    first_not_finite,
    param_values,
    settle_validation,
    sparse_rows,
)
from services.schemas import AttemptEnvironment, JobSpec, JobStatus
from services.store import Claim, Store
from services.store.sweeps import GroupFlushed, MemberFlush
from services.sweeps_math import halving_cut, halving_rungs, rank_by_loss
from services.training import serialize_state

log = logging.getLogger(__name__)


@dataclass
class _Member:
    """A member still training: its id and where it sits in the batched tensors' `specs`."""

    id: str
    position: int


class _GroupSteps:
    """How a group's steps run and where their rows go: chunks of rows in one (capacity,
    members, width) buffer, written by the fastest stepper the group allows -- a CUDA graph
    on a GPU, compiled blocks on the CPU where the cost model says they repay their compile,
    else eager steps. Which step runs how depends on the spec and the step's number only (a
    compiled block starts at a multiple of its length and ends by the next stop: the last
    step or a rung), never on where a chunk was cut, so a resumed group equals its
    uninterrupted run bit for bit. Made again when the live members change: the buffer is as
    wide as they are, and a graph holds their tensors."""

    def __init__(self, name: str, trainer: BatchedTrainer, kind: str, settings: Settings) -> None:
        """`name`: the attempt's, for log lines."""
        self.name, self.trainer, self.live = name, trainer, list(trainer.live)
        device, members, width = trainer.x.device, len(trainer.live), trainer.layout.width
        rows = max(1, min(CHUNK_BUDGET_BYTES // (4 * members * width), settings.flush_max_steps))
        block = settings.compile_block_steps if kind == "compiled" else 1
        self.capacity = max(block, rows - rows % block)
        self.storage = torch.empty(self.capacity, members, width, device=device)
        self.cursor = torch.zeros((), dtype=torch.int64, device=device)
        self.fast: BatchedCudaGraphStep | BatchedCompiledSteps | None = None
        make: Callable[[], BatchedCudaGraphStep | BatchedCompiledSteps] | None = None
        if kind == "cuda-graph":
            make = partial(BatchedCudaGraphStep, trainer, self.storage, self.cursor)
        elif kind == "compiled" and supports_batched_compile(trainer):
            make = partial(BatchedCompiledSteps, trainer, self.storage, self.cursor, block)
        if make is not None:
            self.fast = make_fast(name, kind, make)
        # A fast step that could not be made leaves the group training by eager steps.
        self.failed = make is not None and self.fast is None
        self.block = 1 if self.fast is None else self.fast.block

    def _eager_from(self, step: int, kind: str) -> None:
        """The fast stepper failed before running `step` (it changed nothing): eager steps
        from there on, as when it could not be made."""
        log.warning(
            "%s: the %s step failed at step %d; eager steps",
            self.name,
            kind,
            step,
            exc_info=True,
        )
        self.fast, self.block, self.failed = None, 1, True

    def count(self, first: int, stop_at: int) -> int:
        """The steps of the chunk from step `first`: as many as fit, ending at a block's end
        or at `stop_at`."""
        count = min(self.capacity, stop_at - first)
        if first + count < stop_at and self.block > 1:
            count -= (first + count) % self.block
        return count

    def run(self, first: int, count: int, stop_at: int, cut: Callable[[], bool]) -> int:
        """Run up to `count` steps from step `first` into the buffer's first rows; `cut()`,
        asked every 16 steps or so, ends the chunk early. Returns the steps run."""
        trainer, fast, block = self.trainer, self.fast, self.block
        self.cursor.zero_()
        done = checked = 0
        while done < count:
            step = first + done
            if fast is not None and step % block == 0 and step + block <= stop_at:
                if block > 1:
                    self.cursor.fill_(done)  # eager steps may have run since the last block
                try:
                    fast.replay()  # writes its rows at the cursor
                except Exception:  # a compile on new tensors: the step is not run
                    self._eager_from(step, fast.name)
                    fast, block = None, 1
                    continue
                done += block
            else:
                trainer.step(self.storage[done])
                done += 1
            if done - checked >= 16:
                checked = done
                if cut():
                    break
        return done


def warm_group_block(spec: JobSpec, settings: Settings) -> None:
    """Compile the group block of `spec`'s problem (services/runner.py `warm_compiled`) as a
    group of it would: two members (the members' count is dynamic: one compile serves any),
    the buffer a group's chunks get. Raises if it cannot be made."""
    trainer = BatchedTrainer([spec, spec], torch.device("cpu"))
    if _GroupSteps("warm-up", trainer, "compiled", settings).fast is None:
        raise RuntimeError("the group's block could not be compiled")


class GroupAttempt(Attempt):
    """One attempt at a sweep's group: its running members' steps in one batched tensor,
    each chunk flushed (on a thread of its own) by one fenced write for all of them."""

    what = "group"

    def __init__(
        self,
        store: Store,
        group_id: str,
        claim: Claim,
        worker: str,
        settings: Settings,
        drain: threading.Event,
    ) -> None:
        super().__init__(store, group_id, claim, worker, settings, drain)
        self.group_id = group_id
        self.spec: dict[str, Any] = json.loads(claim.spec_json)
        self.trainer: BatchedTrainer | None = None

    def progress(self) -> int:
        return -1 if self.trainer is None else self.trainer.steps_done

    def run(self, device: torch.device) -> AttemptResult:
        self.device = device
        # Before anything that takes time (reading the members, loading their data, a
        # compile), as a job's attempt does: the lease must not lapse while the group loads.
        self.keeper.start()
        work = self.store.group_work(self.group_id, self.spec["members"])
        running = [
            (member_id, position)
            for position, (member_id, status) in enumerate(
                zip(work.member_ids, work.statuses, strict=True)
            )
            if not JobStatus(status).finished
        ]
        if not running:  # every member was cancelled (or deleted) before the group started
            flushed = self._flush(None, [], None, finish=True)
            return AttemptResult(Outcome.SUCCEEDED if flushed.reply != "fenced" else Outcome.FENCED)
        first = work.specs[0]
        self.every = first.record.every  # the base's: members share it
        data, validation = uploaded_data(self.store, first, device, self.settings)
        early = self.spec.get("early_stop")
        rungs = halving_rungs(early["min_steps"], early["eta"], first.steps) if early else []
        trainer = BatchedTrainer(work.specs, device, data, validation, rungs)
        checkpoint = self.claim.checkpoint
        if checkpoint is not None:
            trainer.load_state(checkpoint.theta, checkpoint.step)
        live_ids = {member_id for member_id, _ in running}
        trainer.keep([p for p in trainer.live if work.member_ids[p] in live_ids])
        self.trainer = trainer
        self.ids = work.member_ids
        self.positions = {member_id: p for p, member_id in enumerate(self.ids)}
        # The stepper the group's first attempt recorded is every later attempt's, whatever
        # this worker's cost model says: a resumed group then rounds as its first attempt did.
        kind = self.claim.stepper or self._stepper_kind(first, trainer, len(work.specs))
        self.stepper = kind
        log.info(
            "group %s attempt %d: %d members, steps %d..%d on %s (%s)",
            self.group_id,
            self.attempt,
            len(trainer.live),
            trainer.steps_done,
            first.steps - 1,
            device,
            kind,
        )
        started = time.perf_counter()
        try:
            return self._loop(trainer, first.steps, kind, rungs)
        finally:
            self.loop_s = time.perf_counter() - started

    def _stepper_kind(self, first: JobSpec, trainer: BatchedTrainer, members: int) -> str:
        """The cost model's stepper (`choose_stepper`) for a group no attempt has recorded one
        for, its compile costing what is found of the group's block (compiled in this process,
        or in Inductor's cache). A group that could run compiled puts its block's shape first
        among the worker's recent shapes, which its next start compiles, as a job does."""
        can_compile = supports_batched_compile(trainer)
        shape = group_block_shape(trainer, self.settings.compile_block_steps)
        if can_compile and may_compile(first, self.settings):
            note_recent_shape(self.settings, shape)
        return choose_stepper(
            first,
            self.settings,
            first.steps,
            supports_batched_cuda_graph(trainer),
            can_compile,
            members,
            shape=shape,
        )

    def _cut(self, deadline: float) -> bool:
        """Whether the chunk ends now: the worker drains, the lease is lost, or it is time to
        flush."""
        return self.drain.is_set() or self.keeper.lost.is_set() or time.monotonic() > deadline

    def _loop(
        self, trainer: BatchedTrainer, steps: int, kind: str, rungs: list[int]
    ) -> AttemptResult:
        """Chunks of steps, each flushed by one script. A chunk's flush runs on a thread of
        its own while the next chunk trains (its reply is read before that chunk is judged and
        flushed, as the scripts take chunks in order); at a rung, at the last step and on a
        drain the loop waits for the flush, as what follows depends on it. Members that end
        by what the chunk shows (the last step, the rung's cut, divergence) leave the batched
        tensors at once; those a cancel ended leave when the flush's reply says so, before
        the next chunk is ranked at a rung."""
        pending: Future[GroupFlushed] | None = None
        chunks: _GroupSteps | None = None
        with ThreadPoolExecutor(1, thread_name_prefix=f"flush-{self.group_id[:8]}") as flusher:
            while True:
                if chunks is None or chunks.live != trainer.live:
                    chunks = _GroupSteps(self.name, trainer, kind, self.settings)
                stop_at = min([steps, *(r for r in rungs if r > trainer.steps_done)])
                first, started = trainer.steps_done, time.monotonic()
                cut = partial(self._cut, started + self.settings.flush_interval_s)
                done = chunks.run(first, chunks.count(first, stop_at), stop_at, cut)
                if chunks.failed:  # no fast step when made, or its compile failed in a block
                    self.stepper = "eager"
                if self.keeper.lost.is_set():
                    return AttemptResult(Outcome.FENCED)
                host = chunks.storage[:done].cpu()  # the next chunk writes there again
                if pending is not None:
                    # The previous flush's reply before this chunk is judged: members a cancel
                    # ended meanwhile leave first, so that a rung ranks only those still
                    # training (a cancelled one would take a survivor's place).
                    flushed, pending = pending.result(), None
                    outcome = self._settle(trainer, flushed)
                    if outcome is not None:
                        return outcome
                    if trainer.live != chunks.live:  # their rows of this chunk go unflushed
                        row_of = {position: row for row, position in enumerate(chunks.live)}
                        host = host[:, [row_of[p] for p in trainer.live]]
                chunk, flushes, ended = self._chunk(trainer, host, first, steps, rungs)
                self.steps_run += sum(member.kept for member in flushes)
                snapshot = trainer.state_snapshot()  # after this chunk, before the next
                landed = None
                if trainer.x.device.type == "cuda":  # the snapshot's copies are non-blocking
                    landed = torch.cuda.Event()  # type: ignore[no-untyped-call]
                    landed.record()
                # Members whose end this chunk decided train no more (all of them, maybe).
                remaining = [p for p in trainer.live if p not in ended]
                if ended:
                    trainer.keep(remaining)
                environment = self.environment()
                pending = flusher.submit(
                    self._flush, chunk, flushes, snapshot, landed, environment=environment
                )
                last = trainer.steps_done >= steps or not remaining
                if last or trainer.steps_done in rungs or self.drain.is_set():
                    flushed, pending = pending.result(), None
                    outcome = self._settle(trainer, flushed)
                    if outcome is not None:
                        return outcome
                    if last:
                        return AttemptResult(Outcome.SUCCEEDED)
                    if self.drain.is_set():
                        return self.hand_back("its worker is shutting down")

    def _settle(self, trainer: BatchedTrainer, flushed: GroupFlushed) -> AttemptResult | None:
        """What a flush's reply means (`ended_by`): the attempt's outcome when it ends the
        attempt, else None, and the members it says no longer train leave the batched
        tensors."""
        outcome = self.ended_by(flushed.reply)
        if outcome is not None:
            return outcome
        gone = {self.positions[member_id] for member_id in flushed.gone}
        if gone & set(trainer.live):
            trainer.keep([p for p in trainer.live if p not in gone])
        return None

    def _chunk(
        self, trainer: BatchedTrainer, host: torch.Tensor, first: int, steps: int, rungs: list[int]
    ) -> tuple[Chunk, list[MemberFlush], set[int]]:
        """The chunk of every live member, and who ends (last step, divergence, the rung's
        cut): the flush's chunk and members, and the positions of the members that end."""
        count = len(host)
        step = first + count  # the steps done after this chunk
        # One member per row, each its chunk's rows in a row (numpy: its slices cost far less
        # than a tensor's, and a group flushes hundreds of members many times a second).
        by_member = host.transpose(0, 1).contiguous().numpy()  # (members, count, width)
        evaluated = trainer.layout.evaluated
        if evaluated:
            settle_validation(by_member[:, :, -1], first, trainer.eval_every, steps - 1, rungs)
        finite = finite_steps(by_member, trainer.layout.params)  # (members, count)
        last_losses = by_member[:, count - 1, 0].tolist()
        params = trainer.params().cpu()
        metric = self.spec.get("metric") or "loss"
        members: list[MemberFlush] = []
        metrics: list[float | None] = []  # the survivors' metric at the chunk's last step
        survivors = []
        for i, position in enumerate(trainer.live):
            kept = count
            end: JobStatus | None = None
            error = None
            loss = last_losses[i]
            bad = first_not_finite(finite[i])
            if bad is not None:
                kept = bad + 1
                end = JobStatus.DIVERGED
                error = diverged_error(first + bad)
                loss = float(by_member[i, bad, 0])
            loss_or_none = loss if math.isfinite(loss) else None
            val_loss = _last_evaluated(by_member[i, :kept, -1]) if evaluated else None
            members.append(
                MemberFlush(
                    self.ids[position],
                    by_member[i, :kept].tobytes() if self.every <= 1 else b"",  # sparse: below
                    loss_or_none,
                    kept,
                    end,
                    None,
                    error,
                    val_loss,
                )
            )
            if end is None:
                metrics.append(val_loss if metric == "val_loss" else loss_or_none)
                survivors.append(i)
        if step >= steps:
            started = time.perf_counter()
            for i in survivors:
                members[i] = self._succeeded(members[i], trainer, params[i], steps)
            self.result_s += time.perf_counter() - started
        elif step in rungs and self.spec.get("early_stop"):
            members = self._prune(members, metrics, survivors, trainer, params, step)
        if self.every > 1:
            # Sparse records (the base's record.every): every member's loss, and the gradients
            # and parameters of the steps kept, and of the last step of a member that ends here.
            members = [
                dataclasses.replace(
                    member,
                    rows=sparse_rows(
                        by_member[i, : member.kept], first, self.every, evaluated, bool(member.end)
                    ),
                )
                for i, member in enumerate(members)
            ]
        chunk = Chunk(
            first,
            count,
            trainer.layout.features,
            trainer.layout.bias,
            b"",
            trainer.batches_per_epoch if trainer.batches_per_epoch > 1 else 0,
            evaluated=evaluated,
            every=self.every,
        )
        ended = {trainer.live[i] for i, member in enumerate(members) if member.end is not None}
        return chunk, members, ended

    def _prune(
        self,
        members: list[MemberFlush],
        metrics: list[float | None],
        survivors: list[int],
        trainer: BatchedTrainer,
        params: torch.Tensor,
        rung: int,
    ) -> list[MemberFlush]:
        """Successive halving at `rung`: the survivors ranked by the sweep's metric at step
        rung - 1 (equal within the rank tolerance: member order decides); those cut end
        pruned."""
        eta, metric = self.spec["early_stop"]["eta"], self.spec.get("metric") or "loss"
        rtol = self.settings.rank_rtol
        going_on, cutoff = halving_cut(metrics, eta, rtol)
        members = list(members)
        for rank, k in enumerate(rank_by_loss(metrics, rtol), start=1):
            if k in going_on:
                continue
            i = survivors[k]
            reason = (
                f"pruned at rung {rung} (successive halving, eta {eta}): rank {rank} of "
                f"{len(survivors)} by the {metric} of step {rung - 1}, cut-off "
                f"{'not finite' if cutoff is None else f'{cutoff:.6g}'}"
            )
            values = param_values(params[i].tolist(), trainer.layout.features, trainer.layout.bias)
            result = {"params": values, "loss": members[i].loss, "stopped": reason}
            members[i] = dataclasses.replace(members[i], end=JobStatus.PRUNED, result=result)
        return members

    def _succeeded(
        self, member: MemberFlush, trainer: BatchedTrainer, theta: torch.Tensor, steps: int
    ) -> MemberFlush:
        """The member's end at the last step, with the result its own job would have
        (`finished_result`: the same keys, its numbers computed alike); the data they are
        measured on is the group's."""
        layout = trainer.layout
        result = finished_result(
            trainer.fit_reference(),
            theta,
            layout.features,
            layout.bias,
            f"ran all {steps} steps",
            self.stepper,
        )
        result["loss"] = member.loss
        return dataclasses.replace(member, end=JobStatus.SUCCEEDED, result=result)

    def _flush(
        self,
        chunk: Chunk | None,
        members: list[MemberFlush],
        snapshot: dict[str, Any] | None,
        landed: "torch.cuda.Event | None" = None,
        finish: bool = False,
        environment: AttemptEnvironment | None = None,
    ) -> GroupFlushed:
        """The group's flush with the checkpoint `snapshot` (`state_snapshot()` after the
        chunk; on a GPU once `landed`), retried while Redis is unreachable (the commit script
        recognises a retry of a flush it applied); `full` when Redis refused it for memory."""
        if landed is not None:
            landed.synchronize()
        state = b"" if snapshot is None else serialize_state(snapshot)
        return self.write(
            lambda: self.store.flush_group(
                self.group_id,
                self.attempt,
                chunk,
                members,
                state,
                self.settings.lease_s,
                finish=finish,
                environment=environment,
                worker=self.worker,
            ),
            sum(member.kept for member in members),
            GroupFlushed("full", {}),
        )


def _last_evaluated(column: "np.ndarray[Any, Any]") -> float | None:
    """The last validation loss in a member's settled column (None: no step evaluated, or
    its value is not finite)."""
    evaluated = np.flatnonzero(~np.isnan(column))
    if not len(evaluated):
        return None
    value = float(column[evaluated[-1]])
    return value if math.isfinite(value) else None
