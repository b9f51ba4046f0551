"""Redis: job records, step streams, status events, the job indexes and the worker registry.

Every key of one job carries the hash tag `{<job id>}`, so a job lives in one cluster slot and
each Lua script below touches one job atomically. The job indexes (`gs:jobs`, `gs:jobs:<status>`)
are lexicographic sorted sets of job ids, which are time-ordered, for newest-first listing.
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

from services.errors import JobFinished, JobNotFound, MalformedJob, StoreUnavailable
from services.records import Chunk, expand_chunk
from services.schemas import JobSpec, JobStatus, JobView, WorkerInfo

JOBS_INDEX = "gs:jobs"
STATUS_INDEX_PREFIX = "gs:jobs:"
WORKERS_INDEX = "gs:workers"


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


# Shared by every script that changes a job's status: keeps the hash, the status indexes and
# the job's event stream (which SSE readers tail) in step.
_SET_STATUS = """
local function set_status(job, events, id, old, new, steps_done)
  redis.call('HSET', job, 'status', new)
  redis.call('ZREM', 'gs:jobs:' .. old, id)
  redis.call('ZADD', 'gs:jobs:' .. new, 0, id)
  redis.call('XADD', events, '*', 'status', new, 'steps_done', steps_done)
end
"""

# KEYS: job, events. ARGV: job id, worker name, now.
_CLAIM = (
    _SET_STATUS
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
local done = redis.call('HGET', KEYS[1], 'steps_done')
if status == 'cancelling' then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[3])
  set_status(KEYS[1], KEYS[2], ARGV[1], status, 'cancelled', done)
  return {'cancelled'}
end
if status ~= 'queued' then return {'busy', status} end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'worker', ARGV[2])
if redis.call('HEXISTS', KEYS[1], 'started_at') == 0 then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[3])
end
set_status(KEYS[1], KEYS[2], ARGV[1], status, 'running', done)
return {'claimed', tostring(attempt), redis.call('HGET', KEYS[1], 'spec')}
"""
)

# KEYS: job, steps, events. ARGV: job id, attempt, first step, entry id, now, finish status
# ('' to go on), result JSON, error, then the chunk's fields as name/value pairs (none when the
# flush carries no steps). All checks come before the first write: a Lua error half-way would
# keep the writes made before it.
_FLUSH = (
    _SET_STATUS
    + """
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[2] then return {'fenced'} end
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' and status ~= 'cancelling' then return {'fenced'} end
local done = tonumber(redis.call('HGET', KEYS[1], 'steps_done'))
if #ARGV > 8 then
  if tonumber(ARGV[3]) ~= done then return {'gap', tostring(done)} end
  local n = 0
  for i = 9, #ARGV, 2 do
    if ARGV[i] == 'n' then n = tonumber(ARGV[i + 1]) end
  end
  redis.call('XADD', KEYS[2], ARGV[4], unpack(ARGV, 9))
  done = done + n
  redis.call('HSET', KEYS[1], 'steps_done', done)
end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[5])
  if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[7]) end
  if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[8]) end
  set_status(KEYS[1], KEYS[3], ARGV[1], status, ARGV[6], done)
  return {'finished'}
end
if status == 'cancelling' then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[5])
  set_status(KEYS[1], KEYS[3], ARGV[1], status, 'cancelled', done)
  return {'cancelled'}
end
return {'ok'}
"""
)

# KEYS: job, events. ARGV: job id, now.
_CANCEL = (
    _SET_STATUS
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', ''} end
local done = redis.call('HGET', KEYS[1], 'steps_done')
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[2])
  set_status(KEYS[1], KEYS[2], ARGV[1], status, 'cancelled', done)
  return {'ok', 'cancelled'}
end
if status == 'running' then
  set_status(KEYS[1], KEYS[2], ARGV[1], status, 'cancelling', done)
  return {'ok', 'cancelling'}
end
if status == 'cancelling' then return {'ok', status} end
return {'finished', status}
"""
)

# KEYS: job, events. ARGV: job id, attempt, error, now.
_FAIL = (
    _SET_STATUS
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[2] then return 0 end
if status ~= 'running' and status ~= 'cancelling' then return 0 end
redis.call('HSET', KEYS[1], 'error', ARGV[3], 'finished_at', ARGV[4])
set_status(KEYS[1], KEYS[2], ARGV[1], status, 'failed', redis.call('HGET', KEYS[1], 'steps_done'))
return 1
"""
)


@dataclass(frozen=True)
class Claim:
    """What claiming a job for an attempt gave: `claimed` with the attempt and spec, or why not."""

    outcome: str  # claimed | missing | cancelled | busy
    attempt: int = 0
    spec_json: str = ""
    status: str = ""


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


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
            route_reason = f"waiting: no live worker for queue {record['queue']!r}"
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
            result=json.loads(record["result"]) if "result" in record else None,
            error=record.get("error"),
        )
    except (KeyError, ValueError) as exc:
        raise MalformedJob(f"job record cannot be read: {exc}") from exc


class Store:
    """The job store on one Redis (sync; used by the API's routes and by workers)."""

    def __init__(self, client: "redis.Redis") -> None:
        self.redis = client
        self._claim = client.register_script(_CLAIM)
        self._flush = client.register_script(_FLUSH)
        self._cancel = client.register_script(_CANCEL)
        self._fail = client.register_script(_FAIL)

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
    def create_job(self, spec: JobSpec, device: str, queue: str, route_reason: str) -> str:
        """Write a new queued job (record, indexes, first status event) in one transaction."""
        job_id = new_job_id()
        record = {
            "id": job_id,
            "spec": spec.model_dump_json(),
            "status": JobStatus.QUEUED.value,
            "device": device,
            "queue": queue,
            "route_reason": route_reason,
            "attempt": 0,
            "steps_done": 0,
            "created_at": utc_now(),
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(job_key(job_id), mapping=record)
        pipe.zadd(JOBS_INDEX, {job_id: 0})
        pipe.zadd(STATUS_INDEX_PREFIX + JobStatus.QUEUED.value, {job_id: 0})
        pipe.xadd(events_key(job_id), {"status": JobStatus.QUEUED.value, "steps_done": 0})
        pipe.execute()
        return job_id

    @_translate_redis_errors
    def delete_job(self, job_id: str) -> None:
        """Remove every trace of a job (used when it could not be enqueued)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(job_key(job_id), steps_key(job_id), events_key(job_id))
        pipe.zrem(JOBS_INDEX, job_id)
        for status in JobStatus:
            pipe.zrem(STATUS_INDEX_PREFIX + status.value, job_id)
        pipe.execute()

    @_translate_redis_errors
    def job_fields(self, job_id: str) -> dict[bytes, bytes]:
        fields: dict[bytes, bytes] = self.redis.hgetall(job_key(job_id))
        if not fields:
            raise JobNotFound(job_id)
        return fields

    def get_job(self, job_id: str) -> JobView:
        return job_view(self.job_fields(job_id), self.live_queues())

    @_translate_redis_errors
    def list_jobs(
        self, status: JobStatus | None, limit: int, cursor: str | None
    ) -> tuple[list[JobView], str | None]:
        """Newest first; `cursor` is the last id of the previous page."""
        index = JOBS_INDEX if status is None else STATUS_INDEX_PREFIX + status.value
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
        self, job_id: str, after: int, limit: int
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Stored steps with `step > after`, in order, and the `after` of the next page or None."""
        fields = self.job_fields(job_id)
        finished = JobStatus(fields[b"status"].decode()).finished
        steps_done = int(fields[b"steps_done"])
        records: list[dict[str, Any]] = []
        start = step_entry_id(after + 1) if after >= 0 else "-"
        # The entry holding step after+1 has an id >= after+1 (ids are a chunk's last step).
        while len(records) < limit:
            entries = self.redis.xrange(steps_key(job_id), start, "+", count=64)
            if not entries:
                break
            for entry_id, entry in entries:
                records.extend(expand_chunk(Chunk.from_fields(entry), after))
                start = "(" + entry_id.decode()
            if len(entries) < 64:
                break
        records = records[:limit]
        last = records[-1]["step"] if records else after
        more = last < steps_done - 1 or not finished
        return records, (last if more else None)

    @_translate_redis_errors
    def cancel_job(self, job_id: str) -> str:
        """Ask a job to stop; its status now: `cancelled` (it was queued) or `cancelling`."""
        keys = [job_key(job_id), events_key(job_id)]
        outcome, status = self._cancel(keys=keys, args=[job_id, utc_now()])
        if outcome == b"finished":
            raise JobFinished(job_id, status.decode())
        if outcome != b"ok":
            raise JobNotFound(job_id)
        return str(status.decode())

    # Attempts (called by the runner) ----------------------------------------------------

    @_translate_redis_errors
    def claim_job(self, job_id: str, worker: str) -> Claim:
        reply = self._claim(
            keys=[job_key(job_id), events_key(job_id)], args=[job_id, worker, utc_now()]
        )
        outcome = reply[0].decode()
        if outcome == "claimed":
            return Claim(outcome, attempt=int(reply[1]), spec_json=reply[2].decode())
        return Claim(outcome, status=reply[1].decode() if len(reply) > 1 else "")

    @_translate_redis_errors
    def flush_steps(
        self,
        job_id: str,
        attempt: int,
        chunk: Chunk | None,
        *,
        finish: JobStatus | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> str:
        """Append a chunk of steps and, with `finish`, end the job; one atomic, fenced script.

        Returns `ok`, `finished`, `cancelled` (a cancel was asked for: stop), `fenced` (another
        attempt owns the job: stop without touching it) or `gap` (the chunk does not follow the
        stored steps).
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
        ]
        if chunk is not None:
            for name, value in chunk.fields().items():
                args += [name, value]
        keys = [job_key(job_id), steps_key(job_id), events_key(job_id)]
        reply = self._flush(keys=keys, args=args)
        return str(reply[0].decode())

    @_translate_redis_errors
    def fail_job(self, job_id: str, attempt: int, error: str) -> bool:
        """End the job `failed` with `error`, if `attempt` still owns it."""
        keys = [job_key(job_id), events_key(job_id)]
        return bool(self._fail(keys=keys, args=[job_id, attempt, error, utc_now()]))

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
    def set_current_job(self, name: str, job_id: str | None) -> None:
        if job_id is None:
            self.redis.hdel(worker_key(name), "current_job")
        else:
            self.redis.hset(worker_key(name), "current_job", job_id)

    @_translate_redis_errors
    def unregister_worker(self, name: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(worker_key(name))
        pipe.zrem(WORKERS_INDEX, name)
        pipe.execute()

    @_translate_redis_errors
    def list_workers(self) -> list[WorkerInfo]:
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
        return workers

    def live_queues(self) -> set[str]:
        return {queue for worker in self.list_workers() for queue in worker.queues}
