"""The Redis side of archiving (DESIGN §10): which finished jobs are due, a job's stream read
whole for its file, and the one script that marks a job archived and drops its stream. The
files themselves are services/archive.py's; the order of the steps services/archiver.py's."""

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from services.records import Chunk
from services.schemas import JobStatus
from services.store import keys
from services.store.base import RedisPart, translate_redis_errors
from services.store.steps import entries_per_read

Entry = tuple[bytes, dict[bytes, bytes]]  # a stream entry: its id, its fields

# What one read of a stream being archived takes, at most (the file is written as it comes).
ARCHIVE_READ_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class ArchiveSnapshot:
    """A finished job as the archiver read it before writing its file: the script marks it
    archived only if it is still so."""

    job_id: str
    tenant: str
    sweep: str | None
    status: str
    attempt: str
    steps_done: int


class Archiving(RedisPart):
    """Finished jobs' streams on their way to the archive."""

    @translate_redis_errors
    def due_for_archive(self, finished_for_s: float, limit: int) -> list[str]:
        """Jobs finished at least `finished_for_s` ago (Redis's clock) whose steps are still in
        Redis, oldest first."""
        cutoff = self.redis_time() - finished_for_s
        ids = self.redis.zrangebyscore(keys.ARCHIVE_DUE, "-inf", cutoff, start=0, num=limit)
        return [i.decode() for i in ids]

    @translate_redis_errors
    def archive_backlog(self, finished_for_s: float) -> tuple[int, int]:
        """Finished jobs whose steps are still in Redis, and how many of them have been
        finished for `finished_for_s` or longer (due, or failing: the archivers are behind)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(keys.ARCHIVE_DUE)
        pipe.zcount(keys.ARCHIVE_DUE, "-inf", self.redis_time() - finished_for_s)
        in_redis, overdue = pipe.execute()
        return int(in_redis), int(overdue)

    @translate_redis_errors
    def defer_archive(self, job_id: str, seconds: float) -> None:
        """Try this job again in `seconds` (its archiving failed), if it is still due."""
        self.lua.defer_archive(keys=[keys.ARCHIVE_DUE], args=[job_id, self.redis_time() + seconds])

    @translate_redis_errors
    def drop_due(self, job_id: str) -> None:
        """The job has nothing to archive."""
        self.redis.zrem(keys.ARCHIVE_DUE, job_id)

    @translate_redis_errors
    def claim_archiving(self, job_id: str, ttl_s: int) -> str | None:
        """A token for archiving the job now, or None while another holds its claim."""
        token = secrets.token_hex(8)
        claimed = self.lua.claim_archiving(keys=[keys.archiving_key(job_id)], args=[ttl_s, token])
        return token if claimed else None

    @translate_redis_errors
    def release_archiving(self, job_id: str, token: str) -> bool:
        """End the claim `token` holds; False (nothing done) when it lapsed and another caller
        took the job over meanwhile: that one's claim stays."""
        released = self.lua.release_archiving(keys=[keys.archiving_key(job_id)], args=[token])
        return bool(released)

    @translate_redis_errors
    def archive_snapshot(self, job_id: str) -> ArchiveSnapshot | None:
        """The job if it is finished, has steps and is not archived yet, else None."""
        fields = ("status", "attempt", "steps_done", "tenant", "sweep", "archived", "members")
        values = self.redis.hmget(keys.job_key(job_id), fields)
        status, attempt, steps_done, tenant, sweep, archived, members = (
            None if v is None else v.decode() for v in values
        )
        if status is None or archived is not None or members is not None:
            return None
        if not JobStatus(status).finished or not int(steps_done or 0):
            return None
        return ArchiveSnapshot(
            job_id, tenant or "", sweep, status, attempt or "0", int(steps_done or 0)
        )

    def stream_chunks(self, job_id: str) -> Iterator[Chunk]:
        """The job's whole step stream, in order, read a bounded number of entries at a time."""
        start, count = "-", 1  # until an entry's size is known
        while True:
            entries = self._read_entries(job_id, start, count)
            for entry_id, fields in entries:
                chunk = Chunk.from_fields(fields)
                yield chunk
                start = "(" + entry_id.decode()
            if len(entries) < count:
                return
            count = entries_per_read(len(chunk.rows), ARCHIVE_READ_BYTES)

    @translate_redis_errors
    def _read_entries(
        self, job_id: str, start: str, count: int
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = self.redis.xrange(
            keys.steps_key(job_id), start, "+", count=count
        )
        return entries

    @translate_redis_errors
    def mark_archived(self, snapshot: ArchiveSnapshot, archived: str) -> str:
        """Mark the job archived (`archived`: where its file is) and drop its stream, if it is
        as `snapshot` saw it: 'ok', 'archived' (already), 'missing' or 'changed'."""
        args = [snapshot.job_id, snapshot.status, snapshot.attempt, snapshot.steps_done, archived]
        outcome: bytes = self.lua.archive(keys=keys.job_keys(snapshot.job_id), args=args)
        return outcome.decode()
