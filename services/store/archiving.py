"""The Redis side of archiving (DESIGN §10): which finished jobs are due, a job's stream read
whole for its file, and the one script that marks a job archived and drops its stream. The
files themselves are services/archive.py's; the order of the steps services/archiver.py's."""

import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from services.archive import Archive
from services.errors import StoreUnavailable
from services.records import Chunk
from services.schemas import JobStatus
from services.store import keys
from services.store.base import RedisPart, translate_redis_errors
from services.store.steps import entries_per_read

Entry = tuple[bytes, dict[bytes, bytes]]  # a stream entry: its id, its fields

# What one read of a stream being archived takes, at most (the file is written as it comes).
ARCHIVE_READ_BYTES = 8 * 1024 * 1024

log = logging.getLogger(__name__)


def _seconds(moment: bytes | None) -> float:
    """A time the store wrote (ISO 8601 UTC), in seconds since the epoch; 0 if there is none."""
    try:
        return datetime.fromisoformat((moment or b"").decode()).timestamp()
    except ValueError:
        return 0.0


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
    def remove_archived_files(self, archive: Archive | None, urls: list[str]) -> list[str]:
        """Remove deleted jobs' archived files by the URLs their records kept: each one removed
        leaves the files to remove (keys.ARCHIVE_REMOVALS), each that fails (or that finds no
        archive here) stays there, for the archivers' next pass. The URLs removed."""
        removed = []
        for url in urls:
            try:
                if archive is None:
                    raise StoreUnavailable("no archive is configured here")
                archive.remove_url(url)
            except Exception:  # whatever the file system raises: the job is gone either way
                log.warning("archive: could not remove %s; tried again later", url, exc_info=True)
                # Last in line (the deleting script put it there): others get their turn first.
                args = [url, self.redis_time()]
                self.lua.defer_archive(keys=[keys.ARCHIVE_REMOVALS], args=args)
            else:
                self.redis.zrem(keys.ARCHIVE_REMOVALS, url)
                removed.append(url)
        return removed

    @translate_redis_errors
    def pending_removals(self, limit: int) -> list[str]:
        """Archived files of deleted jobs still to remove, those tried longest ago first."""
        urls = self.redis.zrange(keys.ARCHIVE_REMOVALS, 0, limit - 1)
        return [url.decode() for url in urls]

    @translate_redis_errors
    def backfill_due(self, page: int = 500) -> int:
        """Make due every job finished before archiving existed (finished, steps in Redis, not
        archived, never due), scored by when it finished; once per Redis. How many."""
        if self.redis.exists(keys.ARCHIVE_BACKFILLED):
            return 0
        added, batch = 0, []
        for member, _ in self.redis.zscan_iter(keys.JOBS_INDEX, count=page):
            batch.append(member.decode())
            if len(batch) == page:
                added, batch = added + self._backfill_page(batch, last=False), []
        return added + self._backfill_page(batch, last=True)

    def _backfill_page(self, job_ids: list[str], last: bool) -> int:
        fields = ("status", "archived", "members", "steps_done", "finished_at")
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(keys.job_key(job_id), fields)
            pipe.exists(keys.steps_key(job_id))
        replies = pipe.execute()
        due: list[str | float] = []
        for job_id, record, in_redis in zip(job_ids, replies[::2], replies[1::2], strict=True):
            status, archived, members, steps_done, finished_at = record
            if status is None or archived is not None or members is not None or not in_redis:
                continue
            if JobStatus(status.decode()).finished and int(steps_done or 0) > 0:
                due += [_seconds(finished_at), job_id]
        script_keys = [keys.ARCHIVE_DUE, keys.ARCHIVE_BACKFILLED]
        return int(self.lua.backfill_due(keys=script_keys, args=[int(last), *due]))

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
