"""Claim contention: deliveries of one job claimed at once (a duplicate message, a redelivery
racing the reaper's requeue) — exactly one wins, whatever the order Redis runs them in.

The claims are released together from a barrier, each on a connection of its own, and the
lapse of a lease is made by deleting it (as its expiry would), so nothing waits on a clock."""

import threading
from collections.abc import Iterator

import pytest

from cli.stack import Stack
from services.schemas import JobSpec
from services.store import Claim, Store
from services.store.keys import job_key, lease_key
from tests.conftest import SEED_EXAMPLE

CLAIMERS = 8


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    local = Stack(tmp_path_factory.mktemp("claims"))
    try:
        local.start_redis()
        yield local
    finally:
        local.stop()


def _claim_at_once(redis_url: str, job_id: str) -> list[Claim]:
    """CLAIMERS claims of `job_id`, each from its own store (own connection), released at
    once: what each got."""
    stores = [Store.from_url(redis_url) for _ in range(CLAIMERS)]
    for store in stores:
        store.ping()  # connected before the race, so the claims leave together
    start = threading.Barrier(CLAIMERS)
    claims: list[Claim | None] = [None] * CLAIMERS

    def claim(i: int) -> None:
        start.wait(timeout=30)
        claims[i] = stores[i].claim_job(job_id, f"worker-{i}", lease_s=600, max_attempts=3)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(CLAIMERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for store in stores:
        store.redis.close()
    assert all(c is not None for c in claims)
    return [c for c in claims if c is not None]


def _queued_job(redis_url: str) -> str:
    store = Store.from_url(redis_url)
    spec = JobSpec.model_validate(SEED_EXAMPLE)
    job_id, _ = store.create_job(spec, "cpu", "test-nobody", "test")
    store.redis.close()
    return job_id


def test_two_claims_of_a_queued_job_at_once_exactly_one_wins(private_redis: Stack) -> None:
    job_id = _queued_job(private_redis.redis_url)
    claims = _claim_at_once(private_redis.redis_url, job_id)
    won = [c for c in claims if c.outcome == "claimed"]
    assert len(won) == 1 and won[0].attempt == 1
    assert sorted(c.outcome for c in claims if c is not won[0]) == ["busy"] * (CLAIMERS - 1)
    store = Store.from_url(private_redis.redis_url)
    record = store.redis.hgetall(job_key(job_id))
    assert record[b"attempt"] == b"1" and record[b"status"] == b"running"
    assert store.redis.get(lease_key(job_id)) == b"1"
    store.redis.close()


def test_claims_of_a_job_whose_lease_lapsed_at_once_one_takes_it_over(
    private_redis: Stack,
) -> None:
    job_id = _queued_job(private_redis.redis_url)
    store = Store.from_url(private_redis.redis_url)
    first = store.claim_job(job_id, "worker-gone", lease_s=600, max_attempts=3)
    assert first.outcome == "claimed" and first.attempt == 1
    store.redis.delete(lease_key(job_id))  # its worker is gone: the lease lapsed

    claims = _claim_at_once(private_redis.redis_url, job_id)
    won = [c for c in claims if c.outcome == "claimed"]
    # One new attempt, and one lost attempt counted, however many deliveries raced.
    assert len(won) == 1 and won[0].attempt == 2
    assert sorted(c.outcome for c in claims if c is not won[0]) == ["busy"] * (CLAIMERS - 1)
    record = store.redis.hgetall(job_key(job_id))
    assert record[b"attempt"] == b"2" and record[b"lost"] == b"1"
    store.redis.close()
