"""What every part of the store shares: the Redis client, its registered scripts, and the
translation of Redis's failures into domain errors."""

import functools
import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import redis

from services.archive import Archive
from services.errors import REDIS_UNAVAILABLE, StorageFull, StoreUnavailable
from services.schemas import JobSummary
from services.store import scripts

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

STORAGE_FULL = (
    "storage is full: Redis reached its maxmemory and refused the write (nothing was "
    "written); delete finished jobs or datasets, or give Redis more memory"
)


def translate_redis_errors(method: Callable[P, R]) -> Callable[P, R]:
    """Redis unreachable: StoreUnavailable (retry later); Redis full: StorageFull.

    A failover is an outage too: while the sentinels elect a primary, a sentinel-managed
    client fails to connect (MasterNotFoundError, a ConnectionError), and a client still on a
    primary that was demoted meanwhile is answered READONLY (ReadOnlyError)."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as exc:
            raise StoreUnavailable(REDIS_UNAVAILABLE) from exc
        except redis.exceptions.OutOfMemoryError as exc:
            raise StorageFull(STORAGE_FULL) from exc

    return wrapper


class LuaScripts:
    """The store's scripts, registered once per client (redis-py runs them by SHA)."""

    def __init__(self, client: "redis.Redis") -> None:
        self.create = client.register_script(scripts.CREATE)
        self.claim = client.register_script(scripts.CLAIM)
        self.flush = client.register_script(scripts.FLUSH)
        self.renew = client.register_script(scripts.RENEW)
        self.release = client.register_script(scripts.RELEASE)
        self.reap = client.register_script(scripts.REAP)
        self.cancel = client.register_script(scripts.CANCEL)
        self.fail = client.register_script(scripts.FAIL)
        self.delete = client.register_script(scripts.DELETE)
        self.put_dataset = client.register_script(scripts.PUT_DATASET)
        self.drop_dataset = client.register_script(scripts.DROP_DATASET)
        self.count_load = client.register_script(scripts.COUNT_LOAD)
        self.touch_queued = client.register_script(scripts.TOUCH_QUEUED)
        self.create_sweep = client.register_script(scripts.CREATE_SWEEP)
        self.flush_group = client.register_script(scripts.FLUSH_GROUP)
        self.commit_group = client.register_script(scripts.COMMIT_GROUP)
        self.check_group_flush = client.register_script(scripts.CHECK_GROUP_FLUSH)
        self.cancel_sweep = client.register_script(scripts.CANCEL_SWEEP)
        self.delete_sweep = client.register_script(scripts.DELETE_SWEEP)
        self.archive = client.register_script(scripts.ARCHIVE)
        self.claim_archiving = client.register_script(scripts.CLAIM_ARCHIVING)
        self.release_archiving = client.register_script(scripts.RELEASE_ARCHIVING)
        self.defer_archive = client.register_script(scripts.DEFER_ARCHIVE)
        self.backfill_due = client.register_script(scripts.BACKFILL_DUE)

    def load_all(self) -> None:
        """SCRIPT LOAD every script, so that one Redis cannot compile fails the process that
        starts (ScriptError) rather than the rare call that would run it. An unreachable Redis
        only logs: redis-py loads a script on its first call anyway, as it must after a
        restart or a failover (the script cache is neither persisted nor replicated)."""
        for name, script in vars(self).items():
            if not isinstance(script, redis.commands.core.Script):
                continue
            try:
                sha = script.registered_client.script_load(script.script)
            except redis.ResponseError as exc:
                raise ScriptError(name, str(exc)) from exc
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("Lua scripts not loaded at start (Redis unavailable): %s", exc)
                return
            if sha != script.sha:
                raise ScriptError(name, f"Redis named it {sha}, not {script.sha}")


class ScriptError(RuntimeError):
    """A Lua script that Redis refuses to load: a bug, caught at start."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"Lua script {name.upper()} does not load: {reason}")
        self.name = name


class RedisPart:
    """A part of the store (one module per thing stored) on one Redis client. What one part
    uses of another is declared here and defined in the part that owns it."""

    redis: "redis.Redis"
    lua: LuaScripts
    archive: Archive | None
    rank_rtol: float

    def redis_time(self) -> float:
        """Redis's clock, in seconds: ages compared with times Redis wrote (its TIME) must
        use it, whatever the clock of the machine asking."""
        seconds, micros = self.redis.time()
        return float(seconds) + float(micros) / 1e6

    def job_fields(self, job_id: str, tenant: str | None = None) -> dict[bytes, bytes]:
        raise NotImplementedError  # jobs.py

    def remove_archived_files(self, archive: Archive | None, urls: list[str]) -> list[str]:
        raise NotImplementedError  # archiving.py

    def live_queues(self) -> set[str]:
        raise NotImplementedError  # workers.py

    def summaries(self, page: list[str]) -> list[JobSummary]:
        raise NotImplementedError  # jobs.py
