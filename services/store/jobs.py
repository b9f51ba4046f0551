"""Job records (DESIGN §4 `gs:{J}:job`) and the indexes that list them: submit, read, list,
cancel, delete. Each write that changes a job's status is one script (scripts.py)."""

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.errors import (
    JobActive,
    JobFinished,
    JobNotFound,
    LimitExceeded,
    MalformedJob,
    MemberOfSweep,
)
from services.records import kept_steps, loss_width, row_width
from services.schemas import AttemptEnvironment, JobSpec, JobStatus, JobSummary, JobView
from services.store import keys
from services.store.base import RedisPart, translate_redis_errors

IDEMPOTENCY_TTL_S = 24 * 3600

# What a listing reads of each job: everything but the spec, whose inline data can be
# megabytes; the listing shows `summary` instead.
_SUMMARY_FIELDS = (
    "id",
    "status",
    "device",
    "route_reason",
    "queue",
    "worker",
    "attempt",
    "steps_done",
    "created_at",
    "started_at",
    "finished_at",
    "result",
    "error",
    "summary",
    "sweep",
)


def _data_summary(data: dict[str, Any]) -> dict[str, Any]:
    """Inline data as its shape, never its numbers; other data as it is."""
    if data.get("x") is not None:
        x = data["x"]
        features = len(x[0]) if x and isinstance(x[0], list) else 1
        return {"inline": {"samples": len(x), "features": features}}
    return data


def spec_summary(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as listings show it: inline data (training and validation) as its shape."""
    summary = {**spec, "data": _data_summary(spec.get("data") or {})}
    evaluation = spec.get("eval")
    if evaluation and evaluation.get("data"):
        summary["eval"] = {**evaluation, "data": _data_summary(evaluation["data"])}
    return summary


def dataset_ids(spec: JobSpec) -> list[str]:
    """The datasets a spec trains and validates on: while it is active, none can be deleted."""
    validation = spec.eval.data if spec.eval is not None else None
    found = [spec.data.dataset_id, validation.dataset_id if validation is not None else None]
    return list(dict.fromkeys(d for d in found if d is not None))


@dataclass(frozen=True)
class StoredBytes:
    """What a job keeps, counted up front: its spec, `row_bytes` for each step, and for a
    sparse job (record.every > 1) `kept_row_bytes` more for each step that keeps its gradients
    and parameters (services/records.py: a sparse chunk's loss block and its full rows). The
    finish script counts the same from the steps stored (scripts.py `finish`)."""

    spec_bytes: int
    row_bytes: int
    kept_row_bytes: int = 0
    every: int = 1

    def reserved(self, steps: int) -> int:
        """The bytes a job of `steps` steps reserves at submit."""
        kept = kept_steps(steps, self.every) if self.kept_row_bytes else 0
        return self.spec_bytes + steps * self.row_bytes + kept * self.kept_row_bytes

    def fields(self) -> dict[str, int]:
        """The job record's fields the finish script counts what the job keeps from."""
        fields = {"spec_bytes": self.spec_bytes, "row_bytes": self.row_bytes}
        if self.kept_row_bytes:
            fields |= {"kept_row_bytes": self.kept_row_bytes, "record_every": self.every}
        return fields


def stored_bytes(spec: JobSpec, spec_json: str) -> StoredBytes:
    """What a job keeps (StoredBytes): its spec and its step records."""
    explain = spec.train_samples if spec.record.explain else 0
    evaluated = spec.eval is not None
    full = 4 * row_width(spec.data.features, spec.bias, explain, evaluated)
    every = spec.record.every
    if every == 1:
        return StoredBytes(len(spec_json), full)
    return StoredBytes(len(spec_json), 4 * loss_width(evaluated), full, every)


def _kept_words(stored: StoredBytes) -> str:
    """How a sparse job's records count, for a message."""
    if not stored.kept_row_bytes:
        return ""
    return (
        f", and {stored.kept_row_bytes} more for each step divisible by record.every "
        f"{stored.every} and the last"
    )


def _stop_reason(status: JobStatus, result: dict[str, Any] | None, error: str | None) -> str | None:
    if status is JobStatus.SUCCEEDED and result is not None:
        return str(result.get("stopped") or "ran all its steps")
    if status is JobStatus.CANCELLED:
        return "cancelled"
    if status in (JobStatus.FAILED, JobStatus.DIVERGED):
        return error
    if status is JobStatus.PRUNED and result is not None:
        return str(result.get("stopped"))
    return None


# What a resume must keep to equal the uninterrupted run bit for bit (DESIGN §11), as a
# JobView's `resume` note names it.
_RESUME_CONDITIONS = {
    "device": "device type",
    "cpu_capability": "CPU instruction set",
    "torch": "torch version",
    "threads": "thread count",
    "stepper": "stepper",
}


def resume_note(attempts: list[AttemptEnvironment]) -> str | None:
    """Which conditions later attempts changed from the first's, in words; None if none did
    (the records then equal an uninterrupted run's bit for bit)."""
    if not attempts:
        return None
    first, changes, since = attempts[0], [], None
    for later in attempts[1:]:
        changed = [
            f"{name} {getattr(later, field)} (attempt {first.attempt}: {getattr(first, field)})"
            for field, name in _RESUME_CONDITIONS.items()
            if getattr(later, field) != getattr(first, field)
        ]
        if changed:
            since = since or later.attempt
            changes.append(f"attempt {later.attempt} ran with another {', '.join(changed)}")
    if not changes:
        return None
    return (
        f"{'; '.join(changes)}: from attempt {since} on, the job's records agree with an "
        "uninterrupted run to float32 rounding, not bit for bit"
    )


def _attempts(record: dict[str, str]) -> list[AttemptEnvironment]:
    """What each attempt that stored steps ran on, in attempt order."""
    prefix = keys.ENVIRONMENT_FIELD_PREFIX
    found = [
        AttemptEnvironment.model_validate_json(value)
        for name, value in record.items()
        if name.startswith(prefix)
    ]
    return sorted(found, key=lambda environment: environment.attempt)


def _view_fields(record: dict[str, str], live_queues: Iterable[str] | None) -> dict[str, Any]:
    """A JobView's fields but the spec, from the job's hash (decoded)."""
    status = JobStatus(record["status"])
    route_reason = record["route_reason"]
    waiting = live_queues is not None and record["queue"] not in set(live_queues)
    if status is JobStatus.QUEUED and waiting:
        route_reason += f"; waiting: no live worker for queue {record['queue']!r}"
    result = json.loads(record["result"]) if record.get("result") else None
    return {
        "id": record["id"],
        "status": status,
        "device": record["device"],
        "route_reason": route_reason,
        "worker": record.get("worker"),
        "attempt": int(record["attempt"]),
        "steps_done": int(record["steps_done"]),
        "created_at": datetime.fromisoformat(record["created_at"]),
        "started_at": record.get("started_at"),
        "finished_at": record.get("finished_at"),
        "result": result,
        "error": record.get("error"),
        "stop_reason": _stop_reason(status, result, record.get("error")),
        "sweep": record.get("sweep"),
    }


def _decoded(fields: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in fields.items()}


def job_view(fields: dict[bytes, bytes], live_queues: Iterable[str] | None = None) -> JobView:
    """A JobView from the job's hash; a queued job says why it waits if no worker can take it."""
    try:
        record = _decoded(fields)
        spec = JobSpec.model_validate_json(record["spec"])
        attempts = _attempts(record)
        return JobView(
            spec=spec,
            stepper=record.get("stepper"),
            attempts=attempts,
            resume=resume_note(attempts),
            **_view_fields(record, live_queues),
        )
    except (KeyError, ValueError) as exc:
        raise MalformedJob(f"job record cannot be read: {exc}") from exc


def job_summary(record: dict[str, str], live_queues: Iterable[str] | None = None) -> JobSummary:
    """A listing's row: the JobView with the spec's summary (no spec validated, no data)."""
    try:
        summary = json.loads(record["summary"])
        return JobSummary(spec=summary, **_view_fields(record, live_queues))
    except (KeyError, ValueError) as exc:
        raise MalformedJob(f"job record cannot be read: {exc}") from exc


class Jobs(RedisPart):
    """Job records and their indexes."""

    @translate_redis_errors
    def create_job(
        self,
        spec: JobSpec,
        device: str,
        queue: str,
        route_reason: str,
        idempotency: str | None = None,
        tenant: str = "dev",
        max_active: int = 2**31,
        storage_limit: int = 2**62,
    ) -> tuple[str, bool]:
        """Write a new queued job of `tenant` (record, indexes, first status event) atomically.

        With an idempotency key the tenant already used (within a day), writes nothing and
        returns that job's id; the flag says whether the job is new. LimitExceeded when the
        tenant already has `max_active` jobs queued or running, or when what the job keeps
        (its spec and `steps` records, counted up front) would take the tenant's storage past
        `storage_limit` bytes. StorageFull when Redis is full (nothing written).
        """
        job_id = keys.new_job_id()
        spec_json = spec.model_dump_json()
        stored = stored_bytes(spec, spec_json)
        reserved = stored.reserved(spec.steps)
        record = {
            "id": job_id,
            "tenant": tenant,
            "spec": spec_json,
            "summary": json.dumps(spec_summary(json.loads(spec_json))),
            "status": JobStatus.QUEUED.value,
            "device": device,
            "queue": queue,
            "route_reason": route_reason,
            "attempt": 0,
            "lost": 0,
            "steps_done": 0,
            "created_at": keys.utc_now(),
            "bytes": reserved,
            **stored.fields(),
            "datasets": " ".join(dataset_ids(spec)),
        }
        script_keys = keys.job_keys(job_id)
        if idempotency is not None:
            script_keys.append(keys.idempotency_key(tenant, idempotency))
        args: list[Any] = [job_id, IDEMPOTENCY_TTL_S, tenant, max_active, storage_limit, reserved]
        for name, value in record.items():
            args += [name, value]
        found, detail = self.lua.create(keys=script_keys, args=args)
        if found == b"limit":
            raise LimitExceeded(
                "max_active_jobs_per_tenant",
                f"tenant {tenant!r} has {detail} jobs queued or running; "
                f"max_active_jobs_per_tenant is {max_active}",
            )
        if found == b"storage":
            raise LimitExceeded(
                "tenant_storage_bytes",
                f"tenant {tenant!r} keeps {int(detail)} bytes; this job needs {reserved} more "
                f"(its spec and {spec.steps} step records of {stored.row_bytes} bytes"
                f"{_kept_words(stored)}), and "
                f"tenant_storage_bytes is {storage_limit}: delete finished jobs or datasets",
            )
        return found.decode(), bool(detail)

    def _delete(self, job_id: str, force: bool) -> list[bytes]:
        reply: list[bytes] = self.lua.delete(keys=keys.job_keys(job_id), args=[job_id, int(force)])
        return reply

    @translate_redis_errors
    def discard_job(self, job_id: str) -> None:
        """Remove every trace of a job whatever its status (one that could not be enqueued)."""
        self._delete(job_id, force=True)

    @translate_redis_errors
    def delete_job(self, job_id: str, tenant: str) -> None:
        """Delete an ended job of `tenant`: its record, steps (in Redis or archived),
        checkpoint and index entries; its bytes no longer count against the tenant. JobActive
        while it is queued or running."""
        self.job_fields(job_id, tenant)  # the owner never changes: checking first is safe
        reply = self._delete(job_id, force=False)
        if reply[0] == b"live":
            raise JobActive(job_id, reply[1].decode())
        if reply[0] == b"member":
            raise MemberOfSweep(job_id, reply[1].decode())
        if reply[0] == b"missing":
            raise JobNotFound(job_id)
        # After the record: the file where the record said it is (the script kept its URL for
        # the archivers, should this fail); an archiver that publishes the file meanwhile
        # finds the job gone and removes the file itself. (Members go with their sweep.)
        self.remove_archived_files(self.archive, [url.decode() for url in reply[1:]])
        if self.archive is not None:
            self.archive.remove_job(tenant, job_id)

    @translate_redis_errors
    def count_submit(self, tenant: str, window_s: int = 60) -> tuple[int, int]:
        """Count one submit of `tenant` in the current window: the window's count so far and
        the seconds until the next window starts."""
        now = int(time.time())
        window = now // window_s
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(keys.submits_key(tenant, window))
        pipe.expire(keys.submits_key(tenant, window), 2 * window_s)
        count, _ = pipe.execute()
        return int(count), (window + 1) * window_s - now

    @translate_redis_errors
    def tenant_bytes(self, tenant: str) -> int:
        """What `tenant` keeps now (specs, step records counted up front, datasets)."""
        return int(self.redis.get(keys.tenant_storage(tenant)) or 0)

    @translate_redis_errors
    def job_fields(self, job_id: str, tenant: str | None = None) -> dict[bytes, bytes]:
        """The job's record; JobNotFound also when `tenant` is given and does not own it, so
        that another tenant's job cannot be told from a missing one."""
        fields: dict[bytes, bytes] = self.redis.hgetall(keys.job_key(job_id))
        if not fields or (tenant is not None and fields.get(b"tenant") != tenant.encode()):
            raise JobNotFound(job_id)
        return fields

    def get_job(self, job_id: str, tenant: str | None = None) -> JobView:
        return job_view(self.job_fields(job_id, tenant), self.live_queues())

    @translate_redis_errors
    def list_jobs(
        self, tenant: str, status: JobStatus | None, limit: int, cursor: str | None
    ) -> tuple[list[JobSummary], str | None]:
        """The tenant's jobs, newest first, without their data; `cursor` is the last id of the
        previous page."""
        index = keys.tenant_index(tenant, status)
        upper = "+" if cursor is None else f"({cursor}"
        ids = [i.decode() for i in self.redis.zrevrangebylex(index, upper, "-", 0, limit + 1)]
        return self.summaries(ids[:limit]), (ids[limit - 1] if len(ids) > limit else None)

    def summaries(self, page: list[str]) -> list[JobSummary]:
        """Listing rows of these jobs, in this order (a job deleted meanwhile left out)."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in page:
            pipe.hmget(keys.job_key(job_id), _SUMMARY_FIELDS)
        live = self.live_queues()
        rows = []
        for job_id, values in zip(page, pipe.execute(), strict=True):
            record = {
                name: value.decode()
                for name, value in zip(_SUMMARY_FIELDS, values, strict=True)
                if value is not None
            }
            if "id" not in record:
                continue  # deleted between the two reads
            if "summary" not in record:  # a record written before listings had summaries
                spec = self.redis.hget(keys.job_key(job_id), "spec") or b"{}"
                record["summary"] = json.dumps(spec_summary(json.loads(spec)))
            rows.append(job_summary(record, live))
        return rows

    @translate_redis_errors
    def cancel_job(self, job_id: str, tenant: str | None = None) -> str:
        """Ask a job to stop; its status now: `cancelled` (it was queued) or `cancelling`."""
        if tenant is not None:
            self.job_fields(job_id, tenant)  # the owner never changes: checking first is safe
        args = [job_id, keys.utc_now()]
        outcome, status = self.lua.cancel(keys=keys.job_keys(job_id), args=args)
        if outcome == b"finished":
            raise JobFinished(job_id, status.decode())
        if outcome != b"ok":
            raise JobNotFound(job_id)
        return str(status.decode())
