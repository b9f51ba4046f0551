"""Domain errors. Services raise these; only api/ maps them to HTTP status codes."""


class GradstreamError(Exception):
    """Base class of every error gradstream raises on purpose."""


class JobNotFound(GradstreamError):
    """No job with this id (or not one the caller may see)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found")
        self.job_id = job_id


class DatasetNotFound(GradstreamError):
    """No dataset with this id among the caller's."""

    def __init__(self, dataset_id: str) -> None:
        super().__init__(f"dataset {dataset_id!r} not found")
        self.dataset_id = dataset_id


class JobFinished(GradstreamError):
    """The job has already reached a terminal status, so the request cannot apply."""

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job {job_id!r} already finished with status {status!r}")
        self.job_id = job_id
        self.status = status


class JobNotFinished(GradstreamError):
    """The request needs a finished (succeeded) job."""

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job {job_id!r} has no result: its status is {status!r}")
        self.job_id = job_id
        self.status = status


class SpecRejected(GradstreamError):
    """A spec that is well-formed but breaks a configured limit; `field` names where."""

    def __init__(self, field: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


# Where a sweep's problem is, as a 422's loc after "body": ("grid", "optimizer.lr", 2).
SweepPlace = tuple[str | int, ...]


class SweepRejected(GradstreamError):
    """A sweep whose members cannot all be built: each error names the place in the
    SweepSpec that causes it (a grid value, a random path, the base) and says why.
    `error_type` is the 422's `type`: `value_error`, or `limit` for a configured cap."""

    def __init__(
        self, errors: list[tuple[SweepPlace, str]], error_type: str = "value_error"
    ) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in errors))
        self.errors = errors
        self.error_type = error_type


class StoreUnavailable(GradstreamError):
    """Redis (or the archive) could not be reached; the request may be retried. Its message
    says what is wrong in words a client may read (the API answers it as a 503); where things
    live (hosts, ports, URLs) and the underlying error are the cause's, for the log only."""


# What a client is told while Redis cannot be reached (a restart, a Sentinel failover).
REDIS_UNAVAILABLE = "Redis is unavailable (restarting or failing over): retry shortly"


class MalformedJob(GradstreamError):
    """A job record in Redis that cannot be read back (corrupt or written by something else)."""


class Unauthorized(GradstreamError):
    """No credentials, or credentials that name no tenant."""


class LimitExceeded(GradstreamError):
    """A tenant reached a configured limit (`limit` names the setting); it may try again after
    `retry_after_s` seconds where that is known."""

    def __init__(self, limit: str, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s


class JobActive(GradstreamError):
    """The request needs an ended job, and this one is still queued or running."""

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job {job_id!r} is {status}: cancel it first, then delete it")
        self.job_id = job_id
        self.status = status


class DatasetInUse(GradstreamError):
    """A dataset that a queued or running job or sweep of the tenant trains on, or that a
    sweep owns (its inline data, deleted with it)."""

    def __init__(
        self, dataset_id: str, job_id: str, kind: str = "job", owned: bool = False
    ) -> None:
        if owned:
            message = (
                f"dataset {dataset_id!r} is the inline data of sweep {job_id!r}: it is deleted "
                "with the sweep (DELETE /v1/sweeps/{id})"
            )
        else:
            message = (
                f"dataset {dataset_id!r} is used by {kind} {job_id!r}, which has not ended: "
                f"cancel the {kind} or wait for it, then delete the dataset"
            )
        super().__init__(message)
        self.dataset_id = dataset_id
        self.job_id = job_id


class StorageFull(GradstreamError):
    """Redis refused a write because it reached its `maxmemory`; nothing was written."""


class SweepNotFound(GradstreamError):
    """No such sweep (or another tenant's)."""

    def __init__(self, sweep_id: str) -> None:
        super().__init__(f"sweep {sweep_id} not found")
        self.sweep_id = sweep_id


class SweepFinished(GradstreamError):
    """The sweep has ended: it cannot be cancelled."""

    def __init__(self, sweep_id: str, status: str) -> None:
        super().__init__(f"sweep {sweep_id} has already ended ({status})")
        self.sweep_id = sweep_id
        self.status = status


class SweepActive(GradstreamError):
    """The sweep is still queued or running: cancel it before deleting it."""

    def __init__(self, sweep_id: str, status: str) -> None:
        super().__init__(f"sweep {sweep_id} is {status}: cancel it first")
        self.sweep_id = sweep_id
        self.status = status


class MemberOfSweep(GradstreamError):
    """A sweep's member is deleted with its sweep, not on its own."""

    def __init__(self, job_id: str, sweep_id: str) -> None:
        super().__init__(
            f"job {job_id} is a member of sweep {sweep_id}: delete the sweep (DELETE /v1/sweeps/"
            f"{sweep_id}) once it has ended"
        )
        self.job_id = job_id
        self.status = "member"


class ArchivedStepsLost(GradstreamError):
    """A finished job's archived steps cannot be read because their file is gone: no retry
    brings them back (the API answers 410, and an event stream ends with a `gone` event)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id}: its archived steps are missing from the archive")
        self.job_id = job_id


def archived_file_missing(exc: BaseException) -> bool:
    """Whether a StoreUnavailable from reading the archive is a missing file (permanent), not
    an archive out of reach for now."""
    return isinstance(exc.__cause__, FileNotFoundError)
