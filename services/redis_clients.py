"""Every Redis connection gradstream makes, built from the settings in one place: to
`redis_url`, or, with `redis_sentinels` set, to the primary the sentinels name.

A sentinel-managed client asks the sentinels where the primary is whenever it connects, so
after a failover its next connection reaches the promoted replica. Until the sentinels have
elected one, it fails like an unreachable Redis (MasterNotFoundError is a ConnectionError),
and a demoted primary's READONLY answer closes the connection and fails the same way: to the
rest of the code a failover is an outage of a few seconds (services/store/base.py).
"""

from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool
from redis.connection import parse_url
from redis.sentinel import Sentinel

from services.config import Settings

# The store's connections: a dead Redis is noticed within seconds, not at the OS's TCP timeout.
STORE_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 5,
    "socket_timeout": 10,
    "health_check_interval": 30,
}
# Asking a sentinel is quick or that sentinel is gone (the next one is asked).
SENTINEL_TIMEOUT_S = 2.0
# A sentinel that asked the others to elect it gives up after this (SENTINEL_ELECTION_TIMEOUT
# in Redis's sentinel.c, 10 s, or the failover-timeout if shorter).
SENTINEL_ELECTION_S = 10.0


def failover_bound_s(down_after_ms: float, failover_timeout_ms: float) -> float:
    """The longest one Sentinel failover leaves the store without a primary: the primary
    silent for `down-after-milliseconds`, the sentinels agreeing (they ask each other every
    second), a leader elected, and the replica it chose promoted (a failover not done within
    `failover-timeout` is abandoned, and tried again only after twice that).
    Settings.redis_outage_s, and the client's stream retries, must cover it."""
    election_s = min(SENTINEL_ELECTION_S, failover_timeout_ms / 1000)
    return down_after_ms / 1000 + 1.0 + election_s + failover_timeout_ms / 1000


def failover_outlasts_outage(settings: Settings) -> str | None:
    """Asked at start, of the first sentinel that answers: a warning when its failover may
    outlast `redis_outage_s` (a running attempt would give up during one), else None; None
    too without sentinels or with none answering (nothing is known yet)."""
    for host, port in settings.sentinel_addresses():
        sentinel = redis.Redis(host=host, port=port, **_sentinel_kwargs(settings))
        try:
            primary = sentinel.sentinel_master(settings.redis_master)
        except redis.RedisError:
            continue
        finally:
            sentinel.close()
        down_after = float(primary["down-after-milliseconds"])
        timeout = float(primary["failover-timeout"])
        bound = failover_bound_s(down_after, timeout)
        if bound <= settings.redis_outage_s:
            return None
        return (
            f"a Sentinel failover may take {bound:.0f} s (down-after-milliseconds "
            f"{down_after:.0f}, failover-timeout {timeout:.0f}), longer than "
            f"GRADSTREAM_REDIS_OUTAGE_S ({settings.redis_outage_s:g} s): lower them or raise "
            "it (docs/deploy.md, 'The clients' window')"
        )
    return None


def direct_client(url: str) -> "redis.Redis":
    """A store client to the Redis at `url` (no sentinels)."""
    return redis.Redis.from_url(url, **STORE_OPTIONS)


def redis_client(settings: Settings) -> "redis.Redis":
    """The store's (sync) client: to `redis_url`, or to the primary the sentinels name."""
    addresses = settings.sentinel_addresses()
    if not addresses:
        return direct_client(settings.redis_url)
    sentinels = Sentinel(addresses, sentinel_kwargs=_sentinel_kwargs(settings))
    client: redis.Redis = sentinels.master_for(
        settings.redis_master, **_primary_kwargs(settings), **STORE_OPTIONS
    )
    return client


def close_client(client: "redis.Redis") -> None:
    """Close a client of `redis_client`, and its connections to the sentinels if it has any."""
    client.close()
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    if manager is not None:
        for sentinel in manager.sentinels:
            sentinel.close()


class _BlockingSentinelPool(AsyncSentinelPool, aioredis.BlockingConnectionPool):  # type: ignore[misc]
    """A sentinel-managed pool that, once all its connections are in use, makes the next
    caller wait for one (as the API's direct pool does) instead of failing."""


def async_redis_client(
    settings: Settings, max_connections: int, timeout: float, socket_timeout: float
) -> aioredis.Redis:
    """An async client (the API's streams) whose pool holds up to `max_connections` and makes
    a caller wait up to `timeout` for a free one; `socket_timeout` bounds each read."""
    options: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": timeout,
        "socket_connect_timeout": 5,
        "socket_timeout": socket_timeout,
    }
    addresses = settings.sentinel_addresses()
    if not addresses:
        pool = aioredis.BlockingConnectionPool.from_url(settings.redis_url, **options)
        return aioredis.Redis.from_pool(pool)  # closes the pool with it
    sentinels = AsyncSentinel(addresses, sentinel_kwargs=_sentinel_kwargs(settings))
    client: aioredis.Redis = sentinels.master_for(
        settings.redis_master,
        connection_pool_class=_BlockingSentinelPool,
        **_primary_kwargs(settings),
        **options,
    )
    return client


async def close_async_client(client: aioredis.Redis) -> None:
    """Close a client of `async_redis_client`, and its connections to the sentinels."""
    await client.aclose()
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    if manager is not None:
        for sentinel in manager.sentinels:
            await sentinel.aclose()


def celery_broker(settings: Settings) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and the transport options it takes besides the usual ones: kombu's
    `sentinel://` transport (one URL per sentinel, separated by `;`) names the primary by
    `master_name`, and gets the primary's password and database from the URLs."""
    addresses = settings.sentinel_addresses()
    if not addresses:
        return settings.redis_url, {}
    url = urlsplit(settings.redis_url)
    auth, _, _ = url.netloc.rpartition("@")
    credentials = f"{auth}@" if auth else ""
    database = url.path or "/0"
    broker = ";".join(
        f"sentinel://{credentials}{host}:{port}{database}" for host, port in addresses
    )
    options: dict[str, Any] = {
        "master_name": settings.redis_master,
        "sentinel_kwargs": _sentinel_kwargs(settings),
    }
    return broker, options


def _primary_kwargs(settings: Settings) -> dict[str, Any]:
    """What a connection to the primary takes from `redis_url`: credentials and database
    (the sentinels give its address)."""
    parsed = parse_url(settings.redis_url)
    return {key: parsed[key] for key in ("username", "password", "db") if key in parsed}


def _sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """How to talk to a sentinel: short timeouts, and its password if it has one."""
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        "socket_timeout": SENTINEL_TIMEOUT_S,
    }
    password = settings.redis_sentinel_password.get_secret_value()
    if password:
        kwargs["password"] = password
    return kwargs
