"""A group's flush with its rows outside the Lua (services/store/sweeps.py, GroupFlushTry;
docs/design.md "Exactly once per member"): the members' XADDs and the commit script run as
one MULTI block under a WATCH of the records the fence reads. Each test drives the two halves
of a try (`watch()`, then `commit()`) with the interfering write between them, on the
session's Redis: no sleeps, no worker racing."""

import os
from typing import Any

import pytest
import redis

from services.errors import StorageFull
from services.records import Chunk
from services.schemas import JobStatus
from services.store import Store, keys
from services.store.sweeps import GroupFlushed, GroupFlushTry, MemberFlush
from tests.attempts import store_sweep

FEATURES = 3
WIDTH = 1 + 2 * FEATURES  # loss, dLoss/dw, w (no bias)
ROWS = 4  # steps a chunk
SWEEP: dict[str, Any] = {
    "base": {
        "data": {"synthetic": {"n": 16, "d": FEATURES, "seed": 1}},
        "steps": 20,
        "device": "cpu",
    },
    "grid": {"optimizer.lr": [0.01, 0.02, 0.03]},
}


class Group:
    """A stored sweep's one group and its members, claimed by attempts named by worker."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.sweep = store_sweep(store, SWEEP)
        [self.id] = store.redis.hget(keys.sweep_key(self.sweep.id), "groups").decode().split()
        self.members = [m.id for m in store.get_sweep(self.sweep.id).members]

    def claim(self, worker: str) -> int:
        """A new attempt: the last one's lease lapsed and `worker` claims the group."""
        self.store.redis.delete(keys.lease_key(self.id))
        return self.store.claim_job(self.id, worker, 60, 5).attempt

    def chunk(self, first: int, mark: int) -> tuple[Chunk, list[MemberFlush]]:
        """The chunk of steps `first ..`: every member's rows filled with the byte `mark`, so
        that a stream shows whose rows it holds."""
        rows = bytes([mark]) * (ROWS * WIDTH * 4)
        members = [MemberFlush(m, rows, 0.25 * (i + 1), ROWS) for i, m in enumerate(self.members)]
        return Chunk(first, ROWS, FEATURES, False, b""), members

    def attempt_try(self, attempt: int, first: int, mark: int) -> GroupFlushTry:
        chunk, members = self.chunk(first, mark)
        return GroupFlushTry(
            self.store, self.id, attempt, chunk, members, b"state", 60, False, None, None
        )

    def flush(self, attempt: int, first: int, mark: int, **options: Any) -> GroupFlushed:
        chunk, members = self.chunk(first, mark)
        return self.store.flush_group(self.id, attempt, chunk, members, b"state", 60, **options)

    def streams(self) -> dict[str, list[tuple[bytes, dict[bytes, bytes]]]]:
        """Every member's stream, entry ids and fields."""
        return {m: self.store.redis.xrange(keys.steps_key(m)) for m in self.members}

    def keys_stored(self) -> set[bytes]:
        """Every key of the group and its members (whatever a flush might stage under them)."""
        found: set[bytes] = set()
        for owner in (self.id, *self.members):
            found |= set(self.store.redis.scan_iter(match=f"*{{{owner}}}*"))
        return found

    def steps_done(self) -> list[int]:
        return [
            int(self.store.redis.hget(keys.job_key(i), "steps_done") or 0)
            for i in (self.id, *self.members)
        ]

    def tenant_bytes(self) -> int:
        return int(self.store.redis.get(keys.tenant_storage("test")) or 0)


@pytest.fixture
def group(store: Store) -> Group:
    return Group(store)


def test_a_stale_attempt_cannot_publish_rows_it_sends_after_a_newer_attempt_claimed(
    group: Group,
) -> None:
    first = group.claim("first-worker")
    assert group.flush(first, 0, mark=1).reply == "ok"
    before = group.streams()
    # The first attempt checks its second flush while it still owns the group...
    stale = group.attempt_try(first, ROWS, mark=2)
    stale.watch()
    assert stale.live == "111"  # it would append a row to each member
    # ... then its lease lapses and another worker's attempt claims the group, and only then
    # are its rows sent: Redis drops the whole block.
    second = group.claim("second-worker")
    stored, used = group.keys_stored(), group.tenant_bytes()
    assert stale.commit() is None
    # Tried again (a new WATCH, or the script it falls back to), it is fenced.
    assert group.flush(first, ROWS, mark=2).reply == "fenced"
    assert group.flush(first, ROWS, mark=2, rows_in_script=True).reply == "fenced"
    # None of its rows was written anywhere: the streams, the keys kept and the tenant's
    # bytes are what they were when the newer attempt claimed the group.
    assert group.streams() == before
    assert group.keys_stored() == stored and group.tenant_bytes() == used
    assert group.steps_done() == [ROWS] * 4
    # The newer attempt goes on from the stored step.
    assert group.flush(second, ROWS, mark=3).reply == "ok"
    for entries in group.streams().values():
        assert [entry_id for entry_id, _ in entries] == [b"3-1", b"7-1"]
        assert [fields[b"rows"][:1] for _, fields in entries] == [b"\x01", b"\x03"]


def test_a_stale_attempt_that_checks_after_the_claim_appends_nothing(group: Group) -> None:
    first = group.claim("first-worker")
    assert group.flush(first, 0, mark=1).reply == "ok"
    second = group.claim("second-worker")
    stale = group.attempt_try(first, ROWS, mark=2)
    stale.watch()
    assert stale.live == ""  # fenced: the block holds the commit script alone
    assert stale.commit() == GroupFlushed("fenced", {})
    assert all(len(entries) == 1 for entries in group.streams().values())
    assert group.flush(second, ROWS, mark=3).reply == "ok"


def test_a_retried_flush_appends_nothing_twice(group: Group) -> None:
    attempt = group.claim("worker")
    assert group.flush(attempt, 0, mark=1).reply == "ok"
    streams, events = group.streams(), group.store.sweep_events(group.sweep.id, 0)
    # Its reply was lost: the same flush again is recognised as applied.
    for options in ({}, {"rows_in_script": True}):
        assert group.flush(attempt, 0, mark=1, **options).reply == "ok"
        assert group.streams() == streams
        assert group.store.sweep_events(group.sweep.id, 0) == events
        assert group.steps_done() == [ROWS] * 4


def test_a_member_cancelled_while_queued_between_check_and_commit_gets_no_row(
    group: Group,
) -> None:
    attempt = group.claim("worker")
    flush = group.attempt_try(attempt, 0, mark=1)
    flush.watch()
    assert flush.live == "222"  # queued until this attempt's first flush: watched too
    cancelled = group.members[1]
    assert group.store.cancel_job(cancelled) == "cancelled"
    assert flush.commit() is None
    flushed = group.flush(attempt, 0, mark=1)
    assert flushed == GroupFlushed("ok", {cancelled: "cancelled"})
    assert {m: len(entries) for m, entries in group.streams().items()} == {
        group.members[0]: 1,
        cancelled: 0,
        group.members[2]: 1,
    }
    assert group.store.get_job(cancelled).steps_done == 0


def test_the_block_stores_what_the_script_stores(store: Store) -> None:
    """The same flushes, with a member that diverges and one that ends, through the MULTI
    block and through FLUSH_GROUP: the same replies, stream entries and member records."""
    by_path: list[tuple[list[Any], list[Any], list[Any]]] = []
    for rows_in_script in (False, True):
        group = Group(store)
        attempt = group.claim("worker")
        replies = []
        for first in (0, ROWS):
            chunk, members = group.chunk(first, mark=first + 1)
            if first:
                members[0] = MemberFlush(
                    members[0].member_id,
                    members[0].rows[: 2 * WIDTH * 4],
                    float("nan"),
                    2,
                    JobStatus.DIVERGED,
                    None,
                    "loss not finite at step 5",
                )
                members[2] = MemberFlush(
                    members[2].member_id,
                    members[2].rows,
                    0.5,
                    ROWS,
                    JobStatus.PRUNED,
                    {"stopped": "a test"},
                    None,
                    0.125,
                )
            replies.append(
                store.flush_group(
                    group.id, attempt, chunk, members, b"s", 60, rows_in_script=rows_in_script
                )
            )
        # Replies with each member named by its place (the two groups' ids differ).
        place = {m: i for i, m in enumerate(group.members)}
        named = [
            (r.reply, r.stored, {place[m]: status for m, status in r.gone.items()}) for r in replies
        ]
        records = [
            store.redis.hmget(keys.job_key(m), "status", "steps_done", "loss", "val_loss", "error")
            for m in group.members
        ]
        by_path.append((named, list(group.streams().values()), records))
    block, script = by_path
    assert block[0] == [("ok", 0, {}), ("ok", 0, {0: "diverged", 2: "pruned"})]
    assert block == script
    assert [len(entries) for entries in block[1]] == [2, 2, 2]
    assert block[1][0][1][0] == b"5-1"  # the diverged member's chunk ends at its bad step


def test_a_flush_redis_refuses_for_memory_writes_nothing(
    group: Group, redis_client: "redis.Redis"
) -> None:
    attempt = group.claim("worker")
    assert group.flush(attempt, 0, mark=1).reply == "ok"
    streams = group.streams()
    before = redis_client.config_get("maxmemory")["maxmemory"]
    redis_client.config_set("maxmemory", 1)
    try:
        with pytest.raises(StorageFull):
            group.flush(attempt, ROWS, mark=2)
    finally:
        redis_client.config_set("maxmemory", before)
    assert group.streams() == streams and group.steps_done() == [ROWS] * 4
    assert group.flush(attempt, ROWS, mark=2).reply == "ok"


def test_the_rows_are_the_members_own_whatever_their_bytes(group: Group) -> None:
    """Rows are binary (float32): any byte, spaces and NULs included, reaches the stream."""
    attempt = group.claim("worker")
    chunk, members = group.chunk(0, mark=0)
    rows = os.urandom(ROWS * WIDTH * 4 - 2) + b" \x00"
    members = [MemberFlush(m.member_id, rows, m.loss, m.kept) for m in members]
    assert group.store.flush_group(group.id, attempt, chunk, members, b"", 60).reply == "ok"
    assert all(entries[0][1][b"rows"] == rows for entries in group.streams().values())


def test_a_script_cache_emptied_between_check_and_commit_leaves_no_row_uncommitted(
    group: Group,
) -> None:
    """Redis flushed its scripts after the check (as a restart or a failover empties them):
    the block still commits whole, never rows without their bookkeeping."""
    attempt = group.claim("worker")
    flush = group.attempt_try(attempt, 0, mark=1)
    flush.watch()
    group.store.redis.script_flush()
    assert flush.commit() == GroupFlushed("ok", {})
    assert group.steps_done() == [ROWS] * 4
    assert all(len(entries) == 1 for entries in group.streams().values())
