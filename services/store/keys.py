"""Key names of the Redis data model (DESIGN §4), written once: the store's Python code and its
Lua scripts (services/store/scripts.py) both take them from here.

Every key of one job carries the hash tag `{<job id>}`, so one job lives in one Redis Cluster
slot and a script can touch all of its keys. The indexes (all jobs, jobs per status, a
tenant's jobs) are lexicographic sorted sets of job ids, which are time-ordered.
"""

import hashlib
import secrets
import threading
import time
from datetime import UTC, datetime

from services.schemas import JobStatus, SweepStatus, iso_utc

JOBS_INDEX = "gs:jobs"
STATUS_INDEX_PREFIX = "gs:jobs:"  # + status
GROUP_STATUS_PREFIX = "gs:groups:"  # + status: a sweep's groups (units of work, not jobs)
# + status: sweep members apart from other jobs. A member has no lease of its own (its group's
# covers it), so the reaper, which reads the jobs' and the groups' indexes, never walks them.
MEMBER_STATUS_PREFIX = "gs:members:"
TENANT_PREFIX = "gs:tenant:"  # + tenant + ':jobs' (+ ':' + status) | ':datasets' | ':bytes'
SWEEP_STATUS_PREFIX = "gs:sweeps:"  # + status: the ids of every tenant's sweeps in it (a set)
WORKERS_INDEX = "gs:workers"
STATS_KEY = "gs:stats"
# Finished jobs whose steps are still in Redis, scored by when they finished (Redis seconds):
# the workers' archiver moves each one's stream to the archive once it is old enough.
ARCHIVE_DUE = "gs:archive:due"
# Archived files of deleted jobs still to remove (their URLs, as the records kept them), scored
# by when their removal was last tried (Redis seconds): the deleting script adds them, each
# removal that succeeds takes one out, and the archivers try again those that failed.
ARCHIVE_REMOVALS = "gs:archive:removals"
# Set once an archiver has found every job finished before archiving existed (finished, steps
# still in Redis, never due) and made it due.
ARCHIVE_BACKFILLED = "gs:archive:backfilled"
# A job record's field per attempt that stored steps: `env:<attempt>`, what it ran on (JSON).
ENVIRONMENT_FIELD_PREFIX = "env:"


def job_key(job_id: str) -> str:
    """The job's record (a hash)."""
    return f"gs:{{{job_id}}}:job"


def steps_key(job_id: str) -> str:
    """The job's step stream: one entry per chunk of steps, its id the chunk's last step."""
    return f"gs:{{{job_id}}}:steps"


def events_key(job_id: str) -> str:
    """The job's status events, which SSE readers tail beside the steps."""
    return f"gs:{{{job_id}}}:events"


def lease_key(job_id: str) -> str:
    """The running attempt's number (the fencing token), expiring with its lease."""
    return f"gs:{{{job_id}}}:lease"


def ckpt_key(job_id: str) -> str:
    """The state after the last stored step: parameters, optimizer state, step, last loss."""
    return f"gs:{{{job_id}}}:ckpt"


def archiving_key(job_id: str) -> str:
    """Held (with a TTL) by the worker archiving the job, so that two do not do the work twice."""
    return f"gs:{{{job_id}}}:archiving"


def job_keys(job_id: str) -> list[str]:
    """The KEYS every per-job script takes, in this order (scripts.py names them)."""
    return [
        job_key(job_id),
        steps_key(job_id),
        events_key(job_id),
        lease_key(job_id),
        ckpt_key(job_id),
    ]


def sweep_key(sweep_id: str) -> str:
    """A sweep's record (a hash): its spec, members, groups, counts per status, event sequence."""
    return f"gs:sweep:{{{sweep_id}}}"


def sweep_events_key(sweep_id: str) -> str:
    """A sweep's event stream (progress per group flush, status, done): entry ids `<seq>-1`."""
    return f"gs:sweep:{{{sweep_id}}}:events"


def sweep_members_key(sweep_id: str) -> str:
    """A sweep's member job ids (a sorted set scored by member index)."""
    return f"gs:sweep:{{{sweep_id}}}:members"


def sweep_finals_key(sweep_id: str, metric: str) -> str:
    """A sweep's succeeded members scored by their final `metric` (`loss`: the result's
    full_loss; `val_loss`), so that its best member is read without reading every member."""
    return f"gs:sweep:{{{sweep_id}}}:finals:{metric}"


def tenant_sweeps(tenant: str) -> str:
    """A tenant's sweeps, lex-sorted by id (time-ordered) like its jobs."""
    return f"{TENANT_PREFIX}{tenant}:sweeps"


def tenant_active_sweeps(tenant: str) -> str:
    """A tenant's sweeps that have not ended (a set): each counts as one active job."""
    return f"{TENANT_PREFIX}{tenant}:sweeps:active"


def status_index(status: JobStatus | str) -> str:
    return STATUS_INDEX_PREFIX + str(status)


def group_status_index(status: JobStatus | str) -> str:
    return GROUP_STATUS_PREFIX + str(status)


def member_status_index(status: JobStatus | str) -> str:
    """Every tenant's sweep members in one status (/metrics counts them with the jobs)."""
    return MEMBER_STATUS_PREFIX + str(status)


def sweep_status_index(status: SweepStatus | str) -> str:
    """Every tenant's sweeps in one status (a set; /metrics counts them)."""
    return SWEEP_STATUS_PREFIX + str(status)


def tenant_index(tenant: str, status: JobStatus | str | None = None) -> str:
    """A tenant's jobs (all, or in one status), lex-sorted by id like the global indexes."""
    base = f"{TENANT_PREFIX}{tenant}:jobs"
    return base if status is None else f"{base}:{status}"


def tenant_datasets(tenant: str) -> str:
    """The datasets a tenant refers to (a set of ids)."""
    return f"{TENANT_PREFIX}{tenant}:datasets"


def tenant_storage(tenant: str) -> str:
    """Bytes a tenant keeps: its jobs' specs and steps (counted up front) and its datasets."""
    return f"{TENANT_PREFIX}{tenant}:bytes"


def tenant_active_members(tenant: str) -> str:
    """How many of a tenant's sweep members have not ended (a counter): its active jobs count
    its sweeps, not their members."""
    return f"{TENANT_PREFIX}{tenant}:members:active"


def idempotency_key(tenant: str, key: str) -> str:
    # Per tenant: another tenant's key must never return (or reveal) this tenant's job.
    return f"gs:idem:{tenant}:{key}"


def sweep_idempotency_key(tenant: str, key: str) -> str:
    # Apart from jobs' keys: a key a tenant used for a job must never return a job as a sweep.
    return f"gs:idem-sweep:{tenant}:{key}"


def submits_key(tenant: str, window: int) -> str:
    return f"gs:submits:{tenant}:{window}"


def dataset_key(dataset_id: str) -> str:
    """An uploaded dataset (a hash: shape, columns, float32 x and y bytes)."""
    return f"gs:dataset:{dataset_id}"


def dataset_refs(dataset_id: str) -> str:
    """The tenants that refer to a dataset (a set); the bytes go with the last of them."""
    return f"gs:dataset-tenants:{dataset_id}"


def dataset_users(tenant: str, dataset_id: str) -> str:
    """The tenant's jobs and sweeps not yet ended that train (or validate) on a dataset (a
    set of ids): a delete of the dataset asks it, not every active job."""
    return f"{TENANT_PREFIX}{tenant}:dataset-users:{dataset_id}"


def sweep_dataset_id(sweep_id: str, part: str) -> str:
    """The id of the dataset a sweep keeps its inline `part` ('data' or 'eval') in: a dataset
    id's shape (64 hex digits), one per sweep and part, never a content hash (the dataset is
    the sweep's alone and goes with it)."""
    return hashlib.sha256(f"sweep:{sweep_id}:{part}".encode()).hexdigest()


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
    """Now, as every time is written (in Redis as in answers)."""
    return iso_utc(datetime.now(UTC))
