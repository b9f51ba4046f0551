"""The training loop of the backpropagation tutorial, in plain torch: no Redis, no Celery.

One step is the tutorial's four moves on a linear model:

    forward    y_hat = x @ w (+ b)
    loss       mean((y_hat - y) ** 2)          -- (y_hat - y)^2 for a single sample
    backward   loss.backward()                 -- autograd gives dLoss/dw (and dLoss/db)
    update     optimizer.step()                -- SGD: w <- w - lr * dLoss/dw (or Adam, AdamW)

The parameters live in one flat tensor `theta` = [w..., b] so that a step's record (loss,
gradients, parameters) is a single row of float32 values, copied on the device without a
host sync.
"""

import io
import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

# torch.optim imports torch._dynamo on an optimizer's first step (1.5 s here). Importing it with
# this module moves that cost to worker start-up, before Celery forks its pool children, so the
# first job does not pay it. An import runs no torch op, so forking after it stays safe.
import torch._dynamo

from services.records import finite_or_none, is_evaluated, param_values, row_width
from services.schemas import JobSpec, holdout_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Where each value sits in a step's record row: [loss, grads (p), params (p)], then for
    an explained job of n samples the graph: y_hat, s, dLoss/ds (local), ds/dy_hat (local),
    dLoss/dy_hat and dLoss/ds (flowing in backward) (n each) and dy_hat/dtheta (n x p)
    (services/records.py reads them back)."""

    features: int
    bias: bool
    explain_samples: int = 0
    evaluated: bool = False  # the row ends with the validation loss

    @property
    def params(self) -> int:
        return self.features + int(self.bias)

    @property
    def width(self) -> int:
        return row_width(self.features, self.bias, self.explain_samples, self.evaluated)


def compute_device(device: str, cuda_fallback_cpu: bool = False) -> torch.device:
    """The torch device a worker pinned to `device` computes on.

    A `cuda:N` worker sees only GPU N (CUDA_VISIBLE_DEVICES=N), which torch calls cuda:0.
    """
    if device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if cuda_fallback_cpu:
        return torch.device("cpu")
    raise RuntimeError(f"worker pinned to {device} but CUDA is not available")


def build_dataset(spec: JobSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The job's (x, y) as float32 tensors on the CPU; synthetic data is reproducible by seed."""
    data = spec.data
    if data.synthetic is None:
        assert data.x is not None and data.y is not None
        return (
            torch.tensor(data.x, dtype=torch.float32),
            torch.tensor(data.y, dtype=torch.float32),
        )
    params = data.synthetic
    # Generated on the CPU with its own generator, so every device trains on the same numbers.
    generator = torch.Generator().manual_seed(params.seed)
    x = torch.randn(params.n, params.d, generator=generator)
    w_true = torch.randn(params.d, generator=generator)
    y = x @ w_true
    if spec.bias:
        y += torch.randn((), generator=generator)
    if params.noise > 0:
        y += params.noise * torch.randn(params.n, generator=generator)
    return x, y


def split_holdout(
    x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y) of the training rows and of the validation rows (DESIGN §11): the rows of
    randperm(n) seeded by `seed` at positions 0 .. round(fraction * n) - 1 validate (in that
    order), the others train in their original order. Made on the CPU, so every device and
    every attempt splits alike."""
    samples = len(y)
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed))
    held = order[: holdout_size(samples, fraction)].to(x.device)
    train = torch.ones(samples, dtype=torch.bool, device=x.device)
    train[held] = False
    return x[train], y[train], x[held], y[held]


def validation_set(spec: JobSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An explicit, inline validation set's (x, y) as float32 on the CPU; None otherwise (no
    eval, a holdout, or an uploaded dataset, which the worker loads)."""
    evaluation = spec.eval
    if evaluation is None or evaluation.data is None or evaluation.data.x is None:
        return None
    assert evaluation.data.y is not None
    x = torch.tensor(evaluation.data.x, dtype=torch.float32)
    return x, torch.tensor(evaluation.data.y, dtype=torch.float32)


def mse(x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, features: int, bias: bool) -> Any:
    """The tutorial's loss, mean((x @ w (+ b) - y)^2), at the parameters `theta`; theta may hold
    one member per column ((p, K): then y is (n, 1) and the loss one per member)."""
    y_hat = x @ theta[:features] + theta[features] if bias else x @ theta
    return ((y_hat - y) ** 2).mean(dim=0)


def initial_theta(spec: JobSpec) -> torch.Tensor:
    """The flat parameter vector [w..., b] before step 0 (zeros unless `init` says otherwise)."""
    layout = Layout(spec.data.features, spec.bias)
    theta = torch.zeros(layout.params, dtype=torch.float32)
    if spec.init is not None:
        if spec.init.w is not None:
            theta[: layout.features] = torch.tensor(spec.init.w, dtype=torch.float32)
        if spec.init.b is not None:
            theta[layout.features] = spec.init.b
    return theta


def training_and_validation(
    spec: JobSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    validation: tuple[torch.Tensor, torch.Tensor] | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The training rows' (x, y) and the validation rows' (or None: no eval) on `device`."""
    evaluation = spec.eval
    if evaluation is not None and evaluation.holdout is not None:
        x, y, x_val, y_val = split_holdout(x, y, evaluation.holdout, evaluation.seed)
        validation = (x_val, y_val)
    elif evaluation is not None and validation is None:
        validation = validation_set(spec)
        assert validation is not None, "an uploaded validation set must be given"
    if validation is not None:
        validation = (validation[0].to(device), validation[1].to(device))
    return x.to(device), y.to(device), validation


class DatasetCache:
    """Uploaded datasets a worker process used, on their devices, least recently used first
    out once they hold more than `max_bytes`: many jobs on one dataset move it once."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = (
            OrderedDict()
        )

    def get(
        self,
        dataset_id: str,
        device: torch.device,
        load: Callable[[], tuple[bytes, bytes, int, int]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) on `device`, from the cache or from `load()` (float32 bytes and the shape)."""
        key = (dataset_id, str(device))
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        x_bytes, y_bytes, samples, features = load()
        x = torch.frombuffer(bytearray(x_bytes), dtype=torch.float32).reshape(samples, features)
        y = torch.frombuffer(bytearray(y_bytes), dtype=torch.float32)
        entry = (x.to(device), y.to(device))
        self._entries[key] = entry
        while len(self._entries) > 1 and self.held_bytes() > self.max_bytes:
            self._entries.popitem(last=False)
        return entry

    def held_bytes(self) -> int:
        return sum(x.nbytes + y.nbytes for x, y in self._entries.values())


def build_optimizer(
    spec: JobSpec, theta: torch.Tensor
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """torch.optim's optimizer and lr scheduler for the spec (never a hand-written update)."""
    o = spec.optimizer
    optimizer: torch.optim.Optimizer
    if o.name == "sgd":
        optimizer = torch.optim.SGD(
            [theta], lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
        )
    elif o.name == "adam":
        optimizer = torch.optim.Adam(
            [theta], lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(
            [theta], lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
        )
    schedule = o.schedule
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    if schedule.name == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, schedule.step_size, schedule.gamma)
    elif schedule.name == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=spec.steps, eta_min=schedule.eta_min
        )
    return optimizer, scheduler


def batch_order(samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the samples in `epoch`: a permutation that depends on (seed, epoch) only,
    so that a resumed job replays the same batches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(samples, generator=generator)


class Trainer:
    """One job's data, model, optimizer and schedule on one device; `steps_done` counts the
    steps run (from a checkpoint on)."""

    def __init__(
        self,
        spec: JobSpec,
        device: torch.device,
        data: tuple[torch.Tensor, torch.Tensor] | None = None,
        validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """`data`: the (x, y) of an uploaded dataset (on `device` already, from the cache);
        `validation`: an uploaded validation set's, likewise."""
        if data is not None:
            spec.data.resolve(*data[0].shape)
        explained = spec.train_samples if spec.record.explain else 0
        self.layout = Layout(spec.data.features, spec.bias, explained, spec.eval is not None)
        x, y = build_dataset(spec) if data is None else data
        self.x, self.y, self.val = training_and_validation(spec, x, y, validation, device)
        # Which steps evaluate (the records say so); a CUDA graph bakes one path in, so it
        # evaluates every step and the records keep the evaluated ones (`always_evaluate`).
        self.eval_every = spec.eval.every if spec.eval is not None else 0
        self.last_step = spec.steps - 1
        self.always_evaluate = False
        self.theta = initial_theta(spec).to(device).requires_grad_()
        # theta's values without autograd (the same memory): the record row copies them, and the
        # plain update changes them in place, with no detach() and no no_grad block per step.
        self._values = self.theta.detach()
        # Neither explained nor evaluated: a step's whole row is [loss, grads, params].
        self._plain_row = not explained and spec.eval is None
        self.optimizer, self.scheduler = build_optimizer(spec, self.theta)
        # Plain SGD at a constant lr takes the tutorial's update itself (`update`); the
        # optimizer object stays, for the checkpoint's format and the stateful cases.
        o = spec.optimizer
        plain = o.name == "sgd" and o.momentum == 0 and o.schedule.name == "constant"
        self.plain_sgd = (o.lr, o.weight_decay) if plain else None
        self.steps_done = 0
        # Batches of the training rows: a holdout's validation rows are not among them (counted
        # with them, an epoch had batches past its rows, empty, and their loss NaN).
        samples = len(self.y)
        self.batch_size = min(spec.batch_size or samples, samples)
        self.batches_per_epoch = -(-samples // self.batch_size)  # 1: full batch
        self._seed = spec.shuffle_seed
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its sample order)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) of `step`: everything, or its mini-batch in its epoch's order."""
        if self.batches_per_epoch == 1:
            return self.x, self.y
        epoch, index = divmod(step, self.batches_per_epoch)
        rows = self.epoch_order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        return self.x[rows], self.y[rows]

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """`batch_order` of `epoch` on the data's device (the latest epoch's is kept)."""
        if self._order is None or self._order[0] != epoch:
            order = batch_order(len(self.y), self._seed, epoch).to(self.x.device)
            self._order = (epoch, order)
        return self._order[1]

    def block_rows(self, step: int, steps: int, out: torch.Tensor) -> None:
        """The rows of the mini-batches of steps `step` .. `step + steps - 1` into `out`
        ((steps, batch_size)), as `batch` takes them; for batches that split the rows evenly
        (the steps' rows are then consecutive runs of the epochs' orders)."""
        size, per_epoch = self.batch_size, self.batches_per_epoch * self.batch_size
        start, end, filled = step * size, (step + steps) * size, 0
        flat = out.view(-1)
        while start < end:
            epoch, offset = divmod(start, per_epoch)
            take = min(end - start, per_epoch - offset)
            flat[filled : filled + take] = self.epoch_order(epoch)[offset : offset + take]
            start, filled = start + take, filled + take

    def forward_backward(self, explain: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and backward of the next step: the loss; autograd puts dLoss/dtheta into
        theta.grad. With `explain` (a row slice), the step's graph is written there too."""
        x, y = (self.x, self.y) if self.batches_per_epoch == 1 else self.batch(self.steps_done)
        # The views are taken each step, after the previous in-place update.
        y_hat = self._forward(x, self.theta)
        s = y_hat - y
        loss = (s**2).mean()
        if explain is None:
            loss.backward()  # type: ignore[no-untyped-call]
        else:
            self._backward_explained(explain, y_hat, s, loss)
        return loss

    def _forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """y_hat = x @ w (+ b)."""
        d = self.layout.features
        return x @ theta[:d] + theta[d] if self.layout.bias else x @ theta

    def _backward_explained(
        self, out: torch.Tensor, y_hat: torch.Tensor, s: torch.Tensor, loss: torch.Tensor
    ) -> None:
        """The backward pass, with the tutorial's view of it taken from the graph this step
        built: each node's local gradient (torch.autograd.grad on the node's own edge) and the
        gradient flowing into it (hooks that see what backward passes)."""
        n, theta = len(s), self.theta
        local_loss_s = torch.autograd.grad(loss, s, retain_graph=True)[0]
        # s_i depends on y_hat_i alone: a vector of ones pulls back the Jacobian's diagonal.
        ones = torch.ones_like(s)
        local_s_yhat = torch.autograd.grad(s, y_hat, ones, retain_graph=True)[0]
        # dy_hat_i/dtheta, one sample at a time (at most EXPLAIN_MAX_SAMPLES of them).
        unit = torch.eye(n, device=s.device)
        local_yhat_theta = torch.stack(
            [torch.autograd.grad(y_hat, theta, unit[i], retain_graph=True)[0] for i in range(n)]
        )
        # Hooks registered now see only the step's real backward pass.
        flowing: dict[str, torch.Tensor] = {}

        def keep(name: str) -> Callable[[torch.Tensor], None]:
            def hook(grad: torch.Tensor) -> None:
                flowing[name] = grad.detach()

            return hook

        y_hat.register_hook(keep("y_hat"))  # type: ignore[no-untyped-call]
        s.register_hook(keep("s"))  # type: ignore[no-untyped-call]
        loss.backward()  # type: ignore[no-untyped-call]
        parts = [y_hat.detach(), s.detach(), local_loss_s, local_s_yhat]
        parts += [flowing["y_hat"], flowing["s"]]
        torch.cat([*parts, local_yhat_theta.flatten()], out=out)

    def update(self) -> None:
        """The optimizer's step (and the schedule's), reading theta.grad.

        Plain SGD at a constant lr takes the tutorial's update itself; on the CPU, the other
        optimizers take their update as torch.optim documents it, written out with the very ops
        its default (single-tensor) implementation runs, on the state it keeps (so the same
        numbers, bit for bit, and the same checkpoint): torch.optim's per-step machinery costs
        1.3-1.9x the update itself on these small problems (bench/optimizer_step.py). On a GPU
        torch.optim runs its own (foreach) implementation.
        """
        if self.plain_sgd is not None:
            # The tutorial's update, w <- w - lr * dLoss/dw, as one in-place op on theta's
            # values (no graph is recorded for them: no no_grad block needed). Plain SGD has no
            # schedule.
            lr, weight_decay = self.plain_sgd
            grad = self.theta.grad
            assert grad is not None
            if weight_decay:
                grad = grad.add(self._values, alpha=weight_decay)
            self._values.add_(grad, alpha=-lr)
            self.steps_done += 1
            return
        with torch.no_grad():
            if self.theta.device.type == "cpu":
                self._update_by_hand()
                # What torch.optim's step wrapper records, and the schedule checks: the
                # optimizer stepped before the schedule does.
                self.optimizer._opt_called = True  # type: ignore[attr-defined]
            else:
                self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps_done += 1

    def _update_by_hand(self) -> None:
        """SGD with momentum (or a schedule), Adam and AdamW, as torch.optim's single-tensor
        code computes them, on `optimizer.state` under torch.optim's own keys."""
        theta, group = self.theta, self.optimizer.param_groups[0]
        state = self.optimizer.state[theta]
        grad = theta.grad
        assert grad is not None
        lr, weight_decay = group["lr"], group["weight_decay"]
        if isinstance(self.optimizer, torch.optim.SGD):
            if weight_decay != 0:
                grad = grad.add(theta, alpha=weight_decay)
            momentum = group["momentum"]
            if momentum != 0:
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    buffer = state["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    buffer.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
                grad = grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
            theta.add_(grad, alpha=-lr)
            return
        # Adam, and AdamW (its weight decay applied to the parameters, decoupled).
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(theta, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(theta, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        step_t, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
        step_t += 1
        if weight_decay != 0:
            if isinstance(self.optimizer, torch.optim.AdamW):
                theta.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(theta, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = step_t.item()
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        theta.addcdiv_(exp_avg, denom, value=-step_size)

    def step(self, record: torch.Tensor) -> None:
        """Run one step and write its [loss, grads, params] into `record` (a row on the device),
        and where the job evaluates, the validation loss into its last value."""
        theta = self.theta
        # Backward then writes a fresh gradient: no zeroing and no accumulating.
        theta.grad = None
        if self._plain_row:
            loss = self.forward_backward()
            grad = theta.grad
            assert grad is not None
            # Recorded before the update, which changes theta in place: the row holds the
            # parameters this step's forward pass used. One device-side copy, no .item() sync.
            torch.cat([loss.detach().view(1), grad, self._values], out=record)
            self.update()
            return
        p = self.layout.params
        explain = None
        if self.layout.explain_samples:
            explain = record[1 + 2 * p : self.layout.width - int(self.layout.evaluated)]
        loss = self.forward_backward(explain)
        assert theta.grad is not None
        torch.cat([loss.detach().view(1), theta.grad, self._values], out=record[: 1 + 2 * p])
        if self.val is not None and (
            self.always_evaluate or is_evaluated(self.steps_done, self.eval_every, self.last_step)
        ):
            # The validation loss at the same parameters, before the update (no graph).
            with torch.no_grad():
                x_val, y_val = self.val
                residual = self._forward(x_val, theta) - y_val
                torch.mean(residual**2, dim=0, keepdim=True, out=record[-1:])
        # Update: e.g. SGD's w <- w - lr * dLoss/dw.
        self.update()

    def params(self) -> torch.Tensor:
        """The current parameters (after the last update), detached."""
        return self.theta.detach()

    def optimizer_snapshot(self) -> dict[str, Any] | None:
        """The optimizer's and the schedule's state as of now, for a checkpoint beside the raw
        float32 parameters; None when there is none (plain SGD at a constant lr: the spec
        says it all). `serialize_state` turns it into bytes.

        With a schedule the optimizer's state is taken even when it has no buffers: its param
        groups hold the current lr, which the schedulers compute the next one from. Buffers are
        copied, since the next steps change them in place; on a GPU into page-locked host
        memory without waiting for the device (the copies land in stream order, before the
        next step's kernels), so taking a snapshot never syncs the step loop.
        """
        state: dict[str, Any] = {}
        if self.optimizer.state or self.scheduler is not None:
            state["optimizer"] = _snapshot(self.optimizer.state_dict())
        if self.scheduler is not None:
            state["scheduler"] = _snapshot(self.scheduler.state_dict())
        return state or None

    def load_state(self, theta: bytes, optimizer: bytes, steps_done: int) -> None:
        """Continue from a checkpoint after `steps_done` steps: raw float32 parameters and
        `serialize_state(optimizer_snapshot())`."""
        if len(theta) != 4 * self.layout.params:
            raise ValueError(
                f"checkpoint holds {len(theta)} bytes of parameters; the job has "
                f"{self.layout.params} float32 parameters ({4 * self.layout.params} bytes)"
            )
        saved = torch.frombuffer(bytearray(theta), dtype=torch.float32)
        with torch.no_grad():
            self.theta.copy_(saved)
        self.steps_done = steps_done
        if optimizer:
            state = torch.load(
                io.BytesIO(optimizer), map_location=self.theta.device, weights_only=True
            )
            if "optimizer" in state:
                self.optimizer.load_state_dict(state["optimizer"])
            if "scheduler" in state and self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])


def _snapshot(value: Any) -> Any:
    """A copy of a state_dict whose tensors no later step can change: CUDA tensors copied into
    pinned host memory, non-blocking; CPU tensors cloned."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "cuda":
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            return host.copy_(value.detach(), non_blocking=True)
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_snapshot(v) for v in value)
    return value


def serialize_state(snapshot: dict[str, Any] | None) -> bytes:
    """A snapshot's bytes for the checkpoint (torch.save: raw tensor values, never a decimal
    rendering, so a resumed run continues bit for bit); b'' for none. On a GPU, only once the
    snapshot's copies have landed."""
    if snapshot is None:
        return b""
    buffer = io.BytesIO()
    torch.save(snapshot, buffer)
    return buffer.getvalue()


# The least-squares solution is computed for problems up to this size (float64, on the CPU).
LSTSQ_MAX_ELEMENTS = 10**7
_lstsq_cache: "OrderedDict[str, tuple[list[float], float]]" = OrderedDict()


def fit_quality(trainer: Trainer, spec: JobSpec) -> dict[str, Any]:
    """How good a job's final parameters are on all its training rows (`FitReference`)."""
    return FitReference(trainer.x, trainer.y, spec).quality(trainer.params())


class FitReference:
    """A problem's training rows as results measure a model on them: the loss, R², and the
    least-squares solution with its loss and the gap to it. Made once and asked for any number
    of models (a job's final parameters, or those of each member of a group): up to
    LSTSQ_MAX_ELEMENTS the rows are copied once, in float64, to the CPU, and the solution is
    computed once per dataset in this process (a bounded cache); larger problems get the loss
    and R² only, computed where the data is (float32 products, float64 sums)."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        spec: JobSpec,
        validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """`y`: one value per row ((n,)); `validation`: the validation rows (likewise), for
        `metrics`."""
        self.bias = spec.bias
        self.small = x.numel() <= LSTSQ_MAX_ELEMENTS
        with torch.no_grad():
            self.x, self.y = (x.double().cpu(), y.double().cpu()) if self.small else (x, y)
            self.validation = None
            if validation is not None:  # float64 once, not once per model
                self.validation = (validation[0].double(), validation[1].double())
        # The rows a solution was computed on: the data, and a holdout's split of it.
        holdout = None if spec.eval is None else (spec.eval.holdout, spec.eval.seed)
        self._key = f"{spec.data.model_dump_json()}|{spec.bias}|{holdout}"

    def quality(self, theta: torch.Tensor) -> dict[str, Any]:
        """full_loss and r2 of the parameters `theta` (p,), and for small problems lstsq_params,
        lstsq_loss and lstsq_gap."""
        with torch.no_grad():
            if not self.small:
                return loss_and_r2(self.x, self.y, theta.to(self.x.device), self.bias)
            quality = loss_and_r2(self.x, self.y, theta.double().cpu(), self.bias)
            solution_values, lstsq_loss = self._least_squares()
        full_loss = quality["full_loss"]
        quality.update(
            lstsq_params=param_values(solution_values, self.x.shape[1], self.bias),
            lstsq_loss=lstsq_loss,
            lstsq_gap=None if full_loss is None else full_loss - lstsq_loss,
        )
        return quality

    def metrics(self, theta: torch.Tensor) -> dict[str, Any]:
        """`fit_metrics` of the parameters `theta` (p,) on these rows."""
        return fit_metrics((self.x, self.y), self.validation, theta, self.bias)

    def _least_squares(self) -> tuple[list[float], float]:
        x, y = self.x, self.y
        if self._key not in _lstsq_cache:
            if self.bias:
                x = torch.cat([x, torch.ones(len(y), 1, dtype=torch.float64)], dim=1)
            solution = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
            _lstsq_cache[self._key] = (solution.tolist(), float(((x @ solution - y) ** 2).mean()))
            if len(_lstsq_cache) > 32:
                _lstsq_cache.popitem(last=False)
        return _lstsq_cache[self._key]


def regression_metrics(
    x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, bias: bool
) -> dict[str, float | None]:
    """mse, rmse, mae and r2 of the model `theta` on (x, y), in float64 (on x's device)."""
    d = x.shape[1]
    theta = theta.double().to(x.device)
    x64, y64 = x.double(), y.double()
    residual = (x64 @ theta[:d] + theta[d] if bias else x64 @ theta) - y64
    mse_value = float(residual.square().mean())
    total = float((y64 - y64.mean()).square().mean())
    return {
        "mse": finite_or_none(mse_value),
        "rmse": finite_or_none(math.sqrt(mse_value)) if math.isfinite(mse_value) else None,
        "mae": finite_or_none(float(residual.abs().mean())),
        "r2": finite_or_none(1 - mse_value / total) if total else None,
    }


def fit_metrics(
    train: tuple[torch.Tensor, torch.Tensor],
    validation: tuple[torch.Tensor, torch.Tensor] | None,
    theta: torch.Tensor,
    bias: bool,
) -> dict[str, Any]:
    """A finished job's `metrics` at its final parameters `theta` (float64) on the training
    rows and, with eval, on the validation rows; and `val_loss`, the latter's mse."""
    with torch.no_grad():
        metrics = {"train": regression_metrics(*train, theta, bias)}
        if validation is None:
            return {"metrics": metrics}
        metrics["val"] = regression_metrics(*validation, theta, bias)
    return {"metrics": metrics, "val_loss": metrics["val"]["mse"]}


def loss_and_r2(
    x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, bias: bool
) -> dict[str, Any]:
    d = x.shape[1]
    y_hat = x @ theta[:d] + theta[d] if bias else x @ theta
    full_loss = float((y_hat - y).double().square().mean())
    total = float((y.double() - y.double().mean()).square().mean())
    r2 = finite_or_none(1 - full_loss / total) if total else None
    return {"full_loss": finite_or_none(full_loss), "r2": r2}


def step_at_cursor(
    trainer: Trainer, row: torch.Tensor, storage: torch.Tensor, cursor: torch.Tensor
) -> None:
    """`trainer.step` in the form a CUDA graph captures: the row goes to `storage[cursor]`, a
    device-side index, which then moves on."""
    trainer.step(row)
    storage.index_copy_(0, cursor.view(1), row.view(1, -1))
    cursor.add_(1)


def capture_whole_step(step: Callable[[], None], undo: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """`step` captured as a CUDA graph, by torch's recipe for a whole training step: warm-up
    steps on a side stream first (autograd and cuBLAS set up their workspaces outside the
    capture), then the capture, which records the kernels and runs nothing (other threads may
    use the GPU meanwhile). `undo` then reverts what the warm-up steps changed, also when the
    capture fails."""
    try:
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            step()
        return graph
    finally:
        undo()


class CudaGraphStep:
    """The trainer's whole step (forward, backward, SGD update, writing the record row) captured
    once in a CUDA graph and replayed: one launch per step instead of about twenty.

    The graph writes each step's row into `storage` at the row `cursor` (a device-side index it
    increments: `step_at_cursor`), so recording needs no host work either. tests/gpu checks
    the replayed graph against the eager step, step for step. Static shapes only: the full
    batch, the same tensors every step.
    """

    name = "cuda-graph"
    block = 1  # steps per replay

    def __init__(self, trainer: Trainer, storage: torch.Tensor, cursor: torch.Tensor) -> None:
        self._trainer, self._storage, self._cursor = trainer, storage, cursor
        self._row = torch.empty(trainer.layout.width, device=storage.device)
        theta = trainer.theta
        saved, start, done = theta.detach().clone(), cursor.clone(), trainer.steps_done

        def undo() -> None:  # the warm-up steps changed the parameters and moved the cursor
            with torch.no_grad():
                theta.copy_(saved)
                cursor.copy_(start)
            trainer.steps_done = done

        # A graph replays the path its capture took: every step evaluates (the runner keeps
        # the values of the steps that the records show).
        trainer.always_evaluate = True
        try:
            self.graph = capture_whole_step(self._step, undo)
        except Exception:
            trainer.always_evaluate = False
            raise

    def _step(self) -> None:
        step_at_cursor(self._trainer, self._row, self._storage, self._cursor)

    def replay(self) -> None:
        self.graph.replay()
        self._trainer.steps_done += 1


def supports_cuda_graph(trainer: Trainer) -> bool:
    """Whether the step can be captured: on a GPU, the full batch every step, and plain SGD at
    a constant lr (a graph bakes the lr in, and cannot own an optimizer's state)."""
    optimizer = trainer.optimizer
    plain_sgd = isinstance(optimizer, torch.optim.SGD) and all(
        group["momentum"] == 0 for group in optimizer.param_groups
    )
    return (
        trainer.theta.device.type == "cuda"
        and plain_sgd
        and trainer.scheduler is None
        and trainer.batches_per_epoch == 1
        and trainer.layout.explain_samples == 0
    )


class BlockShape(NamedTuple):
    """What a compiled block of a job's steps is specialised to (with the recorder's buffer,
    whose shape follows from it and the worker's settings)."""

    samples: int  # training rows
    features: int
    bias: bool
    block: int  # steps per call
    validation: int = 0  # validation rows
    update: str = "sgd"  # the optimizer's update: one of UPDATES
    batch: int = 0  # rows per mini-batch; 0: the full batch
    # A sweep group's block (services/batched.py), a graph of its own: every live member's
    # steps at once, the members' count and the record buffer's rows dynamic, so nothing that
    # varies per group or per chunk is in the shape (only plain SGD on the full batch).
    group: bool = False


# The updates a compiled block runs, as `Trainer.update` computes them at a constant lr: plain
# SGD (the tutorial's), SGD with momentum (and nesterov), Adam and AdamW.
UPDATES = ("sgd", "momentum", "nesterov", "adam", "adamw")

# Compiled blocks, by shape, for as long as the process lives: a worker's pool process compiles
# each shape once, and Inductor's on-disk caches make the next process's compile of it a cache
# hit. `_ready_blocks`: the shapes whose block has run here (compiled, not only made), which
# the cost model counts as free.
_compiled_blocks: dict[BlockShape, Callable[..., None]] = {}
_failed_blocks: set[BlockShape] = set()
_ready_blocks: set[BlockShape] = set()

Update = Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], Any], None]


def _sgd_update(update: str) -> tuple[Callable[..., Any], Update]:
    """SGD's update (plain, `momentum` or `nesterov`) for a compiled block: the
    hyperparameters as float32 tensors (lr, weight decay, momentum), as eager SGD's kernels
    take its Python numbers."""

    def constants(hyper: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return hyper

    def plain(theta: torch.Tensor, grad: torch.Tensor, _: Any, c: Any) -> None:
        lr, weight_decay = c
        theta.sub_((grad + weight_decay * theta) * lr)  # the tutorial's update

    def momentum(theta: torch.Tensor, grad: torch.Tensor, state: Any, c: Any) -> None:
        lr, weight_decay, momentum = c
        (buffer,) = state  # zeros before the first step: then it becomes the gradient itself
        grad = grad + weight_decay * theta
        buffer.mul_(momentum).add_(grad)
        theta.sub_((grad + momentum * buffer if update == "nesterov" else buffer) * lr)

    return constants, plain if update == "sgd" else momentum


def _adam_update(decoupled: bool) -> tuple[Callable[..., Any], Update]:
    """Adam's (AdamW's: `decoupled` weight decay) update for a compiled block, as
    `Trainer._update_by_hand` computes it: the numbers it computes in Python (float64) are
    computed here in float64 too, from float64 hyperparameters and the step count, and taken
    to float32 where its kernels take them."""

    def constants(hyper: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        lr, weight_decay, beta1, beta2, eps = hyper
        f32 = torch.float32
        return (
            lr,
            weight_decay,
            beta1,
            beta2,
            (1 - lr * weight_decay).to(f32) if decoupled else weight_decay.to(f32),
            (1 - beta1).to(f32),
            beta2.to(f32),
            (1 - beta2).to(f32),
            eps.to(f32),
        )

    def adam(theta: torch.Tensor, grad: torch.Tensor, state: Any, c: Any) -> None:
        lr, _, beta1, beta2, decay, one_minus_beta1, beta2_32, one_minus_beta2, eps = c
        step, exp_avg, exp_avg_sq = state
        step.add_(1)  # float32, as torch.optim keeps it
        t = step.to(torch.float64)
        if decoupled:
            theta.mul_(decay)
        else:
            grad = grad + decay * theta
        exp_avg.lerp_(grad, one_minus_beta1)
        exp_avg_sq.mul_(beta2_32).add_(grad * grad * one_minus_beta2)
        step_size = (lr / (1 - beta1**t)).to(torch.float32)
        bias_correction2_sqrt = ((1 - beta2**t) ** 0.5).to(torch.float32)
        denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps
        theta.sub_(step_size * exp_avg / denom)

    return constants, adam


def _block_of_steps(shape: BlockShape) -> Callable[..., None]:
    """`shape.block` whole steps as one compiled call: forward, the gradient from autograd
    (torch.func.grad_and_value, traced), the record row written at the device-side `cursor`,
    and the optimizer's update (`shape.update`) on its state. One call's fixed cost (Dynamo's
    guards) is paid once per block. With mini-batches, `rows` holds each step's rows (the
    caller fills it: `Trainer.block_rows`). With validation rows, each row also gets the
    validation loss at the step's parameters: a branch per step would break the block up, so
    every step evaluates (the runner keeps the values of the steps that the records show)."""
    features, bias, block = shape.features, shape.bias, shape.block
    evaluated, batched = bool(shape.validation), bool(shape.batch)
    if shape.update in ("adam", "adamw"):
        constants, update = _adam_update(shape.update == "adamw")
    else:
        constants, update = _sgd_update(shape.update)

    def loss_of(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor = mse(x, y, theta, features, bias)
        return loss

    grad_and_loss = torch.func.grad_and_value(loss_of)

    def steps(
        theta: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        hyper: tuple[torch.Tensor, ...],
        state: tuple[torch.Tensor, ...],
        storage: torch.Tensor,
        cursor: torch.Tensor,
        rows: torch.Tensor | None = None,
        x_val: torch.Tensor | None = None,
        y_val: torch.Tensor | None = None,
    ) -> None:
        c = constants(hyper)
        for i in range(block):  # unrolled when traced
            if batched:
                assert rows is not None
                grad, loss = grad_and_loss(theta, x[rows[i]], y[rows[i]])
            else:
                grad, loss = grad_and_loss(theta, x, y)
            parts = [loss.view(1), grad, theta]  # the parameters before the update
            if evaluated:
                assert x_val is not None and y_val is not None
                parts.append(mse(x_val, y_val, theta, features, bias).view(1))
            row = torch.cat(parts)
            storage.index_copy_(0, cursor.view(1), row.view(1, -1))
            cursor.add_(1)
            update(theta, grad, state, c)

    # The hyperparameters are tensors, so that one compiled block serves every job of a
    # shape; each shape is a graph of its own (static shapes: the fastest code).
    compiled: Callable[..., None] = torch.compile(steps, fullgraph=True, dynamic=False)
    return compiled


def compiled_update(trainer: Trainer) -> str | None:
    """Which of UPDATES the trainer's optimizer takes, or None where a compiled block cannot
    take it: an lr schedule (its lr changes between steps; torch.optim's schedulers are
    Python), or a setting the JobSpec does not give (dampening, amsgrad, maximize)."""
    if trainer.scheduler is not None:
        return None
    optimizer, group = trainer.optimizer, trainer.optimizer.param_groups[0]
    if group.get("maximize") or group.get("amsgrad"):
        return None
    if isinstance(optimizer, torch.optim.AdamW):
        return "adamw"
    if isinstance(optimizer, torch.optim.Adam):
        return "adam"
    if not isinstance(optimizer, torch.optim.SGD) or group["dampening"] != 0:
        return None
    if group["momentum"] == 0:
        return "sgd"
    return "nesterov" if group["nesterov"] else "momentum"


def _hyperparameters(trainer: Trainer, update: str) -> tuple[torch.Tensor, ...]:
    """The block's hyperparameter tensors for `update` (`_sgd_update`, `_adam_update`)."""
    group = trainer.optimizer.param_groups[0]
    if update in ("adam", "adamw"):
        beta1, beta2 = group["betas"]
        adam = [group["lr"], group["weight_decay"], beta1, beta2, group["eps"]]
        return tuple(torch.tensor(float(n), dtype=torch.float64) for n in adam)
    numbers = [group["lr"], group["weight_decay"]]
    if update != "sgd":
        numbers.append(group["momentum"])
    return tuple(torch.tensor(float(n), dtype=torch.float32) for n in numbers)


def _optimizer_state(trainer: Trainer, update: str) -> tuple[torch.Tensor, ...]:
    """The optimizer's state tensors that `update` changes in place: torch.optim's own, under
    its keys (a checkpoint then reads alike whichever stepper wrote it); made as torch.optim
    makes them where no step has run yet (a zero momentum buffer takes the first gradient as
    torch.optim's first step does)."""
    theta = trainer.theta
    if update == "sgd":  # stateless: no entry either (the snapshot of plain SGD is None)
        return ()
    state = trainer.optimizer.state[theta]
    if update in ("momentum", "nesterov"):
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(theta.detach())
        return (state["momentum_buffer"],)
    if not state:  # adam, adamw
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(theta.detach())
        state["exp_avg_sq"] = torch.zeros_like(theta.detach())
    return (state["step"], state["exp_avg"], state["exp_avg_sq"])


class CompiledSteps:
    """Blocks of the trainer's whole step compiled with torch.compile (Inductor, on the CPU):
    the full batch or mini-batches that split the rows evenly, plain SGD, SGD with momentum,
    Adam or AdamW at a constant lr. Like `CudaGraphStep` it writes each row at the device-side
    `cursor` of the recorder's storage; `replay()` runs `block` steps. The optimizer's state
    is torch.optim's own tensors (`optimizer.state`), changed in place by the block, so
    checkpoints are the eager steps' format.

    Compiled code rounds a little differently from the eager step (records agree to float32
    rounding). Every attempt of a job runs the stepper its first attempt recorded (DESIGN
    §11), its blocks start at the same steps in every attempt (the checkpoints it writes fall
    on block boundaries, or in the eager tail of its last steps), so a resumed job equals its
    uninterrupted run bit for bit -- given workers with the same CPU instruction set, torch
    version, torch threads and block length, and no compile failing in one attempt only
    (that attempt's eager steps round differently). Constructing one compiles (or finds)
    the block and runs it once; a failure raises (and is remembered for the shape), and the
    caller runs eager steps.
    """

    name = "compiled"

    def __init__(
        self, trainer: Trainer, storage: torch.Tensor, cursor: torch.Tensor, block: int
    ) -> None:
        update = compiled_update(trainer)
        if update is None or not supports_compiled_steps(trainer):
            raise ValueError("this job's steps cannot run compiled")
        self.block = block
        self._trainer = trainer
        key = block_shape(trainer, block)
        if key in _failed_blocks:  # one failed compile of a shape is enough
            raise RuntimeError(f"compiling blocks of shape {key} failed before in this process")
        if key not in _compiled_blocks:
            # Each shape adds a compiled variant of the same code: allow many (past the limits
            # Dynamo refuses to compile, and the shape runs eager steps).
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, 1024)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)
            _compiled_blocks[key] = _block_of_steps(key)
        self._steps = _compiled_blocks[key]
        had_state = bool(trainer.optimizer.state.get(trainer.theta))
        state = _optimizer_state(trainer, update)
        self._rows = None
        if key.batch:
            self._rows = torch.empty(block, key.batch, dtype=torch.long, device=storage.device)
        theta = trainer.theta.detach()  # the trainer's parameters: updated in place
        self._args = (
            theta,
            trainer.x,
            trainer.y,
            _hyperparameters(trainer, update),
            state,
            storage,
            cursor,
            self._rows,
            *(trainer.val or ()),
        )
        saved, start = theta.clone(), cursor.clone()
        saved_state = [t.clone() for t in state]
        try:
            self.replay(count=False)  # compiles now, not in the first step of the loop
        except Exception:
            _failed_blocks.add(key)
            del _compiled_blocks[key]
            if not had_state:  # as it was: eager steps make their state themselves
                trainer.optimizer.state.pop(trainer.theta, None)
            raise
        finally:
            # That block changed the parameters, the optimizer's state and the cursor: undo.
            theta.copy_(saved)
            cursor.copy_(start)
            for tensor, value in zip(state, saved_state, strict=True):
                tensor.copy_(value)
        block_ready(key)

    def replay(self, count: bool = True) -> None:
        """Run the next `block` steps (`count`: and count them as done)."""
        trainer = self._trainer
        if self._rows is not None:
            trainer.block_rows(trainer.steps_done, self.block, self._rows)
        self._steps(*self._args)
        if count:
            trainer.steps_done += self.block


def block_shape(trainer: Trainer, block: int) -> BlockShape:
    """What a compiled block of the trainer's steps is specialised to."""
    validation = len(trainer.val[1]) if trainer.val is not None else 0
    batch = trainer.batch_size if trainer.batches_per_epoch > 1 else 0
    update = compiled_update(trainer) or "sgd"
    features, bias = trainer.layout.features, trainer.layout.bias
    return BlockShape(len(trainer.y), features, bias, block, validation, update, batch)


def shape_text(shape: tuple[Any, ...]) -> str:
    """A shape as GRADSTREAM_COMPILE_WARM_SHAPES writes it: samples x features, `+b` with a
    bias, `+vN` with N validation rows, `+bsN` for mini-batches of N rows, the update unless
    plain SGD (`+adam`), and `+group` for a sweep group's block (the block length is the
    worker's setting)."""
    shape = BlockShape(*shape)
    text = f"{shape.samples}x{shape.features}{'+b' if shape.bias else ''}"
    text += f"+v{shape.validation}" if shape.validation else ""
    text += f"+bs{shape.batch}" if shape.batch else ""
    text += f"+{shape.update}" if shape.update != "sgd" else ""
    return text + ("+group" if shape.group else "")


def parse_shape(text: str, block: int) -> BlockShape:
    """The BlockShape of `shape_text`'s `text` ("1000x10+b+v200+bs100+adam", "1000x10+group")
    in blocks of `block`."""
    size, *options = text.strip().split("+")
    samples, features = (int(v) for v in size.split("x"))
    validation = [int(o[1:]) for o in options if o.startswith("v")]
    batch = [int(o[2:]) for o in options if o.startswith("bs")]
    updates = [o for o in options if o in UPDATES]
    known = ("b", "group", *UPDATES)
    if (
        any(o not in known and not o.startswith(("v", "bs")) for o in options)
        or max(len(validation), len(batch), len(updates)) > 1
    ):
        raise ValueError(f"{text!r} is not a shape like 1000x10+b+v200+bs100+adam")
    return BlockShape(
        samples,
        features,
        "b" in options,
        block,
        validation[0] if validation else 0,
        updates[0] if updates else "sgd",
        batch[0] if batch else 0,
        "group" in options,
    )


def block_compiled(shape: tuple[Any, ...]) -> bool:
    """Whether this process has compiled and run the block of `shape`."""
    return BlockShape(*shape) in _ready_blocks


def block_ready(shape: BlockShape) -> None:
    """Note that this process has compiled and run the block of `shape` (a job's, or a
    group's: services/batched.py), and leave its marker beside Inductor's cache."""
    if shape not in _ready_blocks:
        _ready_blocks.add(shape)
        mark_cached(shape)


def _marker(shape: BlockShape) -> str:
    """The file that says Inductor's cache (where this process writes it now) holds the code
    of `shape`'s block, built by this torch version."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    name = f"{shape_text(shape)}.block{shape[3]}"
    return os.path.join(cache_dir(), "gradstream-compiled", torch.__version__, name)


def block_cached(shape: BlockShape) -> bool:
    """Whether a process compiled the block of `shape` into Inductor's current on-disk cache
    (its marker is there): one stat, no compile. A cache emptied by hand leaves no marker."""
    return os.path.exists(_marker(shape))


def mark_cached(shape: BlockShape) -> None:
    """Leave the marker of `shape` beside Inductor's cache, after its block compiled."""
    path = _marker(shape)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a"):
            pass
    except OSError:  # a read-only cache: the cost model then counts a full compile
        pass


def recent_shapes_file(cache_base: str) -> str:
    """The file of the shapes recently seen by the workers whose compile cache is in
    `cache_base` (GRADSTREAM_COMPILE_CACHE_DIR; one per CPU instruction set, like the code)."""
    return os.path.join(inductor_cache_dir(cache_base), "gradstream-recent-shapes.json")


def recent_shapes(path: str) -> list[str]:
    """The shapes in the file at `path`, most recent first (none if it is missing or not a
    list of strings)."""
    try:
        with open(path) as file:
            shapes = json.load(file)
    except (OSError, ValueError):
        return []
    if not isinstance(shapes, list) or not all(isinstance(s, str) for s in shapes):
        return []
    return shapes


def remember_shape(path: str, shape: str, keep: int) -> None:
    """Put `shape` first in the file at `path`, which keeps the `keep` latest shapes. Written
    to a temporary name and renamed, so a reader sees the old list or the new; two workers
    writing at once may lose one of their shapes (it is a hint, not a record)."""
    shapes = recent_shapes(path)
    if shapes[:1] == [shape] or keep == 0:
        return
    shapes = [shape, *(s for s in shapes if s != shape)][:keep]
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w") as file:
            json.dump(shapes, file)
        os.replace(temporary, path)
    except OSError:
        log.warning("could not write the recent shapes to %s", path, exc_info=True)


def supports_compiled_steps(trainer: Trainer) -> bool:
    """Whether the step can be compiled in blocks: on the CPU (a GPU captures a CUDA graph),
    an update a block can take (`compiled_update`: no lr schedule), the full batch or
    mini-batches that split the rows evenly (a shorter last batch would be a shape of its
    own), no explain view."""
    batches = trainer.batches_per_epoch
    return (
        trainer.theta.device.type == "cpu"
        and compiled_update(trainer) is not None
        and (batches == 1 or batches * trainer.batch_size == len(trainer.y))
        and trainer.layout.explain_samples == 0
    )


def inductor_cache_dir(base: str = "") -> str:
    """The folder for Inductor's on-disk caches: `base` (else torch's own choice) with a
    subfolder per CPU instruction set. Inductor's cache keys leave ATEN_CPU_CAPABILITY out, so
    workers of two instruction sets sharing one folder would find each other's code: built for
    AVX2, it fails to build under `default` (the worker then runs eager steps)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    root = base or cache_dir()
    capability = torch.backends.cpu.get_cpu_capability().lower()
    if os.path.basename(os.path.normpath(root)) == capability:
        return root  # set up already (a pool process started again)
    return os.path.join(root, capability)


def inductor_cache_counts() -> tuple[int, int]:
    """Inductor's FX graph cache hits and misses in this process so far."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def warm_up(device: torch.device) -> None:
    """Run one throw-away step so that torch's lazy imports and kernels load now, not in the
    first job (on a cold process the first optimizer step alone takes over a second)."""
    spec = JobSpec.model_validate({"data": {"x": [[1.0]], "y": [1.0]}, "steps": 1})
    trainer = Trainer(spec, device)
    trainer.step(torch.empty(trainer.layout.width, device=device))
