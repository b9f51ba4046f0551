"""Settings: the only place that reads the environment (prefix GRADSTREAM_)."""

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BeforeValidator, Field, Secret, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.sweeps_math import DEFAULT_RANK_RTOL


def default_data_dir() -> Path:
    """Where gradstream keeps data on this machine unless told otherwise (`gradstream up`'s
    folder, the archive): $XDG_DATA_HOME/gradstream, else ~/.local/share/gradstream (the XDG
    base directory default)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "gradstream"


def _json_object(value: Any) -> Any:
    """A setting given as JSON text (the environment) is decoded before it is checked."""
    return json.loads(value) if isinstance(value, str) else value


class Settings(BaseSettings):
    """Everything configurable, with defaults that suit the local stack."""

    model_config = SettingsConfigDict(env_prefix="GRADSTREAM_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    # A Redis with replicas whose primary Sentinel elects (services/redis_clients.py): the
    # sentinels as `host:port` separated by commas, and the name they monitor the primary
    # under. With sentinels set, every client (store, API streams, Celery's broker) asks them
    # for the primary; `redis_url` then gives only the password and the database number.
    redis_sentinels: str = ""
    redis_master: str = "gradstream"
    # The sentinels' own password (their `requirepass`), if they have one; or read from a file.
    redis_sentinel_password: SecretStr = SecretStr("")
    redis_sentinel_password_file: str | None = None
    # How long an attempt rides out an unreachable Redis (a restart, a Sentinel failover),
    # retrying its flushes, before it gives up. It must cover the sentinels' worst failover,
    # redis_clients.failover_bound_s of their down-after-milliseconds and failover-timeout
    # (docs/deploy.md sizes them; the Python client's streams ride out as long).
    redis_outage_s: float = Field(default=60.0, gt=0)

    # Who may call the API: `tenant:key` pairs separated by commas, or the path of a file of
    # them (services/auth.py). With none, the API refuses to start unless `auth_disabled` is
    # set explicitly (development only: every caller is then the tenant "dev").
    api_keys: SecretStr = SecretStr("")
    auth_disabled: bool = False
    # Stream tokens (for EventSource, which cannot send headers): lifetime, and the signing
    # secret shared by all API processes (derived from the keys when empty).
    stream_token_ttl_s: int = Field(default=300, ge=1)
    stream_token_secret: SecretStr = SecretStr("")
    # Redis's password, read from this file (a compose secret) into `redis_url`.
    redis_password_file: str | None = None

    # Limits on what one job may ask for (each refusal is a 422 naming the field).
    max_steps: int = Field(default=1_000_000, ge=1)
    max_elements: int = Field(default=100_000_000, ge=1, description="samples x features per job")
    # Parameters (features, + 1 with a bias) per job: each step's record holds them twice.
    max_params: int = Field(default=10_000, ge=1)
    # Sweeps (DESIGN §9): members per sweep (more is a 422 naming the setting), and per group
    # (one batched step on one worker; a bigger group is split).
    max_sweep_members: int = Field(default=4096, ge=1)
    max_group_members: int = Field(default=1024, ge=1)
    # Rows x members per group: a group's batched step holds a few float32 (rows, members)
    # tensors (y_hat, the residual, autograd's saved ones), rows being a member's training
    # samples (held-out ones included) plus its explicit validation set's. A sweep whose
    # groups would pass it is split into more groups; a member past it alone is a 422.
    max_group_elements: int = Field(default=100_000_000, ge=1)
    # A sweep's event stream keeps its latest this many events (a progress event per flush
    # of any group); a watcher resuming from an older one gets `reset`, then every member's
    # state.
    sweep_events_keep: int = Field(default=2000, ge=10)
    # Two values of a sweep's metric within this relative tolerance rank as equal, and member
    # order decides between them (DESIGN §11): steppers and CPUs that agree to float32
    # rounding then keep and pick the same members.
    rank_rtol: float = Field(default=DEFAULT_RANK_RTOL, ge=0)
    # A /steps page, and each read of an SSE backlog, holds at most about this much JSON.
    max_page_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # What one tenant keeps: specs, step records (counted up front as steps x record width)
    # and datasets. A submit or upload that would not fit is a 429; deleting frees it.
    tenant_storage_bytes: int = Field(default=1024**3, ge=1)
    # The maxmemory of a Redis that gradstream starts itself (tests, `gradstream up`): 0 picks
    # a quarter of the machine's RAM. Redis runs with noeviction: a write that would pass it is
    # refused (a 507 at the API), never a job's data evicted.
    redis_maxmemory_bytes: int = Field(default=0, ge=0)
    # Limits per request and per tenant (413 or 429 naming the limit).
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Dataset uploads (POST /v1/datasets) have a limit of their own, and a worker keeps the
    # datasets it used in a bounded cache per device.
    max_dataset_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # An upload's arrays once read (an .npz of zeros compresses a thousandfold): checked from
    # the .npy headers and the zip's declared sizes before any array is read.
    max_dataset_array_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    # Each upload holds its body and its parsed arrays in the API process at once.
    max_concurrent_uploads: int = Field(default=4, ge=1, description="per API process")
    dataset_cache_bytes: int = Field(default=1024 * 1024 * 1024, ge=0)
    max_datasets_per_tenant: int = Field(default=100, ge=1)
    max_active_jobs_per_tenant: int = Field(default=100, ge=1, description="queued or running")
    max_sse_per_tenant: int = Field(default=64, ge=1, description="per API process")
    submits_per_minute: int = Field(default=600, ge=1, description="per tenant")
    # An SSE client that takes nothing for this long is dropped (it resumes by Last-Event-ID).
    sse_send_timeout_s: float = Field(default=30.0, gt=0)
    # What one SSE watcher may hold in an API process: the events queued for it (shared with
    # the job's other watchers) and its write in flight. Past it the watcher is dropped and
    # resumes by Last-Event-ID. Its own copy is at most one write (64 KiB) beyond the socket.
    # Unset: 4 pages of `max_page_bytes` (32 MiB by default).
    sse_watcher_bytes: int | None = Field(default=None, ge=256 * 1024)
    # The API process's async Redis connections (its event streams): each watched running job
    # or sweep holds one in a blocking read; backlog pages and snapshots share the rest. A
    # stream that finds none free within 10 s fails (the client backs off and reconnects);
    # gradstream_sse_redis_connections{state="in_use"} shows how near the limit a process is.
    sse_redis_connections: int = Field(default=256, ge=8, description="per API process")

    # History beyond Redis memory (DESIGN §10): a job finished for `hot_retention_s` has its
    # step stream moved to one Parquet file under `archive_url` (any fsspec URL: a local
    # folder, `s3://bucket/prefix`, ...; `archive_options` are the file system's options as
    # JSON, e.g. {"endpoint_url": ...} for an S3-compatible server). Every worker looks for
    # such jobs every `archive_interval_s`; each API process keeps up to `archive_cache_bytes`
    # of archived steps decoded, so that paging through an archived job reads each row group
    # once.
    archive_url: str = Field(default_factory=lambda: str(default_data_dir() / "archive"))
    # A secret: s3fs's options carry the key and secret (never in a repr or a log line).
    archive_options: Annotated[Secret[dict[str, Any]], BeforeValidator(_json_object)] = Field(
        default_factory=lambda: Secret[dict[str, Any]]({})
    )
    hot_retention_s: float = Field(default=3600.0, ge=0)
    archive_interval_s: float = Field(default=30.0, gt=0)
    archive_cache_bytes: int = Field(default=256 * 1024 * 1024, ge=0)

    # Recording: steps are flushed to Redis in chunks, by time or by count.
    flush_interval_s: float = Field(default=0.02, gt=0)
    flush_max_steps: int = Field(default=4096, ge=1)

    # Leases and recovery (DESIGN §5): a running attempt holds a lease it renews; a job whose
    # lease lapsed is handed to a new attempt by the reaper every worker runs, up to
    # `max_attempts` attempts lost to failures.
    lease_s: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    reaper_interval_s: float = Field(default=2.0, gt=0)
    # Celery redelivers an unacknowledged message after this long even while it still runs;
    # duplicates are harmless (fencing), recovery does not wait for it (leases).
    visibility_timeout_s: float = Field(default=3600.0, gt=0)
    # A job queued this long while its queue holds no message gets its message sent again
    # (the first was lost: a crash between writing the job and enqueueing it, or Redis
    # restarted from an AOF that missed it). A duplicate message is harmless.
    orphan_after_s: float = Field(default=30.0, gt=0)
    # An attempt that records no step for this long is taken as hung: its lease is left to
    # lapse and the job goes to a new attempt.
    attempt_stall_s: float = Field(default=120.0, gt=0)
    # A hard limit on one attempt (none by default): Celery kills the pool child, the lease
    # lapses, and the job resumes from its checkpoint like after any other lost worker.
    attempt_time_limit_s: float | None = Field(default=None, gt=0)

    # Worker.
    device: str = "cpu"
    # A `cuda:N` worker on a machine without CUDA refuses to start unless this is set (then it
    # computes on the CPU: useful to test routing to the gpu queue on a CPU-only machine).
    cuda_fallback_cpu: bool = False
    torch_threads: int = Field(default=1, ge=1)
    # On a GPU, a job of at least this many steps runs its step as a captured CUDA graph (one
    # launch per step instead of ~20); shorter jobs do not repay the capture.
    cuda_graphs: bool = True
    cuda_graph_min_steps: int = Field(default=50, ge=1)
    # On the CPU, a job long enough to repay compiling (the cost model below) runs its steps
    # as compiled blocks of `compile_block_steps` (torch.compile, Inductor): plain SGD on the
    # full batch. Compiled code is cached per shape in the worker process, and on disk by
    # Inductor (TORCHINDUCTOR_CACHE_DIR, or `compile_cache_dir`), so the next worker finds it.
    compile_steps: bool = True
    compile_block_steps: int = Field(default=16, ge=1)
    compile_cache_dir: str = ""
    # Shapes each pool process compiles when it starts, e.g. "1x1,1000x10+b" (samples x
    # features, +b with a bias; "1000x10+group": a sweep group's block), so that jobs (groups)
    # of those shapes never wait for a compile.
    compile_warm_shapes: str = ""
    # Besides those, the shapes of the last `compile_recent_shapes` jobs that could run
    # compiled, kept most recent first in a small file in the compile cache's folder (shared by
    # the workers that share the cache), so that a restarted worker compiles what it ran
    # lately before such jobs come again. 0: neither kept nor warmed.
    compile_recent_shapes: int = Field(default=4, ge=0)
    worker_heartbeat_s: float = Field(default=2.0, gt=0)
    # Celery task events (Flower shows tasks from them): three PUBLISHes per job from the
    # worker, one from the API. Off, Redis did ~230-350 µs less per tutorial job (of ~720-850)
    # and a worker's main process ~1-1.3 ms less (of ~2-2.4) on this project's VM
    # (bench/job_cost.py, bench/RESULTS.md); Flower still lists the workers.
    task_events: bool = True
    # A worker serves its own Prometheus metrics on this port (`gradstream worker
    # --metrics-port`, which also sets up prometheus-client's multiprocess mode).
    worker_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    worker_ttl_s: float = Field(default=10.0, gt=0)

    # The cost model of `device: auto`: seconds per step = fixed + per_element * samples x
    # features, plus on a GPU moving the data once and, for a graphed job, the capture.
    # Defaults: a CPU worker with one torch thread on this project's VM (bench/step_loop.py);
    # an H100 (bench/gpu_bench.py, bench/RESULTS.md): eager step ~500 µs at 1000x10, bound by
    # kernel launches; graphed step 24 µs, ~30 ms to capture; 3.2 ms at 10^7 x 100.
    cpu_step_fixed_s: float = Field(default=250e-6, ge=0)
    cpu_step_per_element_s: float = Field(default=1.5e-9, ge=0)
    # Compiled blocks (bench/worker_loop.py): ~5 µs a step at 1x1 in blocks of 16; compiling a
    # shape took 16 s with a cold cache and 4-7 s with a warm one on this project's VM.
    cpu_compiled_step_fixed_s: float = Field(default=10e-6, ge=0)
    # What an optimizer's state adds to an eager step (SGD with momentum, Adam, AdamW: their
    # update is 3-9 more ops than the tutorial's), not to a compiled one, whose block fuses it:
    # measured in one process at 1x1, momentum +17 µs and Adam +47 µs over plain SGD's 92 µs.
    # Their blocks compile in about the time plain SGD's do (5-15 s here, as cpu_compile_s).
    cpu_stateful_update_s: float = Field(default=40e-6, ge=0)
    cpu_compile_s: float = Field(default=10.0, ge=0)
    # A compile whose code Inductor's on-disk cache holds (another process compiled the
    # shape): Dynamo still traces, and the cached code is loaded (measured on this VM: 2.9 s
    # for a process's first shape, 0.5 s for its next; 3.1 s in tests/test_resume.py). A
    # shape this process has compiled costs nothing.
    cpu_compile_cached_s: float = Field(default=4.0, ge=0)
    gpu_step_fixed_s: float = Field(default=500e-6, ge=0)
    gpu_graph_step_fixed_s: float = Field(default=25e-6, ge=0)
    gpu_graph_setup_s: float = Field(default=0.03, ge=0)
    gpu_step_per_element_s: float = Field(default=3.2e-12, ge=0)
    gpu_transfer_per_element_s: float = Field(default=2e-10, ge=0)

    # API.
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    sse_keepalive_s: float = Field(default=15.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _redis_password(self) -> "Settings":
        if self.redis_password_file:
            password = Path(self.redis_password_file).read_text().strip()
            url = urlsplit(self.redis_url)
            host = url.netloc.rsplit("@", 1)[-1]
            netloc = f"{url.username or ''}:{quote(password, safe='')}@{host}"
            self.redis_url = urlunsplit(url._replace(netloc=netloc))
        if self.redis_sentinel_password_file:
            password = Path(self.redis_sentinel_password_file).read_text().strip()
            self.redis_sentinel_password = SecretStr(password)
        self.sentinel_addresses()  # refuses a malformed list at start, naming the setting
        return self

    @property
    def watcher_bytes(self) -> int:
        """The byte budget of one SSE watcher (`sse_watcher_bytes`, or 4 pages)."""
        return self.sse_watcher_bytes or 4 * self.max_page_bytes

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """`redis_sentinels` as (host, port) pairs; empty when Redis is reached by its URL."""
        addresses = []
        for item in filter(None, (part.strip() for part in self.redis_sentinels.split(","))):
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"redis_sentinels: {item!r} is not host:port (GRADSTREAM_REDIS_SENTINELS "
                    "takes sentinels as host:port separated by commas)"
                )
            addresses.append((host, int(port)))
        return addresses


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()
