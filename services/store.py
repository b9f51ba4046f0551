"""Redis: job records, step streams, status events, the job indexes and the worker registry.

Every key of one job carries the hash tag `{<job id>}`, so each Lua script (services/scripts.py)
touches one job atomically. The job indexes (`gs:jobs`, `gs:jobs:<status>`) are lexicographic
sorted sets of job ids, which are time-ordered, for newest-first listing.
"""

import functools
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

import redis

from services import scripts
from services.datasets import ParsedDataset
from services.errors import (
    DatasetNotFound,
    JobFinished,
    JobNotFound,
    LimitExceeded,
    MalformedJob,
    StoreUnavailable,
)
from services.records import Chunk, expand_chunk
from services.schemas import DatasetInfo, JobSpec, JobStatus, JobView, WorkerInfo

IDEMPOTENCY_TTL_S = 24 * 3600
LIVE_QUEUES_TTL_S = 1.0

JOBS_INDEX = "gs:jobs"
STATUS_INDEX_PREFIX = "gs:jobs:"
WORKERS_INDEX = "gs:workers"
STATS_KEY = "gs:stats"


def lease_key(job_id: str) -> str:
    return f"gs:{{{job_id}}}:lease"


def ckpt_key(job_id: str) -> str:
    return f"gs:{{{job_id}}}:ckpt"


def idempotency_key(tenant: str, key: str) -> str:
    # Per tenant: another tenant's key must never return (or reveal) this tenant's job.
    return f"gs:idem:{tenant}:{key}"


def tenant_index(tenant: str, status: JobStatus | None = None) -> str:
    """A tenant's jobs (all, or in one status), lex-sorted by id like the global indexes."""
    base = f"gs:tenant:{tenant}:jobs"
    return base if status is None else f"{base}:{status.value}"


def dataset_key(dataset_id: str) -> str:
    return f"gs:dataset:{dataset_id}"


def tenant_datasets(tenant: str) -> str:
    return f"gs:tenant:{tenant}:datasets"


def submits_key(tenant: str, window: int) -> str:
    return f"gs:submits:{tenant}:{window}"


def job_key(job_id: str) -> str:
    return f"gs:{{{job_id}}}:job"


def steps_key(job_id: str) -> str:
    return f"gs:{{{job_id}}}:steps"


def events_key(job_id: str) -> str:
    return f"gs:{{{job_id}}}:events"


def worker_key(name: str) -> str:
    return f"gs:worker:{name}"


def step_entry_id(step: int) -> str:
    """The stream entry id of the chunk whose last step is `step` (0-0 is not a valid id)."""
    return f"{step}-1"


_last_id_micros = 0
_id_lock = threading.Lock()


def new_job_id() -> str:
    """32 hex digits: microseconds since the epoch (so ids sort by creation, strictly within a
    process), then 76 random bits (so ids cannot be guessed)."""
    global _last_id_micros
    with _id_lock:
        micros = max(time.time_ns() // 1000, _last_id_micros + 1)
        _last_id_micros = micros
    return f"{micros:013x}{secrets.randbits(76):019x}"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


P = ParamSpec("P")
R = TypeVar("R")


def _translate_redis_errors(method: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(f"Redis unavailable: {exc}") from exc

    return wrapper


@dataclass(frozen=True)
class Checkpoint:
    """The state after the last stored step: resume runs step `step` next."""

    step: int
    theta: bytes  # float32 parameters [w..., b], raw
    optimizer: bytes  # the optimizer's state_dict, torch.save format ('' when stateless)


@dataclass(frozen=True)
class Claim:
    """What claiming a job gave: `claimed` with the attempt, spec and checkpoint, or why not
    (`missing`, `finished`, `busy`: another attempt holds a live lease, `cancelled`, `failed`)."""

    outcome: str
    attempt: int = 0
    spec_json: str = ""
    checkpoint: Checkpoint | None = None
    status: str = ""


def _stop_reason(status: JobStatus, result: dict[str, Any] | None, error: str | None) -> str | None:
    if status is JobStatus.SUCCEEDED and result is not None:
        return str(result.get("stopped") or "ran all its steps")
    if status is JobStatus.CANCELLED:
        return "cancelled"
    if status in (JobStatus.FAILED, JobStatus.DIVERGED):
        return error
    return None


def job_view(fields: dict[bytes, bytes], live_queues: Iterable[str] | None = None) -> JobView:
    """A JobView from the job's hash; a queued job says why it waits if no worker can take it."""
    try:
        record = {k.decode(): v.decode() for k, v in fields.items()}
        status = JobStatus(record["status"])
        route_reason = record["route_reason"]
        if (
            status is JobStatus.QUEUED
            and live_queues is not None
            and record["queue"] not in set(live_queues)
        ):
            route_reason += f"; waiting: no live worker for queue {record['queue']!r}"
        result = json.loads(record["result"]) if "result" in record else None
        return JobView(
            id=record["id"],
            status=status,
            spec=JobSpec.model_validate_json(record["spec"]),
            device=record["device"],  # type: ignore[arg-type]
            route_reason=route_reason,
            worker=record.get("worker"),
            attempt=int(record["attempt"]),
            steps_done=int(record["steps_done"]),
            created_at=datetime.fromisoformat(record["created_at"]),
            started_at=record.get("started_at"),  # type: ignore[arg-type]
            finished_at=record.get("finished_at"),  # type: ignore[arg-type]
            result=result,
            error=record.get("error"),
            stop_reason=_stop_reason(status, result, record.get("error")),
        )
    except (KeyError, ValueError) as exc:
        raise MalformedJob(f"job record cannot be read: {exc}") from exc


class Store:
    """The job store on one Redis (sync; used by the API's routes and by workers)."""

    def __init__(self, client: "redis.Redis") -> None:
        self.redis = client
        self._create = client.register_script(scripts.CREATE)
        self._claim = client.register_script(scripts.CLAIM)
        self._flush = client.register_script(scripts.FLUSH)
        self._renew = client.register_script(scripts.RENEW)
        self._release = client.register_script(scripts.RELEASE)
        self._reap = client.register_script(scripts.REAP)
        self._cancel = client.register_script(scripts.CANCEL)
        self._fail = client.register_script(scripts.FAIL)
        self._live_queues: set[str] = set()
        self._live_queues_at = -LIVE_QUEUES_TTL_S

    @classmethod
    def from_url(cls, url: str) -> "Store":
        return cls(
            redis.Redis.from_url(
                url, socket_connect_timeout=5, socket_timeout=10, health_check_interval=30
            )
        )

    @_translate_redis_errors
    def ping(self) -> bool:
        return bool(self.redis.ping())

    # Jobs -------------------------------------------------------------------------------

    @_translate_redis_errors
    def create_job(
        self,
        spec: JobSpec,
        device: str,
        queue: str,
        route_reason: str,
        idempotency: str | None = None,
        tenant: str = "dev",
        max_active: int = 2**31,
    ) -> tuple[str, bool]:
        """Write a new queued job of `tenant` (record, indexes, first status event) atomically.

        With an idempotency key the tenant already used (within a day), writes nothing and
        returns that job's id; the flag says whether the job is new. LimitExceeded when the
        tenant already has `max_active` jobs queued or running.
        """
        job_id = new_job_id()
        record = {
            "id": job_id,
            "tenant": tenant,
            "spec": spec.model_dump_json(),
            "status": JobStatus.QUEUED.value,
            "device": device,
            "queue": queue,
            "route_reason": route_reason,
            "attempt": 0,
            "lost": 0,
            "steps_done": 0,
            "created_at": utc_now(),
        }
        keys = [job_key(job_id), events_key(job_id)]
        if idempotency is not None:
            keys.append(idempotency_key(tenant, idempotency))
        args: list[Any] = [job_id, IDEMPOTENCY_TTL_S, tenant, max_active]
        for name, value in record.items():
            args += [name, value]
        found, created = self._create(keys=keys, args=args)
        if found == b"limit":
            raise LimitExceeded(
                "max_active_jobs_per_tenant",
                f"tenant {tenant!r} has {created} jobs queued or running; "
                f"max_active_jobs_per_tenant is {max_active}",
            )
        return found.decode(), bool(created)

    @_translate_redis_errors
    def delete_job(self, job_id: str, idempotency: str | None = None, tenant: str = "dev") -> None:
        """Remove every trace of a job (used when it could not be enqueued)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(job_key(job_id), steps_key(job_id), events_key(job_id))
        if idempotency is not None:
            pipe.delete(idempotency_key(tenant, idempotency))
        pipe.zrem(JOBS_INDEX, job_id)
        pipe.zrem(tenant_index(tenant), job_id)
        for status in JobStatus:
            pipe.zrem(STATUS_INDEX_PREFIX + status.value, job_id)
            pipe.zrem(tenant_index(tenant, status), job_id)
        pipe.execute()

    @_translate_redis_errors
    def count_submit(self, tenant: str, window_s: int = 60) -> tuple[int, int]:
        """Count one submit of `tenant` in the current window: the window's count so far and
        the seconds until the next window starts."""
        now = int(time.time())
        window = now // window_s
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(submits_key(tenant, window))
        pipe.expire(submits_key(tenant, window), 2 * window_s)
        count, _ = pipe.execute()
        return int(count), (window + 1) * window_s - now

    # Datasets ---------------------------------------------------------------------------

    @_translate_redis_errors
    def put_dataset(
        self,
        tenant: str,
        dataset_id: str,
        parsed: ParsedDataset,
        size: int,
        max_per_tenant: int = 2**31,
    ) -> tuple[DatasetInfo, bool]:
        """Store a parsed upload under its content hash, once (a second upload of the same
        bytes, by any tenant, writes no data again), and give `tenant` access to it. The flag
        says whether the dataset is new to the tenant. LimitExceeded when the tenant already
        has `max_per_tenant` datasets."""
        key = dataset_key(dataset_id)
        mine = tenant_datasets(tenant)
        if not self.redis.sismember(mine, dataset_id) and self.redis.scard(mine) >= max_per_tenant:
            raise LimitExceeded(
                "max_datasets_per_tenant",
                f"tenant {tenant!r} has {max_per_tenant} datasets; "
                f"max_datasets_per_tenant is {max_per_tenant}",
            )
        if not self.redis.exists(key):
            self.redis.hset(
                key,
                mapping={
                    "id": dataset_id,
                    "n": parsed.samples,
                    "d": parsed.features,
                    "format": parsed.format,
                    "columns": json.dumps(parsed.columns),
                    "target": json.dumps(parsed.target),
                    "bytes": size,
                    "created_at": utc_now(),
                    "loads": 0,
                    "x": parsed.x.tobytes(),
                    "y": parsed.y.tobytes(),
                },
            )
        added = self.redis.sadd(tenant_datasets(tenant), dataset_id)
        return self.dataset_info(tenant, dataset_id), bool(added)

    @_translate_redis_errors
    def dataset_info(self, tenant: str, dataset_id: str) -> DatasetInfo:
        """A dataset of `tenant` (DatasetNotFound for another tenant's, like a missing one)."""
        if not self.redis.sismember(tenant_datasets(tenant), dataset_id):
            raise DatasetNotFound(dataset_id)
        fields = self.redis.hmget(
            dataset_key(dataset_id),
            "n",
            "d",
            "format",
            "columns",
            "target",
            "bytes",
            "created_at",
            "loads",
        )
        if fields[0] is None:
            raise DatasetNotFound(dataset_id)
        n, d, fmt, columns, target, size, created, loads = (f.decode() for f in fields)
        return DatasetInfo(
            id=dataset_id,
            samples=int(n),
            features=int(d),
            format=fmt,
            columns=json.loads(columns),
            target=json.loads(target),
            bytes=int(size),
            created_at=datetime.fromisoformat(created),
            loads=int(loads),
        )

    @_translate_redis_errors
    def load_dataset(self, dataset_id: str) -> tuple[bytes, bytes, int, int]:
        """A worker's copy of a dataset: float32 x and y bytes, samples, features. Counted in
        the dataset's `loads`."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hmget(dataset_key(dataset_id), "x", "y", "n", "d")
        pipe.hincrby(dataset_key(dataset_id), "loads", 1)
        (x, y, n, d), _ = pipe.execute()
        if x is None:
            raise DatasetNotFound(dataset_id)
        return x, y, int(n), int(d)

    @_translate_redis_errors
    def job_fields(self, job_id: str, tenant: str | None = None) -> dict[bytes, bytes]:
        """The job's record; JobNotFound also when `tenant` is given and does not own it, so
        that another tenant's job cannot be told from a missing one."""
        fields: dict[bytes, bytes] = self.redis.hgetall(job_key(job_id))
        if not fields or (tenant is not None and fields.get(b"tenant") != tenant.encode()):
            raise JobNotFound(job_id)
        return fields

    def get_job(self, job_id: str, tenant: str | None = None) -> JobView:
        return job_view(self.job_fields(job_id, tenant), self.live_queues())

    @_translate_redis_errors
    def list_jobs(
        self, tenant: str, status: JobStatus | None, limit: int, cursor: str | None
    ) -> tuple[list[JobView], str | None]:
        """The tenant's jobs, newest first; `cursor` is the last id of the previous page."""
        index = tenant_index(tenant, status)
        upper = "+" if cursor is None else f"({cursor}"
        ids = [i.decode() for i in self.redis.zrevrangebylex(index, upper, "-", 0, limit + 1)]
        page = ids[:limit]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in page:
            pipe.hgetall(job_key(job_id))
        live = self.live_queues()
        views = [job_view(fields, live) for fields in pipe.execute() if fields]
        return views, (page[-1] if len(ids) > limit else None)

    @_translate_redis_errors
    def read_steps(
        self, job_id: str, after: int, limit: int, tenant: str | None = None
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Stored steps with `step > after`, in order, and the `after` of the next page or None."""
        fields = self.job_fields(job_id, tenant)
        finished = JobStatus(fields[b"status"].decode()).finished
        steps_done = int(fields[b"steps_done"])
        records: list[dict[str, Any]] = []
        start = step_entry_id(after + 1) if after >= 0 else "-"
        # The entry holding step after+1 has an id >= after+1 (ids are a chunk's last step).
        while len(records) < limit:
            # A few entries at a time: an entry can hold thousands of steps.
            entries = self.redis.xrange(steps_key(job_id), start, "+", count=4)
            if not entries:
                break
            for entry_id, entry in entries:
                records.extend(expand_chunk(Chunk.from_fields(entry), after))
                start = "(" + entry_id.decode()
                if len(records) >= limit:
                    break
            if len(entries) < 4:
                break
        records = records[:limit]
        last = records[-1]["step"] if records else after
        more = last < steps_done - 1 or not finished
        return records, (last if more else None)

    @_translate_redis_errors
    def cancel_job(self, job_id: str, tenant: str | None = None) -> str:
        """Ask a job to stop; its status now: `cancelled` (it was queued) or `cancelling`."""
        if tenant is not None:
            self.job_fields(job_id, tenant)  # the owner never changes: checking first is safe
        keys = [job_key(job_id), events_key(job_id)]
        outcome, status = self._cancel(keys=keys, args=[job_id, utc_now()])
        if outcome == b"finished":
            raise JobFinished(job_id, status.decode())
        if outcome != b"ok":
            raise JobNotFound(job_id)
        return str(status.decode())

    # Attempts (called by the runner) ----------------------------------------------------

    @_translate_redis_errors
    def claim_job(self, job_id: str, worker: str, lease_s: float, max_attempts: int) -> Claim:
        """Take the job for a new attempt, with a lease of `lease_s` and the latest checkpoint."""
        keys = [job_key(job_id), events_key(job_id), lease_key(job_id), ckpt_key(job_id)]
        args = [job_id, worker, utc_now(), int(lease_s * 1000), max_attempts]
        reply = self._claim(keys=keys, args=args)
        outcome = reply[0].decode()
        if outcome != "claimed":
            return Claim(outcome, status=reply[1].decode())
        saved = dict(zip(reply[3::2], reply[4::2], strict=True))
        checkpoint = None
        if saved:
            checkpoint = Checkpoint(int(saved[b"step"]), saved[b"theta"], saved[b"optimizer"])
        return Claim(outcome, int(reply[1]), reply[2].decode(), checkpoint)

    @_translate_redis_errors
    def flush_steps(
        self,
        job_id: str,
        attempt: int,
        chunk: Chunk | None,
        checkpoint: Checkpoint | None,
        lease_s: float,
        *,
        finish: JobStatus | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> str:
        """Append a chunk of steps with the checkpoint after its last step, renew the lease,
        and with `finish` end the job: one atomic script, fenced by the attempt number.

        Returns `ok`, `finished`, `cancelled` (a cancel was asked for: stop), `fenced` (a newer
        attempt owns the job: stop without touching it) or `gap` (the chunk does not follow
        the stored steps: Redis lost recent writes, so resume from the stored checkpoint).
        """
        args: list[Any] = [
            job_id,
            attempt,
            chunk.first if chunk else -1,
            step_entry_id(chunk.last) if chunk else "",
            utc_now(),
            finish.value if finish else "",
            json.dumps(result) if result is not None else "",
            error or "",
            int(lease_s * 1000),
            checkpoint.theta if checkpoint else b"",
            checkpoint.optimizer if checkpoint else b"",
        ]
        if chunk is not None:
            for name, value in chunk.fields().items():
                args += [name, value]
        keys = [
            job_key(job_id),
            steps_key(job_id),
            events_key(job_id),
            lease_key(job_id),
            ckpt_key(job_id),
        ]
        reply = self._flush(keys=keys, args=args)
        return str(reply[0].decode())

    @_translate_redis_errors
    def renew_lease(self, job_id: str, attempt: int, lease_s: float) -> bool:
        """Extend the attempt's lease; False once a newer attempt owns the job."""
        keys = [job_key(job_id), events_key(job_id), lease_key(job_id)]
        return bool(self._renew(keys=keys, args=[job_id, attempt, int(lease_s * 1000)]))

    @_translate_redis_errors
    def release_job(self, job_id: str, attempt: int, reason: str) -> str | None:
        """Hand the job back (queued, to resume from its checkpoint): the queue to send it to,
        '' if it was being cancelled (now cancelled), None if the attempt no longer owns it."""
        keys = [job_key(job_id), events_key(job_id), lease_key(job_id)]
        queue = self._release(keys=keys, args=[job_id, attempt, utc_now(), reason])
        return None if queue is None else str(queue.decode())

    @_translate_redis_errors
    def fail_job(self, job_id: str, attempt: int, error: str) -> bool:
        """End the job `failed` with `error`, if `attempt` still owns it."""
        keys = [job_key(job_id), events_key(job_id)]
        return bool(self._fail(keys=keys, args=[job_id, attempt, error, utc_now()]))

    # Recovery (the reaper every worker runs) --------------------------------------------

    @_translate_redis_errors
    def reap_lapsed(self, max_attempts: int) -> list[tuple[str, str]]:
        """Requeue running jobs whose lease lapsed: (job id, queue) for each to send again."""
        running: list[str] = []
        for status in (JobStatus.RUNNING, JobStatus.CANCELLING):
            index = STATUS_INDEX_PREFIX + status.value
            running += [i.decode() for i in self.redis.zrangebylex(index, "-", "+")]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in running:
            pipe.exists(lease_key(job_id))
        requeued = []
        for job_id, leased in zip(running, pipe.execute(), strict=True):
            if leased:
                continue
            keys = [job_key(job_id), events_key(job_id), lease_key(job_id)]
            queue = self._reap(keys=keys, args=[job_id, utc_now(), max_attempts])
            if queue is not None:
                requeued.append((job_id, queue.decode()))
        return requeued

    @_translate_redis_errors
    def orphaned_jobs(self, older_than_s: float) -> list[tuple[str, str]]:
        """Jobs queued for `older_than_s` while their queue holds no message: (id, queue)."""
        queued = [
            i.decode()
            for i in self.redis.zrangebylex(STATUS_INDEX_PREFIX + JobStatus.QUEUED.value, "-", "+")
        ]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in queued:
            pipe.hmget(job_key(job_id), "queue", "queued_at")
        now = time.time()
        stale = [
            (job_id, queue.decode())
            for job_id, (queue, queued_at) in zip(queued, pipe.execute(), strict=True)
            if queue is not None and queued_at is not None and now - int(queued_at) > older_than_s
        ]
        if not stale:
            return []
        # Celery's Redis transport keeps a queue's waiting messages in a list named after it.
        lengths = {queue: self.redis.llen(queue) for queue in {q for _, q in stale}}
        orphans = [(job_id, queue) for job_id, queue in stale if lengths[queue] == 0]
        pipe = self.redis.pipeline(transaction=False)
        for job_id, _ in orphans:
            pipe.hset(job_key(job_id), "queued_at", int(now))  # next check in older_than_s
        pipe.execute()
        return orphans

    # Worker registry --------------------------------------------------------------------

    @_translate_redis_errors
    def heartbeat(self, info: dict[str, str | int], ttl_s: float) -> None:
        """Register or refresh a worker; its entry lapses `ttl_s` after the last heartbeat."""
        name = str(info["name"])
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(worker_key(name), mapping={**info, "heartbeat_at": utc_now()})
        pipe.pexpire(worker_key(name), int(ttl_s * 1000))
        pipe.zadd(WORKERS_INDEX, {name: now})
        pipe.zremrangebyscore(WORKERS_INDEX, "-inf", now - ttl_s)
        pipe.execute()

    @_translate_redis_errors
    def set_current_job(self, name: str, job_id: str) -> None:
        self.redis.hset(worker_key(name), "current_job", job_id)

    @_translate_redis_errors
    def clear_current_job(self, name: str, job_id: str) -> None:
        """Clear the worker's current job if it is still `job_id` (a pool child with several
        siblings must not clear a job another one runs)."""
        if self.redis.hget(worker_key(name), "current_job") == job_id.encode():
            self.redis.hdel(worker_key(name), "current_job")

    @_translate_redis_errors
    def unregister_worker(self, name: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(worker_key(name))
        pipe.zrem(WORKERS_INDEX, name)
        pipe.execute()

    @_translate_redis_errors
    def list_workers(self, tenant: str | None = None) -> list[WorkerInfo]:
        """Live workers; with `tenant`, a current job of another tenant shows as null."""
        names = self.redis.zrangebyscore(WORKERS_INDEX, time.time() - 3600, "+inf")
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(worker_key(name.decode()))
        workers = []
        for fields in pipe.execute():
            if not fields or b"device" not in fields:
                continue  # lapsed between the two reads, or not fully registered yet
            record = {k.decode(): v.decode() for k, v in fields.items()}
            workers.append(
                WorkerInfo(
                    name=record["name"],
                    device=record["device"],
                    device_name=record.get("device_name", ""),
                    memory_bytes=int(record.get("memory_bytes", 0)),
                    queues=record["queues"].split(","),
                    current_job=record.get("current_job"),
                    heartbeat_at=datetime.fromisoformat(record["heartbeat_at"]),
                )
            )
        if tenant is not None:
            running = [w for w in workers if w.current_job]
            pipe = self.redis.pipeline(transaction=False)
            for worker in running:
                pipe.hget(job_key(str(worker.current_job)), "tenant")
            for worker, owner in zip(running, pipe.execute(), strict=True):
                if owner != tenant.encode():
                    worker.current_job = None
        return workers

    @_translate_redis_errors
    def service_stats(
        self, queues: tuple[str, ...]
    ) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """Jobs per status, messages waiting in each worker queue, and the service-wide
        counters the flush script keeps (`steps`, `flushes`)."""
        pipe = self.redis.pipeline(transaction=False)
        for status in JobStatus:
            pipe.zcard(STATUS_INDEX_PREFIX + status.value)
        for queue in queues:
            pipe.llen(queue)  # kombu's Redis transport keeps a queue's messages in a list
        pipe.hgetall(STATS_KEY)
        *counts, stats = pipe.execute()
        jobs = {status.value: int(n) for status, n in zip(JobStatus, counts, strict=False)}
        depth = {queue: int(n) for queue, n in zip(queues, counts[len(JobStatus) :], strict=True)}
        return jobs, depth, {k.decode(): int(v) for k, v in stats.items()}

    def live_queues(self) -> set[str]:
        """Queues some live worker consumes (cached for a second: routing can be a second
        behind a worker starting or stopping, and submits do not each read the registry)."""
        now = time.monotonic()
        if now - self._live_queues_at > LIVE_QUEUES_TTL_S:
            workers = self.list_workers()
            self._live_queues = {queue for worker in workers for queue in worker.queues}
            self._live_queues_at = now
        return self._live_queues
