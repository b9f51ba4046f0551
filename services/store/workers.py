"""The worker registry (`gs:worker:<name>`, with a TTL, and the `gs:workers` index) and the
service's counters. Heartbeat ages are on Redis's clock, whichever machine a worker runs on."""

import time
from dataclasses import dataclass
from datetime import datetime

from services.schemas import JobStatus, QueueDepth, SweepStatus, WorkerInfo
from services.store import keys
from services.store.base import RedisPart, translate_redis_errors

LIVE_QUEUES_TTL_S = 1.0


@dataclass(frozen=True)
class ServiceStats:
    """What /metrics reads of the whole service at a scrape."""

    jobs: dict[JobStatus, int]  # jobs (members and groups included) per status
    sweeps: dict[SweepStatus, int]  # sweeps per status
    queue_depth: dict[str, int]  # messages waiting per worker queue
    counters: dict[str, int]  # the flush scripts' `steps`, `flushes`, `member_steps`


class Workers(RedisPart):
    """Live workers, what they run, and the service's counters."""

    _live_queues: set[str]
    _live_queues_at: float
    _live_memory: dict[str, int]

    @translate_redis_errors
    def heartbeat(self, info: dict[str, str | int], ttl_s: float) -> None:
        """Register or refresh a worker; its entry lapses `ttl_s` after the last heartbeat."""
        name = str(info["name"])
        now = self.redis_time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.worker_key(name), mapping={**info, "heartbeat_at": keys.utc_now()})
        pipe.pexpire(keys.worker_key(name), int(ttl_s * 1000))
        pipe.zadd(keys.WORKERS_INDEX, {name: now})
        pipe.zremrangebyscore(keys.WORKERS_INDEX, "-inf", now - ttl_s)
        pipe.execute()

    @translate_redis_errors
    def clear_current_job(self, name: str, job_id: str) -> None:
        """Clear the worker's current job if it is still `job_id` (a pool child with several
        siblings must not clear a job another one runs). The claim sets it, and the script that
        ends an attempt clears it; this is for an attempt that ended otherwise."""
        if self.redis.hget(keys.worker_key(name), "current_job") == job_id.encode():
            self.redis.hdel(keys.worker_key(name), "current_job")

    @translate_redis_errors
    def unregister_worker(self, name: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(keys.worker_key(name))
        pipe.zrem(keys.WORKERS_INDEX, name)
        pipe.execute()

    @translate_redis_errors
    def list_workers(self, tenant: str | None = None) -> list[WorkerInfo]:
        """Live workers; with `tenant`, a current job of another tenant shows as null."""
        names = self.redis.zrangebyscore(keys.WORKERS_INDEX, self.redis_time() - 3600, "+inf")
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(keys.worker_key(name.decode()))
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
                pipe.hget(keys.job_key(str(worker.current_job)), "tenant")
            for worker, owner in zip(running, pipe.execute(), strict=True):
                if owner != tenant.encode():
                    worker.current_job = None
        return workers

    @translate_redis_errors
    def queue_depths(self, queues: list[str]) -> list[QueueDepth]:
        """Messages waiting in each queue: kombu's Redis transport keeps a queue in a list of
        its name (a message a worker has taken is in its unacked hash instead)."""
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(queue)
        depths = pipe.execute()
        return [QueueDepth(name=q, depth=int(n)) for q, n in zip(queues, depths, strict=True)]

    @translate_redis_errors
    def service_stats(self, queues: tuple[str, ...]) -> ServiceStats:
        """Jobs and sweeps per status, messages waiting in each worker queue, and the
        service-wide counters the flush scripts keep, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for status in JobStatus:
            pipe.zcard(keys.status_index(status))
        for status in JobStatus:  # sweep members are jobs too, indexed apart
            pipe.zcard(keys.member_status_index(status))
        for sweep_status in SweepStatus:
            pipe.scard(keys.sweep_status_index(sweep_status))
        for queue in queues:
            pipe.llen(queue)  # kombu's Redis transport keeps a queue's messages in a list
        pipe.hgetall(keys.STATS_KEY)
        *counts, stats = pipe.execute()
        members = counts[len(JobStatus) : 2 * len(JobStatus)]
        jobs = {s: n + m for s, n, m in zip(JobStatus, counts, members, strict=False)}
        counts = counts[2 * len(JobStatus) :]
        sweeps = dict(zip(SweepStatus, counts, strict=False))
        depth = dict(zip(queues, counts[len(SweepStatus) :], strict=True))
        counters = {name.decode(): int(value) for name, value in stats.items()}
        return ServiceStats(jobs, sweeps, depth, counters)

    def live_queues(self) -> set[str]:
        """Queues some live worker consumes (cached for a second: routing can be a second
        behind a worker starting or stopping, and submits do not each read the registry)."""
        now = time.monotonic()
        if now - self._live_queues_at > LIVE_QUEUES_TTL_S:
            workers = self.list_workers()
            self._live_queues = {queue for worker in workers for queue in worker.queues}
            memory: dict[str, int] = {}
            for worker in workers:
                for queue in worker.queues:
                    memory[queue] = max(memory.get(queue, 0), worker.memory_bytes or 0)
            self._live_memory = memory
            self._live_queues_at = now
        return self._live_queues

    def live_memory(self) -> dict[str, int]:
        """The most memory (bytes: a GPU's own, a CPU worker's RAM) a live worker of each queue
        has, as cached with live_queues: routing sends a group where it fits."""
        self.live_queues()
        return self._live_memory
