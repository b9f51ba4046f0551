"""One attempt machinery for jobs and groups (services/attempts.py): a sweep's group is leased
before it loads, reports its steps and loop time as a job does, and leaves its worker's
registry entry clean however it ends. Groups run in this process, as a worker's pool child
runs them, through stores that act at a chosen point (no sleeps racing a worker)."""

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from cli.stack import Stack
from services.attempts import Outcome
from services.config import Settings
from services.redis_clients import direct_client
from services.runner import run_job
from services.store import Store, keys
from services.store.sweeps import GroupWork
from tests.attempts import run_groups, store_sweep

CPU = torch.device("cpu")
WORKER = "lifecycle-worker"
SWEEP: dict[str, Any] = {
    "base": {
        "data": {"synthetic": {"n": 64, "d": 3, "noise": 0.1, "seed": 2}},
        "steps": 40,
        "device": "cpu",
    },
    "grid": {"optimizer.lr": [0.01, 0.02, 0.03]},
}
# Chunks of 16 steps by count only: three flushes for 40 steps.
SETTINGS = Settings(flush_max_steps=16, flush_interval_s=60, compile_steps=False)


class SlowLoadStore(Store):
    """Reading the group's members takes `load_s` (a sweep of many members, a large spec):
    what the attempt does before it trains. Records whether the group's lease was still held
    when the load ended."""

    load_s = 0.0
    leased_after_load: bool | None = None

    def group_work(self, group_id: str, member_ids: list[str]) -> GroupWork:
        time.sleep(self.load_s)
        self.leased_after_load = bool(self.redis.exists(keys.lease_key(group_id)))
        return super().group_work(group_id, member_ids)


class FencingStore(Store):
    """While the group loads, its lease lapses and a newer attempt (another worker's) takes
    it: the load ends once the attempt's lease keeper has found that out (its renewal
    refused), and the attempt stops before it flushes anything (no script of its own ends
    it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused = threading.Event()

    def renew_lease(self, job_id: str, attempt: int, lease_s: float) -> bool:
        renewed = super().renew_lease(job_id, attempt, lease_s)
        if not renewed:
            self.refused.set()
        return renewed

    def group_work(self, group_id: str, member_ids: list[str]) -> GroupWork:
        self.redis.delete(keys.lease_key(group_id))
        claim = self.claim_job(group_id, "other-worker", 30.0, 5)
        assert claim.outcome == "claimed", claim
        assert self.refused.wait(30), "the lease keeper never renewed during the load"
        return super().group_work(group_id, member_ids)


@pytest.fixture
def redis_url(stack: Stack) -> str:
    return stack.redis_url


@pytest.fixture
def slow(redis_url: str) -> Iterator[SlowLoadStore]:
    store = SlowLoadStore(direct_client(redis_url))
    yield store
    store.redis.close()


def test_a_group_is_leased_while_it_loads(slow: SlowLoadStore) -> None:
    # The load outlasts the lease three times over: only a keeper started before it holds it.
    settings = SETTINGS.model_copy(update={"lease_s": 0.6})
    slow.load_s = 1.8
    sweep = store_sweep(slow, SWEEP)
    [result] = run_groups(slow, sweep.id, CPU, settings)
    assert result.outcome is Outcome.SUCCEEDED, result
    assert slow.leased_after_load is True
    view = slow.get_sweep(sweep.id)
    assert view.counts == {"succeeded": 3}
    assert {slow.get_job(m.id).attempt for m in view.members} == {1}


def test_a_group_reports_its_steps_and_loop_time_as_a_job_does(redis_url: str) -> None:
    store = Store(direct_client(redis_url))
    sweep = store_sweep(store, SWEEP)
    [result] = run_groups(store, sweep.id, CPU, SETTINGS)
    assert result.outcome is Outcome.SUCCEEDED, result
    assert result.steps == 3 * 40  # member-steps
    assert result.loop_s > 0 and result.result_s > 0
    assert result.stepper == "eager"
    store.redis.close()


def test_a_fenced_group_leaves_its_worker_without_a_current_job(redis_url: str) -> None:
    store = FencingStore(direct_client(redis_url))
    # Steps it cannot finish, in chunks it cannot fill before the keeper's first renewal.
    sweep = store_sweep(store, {**SWEEP, "base": {**SWEEP["base"], "steps": 100_000}})
    [group_id] = store.redis.hget(keys.sweep_key(sweep.id), "groups").decode().split()
    settings = Settings(flush_max_steps=4096, flush_interval_s=60, lease_s=0.6, compile_steps=False)
    worker = keys.worker_key(WORKER)
    store.redis.hset(worker, "queues", "cpu")  # registered: the claim marks its current job
    try:
        result = run_job(store, group_id, WORKER, CPU, settings)
        assert result.outcome is Outcome.FENCED, result
        # The claim made it the worker's current job; no script of its attempt ended it.
        assert store.redis.hget(worker, "current_job") is None
    finally:
        store.redis.delete(worker)
        store.redis.close()
