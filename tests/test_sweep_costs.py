"""What a sweep's size costs the service (issue 21): a reaper pass, a page of a sweep's members
and a sweep's view cost Redis commands in proportion to what they must touch, not to the
sweep's members. Counted on a private redis-server with MONITOR: the commands one client
connection sent (a script's own commands are not round trips, and are left out), between two
marker commands of that connection."""

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from api.client import Client
from cli.stack import Stack, wait_until
from services.store import Store
from tests.faults import FAULT_ENV, endless_spec, redis_and_api

# A sweep of endless members reserves its steps up front (DESIGN §10): room for them.
ENV = {**FAULT_ENV, "GRADSTREAM_TENANT_STORAGE_BYTES": str(10**15)}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with redis_and_api(tmp_path_factory.mktemp("sweep-costs"), ENV) as local:
        local.start_worker("cpu")
        local.wait_for_workers({"cpu"})
        yield local


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[Client]:
    with Client(stack.api_url, stack.api_key, timeout=30) as client:
        yield client


@pytest.fixture
def store(stack: Stack) -> Iterator[Store]:
    store = Store.from_url(stack.redis_url)
    yield store
    store.redis.close()


def commands_sent(redis_url: str, store: Store, action: Callable[[], Any]) -> list[str]:
    """The commands (name first, arguments left out) that `store`'s connection sent to Redis
    while `action` ran, as MONITOR saw them: one thread, so one pooled connection."""
    start, end = f"start-{secrets.token_hex(4)}", f"end-{secrets.token_hex(4)}"
    watcher = redis.Redis.from_url(redis_url, socket_timeout=30)
    try:
        with watcher.monitor() as monitor:
            store.redis.echo(start)
            action()
            store.redis.echo(end)
            sender, sent = None, []
            while True:  # each read times out after 30 s (socket_timeout)
                entry = monitor.next_command()
                command = entry["command"]
                if command == f"ECHO {start}":
                    sender = (entry["client_address"], entry["client_port"])
                elif sender == (entry["client_address"], entry["client_port"]):
                    if command == f"ECHO {end}":
                        return sent
                    sent.append(command.split(" ", 1)[0].upper())
    finally:
        watcher.close()


def endless_sweep(members: int) -> dict[str, Any]:
    """`members` endless members in one group (they differ in lr only): a sweep no test sees
    finish, cancelled at the end. Rows enough that its steps come at a pace Redis keeps up
    with, however many members the batched step has."""
    base = endless_spec()
    base["data"] = {"synthetic": {"n": 4096, "d": 4, "noise": 0.1, "seed": 0}}
    return {
        "name": f"endless x{members}",
        "base": base,
        "grid": {"optimizer.lr": [1e-4 * (1 + i / members) for i in range(members)]},
    }


def running_sweep(api: Client, members: int) -> dict[str, Any]:
    """An endless sweep whose group runs now, every member of it running."""
    view = api.submit_sweep(endless_sweep(members))
    wait_until(
        lambda: api.sweep(view["id"])["counts"] == {"running": members},
        120,
        f"{members} members running",
    )
    return view


def reaper_pass(store: Store) -> Callable[[], None]:
    """One pass of the reaper every worker runs (worker/app.py `reap`), nothing found."""

    def run() -> None:
        assert store.reap_lapsed(max_attempts=3) == []
        assert store.orphaned_jobs(older_than_s=5) == []

    return run


def test_reaper_pass_commands_do_not_grow_with_running_members(
    stack: Stack, api: Client, store: Store
) -> None:
    passes = {}
    for members in (2, 256):
        sweep = running_sweep(api, members)
        passes[members] = commands_sent(stack.redis_url, store, reaper_pass(store))
        api.cancel_sweep(sweep["id"])
        assert api.wait_sweep(sweep["id"], timeout=60)["status"] == "cancelled"
    # The group is checked (its lease), its members are not: the same commands either way.
    assert passes[256] == passes[2], passes
    assert passes[2].count("EVALSHA") == 0  # no lease lapsed: nothing to reap
    assert len(passes[2]) < 20, passes[2]
