"""Recovery that every worker runs (the reaper): jobs whose lease lapsed are requeued, and
queued jobs whose message was lost are sent again. Both read only live jobs (the queued and
running indexes), and compare ages on Redis's clock."""

import base64
import json
from typing import Any

from services.schemas import JobStatus
from services.store import keys
from services.store.base import RedisPart, translate_redis_errors


def message_job_id(message: bytes) -> str | None:
    """The job id a Celery task message in a kombu Redis queue carries (protocol 2: the body
    is base64 JSON `[args, kwargs, embed]`), or None for a message that is not ours."""
    try:
        envelope: dict[str, Any] = json.loads(message)
        args = json.loads(base64.b64decode(envelope["body"]))[0]
        return str(args[0]) if args else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None


class Recovery(RedisPart):
    """The reaper's reads and writes."""

    def _index(self, status: JobStatus) -> list[str]:
        return [i.decode() for i in self.redis.zrangebylex(keys.status_index(status), "-", "+")]

    @translate_redis_errors
    def reap_lapsed(self, max_attempts: int) -> list[tuple[str, str]]:
        """Requeue running jobs whose lease lapsed: (job id, queue) for each to send again."""
        running: list[str] = []
        for status in (JobStatus.RUNNING, JobStatus.CANCELLING):
            for index in (keys.status_index(status), keys.group_status_index(status)):
                running += [i.decode() for i in self.redis.zrangebylex(index, "-", "+")]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in running:
            pipe.exists(keys.lease_key(job_id))
        requeued = []
        for job_id, leased in zip(running, pipe.execute(), strict=True):
            if leased:
                continue
            args = [job_id, keys.utc_now(), max_attempts]
            queue = self.lua.reap(keys=keys.job_keys(job_id), args=args)
            if queue is not None:
                requeued.append((job_id, queue.decode()))
        return requeued

    @translate_redis_errors
    def orphaned_jobs(self, older_than_s: float) -> list[tuple[str, str]]:
        """Jobs queued for `older_than_s` (Redis's clock) with no message for them waiting in
        their queue, whatever else waits there: (id, queue) for each to send again."""
        queued = [
            i.decode()
            for index in (keys.status_index("queued"), keys.group_status_index("queued"))
            for i in self.redis.zrangebylex(index, "-", "+")
        ]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in queued:
            pipe.hmget(keys.job_key(job_id), "queue", "queued_at", "group")
        now = self.redis_time()
        # A sweep's member has no message of its own: its group's is checked instead.
        stale = [
            (job_id, queue.decode())
            for job_id, (queue, queued_at, group) in zip(queued, pipe.execute(), strict=True)
            if queue is not None
            and queued_at is not None
            and group is None
            and now - int(queued_at) > older_than_s
        ]
        if not stale:
            return []
        # Celery's Redis transport keeps a queue's waiting messages in a list named after it.
        # The list holds messages for queued jobs only (a backlog of live jobs): read it in
        # pages, and look for each stale job's id.
        waiting: set[str] = set()
        for queue in {q for _, q in stale}:
            start = 0
            while page := self.redis.lrange(queue, start, start + 499):
                waiting.update(filter(None, map(message_job_id, page)))
                start += len(page)
        orphans = [(job_id, queue) for job_id, queue in stale if job_id not in waiting]
        # Each one's next check is older_than_s away (a job deleted meanwhile stays deleted).
        pipe = self.redis.pipeline(transaction=False)
        for job_id, _ in stale:
            self.lua.touch_queued(keys=keys.job_keys(job_id), args=[int(now)], client=pipe)
        pipe.execute()
        return orphans
