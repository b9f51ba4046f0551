"""The Celery app (configured lazily from Settings), the task name, and device -> queue routing."""

from dataclasses import dataclass
from enum import StrEnum
from types import SimpleNamespace
from typing import Any

from celery import Celery

from services.config import Settings, get_settings
from services.redis_clients import celery_broker
from services.schemas import JobSpec

TRAIN_TASK = "gradstream.train"
CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for at-least-once delivery of jobs to one-job-at-a-time workers."""
    broker_url, transport_options = celery_broker(settings)
    return {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        # JSON only: a task carries a job id, never a pickled object.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "task_default_queue": CPU_QUEUE,
        # Acknowledge after the attempt, so a job whose worker died is delivered again; take one
        # message at a time, so a busy worker does not sit on jobs another could run.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # A worker that loses the broker (Redis restarting, or failing over to a replica) keeps
        # running its job: the attempt rides the outage out by retrying its flushes
        # (services/runner.py), and a copy of its message delivered elsewhere meanwhile is
        # skipped (the claim finds the job's live lease). Terminating it, Celery's default
        # from 6.0, would cost the job one of its max_attempts and a lease's wait.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            **transport_options,
        },
        "task_time_limit": settings.attempt_time_limit_s,
        # Task events, so that Flower (`celery --broker URL flower`) shows gradstream's tasks
        # (GRADSTREAM_TASK_EVENTS=false: not, for a service that has no use for them).
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": settings.task_events,
    }


class GradstreamCelery(Celery):  # type: ignore[misc]
    """Reads Settings when the app is first used, not at import (`celery -A worker.app` imports)."""

    def on_configure(self) -> None:
        self.config_from_object(SimpleNamespace(**celery_config(get_settings())))


celery_app = GradstreamCelery("gradstream", set_as_current=False)


def enqueue_training(job_id: str, queue: str) -> None:
    """Send the training task by name: the API never imports the worker."""
    celery_app.send_task(TRAIN_TASK, args=[job_id], queue=queue)


@dataclass(frozen=True)
class Device:
    """A worker's device: `cpu`, or `cuda` with an index (`cuda:1`)."""

    kind: str
    index: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Device":
        if text == "cpu":
            return cls("cpu")
        kind, _, index = text.partition(":")
        if kind == "cuda" and index.isdigit():
            return cls("cuda", int(index))
        raise ValueError(f"unknown device {text!r}: use cpu or cuda:N")

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    @property
    def queue(self) -> str:
        return GPU_QUEUE if self.kind == "cuda" else CPU_QUEUE

    def pinning_env(self) -> dict[str, str]:
        """Environment that pins a worker to this device before any CUDA initialisation."""
        if self.kind == "cuda":
            return {"CUDA_VISIBLE_DEVICES": str(self.index), "GRADSTREAM_DEVICE": str(self)}
        return {"CUDA_VISIBLE_DEVICES": "", "GRADSTREAM_DEVICE": "cpu"}


@dataclass(frozen=True)
class Route:
    device: str  # cpu | cuda
    queue: str
    reason: str


def estimated_seconds(device: str, elements: int, steps: int, settings: Settings) -> float:
    """The cost model's time for a job of `steps` steps over `elements` samples x features."""
    if device == "cpu":
        return steps * (settings.cpu_step_fixed_s + settings.cpu_step_per_element_s * elements)
    transfer = settings.gpu_transfer_per_element_s * elements
    per_element = settings.gpu_step_per_element_s * elements
    if settings.cuda_graphs and steps >= settings.cuda_graph_min_steps:  # as the runner decides
        per_step = settings.gpu_graph_step_fixed_s + per_element
        return steps * per_step + settings.gpu_graph_setup_s + transfer
    return steps * (settings.gpu_step_fixed_s + per_element) + transfer


class CompiledAt(StrEnum):
    """Where a job's compiled block of steps is found when its attempt chooses a stepper."""

    NOWHERE = "nowhere"  # compiled from scratch: cpu_compile_s
    DISK = "disk"  # Inductor's on-disk cache holds its code: cpu_compile_cached_s
    PROCESS = "process"  # this process compiled it already: nothing to pay


def compile_seconds(compiled_at: CompiledAt, settings: Settings) -> float:
    """The cost model's time to have a shape's compiled block ready, given where it is found."""
    if compiled_at is CompiledAt.PROCESS:
        return 0.0
    if compiled_at is CompiledAt.DISK:  # never dearer than compiling
        return min(settings.cpu_compile_cached_s, settings.cpu_compile_s)
    return settings.cpu_compile_s


def may_compile(spec: JobSpec, settings: Settings) -> bool:
    """Whether a CPU job may run compiled blocks at all, whatever they cost: compiling is on
    and the job has a whole block of steps."""
    return settings.compile_steps and spec.steps >= settings.compile_block_steps


def compiles(
    spec: JobSpec,
    settings: Settings,
    members: int = 1,
    compiled_at: CompiledAt = CompiledAt.NOWHERE,
) -> bool:
    """Whether a CPU job runs compiled blocks: when the cost model says compiling repays
    itself over the whole job (the spec's steps, not an attempt's: every attempt of a job
    chooses alike, so its records do not depend on where it was resumed). The compile costs
    what `compiled_at` says (nothing when this process has the block); a free one still needs
    a whole block of steps. A step computes on its mini-batch's rows (all of them by
    default), and an optimizer with state (momentum, Adam, AdamW) makes an eager step dearer
    by `cpu_stateful_update_s`. A sweep's group of `members` costs as one job on `members`
    times the data."""
    if not may_compile(spec, settings):
        return False
    rows = min(spec.batch_size or spec.data.samples, spec.data.samples)
    elements = rows * spec.data.features * members
    eager = estimated_seconds("cpu", elements, spec.steps, settings)
    o = spec.optimizer
    if o.name != "sgd" or o.momentum:
        eager += spec.steps * settings.cpu_stateful_update_s
    per_step = settings.cpu_compiled_step_fixed_s + settings.cpu_step_per_element_s * elements
    return compile_seconds(compiled_at, settings) + spec.steps * per_step < eager


# Float32 (rows, members) tensors a batched step holds at once: y_hat, the residual, its
# square, what autograd saves and the backward pass's gradients (services/batched.py). Measured
# on the CPU: one eager step of 10^6 rows x 64 members grew the peak by 1.53 GB, 6.0 such
# tensors.
GROUP_ACTIVATIONS = 6
# Float32 (parameters, members) tensors: theta, its gradient, the optimizer's state (Adam's
# two moments, a momentum buffer) and the record rows' copies.
GROUP_PARAMETER_COPIES = 8


def group_rows(spec: JobSpec) -> int:
    """The rows one member's step computes on: its training data (held-out rows included:
    the validation loss computes on them) and an explicit validation set."""
    validation = spec.eval.data if spec.eval is not None else None
    return spec.data.samples + (validation.samples if validation is not None else 0)


def group_bytes(spec: JobSpec, members: int = 1) -> int:
    """An estimate of the memory a group of `members` members of `spec` needs on its device:
    the shared data once, and per member its (rows,) activations and its parameters' copies.
    A job is a group of one."""
    features = spec.data.features
    data = group_rows(spec) * (features + 1)
    activations = GROUP_ACTIVATIONS * group_rows(spec) * members
    parameters = GROUP_PARAMETER_COPIES * (features + int(spec.bias)) * members
    return 4 * (data + activations + parameters)


def route_job(
    spec: JobSpec,
    live_queues: set[str],
    settings: Settings,
    members: int = 1,
    live_memory: dict[str, int] | None = None,
) -> Route:
    """Where a job goes: as asked, or for `auto` by the cost model among the live workers. A
    sweep's group of `members` costs as one job on `members` times the data (one batched
    step's matmul), and for `auto` goes to a GPU only if its memory estimate (group_bytes)
    fits the largest live GPU's memory (`live_memory`, bytes per queue, where known)."""
    if spec.device == "cpu":
        return Route("cpu", CPU_QUEUE, "asked for cpu")
    if spec.device == "cuda":
        return Route("cuda", GPU_QUEUE, "asked for cuda")
    gpu_live, cpu_live = GPU_QUEUE in live_queues, CPU_QUEUE in live_queues
    if not gpu_live:
        return Route("cpu", CPU_QUEUE, "auto: cpu (no gpu worker live)")
    needs = group_bytes(spec, members)
    gpu_memory = (live_memory or {}).get(GPU_QUEUE, 0)
    if cpu_live and gpu_memory and needs > gpu_memory:
        return Route(
            "cpu",
            CPU_QUEUE,
            f"auto: cpu (needs ~{needs} bytes; the largest live gpu has {gpu_memory})",
        )
    if not cpu_live:
        return Route("cuda", GPU_QUEUE, "auto: gpu (no cpu worker live)")
    elements = spec.data.samples * spec.data.features * members
    cpu_s = estimated_seconds("cpu", elements, spec.steps, settings)
    gpu_s = estimated_seconds("cuda", elements, spec.steps, settings)
    estimates = f"estimated {cpu_s:.3g} s on cpu, {gpu_s:.3g} s on gpu, ~{needs} bytes"
    if gpu_s < cpu_s:
        return Route("cuda", GPU_QUEUE, f"auto: gpu ({estimates})")
    return Route("cpu", CPU_QUEUE, f"auto: cpu ({estimates})")
