"""Step streams (DESIGN §4 `gs:{J}:steps`): pages of stored steps, bounded in steps and in
bytes. An entry holds a chunk of steps as float32 rows (services/records.py); a page expands
only the rows it returns."""

from typing import Any

from services.archive import archived_file
from services.errors import ArchivedStepsLost, StoreUnavailable, archived_file_missing
from services.records import Chunk, expand_chunk, loss_record_json_bytes, record_json_bytes
from services.schemas import JobStatus
from services.store import keys
from services.store.base import RedisPart, translate_redis_errors

# Entries read per round trip, at most; fewer when entries are big (see `entries_per_read`).
MAX_ENTRIES_PER_READ = 64


def entries_per_read(entry_bytes: int, budget_bytes: int) -> int:
    """How many entries of about `entry_bytes` one read may take within `budget_bytes`."""
    return max(1, min(MAX_ENTRIES_PER_READ, budget_bytes // max(1, entry_bytes)))


def entry_json_bytes(chunk: Chunk) -> int:
    """An upper bound on the JSON an entry's steps become (reads are sized by it)."""
    full = record_json_bytes(chunk.features, chunk.bias, chunk.explain, chunk.evaluated)
    if chunk.every <= 1:
        return chunk.count * full
    kept = len(chunk.kept_rows())
    return kept * full + (chunk.count - kept) * loss_record_json_bytes(chunk.evaluated)


def page_steps(chunk: Chunk, limit: int, max_bytes: int) -> int:
    """The most steps of this job one page may hold: `limit`, fewer if their JSON would pass
    `max_bytes` (never fewer than one)."""
    full = record_json_bytes(chunk.features, chunk.bias, chunk.explain, chunk.evaluated)
    if chunk.every <= 1:
        return max(1, min(limit, max_bytes // full))
    # k steps of a sparse job hold at most k // every + 2 full records (one each `every`
    # steps, and the job's last step): k x loss + (k / every + 2) x extra <= max_bytes.
    loss = loss_record_json_bytes(chunk.evaluated)
    extra = full - loss
    steps = int((max_bytes - 2 * extra) / (loss + extra / chunk.every))
    return max(1, min(limit, steps))


class Steps(RedisPart):
    """Reading a job's stored steps."""

    @translate_redis_errors
    def read_steps(
        self,
        job_id: str,
        after: int,
        limit: int,
        tenant: str | None = None,
        max_bytes: int = 8 * 1024 * 1024,
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Stored steps with `step > after`, in order, at most `limit` of them and about
        `max_bytes` of JSON (at least one step), and the `after` of the next page or None.

        Steps come from the stream, and from the archive for an archived job: a stream that
        ends short of a finished job's last step was archived, before this read or during it.
        """
        fields = self.job_fields(job_id, tenant)
        finished = JobStatus(fields[b"status"].decode()).finished
        steps_done = int(fields[b"steps_done"])
        records, limit = self._stream_page(job_id, after, limit, max_bytes)
        last = records[-1]["step"] if records else after
        if finished and len(records) < limit and last < steps_done - 1:
            archived = fields.get(b"archived") or self.redis.hget(keys.job_key(job_id), "archived")
            if archived is not None:
                try:
                    records += self._archive_page(archived, last, limit - len(records), max_bytes)
                except StoreUnavailable as exc:
                    if archived_file_missing(exc):
                        raise ArchivedStepsLost(job_id) from exc
                    raise
        last = records[-1]["step"] if records else after
        more = last < steps_done - 1 or not finished
        return records, (last if more else None)

    def _stream_page(
        self, job_id: str, after: int, limit: int, max_bytes: int
    ) -> tuple[list[dict[str, Any]], int]:
        """The page's steps that the stream holds, and the page's limit in steps (lowered to
        fit `max_bytes` once a record's size is known)."""
        records: list[dict[str, Any]] = []
        # The entry holding step after+1 has an id >= after+1 (ids are a chunk's last step).
        start = keys.step_entry_id(after + 1) if after >= 0 else "-"
        count = 1  # until an entry's size is known
        while len(records) < limit:
            # Each entry holds at least one step: never more entries than steps still wanted.
            asked = min(count, limit - len(records))
            entries = self.redis.xrange(keys.steps_key(job_id), start, "+", count=asked)
            for entry_id, entry in entries:
                chunk = Chunk.from_fields(entry)
                limit = min(limit, page_steps(chunk, limit, max_bytes))
                records.extend(expand_chunk(chunk, after, limit - len(records)))
                start = "(" + entry_id.decode()
                count = entries_per_read(entry_json_bytes(chunk), max_bytes)
                if len(records) >= limit:
                    break
            if len(entries) < asked:
                break  # the end of the stream
        return records, limit

    def _archive_page(
        self, archived: bytes, after: int, limit: int, max_bytes: int
    ) -> list[dict[str, Any]]:
        """Up to `limit` steps after `after` from the job's archived file (row groups decoded
        once, through the archive's cache), within `max_bytes` of JSON."""
        archive, location = archived_file(self.archive, archived)
        records: list[dict[str, Any]] = []
        while len(records) < limit:
            chunk = archive.chunk_after(location, after)
            if chunk is None:
                break
            limit = min(limit, page_steps(chunk, limit, max_bytes))
            records.extend(expand_chunk(chunk, after, limit - len(records)))
            after = records[-1]["step"]
        return records
