"""The job store on Redis, one module per thing stored (DESIGN §4):

- keys.py      every key name, written once (the Lua scripts take them from there too)
- scripts.py   the Lua scripts: each one atomic on one job's keys, fenced by attempt
- jobs.py      job records and their indexes: submit, read, list, cancel, delete
- attempts.py  claims, leases, checkpoints and step flushes of a job's attempts
- steps.py     pages of a job's step stream, bounded in steps and bytes
- datasets.py  uploaded datasets and the tenants' references to them
- workers.py   the worker registry and the service's counters
- recovery.py  the reaper: lapsed leases and lost messages
- archiving.py finished jobs due for the archive, and the script that marks one archived
- sweeps.py    sweeps, their members (jobs) and groups (units of work), a group's flush
"""

import redis

from services.archive import Archive
from services.config import Settings
from services.redis_clients import direct_client, redis_client
from services.store.archiving import Archiving
from services.store.attempts import Attempts, Checkpoint, Claim, SentFlush
from services.store.base import LuaScripts, translate_redis_errors
from services.store.datasets import Datasets
from services.store.jobs import Jobs, job_view
from services.store.recovery import Recovery
from services.store.steps import Steps
from services.store.sweeps import Sweeps
from services.store.workers import LIVE_QUEUES_TTL_S, Workers
from services.sweeps_math import DEFAULT_RANK_RTOL

__all__ = ["Checkpoint", "Claim", "SentFlush", "Store", "job_view"]


class Store(Jobs, Attempts, Steps, Sweeps, Datasets, Workers, Recovery, Archiving):
    """The store on one Redis (sync; used by the API's routes and by workers), and the archive
    that holds archived jobs' steps (the API's and the archiver's stores have one: reading or
    deleting an archived job needs it)."""

    def __init__(
        self,
        client: "redis.Redis",
        archive: Archive | None = None,
        rank_rtol: float = DEFAULT_RANK_RTOL,
    ) -> None:
        self.redis = client
        self.archive = archive
        self.rank_rtol = rank_rtol  # sweeps' `best`: metric values this close are equal
        self.lua = LuaScripts(client)
        self._live_queues = set()
        self._live_memory = {}
        self._live_queues_at = -LIVE_QUEUES_TTL_S

    @classmethod
    def from_settings(cls, settings: Settings, archive: Archive | None = None) -> "Store":
        """The store on the configured Redis (by URL, or the primary the sentinels name)."""
        return cls(redis_client(settings), archive, settings.rank_rtol)

    @classmethod
    def from_url(cls, url: str, archive: Archive | None = None) -> "Store":
        """The store on the Redis at `url` (tests and benchmarks)."""
        return cls(direct_client(url), archive)

    def load_scripts(self) -> None:
        """Load every Lua script now, at the process's start (LuaScripts.load_all)."""
        self.lua.load_all()

    @translate_redis_errors
    def ping(self) -> bool:
        return bool(self.redis.ping())
