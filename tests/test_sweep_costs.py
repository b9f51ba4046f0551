"""What a sweep's size costs the service (issue 21): a reaper pass, a page of a sweep's members
and a sweep's view cost Redis commands in proportion to what they must touch, not to the
sweep's members. Counted on a private redis-server with MONITOR: the commands one client
connection sent (a script's own commands are not round trips, and are left out), between two
marker commands of that connection."""

import json
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from api.client import Client
from cli.stack import Stack, wait_until
from services.schemas import JobStatus
from services.store import Store, keys
from services.store.sweeps import MEMBER_STATUS_BATCH
from tests.faults import FAULT_ENV, endless_spec, redis_and_api, running_blocker

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


@pytest.fixture(scope="module")
def queued_sweep(api: Client) -> Iterator[dict[str, Any]]:
    """A sweep of 1 000 members, all queued behind an endless job the worker runs (its one
    pool process); both cancelled at the end."""
    blocker = running_blocker(api)
    spec = {
        "name": "a thousand",
        "base": {"data": {"synthetic": {"n": 8, "d": 2}}, "steps": 5, "device": "cpu"},
        "grid": {"optimizer.lr": [1e-3 * (1 + i / 1000) for i in range(1000)]},
    }
    sweep = api.submit_sweep(spec)
    try:
        yield sweep
    finally:
        api.cancel_sweep(sweep["id"])
        api.cancel(blocker)
        api.wait(blocker, timeout=60)


def test_a_page_of_members_reads_only_its_records(
    stack: Stack, api: Client, store: Store, queued_sweep: dict[str, Any]
) -> None:
    sweep_id = queued_sweep["id"]
    tenant = store.redis.hget(keys.sweep_key(sweep_id), "tenant").decode()
    store.live_queues()  # routing's cache of the worker registry, read apart from the page
    pages: list[Any] = []
    sent = commands_sent(
        stack.redis_url,
        store,
        lambda: pages.append(store.list_members(sweep_id, tenant, None, 10, "500")),
    )
    (rows, cursor) = pages[0]
    assert [row.id for row in rows] == member_ids(store, sweep_id)[501:511]
    assert cursor == "510"
    # The owner (one field), the page's ids, each row's record: nothing of the other 990.
    assert sorted(sent) == sorted(["HGET", "ZRANGEBYSCORE"] + ["HMGET"] * 10), sent

    # With a status, statuses are read in batches until the page is full.
    pages.clear()
    sent = commands_sent(
        stack.redis_url,
        store,
        lambda: pages.append(store.list_members(sweep_id, tenant, JobStatus.QUEUED, 10, None)),
    )
    (rows, cursor) = pages[0]
    assert [row.id for row in rows] == member_ids(store, sweep_id)[:10]
    assert cursor == "9"
    assert sent.count("HMGET") == 10, sent
    assert sent.count("HGET") <= 1 + MEMBER_STATUS_BATCH, sent

    # Paging through still gives every member once, in order, with or without a status.
    for status in (None, JobStatus.QUEUED):
        seen, cursor = [], None
        while True:
            rows, cursor = store.list_members(sweep_id, tenant, status, 300, cursor)
            seen += [row.id for row in rows]
            if cursor is None:
                break
        assert seen == member_ids(store, sweep_id)
    assert store.list_members(sweep_id, tenant, JobStatus.RUNNING, 10, None) == ([], None)


def member_ids(store: Store, sweep_id: str) -> list[str]:
    return [i.decode() for i in store.redis.zrange(keys.sweep_members_key(sweep_id), 0, -1)]


def test_a_sweeps_view_reads_its_page_of_members_and_counts_them_all(
    stack: Stack, api: Client, store: Store, queued_sweep: dict[str, Any]
) -> None:
    sweep_id = queued_sweep["id"]
    views: list[Any] = []
    sent = commands_sent(
        stack.redis_url, store, lambda: views.append(store.get_sweep(sweep_id, None, 10, "500"))
    )
    view = views[0]
    assert [m.index for m in view.members] == list(range(501, 511))
    assert view.members_next == "510" and view.member_count == 1000
    assert view.counts == {JobStatus.QUEUED: 1000} and view.best is None
    # The record (counts in it), the page's ids and records, the group's record, the lowest
    # final loss: nothing of the other 990 members.
    assert sorted(sent) == sorted(["HGETALL", "ZRANGEBYSCORE", "HMGET", "ZRANGE"] + ["HMGET"] * 10)

    # Over HTTP: 100 members by default, a cursor to the next page, the client joins them all.
    first = api.sweep_page(sweep_id)
    assert len(first["members"]) == 100 and first["members_next"] == "99"
    whole = api.sweep(sweep_id)
    assert [m["id"] for m in whole["members"]] == member_ids(store, sweep_id)
    assert whole["members_next"] is None and whole["counts"] == {"queued": 1000}
    assert len(json.dumps(first)) < len(json.dumps(whole)) / 5
