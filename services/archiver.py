"""Moving finished jobs' steps out of Redis (DESIGN §10), run by every worker like the reaper.

A job's archiving is a sequence of named steps, each of which may be the last a crash lets
run: read the job (snapshot), write its stream to a temporary file (write), read the file back
and check it (verify), rename it to its place (publish), and mark the job archived and drop its
stream in one script, if the job is as the snapshot saw it (mark). Until `mark` the stream is
in Redis, untouched; from `mark` on the record names a verified file. So a crash anywhere
leaves the steps readable from Redis, the archive, or both, and running the whole sequence
again finishes the work: the same path, the script idempotent.

Two archivers may run one job at once (a claim lapses after CLAIM_TTL_S while its holder still
writes): each writes its own temporary file and removes only that one, and releases the claim
only if it still holds it (the claim's token). Both files hold the same verified rows, so
whichever rename lands last, the record names the same bytes.
"""

import logging
from dataclasses import dataclass

from services.archive import Archive, ArchivedFile, ArchiveMismatch
from services.store import Store
from services.store.archiving import ArchiveSnapshot

log = logging.getLogger(__name__)

# Jobs one pass of a worker's archiver takes on (the rest wait for the next pass).
BATCH = 16
# How long a worker may hold a job's archiving before another may take it over.
CLAIM_TTL_S = 600
# A job whose archiving failed (storage unreachable, a file that did not verify) is tried again
# this much later.
RETRY_AFTER_S = 300.0
# A temporary file beside a job's file, written this long ago, was left by a writer that died
# (one whose claim lapsed may still be writing: a writer removes only its own file, and
# others' only once they are this old, far longer than any write takes).
STALE_TEMPORARY_S = 24 * 3600.0


@dataclass
class ArchiveRun:
    """One attempt at archiving one job; `run()` takes every step in order."""

    store: Store
    archive: Archive
    job_id: str
    snapshot: ArchiveSnapshot | None = None
    path: str = ""
    temporary: str = ""
    rows: int = 0
    sha256: str = ""

    def read(self) -> bool:
        """Snapshot the job; False when there is nothing to archive (not finished, no steps,
        archived already, deleted)."""
        self.snapshot = self.store.archive_snapshot(self.job_id)
        if self.snapshot is None:
            return False
        self.path = self.archive.job_path(self.snapshot.tenant, self.job_id, self.snapshot.sweep)
        return True

    def write(self) -> None:
        assert self.snapshot is not None
        self.archive.remove_stale_temporaries(self.path, STALE_TEMPORARY_S)
        self.temporary, self.rows, self.sha256 = self.archive.write(
            self.path, self.store.stream_chunks(self.job_id)
        )
        if self.rows != self.snapshot.steps_done:
            raise ArchiveMismatch(
                f"job {self.job_id}: the stream holds {self.rows} steps, the record "
                f"{self.snapshot.steps_done}"
            )

    def verify(self) -> None:
        self.archive.verify(self.temporary, self.rows, self.sha256)

    def publish(self) -> None:
        self.archive.publish(self.temporary, self.path)

    def mark(self) -> str:
        """Mark the job archived and drop its stream (one script): its outcome."""
        assert self.snapshot is not None
        archived = ArchivedFile(self.archive.url(self.path), self.rows, self.sha256)
        outcome = self.store.mark_archived(self.snapshot, archived.to_json())
        if outcome == "missing":  # deleted while its file was being written: its file goes
            self.store.remove_archived_files(self.archive, [archived.url])
        return outcome

    def run(self) -> str:
        """Archive the job: 'ok', or why not ('skipped', 'archived', 'missing', 'changed')."""
        if not self.read():
            return "skipped"
        try:
            self.write()
            self.verify()
        except BaseException:
            if self.temporary:  # this run's own file; another writer's stays
                self.archive.remove_temporary(self.temporary)
            raise
        self.publish()
        return self.mark()


def archive_job(store: Store, archive: Archive, job_id: str) -> str:
    """Archive one finished job's steps (see ArchiveRun.run)."""
    return ArchiveRun(store, archive, job_id).run()


def archive_due(store: Store, archive: Archive, hot_retention_s: float) -> list[str]:
    """A worker's archiver, once: archive the jobs finished for `hot_retention_s`, a batch at a
    time for as long as whole batches get archived. The jobs archived. First, once per Redis,
    jobs finished before archiving existed are made due; and deleted jobs' files whose
    removal failed are tried again."""
    if added := store.backfill_due():
        log.info("archiver: %d jobs finished before archiving existed are due", added)
    store.remove_archived_files(archive, store.pending_removals(BATCH))
    done: list[str] = []
    while True:
        archived = _archive_batch(store, archive, hot_retention_s)
        done += archived
        if len(archived) < BATCH:
            return done


def _archive_batch(store: Store, archive: Archive, hot_retention_s: float) -> list[str]:
    """The oldest due jobs, each one that no other worker is at."""
    done = []
    for job_id in store.due_for_archive(hot_retention_s, BATCH):
        token = store.claim_archiving(job_id, CLAIM_TTL_S)
        if token is None:
            continue
        try:
            outcome = archive_job(store, archive, job_id)
        except Exception:
            log.exception("archiving job %s failed; trying again in %.0f s", job_id, RETRY_AFTER_S)
            store.defer_archive(job_id, RETRY_AFTER_S)
            continue
        finally:
            store.release_archiving(job_id, token)
        if outcome == "ok":
            done.append(job_id)
        elif outcome == "changed":
            log.warning("job %s changed while being archived: trying again later", job_id)
            store.defer_archive(job_id, RETRY_AFTER_S)
        elif outcome == "skipped":  # nothing to archive (no steps): no longer due
            store.drop_due(job_id)
    return done
