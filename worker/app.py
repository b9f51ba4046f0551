"""The worker's Celery app: `celery -A worker.app worker -Q cpu|gpu` (or `gradstream worker`).

The main process never touches torch: Celery's prefork pool forks children from it, and a
child of a process that started torch's thread pool or CUDA can hang or fail (DESIGN §8). Torch
is set up in each child (`worker_process_init`); the main process only pins the device through
the environment its children inherit, and keeps the registry entry alive with a heartbeat.
"""

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from celery.signals import (
    celeryd_init,
    setup_logging,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from prometheus_client import CollectorRegistry, multiprocess, start_http_server

from services.archive import Archive
from services.archiver import archive_due
from services.config import Settings, get_settings
from services.environment import cpu_model
from services.errors import StoreUnavailable
from services.logs import configure_logging
from services.queue import Device, celery_app, enqueue_training
from services.redis_clients import failover_outlasts_outage
from services.runner import shapes_to_warm, warm_compiled
from services.store import Store
from services.training import compute_device, inductor_cache_dir, warm_up

log = logging.getLogger(__name__)


@setup_logging.connect
def _logging(loglevel: str | int | None = None, **_: Any) -> None:
    # Connected, this replaces Celery's own logging set-up (in the main process and, through
    # it, the pool children): JSON lines off a terminal, each job's lines with its ids.
    level = logging.getLevelName(loglevel) if isinstance(loglevel, int) else loglevel
    configure_logging(str(level or get_settings().log_level))


app = celery_app


# Sent by the main process to each pool child at a warm shutdown: checkpoint the running job
# and hand it back instead of finishing it (Celery would otherwise wait for the whole job).
DRAIN_SIGNAL = signal.SIGUSR2


@dataclass
class ChildContext:
    """What a pool child needs to run jobs: its own Redis connection, its torch device, and
    the event that asks the running job to hand itself back."""

    store: Store
    device: torch.device
    drain: threading.Event


_child: ChildContext | None = None
_heartbeat_stop = threading.Event()
_node_name = ""
_controller: Any = None  # the WorkController, for its pool's process ids


def child_context() -> ChildContext:
    if _child is None:
        raise RuntimeError("worker_process_init has not run in this process")
    return _child


@celeryd_init.connect
def pin_device(sender: str, **_: Any) -> None:
    """Main process, before the pool forks: pin CUDA to the worker's one GPU."""
    global _node_name
    _node_name = sender
    device = Device.parse(get_settings().device)
    # Assigned, not defaulted: a CUDA_VISIBLE_DEVICES inherited from the shell would let a
    # cuda:1 worker compute on another GPU than the one it registers.
    os.environ.update(device.pinning_env())


@worker_init.connect
def remember_controller(sender: Any, **_: Any) -> None:
    global _controller
    _controller = sender


@worker_process_init.connect
def init_child(**_: Any) -> None:
    """Each pool child: torch threads, its device, a connection of its own, the drain signal."""
    global _child
    settings = get_settings()
    torch.set_num_threads(settings.torch_threads)
    # Inductor's on-disk caches, shared by the worker's processes: one folder per instruction set.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir(settings.compile_cache_dir)
    device = compute_device(settings.device, settings.cuda_fallback_cpu)
    warm_up(device)
    drain = threading.Event()
    signal.signal(DRAIN_SIGNAL, lambda *_: drain.set())
    # The configured shapes and those its cache's workers ran lately (the file is read after
    # TORCHINDUCTOR_CACHE_DIR is set: it sits in that folder).
    shapes = shapes_to_warm(settings) if device.type == "cpu" and settings.compile_steps else []
    if shapes:
        # Apart from the child's start: Celery kills a child not up within a few seconds,
        # and a compile takes longer.
        threading.Thread(target=_warm_compiled, args=(settings, shapes), daemon=True).start()
    store = Store.from_settings(settings)
    store.load_scripts()  # a script Redis cannot compile fails the child at start, not a job
    _child = ChildContext(store, device, drain)


def _warm_compiled(settings: Settings, shapes: list[str]) -> None:
    try:
        log.info("compiled steps warmed for %s", ", ".join(warm_compiled(settings, shapes)))
    except Exception:
        log.exception("warming compiled steps failed (jobs compile when they come)")


@worker_shutting_down.connect
def drain_children(how: str, **_: Any) -> None:
    """Main process, warm shutdown: ask each pool child to hand its job back."""
    if how != "Warm" or _controller is None:
        return
    for pid in _controller.pool.info.get("processes", []):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, DRAIN_SIGNAL)


def _describe_device(device: Device) -> tuple[str, int]:
    """Device name and memory in bytes, found without torch (this runs in the main process)."""
    if device.kind == "cuda":
        try:
            out = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,memory.total",
                    "--format=csv,noheader,nounits",
                    "-i",
                    str(device.index),
                ],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            name, mib = (part.strip() for part in out.split(","))
            return name, int(mib) * 1024 * 1024
        except (OSError, subprocess.SubprocessError, ValueError):
            return f"cuda:{device.index} (nvidia-smi unavailable)", 0
    return cpu_model(), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@worker_ready.connect
def start_heartbeat(**_: Any) -> None:
    """Main process: register the worker and refresh its entry until shutdown (and serve its
    metrics, when it has a metrics port)."""
    settings = get_settings()
    device = Device.parse(settings.device)
    device_name, memory = _describe_device(device)
    info: dict[str, str | int] = {
        "name": _node_name,
        "device": str(device),
        "device_name": device_name,
        "memory_bytes": memory,
        "queues": device.queue,
    }
    store = Store.from_settings(settings)
    if warning := failover_outlasts_outage(settings):
        log.warning("%s", warning)

    def beat() -> None:
        next_reap = 0.0
        while True:
            # Apart: a heartbeat Redis refuses (it is full) must not stop recovery.
            try:
                store.heartbeat(info, settings.worker_ttl_s)
            except StoreUnavailable as exc:
                # Redis is unreachable (restarting, failing over): no running attempt can
                # renew its lease either. Reaping waits a lease once Redis is back, so that a
                # lease that lapsed in the outage is renewed by its attempt, not taken for a
                # lost worker (which would cost the job one of its max_attempts).
                log.warning("worker heartbeat failed: %s (%s)", exc, exc.__cause__)
                next_reap = time.monotonic() + settings.lease_s
            except Exception:
                log.exception("worker heartbeat failed")
            if time.monotonic() >= next_reap:
                try:
                    reap(store)
                except Exception:
                    log.exception("reaper failed")
                next_reap = time.monotonic() + settings.reaper_interval_s
            if _heartbeat_stop.wait(min(settings.worker_heartbeat_s, settings.reaper_interval_s)):
                return

    threading.Thread(target=beat, name="gradstream-heartbeat", daemon=True).start()
    threading.Thread(
        target=archive_loop, args=(settings,), name="gradstream-archiver", daemon=True
    ).start()
    log.info("worker %s registered on queue %s (%s)", _node_name, device.queue, device_name)
    if settings.worker_metrics_port is not None:
        _serve_metrics(settings.worker_metrics_port)


def _serve_metrics(port: int) -> None:
    """Serve what every pool process recorded (multiprocess mode). A failure (the port is
    taken, no multiprocess directory) costs the metrics only, never the heartbeat."""
    try:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        start_http_server(port, registry=registry)
    except (OSError, ValueError) as exc:
        log.error("worker metrics not served on port %d: %s", port, exc)


def reap(store: Store) -> None:
    """Recovery that needs no extra process: every worker requeues jobs whose lease lapsed
    and resends jobs whose message was lost. Duplicate messages are harmless (fencing)."""
    settings = get_settings()
    for job_id, queue in store.reap_lapsed(settings.max_attempts):
        log.warning("job %s lost its worker (lease lapsed): requeued on %s", job_id, queue)
        enqueue_training(job_id, queue)
    for job_id, queue in store.orphaned_jobs(settings.orphan_after_s):
        log.warning("job %s queued with no message on %s: sent again", job_id, queue)
        enqueue_training(job_id, queue)


def archive_loop(settings: Settings) -> None:
    """Main process, beside the heartbeat: every worker moves the steps of jobs finished for
    the hot retention to the archive (services/archiver.py), a batch per pass. A thread of its
    own, as writing a file can take longer than a heartbeat may wait."""
    try:
        archive = Archive.from_settings(settings)
    except (ImportError, ValueError, OSError):  # an unknown protocol, a bad option...
        log.exception("archiver not started: GRADSTREAM_ARCHIVE_URL cannot be used")
        return
    store = Store.from_settings(settings, archive)
    while not _heartbeat_stop.wait(settings.archive_interval_s):
        try:
            for job_id in archive_due(store, archive, settings.hot_retention_s):
                log.info("job %s: steps archived", job_id)
        except Exception:
            log.exception("archiver failed")


@worker_shutdown.connect
def stop_heartbeat(**_: Any) -> None:
    _heartbeat_stop.set()
    try:
        Store.from_settings(get_settings()).unregister_worker(_node_name)
    except Exception:
        log.exception("could not unregister worker %s", _node_name)


# Registers the task on the app; last, because tasks.py reads this module's names.
import worker.tasks  # noqa: E402, F401
