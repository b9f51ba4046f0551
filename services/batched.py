"""The tutorial's training step for K sweep members at once: one group (DESIGN §9).

Member k has its own parameters theta_k = [w_k..., b_k], column k of one (p, K) tensor
`theta` = [W; b], and its own optimizer numbers, column k of (1, K) rows. The step is still
the tutorial's four moves, each done for every member in one go:

    forward    y_hat = x @ W + b                   -- (n, K): one matmul, column k is member k's
    loss       mean over samples of (y_hat - y)^2  -- (K,): one loss per member
    backward   loss.sum().backward()               -- member k's loss depends on theta_k alone,
                                                      so d(sum)/dtheta_k = dLoss_k/dtheta_k
    update     theta <- theta - lr * grad          -- lr is (1, K): each member its own
               (or SGD with momentum, Adam, AdamW, with (1, K) numbers)

Members are columns, not rows, for the backward pass: with W stored (d, K), autograd takes
dLoss/dW as x.T @ dLoss/dy_hat, 3.5x faster than the (K, d) layout's (dLoss/dy_hat).T @ x
(1000x10, K = 64, MKL, one thread). Record rows and checkpoints hold one member per row.

Each member's numbers equal those of the same JobSpec run alone by `Trainer` to float32
rounding: the update uses the ops `Trainer._update_by_hand` uses, in the same order, with the
scalars torch.optim computes in Python doubles computed here in float64 on the device.
"""

import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from services.records import is_evaluated
from services.schemas import JobSpec
from services.training import (
    BlockShape,
    FitReference,
    Layout,
    _snapshot,
    batch_order,
    block_ready,
    build_dataset,
    capture_whole_step,
    initial_theta,
    mse,
    serialize_state,
    training_and_validation,
)


def _shared(spec: JobSpec) -> tuple[Any, ...]:
    """What every member of a group has in common (all but the per-member numbers)."""
    o = spec.optimizer
    return (
        spec.bias,
        spec.device,
        spec.steps,
        o.name,
        o.nesterov,
        o.schedule.name,
        spec.batch_size,
        spec.shuffle_seed,
    )


def group_problem(specs: Sequence[JobSpec]) -> str | None:
    """Why these specs cannot train as one group, or None when they can."""
    if not specs:
        return "a group needs at least one member"
    first = specs[0]
    for i, spec in enumerate(specs):
        if spec.record.explain:
            return f"member {i} asks for the explain view, which sweeps do not record"
        if i == 0:
            continue
        if _shared(spec) != _shared(first):
            return (
                f"member {i} differs from member 0 in more than per-member numbers "
                "(bias, device, steps, optimizer name, nesterov, schedule name, batch size "
                "or shuffle seed)"
            )
        if spec.data is not first.data and spec.data != first.data:
            return f"member {i} trains on other data than member 0"
        if spec.eval != first.eval:
            return f"member {i} is evaluated otherwise than member 0"
    return None


class BatchedTrainer:
    """The members of one group trained together on one device; `live` are the positions (in
    `specs` order) of those still training, and column i of every per-member tensor (row i of
    a record) is live[i]."""

    def __init__(
        self,
        specs: Sequence[JobSpec],
        device: torch.device,
        data: tuple[torch.Tensor, torch.Tensor] | None = None,
        validation: tuple[torch.Tensor, torch.Tensor] | None = None,
        rungs: Sequence[int] = (),
    ) -> None:
        """`data`: the (x, y) of an uploaded dataset (on `device` already, from the cache);
        `validation`: an uploaded validation set's, likewise; `rungs`: the steps successive
        halving ranks at (the step before each is evaluated)."""
        if (problem := group_problem(specs)) is not None:
            raise ValueError(problem)
        first = specs[0]
        if data is not None:
            for spec in specs:
                spec.data.resolve(*data[0].shape)
        self.layout = Layout(first.data.features, first.bias, evaluated=first.eval is not None)
        x, y = build_dataset(first) if data is None else data
        x, y, val = training_and_validation(first, x, y, validation, device)
        self.x = x
        self.y = y.unsqueeze(1)  # (n, 1): broadcasts against y_hat's (n, K)
        self.val = None if val is None else (val[0], val[1].unsqueeze(1))
        self.eval_every = first.eval.every if first.eval is not None else 0
        self.rungs = frozenset(rungs)
        self._first = first
        self._fit: FitReference | None = None
        # A CUDA graph or a compiled block evaluates every step (see Trainer.always_evaluate).
        self.always_evaluate = False
        self.optimizer = first.optimizer.name
        self.nesterov = first.optimizer.nesterov
        self.schedule = first.optimizer.schedule.name
        self.total_steps = first.steps
        self.steps_done = 0
        self.live = list(range(len(specs)))

        # Every member's numbers, as (1, K) rows: float64 for the scalars torch.optim and
        # its schedulers compute in Python doubles, float32 for those applied to tensors.
        def per_member(values: list[float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device).unsqueeze(0)

        options = [spec.optimizer for spec in specs]
        self._all: dict[str, torch.Tensor] = {
            "lr": per_member([o.lr for o in options]),
            "momentum": per_member([o.momentum for o in options], torch.float32),
            "weight_decay": per_member([o.weight_decay for o in options]),
            "beta1": per_member([o.betas[0] for o in options]),
            "beta2": per_member([o.betas[1] for o in options]),
            "eps": per_member([o.eps for o in options], torch.float32),
            "step_size": per_member([o.schedule.step_size for o in options]),
            "gamma": per_member([o.schedule.gamma for o in options]),
            "eta_min": per_member([o.schedule.eta_min for o in options]),
        }
        self.hyper = dict(self._all)
        # A row of zeros (weight decay, momentum) is skipped: it would change nothing.
        self.decays = any(o.weight_decay for o in options)
        self.momentum = self.optimizer == "sgd" and any(o.momentum for o in options)
        self._derive()

        theta = torch.stack([initial_theta(spec) for spec in specs], dim=1).to(device)
        self.theta = theta.requires_grad_()
        self.state: dict[str, torch.Tensor] = {}
        if self.momentum:
            # Zeros: the first step's buffer is then 0 * momentum + grad = grad exactly, as
            # torch.optim's clone of the first gradient.
            self.state["momentum_buffer"] = torch.zeros_like(theta)
        elif self.optimizer != "sgd":
            self.state["exp_avg"] = torch.zeros_like(theta)
            self.state["exp_avg_sq"] = torch.zeros_like(theta)
        # The step count on the device, for the schedules and Adam's bias corrections.
        self._count = torch.zeros((), dtype=torch.float64, device=device)

        samples = len(y)
        self.batch_size = min(first.batch_size or samples, samples)
        self.batches_per_epoch = -(-samples // self.batch_size)  # 1: full batch
        self._seed = first.shuffle_seed
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its sample order)

    def _derive(self) -> None:
        """The float32 rows of numbers that do not change from step to step."""
        h = self.hyper
        self._lr32 = h["lr"].float()
        self._momentum32 = h["momentum"]
        self._weight_decay32 = h["weight_decay"].float()
        self._one_minus_beta1 = (1 - h["beta1"]).float()
        self._beta2 = h["beta2"].float()
        self._one_minus_beta2 = (1 - h["beta2"]).float()

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) of `step`, as `Trainer.batch`: every member sees the same batch."""
        if self.batches_per_epoch == 1:
            return self.x, self.y
        epoch, index = divmod(step, self.batches_per_epoch)
        if self._order is None or self._order[0] != epoch:
            order = batch_order(len(self.y), self._seed, epoch).to(self.x.device)
            self._order = (epoch, order)
        rows = self._order[1][index * self.batch_size : (index + 1) * self.batch_size]
        return self.x[rows], self.y[rows]

    def forward_backward(self) -> torch.Tensor:
        """Forward and backward of every live member: the losses (K,); autograd puts each
        member's dLoss/dtheta into its column of theta.grad."""
        x, y = self.batch(self.steps_done)
        d, theta = self.layout.features, self.theta
        if self.layout.bias:
            y_hat = x @ theta[:d] + theta[d]  # (n, K)
        else:
            y_hat = x @ theta
        loss = ((y_hat - y) ** 2).mean(dim=0)  # (K,)
        # The members are independent, so the sum's gradient is each one's own.
        loss.sum().backward()  # type: ignore[no-untyped-call]
        return loss

    def step(self, records: torch.Tensor) -> None:
        """One step for every live member; row i of `records` gets live member i's
        [loss, grads, params] (the parameters before this step's update). No host sync."""
        theta = self.theta
        theta.grad = None
        loss = self.forward_backward()
        assert theta.grad is not None
        # One member per row; the parameters this step's forward pass used, before the update.
        grad, params = theta.grad.T, theta.detach().T
        p = self.layout.params
        rows = records if self.val is None else records[:, : 1 + 2 * p]
        torch.cat([loss.detach().unsqueeze(1), grad, params], dim=1, out=rows)
        if self.val is not None and (self.always_evaluate or self.evaluates(self.steps_done)):
            with torch.no_grad():  # each member's validation loss, before the update
                records[:, -1] = mse(*self.val, theta, self.layout.features, self.layout.bias)
        with torch.no_grad():
            self.update(theta.grad)
        self._count += 1
        self.steps_done += 1

    def evaluates(self, step: int) -> bool:
        """Whether `step`'s records carry the validation loss (records.is_evaluated)."""
        return is_evaluated(step, self.eval_every, self.total_steps - 1, self.rungs)

    def learning_rate(self) -> torch.Tensor:
        """This step's lr per member (1, K, float64), as torch.optim.lr_scheduler has it."""
        h, t = self.hyper, self._count
        if self.schedule == "step":  # StepLR: lr * gamma^(t // step_size)
            return h["lr"] * h["gamma"] ** torch.floor(t / h["step_size"])
        if self.schedule == "cosine":  # CosineAnnealingLR over the job's steps
            cosine = (1 + torch.cos(math.pi * t / self.total_steps)) / 2
            return h["eta_min"] + (h["lr"] - h["eta_min"]) * cosine
        return h["lr"]

    def update(self, grad: torch.Tensor) -> None:
        """SGD (momentum, dampening 0, Nesterov, weight decay), Adam and AdamW as torch.optim
        documents them, with `Trainer._update_by_hand`'s ops in its order."""
        theta, state = self.theta, self.state
        constant = self.schedule == "constant"
        if self.optimizer == "sgd":
            lr = self._lr32 if constant else self.learning_rate().float()
            if self.decays:
                grad = grad.addcmul(theta, self._weight_decay32)
            if self.momentum:
                buffer = state["momentum_buffer"]
                buffer.mul_(self._momentum32).add_(grad)
                grad = grad.addcmul(buffer, self._momentum32) if self.nesterov else buffer
            theta.sub_(lr * grad)  # the tutorial's w <- w - lr * dLoss/dw, per member
            return
        # Adam, and AdamW (its weight decay applied to the parameters, decoupled).
        h = self.hyper
        lr64 = h["lr"] if constant else self.learning_rate()
        if self.decays:
            if self.optimizer == "adamw":
                theta.mul_((1 - lr64 * h["weight_decay"]).float())
            else:
                grad = grad.addcmul(theta, self._weight_decay32)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, self._one_minus_beta1)
        exp_avg_sq.mul_(self._beta2).addcmul_(self._one_minus_beta2 * grad, grad)
        step = self._count + 1
        step_size = (lr64 / (1 - h["beta1"] ** step)).float()
        bias_correction2_sqrt = ((1 - h["beta2"] ** step) ** 0.5).float()
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(h["eps"])
        theta.addcdiv_(-step_size * exp_avg, denom)

    def params(self) -> torch.Tensor:
        """The live members' parameters (len(live), p), after the last update: a detached view
        that the next step changes."""
        return self.theta.detach().T

    def keep(self, positions: Sequence[int]) -> None:
        """Only these live members go on (pruned, cancelled or diverged ones leave): every
        per-member tensor keeps their columns, so later steps cost less."""
        wanted = sorted(set(positions))
        row_of = {position: row for row, position in enumerate(self.live)}
        missing = [p for p in wanted if p not in row_of]
        if missing:
            raise ValueError(f"positions {missing} are not live (live: {self.live})")
        # int64 even when nobody goes on (an empty list would make a float tensor, no index).
        rows = torch.tensor(
            [row_of[p] for p in wanted], dtype=torch.int64, device=self.theta.device
        )
        self.live = wanted
        self.theta = self.theta.detach().index_select(1, rows).requires_grad_()
        self.state = {name: buffer.index_select(1, rows) for name, buffer in self.state.items()}
        self.hyper = {name: numbers.index_select(1, rows) for name, numbers in self.hyper.items()}
        self._derive()

    def fit_reference(self) -> FitReference:
        """The training (and validation) rows as each member's result measures its final
        parameters on them, as the member's own job would: made once for the group."""
        if self._fit is None:
            val = None if self.val is None else (self.val[0], self.val[1].squeeze(1))
            self._fit = FitReference(self.x, self.y.squeeze(1), self._first, val)
        return self._fit

    def state_snapshot(self) -> dict[str, Any]:
        """The checkpoint as of now (live positions, stacked parameters, optimizer state: one
        member per row), copied so that later steps cannot change it; on a GPU without waiting
        for the device (`serialize_state` turns it into bytes once the copies have landed)."""
        snapshot: dict[str, Any] = {
            "live": torch.tensor(self.live, dtype=torch.int64),
            "theta": _snapshot(self.theta.detach().T.contiguous()),
        }
        for name, buffer in self.state.items():
            snapshot[name] = _snapshot(buffer.T.contiguous())
        return snapshot

    def state_bytes(self) -> bytes:
        """The checkpoint's bytes (torch.save of tensors: loadable with weights_only)."""
        return serialize_state(self.state_snapshot())

    def load_state(self, state: bytes, steps_done: int) -> None:
        """Continue from `state_bytes()` taken after `steps_done` steps, bit for bit."""
        device = self.theta.device
        saved = torch.load(io.BytesIO(state), map_location=device, weights_only=True)
        live = [int(p) for p in saved["live"].tolist()]
        members = self._all["lr"].shape[1]
        if live != sorted(set(live)) or not all(0 <= p < members for p in live):
            raise ValueError(f"checkpoint's live positions {live} do not fit this group")
        theta = saved["theta"]
        if tuple(theta.shape) != (len(live), self.layout.params):
            raise ValueError(
                f"checkpoint holds parameters of shape {tuple(theta.shape)}; the group has "
                f"{len(live)} live members of {self.layout.params} parameters"
            )
        missing = [name for name in self.state if name not in saved]
        if missing:
            raise ValueError(f"checkpoint lacks the optimizer state {missing}")
        rows = torch.tensor(live, device=device)
        self.live = live
        self.hyper = {name: numbers.index_select(1, rows) for name, numbers in self._all.items()}
        self._derive()
        self.theta = theta.to(torch.float32).T.contiguous().requires_grad_()
        self.state = {name: saved[name].T.contiguous() for name in self.state}
        self.steps_done = steps_done
        self._count.fill_(steps_done)
        self._order = None


def supports_batched_cuda_graph(trainer: BatchedTrainer) -> bool:
    """Whether the group's step can be captured as one CUDA graph: on a GPU, the full batch
    (the same tensors every step; mini-batches gather new ones)."""
    return trainer.theta.device.type == "cuda" and trainer.batches_per_epoch == 1


class BatchedCudaGraphStep:
    """The group's whole step (forward, backward, update with every member's numbers, the
    records) captured once as a CUDA graph and replayed: one launch per step for all members.

    Replay writes the step's rows into `storage[cursor]` ((capacity, len(live), width) and a
    device-side index it moves on), so recording needs no host work. Everything a step reads
    that changes (the schedule's and Adam's step count included) is a device tensor the graph
    updates in place. After `keep()` or `load_state()` the trainer holds new tensors: capture
    a new graph (`live` says which members this one steps). tests/gpu/test_batched_cuda.py
    checks it against the eager step on a GPU.
    """

    name = "cuda-graph"
    block = 1  # steps per replay

    def __init__(self, trainer: BatchedTrainer, storage: torch.Tensor, cursor: torch.Tensor):
        if not supports_batched_cuda_graph(trainer):
            raise ValueError("a batched CUDA graph needs a GPU and the full batch")
        self.live = list(trainer.live)
        self._trainer, self._storage, self._cursor = trainer, storage, cursor
        self._rows = torch.empty(len(trainer.live), trainer.layout.width, device=storage.device)
        saved = [trainer.theta.detach().clone(), trainer._count.clone(), cursor.clone()]
        saved_state = {name: buffer.clone() for name, buffer in trainer.state.items()}
        done = trainer.steps_done

        def undo() -> None:  # the warm-up steps changed the parameters, state and counts
            with torch.no_grad():
                for tensor, value in zip(
                    [trainer.theta, trainer._count, cursor], saved, strict=True
                ):
                    tensor.copy_(value)
                for name, buffer in trainer.state.items():
                    buffer.copy_(saved_state[name])
            trainer.steps_done = done

        trainer.always_evaluate = True  # a graph replays the path its capture took
        try:
            self.graph = capture_whole_step(self._step, undo)
        except Exception:
            trainer.always_evaluate = False
            raise

    def _step(self) -> None:
        self._trainer.step(self._rows)
        self._storage.index_copy_(0, self._cursor.view(1), self._rows.unsqueeze(0))
        self._cursor.add_(1)

    def replay(self) -> None:
        self.graph.replay()
        self._trainer.steps_done += 1


def supports_batched_compile(trainer: BatchedTrainer) -> bool:
    """Whether the group's step can be compiled in blocks: on the CPU (a GPU captures a CUDA
    graph), plain SGD (no momentum) at a constant lr, the full batch, two members or more (a
    size-1 dimension would be compiled as a constant, and then again for every other size)."""
    return (
        trainer.theta.device.type == "cpu"
        and trainer.optimizer == "sgd"
        and not trainer.momentum
        and trainer.schedule == "constant"
        and trainer.batches_per_epoch == 1
        and len(trainer.live) >= 2
    )


# Compiled blocks of group steps, by shape (`group_block_shape`), for as long as the process
# lives: the members' count and the record buffer's rows (which depend on it) are dynamic
# dimensions, so one compile serves every group of a problem's shape however many members it
# has (and as many as it keeps after a cut). Those that have run are `block_compiled`, and
# `block_cached` in the next process, like a job's: the cost model counts them so.
_group_blocks: dict[BlockShape, Callable[..., None]] = {}
_failed_group_blocks: set[BlockShape] = set()


def group_block_shape(trainer: BatchedTrainer, block: int) -> BlockShape:
    """What a compiled block of the group's steps is specialised to: the problem's samples,
    features, bias and validation rows, and the block's length (its update is plain SGD, the
    only one it runs); not the members' count nor the chunk's rows, which are dynamic."""
    validation = len(trainer.val[1]) if trainer.val is not None else 0
    layout = trainer.layout
    return BlockShape(len(trainer.y), layout.features, layout.bias, block, validation, group=True)


def _group_block(features: int, bias: bool, block: int, evaluated: bool) -> Callable[..., None]:
    """`block` whole steps of every member as one compiled call: `BatchedTrainer.step`'s
    forward, losses and backward (torch.func, traced), the rows written at the device-side
    `cursor`, and the tutorial's update with each member's lr and weight decay. With
    `evaluated` every step's rows end with each member's validation loss."""

    def losses(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> Any:
        y_hat = x @ theta[:features] + theta[features] if bias else x @ theta  # (n, K)
        loss = ((y_hat - y) ** 2).mean(dim=0)  # (K,)
        return loss.sum(), loss  # the sum's gradient is each member's own

    grad_and_losses = torch.func.grad_and_value(losses, has_aux=True)

    def steps(
        theta: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        lr: torch.Tensor,
        weight_decay: torch.Tensor,
        storage: torch.Tensor,
        cursor: torch.Tensor,
        x_val: torch.Tensor | None = None,
        y_val: torch.Tensor | None = None,
    ) -> None:
        for _ in range(block):  # unrolled when traced
            grad, (_, loss) = grad_and_losses(theta, x, y)
            parts = [loss.unsqueeze(1), grad.T, theta.T]  # the parameters before the update
            if evaluated:
                assert x_val is not None and y_val is not None
                parts.append(mse(x_val, y_val, theta, features, bias).unsqueeze(1))
            rows = torch.cat(parts, dim=1)
            storage.index_copy_(0, cursor.view(1), rows.unsqueeze(0))
            cursor.add_(1)
            theta.sub_(lr * grad.addcmul(theta, weight_decay))

    compiled: Callable[..., None] = torch.compile(steps, fullgraph=True)
    return compiled


class BatchedCompiledSteps:
    """Blocks of the group's whole step compiled with torch.compile (Inductor, on the CPU):
    like `BatchedCudaGraphStep` each step's rows go to `storage[cursor]`; `replay()` runs
    `block` steps for every live member. Compiled code rounds a little differently from the
    eager step (each member still equals its job run alone to float32 rounding); which steps
    run compiled depends on the spec only (`GroupSteps`), so a resumed group equals its
    uninterrupted run bit for bit. After `keep()` or `load_state()` make a new one (the same
    compiled code: the members' count and the buffer's rows are dynamic). Making the first of
    a shape compiles it (seconds); a failure raises, is remembered for the shape, and the
    caller steps eagerly. So does a compile in `replay()` (Dynamo's guards are checked on the
    first block of new tensors), leaving the parameters and the cursor as they were."""

    name = "compiled"

    def __init__(
        self, trainer: BatchedTrainer, storage: torch.Tensor, cursor: torch.Tensor, block: int
    ) -> None:
        if not supports_batched_compile(trainer):
            raise ValueError("compiled group steps need the CPU, plain SGD and the full batch")
        self.block, self.live, self._trainer = block, list(trainer.live), trainer
        features, bias = trainer.layout.features, trainer.layout.bias
        validation = trainer.val or ()
        key = group_block_shape(trainer, block)
        if key in _failed_group_blocks:
            raise RuntimeError(f"compiling group blocks of shape {key} failed before")
        theta = trainer.theta.detach()  # the trainer's parameters: updated in place
        self._key, self._theta, self._cursor = key, theta, cursor
        self._args = (
            theta,
            trainer.x,
            trainer.y,
            trainer._lr32,
            trainer._weight_decay32,
            storage,
            cursor,
            *validation,
        )
        for member_dim, tensor in [(1, theta), (1, trainer._lr32), (1, trainer._weight_decay32)]:
            torch._dynamo.mark_dynamic(tensor, member_dim)
        # The buffer's rows too: how many fit a chunk depends on the members' count (a
        # budget in bytes), so a cut would otherwise compile the block again.
        torch._dynamo.mark_dynamic(storage, 0)
        torch._dynamo.mark_dynamic(storage, 1)
        # Whether a block has run on these tensors: until then Dynamo may compile (again).
        self._checked = False
        if key in _group_blocks:
            self._steps = _group_blocks[key]
            return
        self._steps = _group_blocks[key] = _group_block(features, bias, block, bool(validation))
        self._guarded(undo=True)  # compiles now, not in the first block of the loop

    def _guarded(self, undo: bool) -> None:
        """One block that may compile: a failure is remembered for the shape and leaves the
        parameters and the cursor as they were (the caller steps eagerly from there); with
        `undo` they are put back after a success too."""
        theta, cursor = self._theta, self._cursor
        saved, start = theta.clone(), cursor.clone()
        try:
            self._steps(*self._args)
        except Exception:
            _failed_group_blocks.add(self._key)
            _group_blocks.pop(self._key, None)
            undo = True
            raise
        finally:
            if undo:
                theta.copy_(saved)  # the block changed the parameters and moved the cursor
                cursor.copy_(start)
        self._checked = True
        block_ready(self._key)  # the cost model counts its compile as done from now on

    def replay(self) -> None:
        """`block` steps; the first on these tensors is guarded, as Dynamo checks its guards
        against them then and may compile (a failure raises with nothing changed)."""
        if self._checked:
            self._steps(*self._args)
        else:
            self._guarded(undo=False)
        self._trainer.steps_done += self.block
