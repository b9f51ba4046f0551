"""The store on a real Redis: step pages across chunks, fencing, job listing."""

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.stack import Stack, wait_until
from services.attempts import LeaseKeeper, Outcome, retry_through_outage
from services.config import Settings
from services.errors import JobFinished, JobNotFound, StoreUnavailable
from services.records import Chunk
from services.runner import run_job
from services.schemas import JobSpec, JobStatus, StopSpec
from services.store import Store
from tests.attempts import run_once, run_with_hand_back

SPEC = JobSpec.model_validate({"data": {"x": [[1.0]], "y": [2.0]}, "steps": 10})


def _chunk(first: int, count: int) -> Chunk:
    rows = np.array([[s, -s, s * 10] for s in range(first, first + count)], dtype=np.float32)
    return Chunk(first=first, count=count, features=1, bias=False, rows=rows.tobytes())


def _running_job(store: Store) -> tuple[str, int]:
    # Queued on a queue no worker consumes, then claimed here as a worker would.
    job_id, _ = store.create_job(SPEC, "cpu", "test-nobody", "test")
    claim = store.claim_job(job_id, "test-worker", lease_s=10, max_attempts=3)
    assert claim.outcome == "claimed" and claim.attempt == 1
    return job_id, claim.attempt


def test_step_pages_split_chunks_and_say_where_to_go_on(store: Store) -> None:
    job_id, attempt = _running_job(store)
    for first, count in [(0, 3), (3, 5), (8, 2)]:
        assert store.flush_steps(job_id, attempt, _chunk(first, count), None, 10) == "ok"
    records, next_after = store.read_steps(job_id, after=4, limit=3)
    assert [r["step"] for r in records] == [5, 6, 7]
    assert records[0] == {"step": 5, "loss": 5.0, "grads": {"w": [-5.0]}, "params": {"w": [50.0]}}
    assert next_after == 7
    # Not finished: `next` stays set at the end, since more steps may come.
    records, next_after = store.read_steps(job_id, after=7, limit=100)
    assert [r["step"] for r in records] == [8, 9]
    assert next_after == 9
    assert store.read_steps(job_id, after=9, limit=5) == ([], 9)

    assert (
        store.flush_steps(job_id, attempt, None, None, 10, finish=JobStatus.SUCCEEDED) == "finished"
    )
    records, next_after = store.read_steps(job_id, after=-1, limit=100)
    assert [r["step"] for r in records] == list(range(10))
    assert next_after is None
    assert store.read_steps(job_id, after=-1, limit=10)[1] is None
    assert store.read_steps(job_id, after=-1, limit=9)[1] == 8


def test_flush_is_fenced_by_attempt_and_refuses_gaps(store: Store) -> None:
    job_id, attempt = _running_job(store)
    assert store.flush_steps(job_id, attempt + 1, _chunk(0, 2), None, 10) == "fenced"
    assert store.flush_steps(job_id, attempt, _chunk(1, 2), None, 10) == "gap"
    assert store.flush_steps(job_id, attempt, _chunk(0, 2), None, 10) == "ok"
    # The same flush again (a retry after its reply was lost) is answered, not written twice;
    # an overlapping chunk is refused before anything is written.
    assert store.flush_steps(job_id, attempt, _chunk(0, 2), None, 10) == "ok"
    assert store.flush_steps(job_id, attempt, _chunk(1, 2), None, 10) == "gap"
    assert store.get_job(job_id).steps_done == 2
    assert store.redis.xlen(f"gs:{{{job_id}}}:steps") == 1
    store.cancel_job(job_id)
    assert store.get_job(job_id).status is JobStatus.CANCELLING
    assert store.flush_steps(job_id, attempt, _chunk(2, 1), None, 10) == "cancelled"
    assert store.get_job(job_id).status is JobStatus.CANCELLED
    assert store.flush_steps(job_id, attempt, _chunk(3, 1), None, 10) == "fenced"
    with pytest.raises(JobFinished):
        store.cancel_job(job_id)


def test_a_sent_flush_is_applied_before_its_reply_is_read(store: Store) -> None:
    # The step loop sends a flush and reads its reply a chunk later: the script runs at once,
    # and the reply, read late, says what the flush_steps reply would (cancelled, fenced).
    job_id, attempt = _running_job(store)
    sent = store.send_flush_steps(job_id, attempt, _chunk(0, 3), None, 10)
    wait_until(lambda: store.get_job(job_id).steps_done == 3, 10, "the sent flush applied")
    assert sent.reply() == "ok"
    # Redis without the script (restarted, or failed over, since it was loaded): NOSCRIPT runs
    # nothing, and the reply runs the script by the client, which loads it.
    store.redis.script_flush()
    assert store.send_flush_steps(job_id, attempt, _chunk(3, 2), None, 10).reply() == "ok"
    store.cancel_job(job_id)
    assert store.send_flush_steps(job_id, attempt, _chunk(5, 1), None, 10).reply() == "cancelled"
    assert store.send_flush_steps(job_id, attempt, _chunk(6, 1), None, 10).reply() == "fenced"
    records, _ = store.read_steps(job_id, after=-1, limit=100)
    assert [r["step"] for r in records] == list(range(6))


@pytest.fixture
def own_store(tmp_path: Path) -> Iterator[Store]:
    """A store on a Redis of the test's own: pausing its writes holds up no worker."""
    local = Stack(tmp_path)
    try:
        store = Store.from_url(local.start_redis())
        yield store
        store.redis.close()
    finally:
        local.stop()


def test_a_sent_flush_whose_connection_dropped_is_run_again_once(own_store: Store) -> None:
    store = own_store
    job_id, attempt = _running_job(store)
    assert store.flush_steps(job_id, attempt, _chunk(0, 2), None, 10) == "ok"
    # Writes paused, the script waits in Redis; its connection is killed before it runs.
    store.redis.client_pause(10_000, all=False)
    try:
        sent = store.send_flush_steps(job_id, attempt, _chunk(2, 3), None, 10)

        def waiting() -> list[str]:
            clients = store.redis.client_list()
            return [c["id"] for c in clients if c["cmd"] == "evalsha" and "b" in c["flags"]]

        wait_until(lambda: bool(waiting()), 10, "the flush waits in Redis")
        store.redis.client_kill_filter(_id=waiting()[0])
    finally:
        store.redis.client_unpause()
    with pytest.raises(StoreUnavailable):
        sent.reply()
    # The attempt retries the reply through the outage (Attempt.write): the script runs again,
    # once (a retry of a flush that did run is recognised: test_flush_is_fenced_by_attempt...).
    assert retry_through_outage(sent.reply, "test", 10) == "ok"
    records, _ = store.read_steps(job_id, after=-1, limit=100)
    assert [r["step"] for r in records] == list(range(5))
    assert store.redis.xlen(f"gs:{{{job_id}}}:steps") == 2


def test_list_jobs_newest_first_with_cursor_and_status(store: Store) -> None:
    ids = [store.create_job(SPEC, "cpu", "test-nobody", "test")[0] for _ in range(5)]
    store.cancel_job(ids[1])
    page, cursor = store.list_jobs("dev", None, 3, None)
    assert [v.id for v in page] == ids[::-1][:3]
    assert cursor == ids[2]
    page, _ = store.list_jobs("dev", None, 2, cursor)
    assert [v.id for v in page] == [ids[1], ids[0]]
    cancelled, _ = store.list_jobs("dev", JobStatus.CANCELLED, 100, None)
    assert ids[1] in [v.id for v in cancelled]
    queued, _ = store.list_jobs("dev", JobStatus.QUEUED, 100, None)
    assert ids[1] not in [v.id for v in queued] and ids[4] in [v.id for v in queued]


def test_missing_job_raises_not_found(store: Store) -> None:
    with pytest.raises(JobNotFound):
        store.get_job("f" * 32)
    with pytest.raises(JobNotFound):
        store.read_steps("f" * 32, -1, 10)
    with pytest.raises(JobNotFound):
        store.cancel_job("f" * 32)
    assert store.claim_job("f" * 32, "w", 10, 3).outcome == "missing"


def test_a_hung_attempt_stops_renewing_its_lease(store: Store) -> None:
    job_id, _ = store.create_job(SPEC, "cpu", "test-nobody", "test")
    claim = store.claim_job(job_id, "test-worker", lease_s=0.3, max_attempts=3)
    # Progress that never moves: the keeper renews for stall_s, then lets the lease lapse.
    with LeaseKeeper(store, job_id, claim.attempt, 0.3, progress=lambda: 0, stall_s=0.6) as keeper:
        assert not keeper.lost.wait(0.4)
        assert store.redis.exists(f"gs:{{{job_id}}}:lease")
        assert keeper.lost.wait(3)
    wait_until(lambda: not store.redis.exists(f"gs:{{{job_id}}}:lease"), 2, "lease lapsed")
    # This reaper or the session worker's (it reaps the same Redis every 2 s) requeues it.
    assert store.reap_lapsed(max_attempts=3) in ([(job_id, "test-nobody")], [])
    assert store.get_job(job_id).status is JobStatus.QUEUED


SEED_LONG = JobSpec.model_validate(
    {
        "data": {"x": [[1.0]], "y": [2.0]},
        "init": {"w": [1.0]},
        "optimizer": {"lr": 0.1},
        "steps": 300,
    }
)


def test_an_attempt_on_the_cpu_runs_eager_steps_and_reports_them(store: Store) -> None:
    result, steps = run_once(store, SEED_LONG, torch.device("cpu"), Settings())
    assert result.outcome is Outcome.SUCCEEDED and result.stepper == "eager"
    assert result.steps == 300 and result.loop_s > 0
    assert steps[0] == {"step": 0, "loss": 1.0, "grads": {"w": [-2.0]}, "params": {"w": [1.0]}}


def test_a_job_handed_back_resumes_bit_for_bit_from_its_checkpoint(store: Store) -> None:
    settings = Settings(flush_max_steps=64)  # the first hand-over comes at step 64 at the latest
    _, whole = run_once(store, SEED_LONG, torch.device("cpu"), settings)
    attempts, resumed = run_with_hand_back(store, SEED_LONG, torch.device("cpu"), settings)
    assert 0 < attempts[0].steps < 300 and attempts[0].steps + attempts[1].steps == 300
    assert resumed == whole


def test_a_malformed_job_record_fails_that_job_not_the_worker(store: Store) -> None:
    # Workers trust nothing they read from Redis: the spec is validated again, and a
    # checkpoint that does not fit the job fails it with the reason.
    job_id, _ = store.create_job(SPEC, "cpu", "test-nobody", "test")
    store.redis.hset(f"gs:{{{job_id}}}:job", "spec", '{"data": {"x": [[1.0]], "y": []}}')
    result = run_job(store, job_id, "test-worker", torch.device("cpu"), Settings())
    assert result.outcome is Outcome.FAILED
    fields = store.job_fields(job_id)  # (no JobView: the spec in it cannot be read back)
    assert fields[b"status"] == b"failed" and b"invalid job record" in fields[b"error"]

    job_id, _ = store.create_job(SPEC, "cpu", "test-nobody", "test")
    store.redis.hset(f"gs:{{{job_id}}}:ckpt", mapping={"step": 3, "theta": b"xy", "optimizer": b""})
    result = run_job(store, job_id, "test-worker", torch.device("cpu"), Settings())
    assert result.outcome is Outcome.FAILED
    assert "checkpoint holds 2 bytes" in str(store.get_job(job_id).error)
    # The same worker code runs the next job as usual.
    assert (
        run_once(store, SEED_LONG, torch.device("cpu"), Settings())[0].outcome is Outcome.SUCCEEDED
    )


def test_a_hand_back_ends_the_attempts_ownership(store: Store) -> None:
    # The race made deterministic: whatever an attempt's threads do after it handed its job
    # back (its lease keeper's next renew, a late failure, a flush), none of it takes the job
    # back or ends it.
    job_id, attempt = _running_job(store)
    assert store.flush_steps(job_id, attempt, _chunk(0, 3), None, 10) == "ok"
    assert store.release_job(job_id, attempt, "requeued: test") == "test-nobody"
    assert store.renew_lease(job_id, attempt, 10) is False
    assert store.fail_job(job_id, attempt, "late failure") is False
    assert store.flush_steps(job_id, attempt, _chunk(3, 2), None, 10) == "fenced"
    assert store.release_job(job_id, attempt, "again") is None
    view = store.get_job(job_id)
    assert view.status is JobStatus.QUEUED and view.steps_done == 3 and view.error is None
    assert not store.redis.exists(f"gs:{{{job_id}}}:lease")
    # The next attempt claims it as usual and resumes after step 2.
    claim = store.claim_job(job_id, "test-worker", lease_s=10, max_attempts=3)
    assert claim.outcome == "claimed" and claim.attempt == attempt + 1
    assert store.flush_steps(job_id, claim.attempt, _chunk(3, 2), None, 10) == "ok"


def test_a_reaped_attempt_that_comes_back_still_takes_its_job_back(store: Store) -> None:
    # Unlike a hand-back, a requeue by the reaper (the attempt was paused past its lease) is
    # not the attempt's doing: if no newer attempt claimed the job, the attempt goes on.
    job_id, _ = store.create_job(SPEC, "cpu", "test-nobody", "test")
    attempt = store.claim_job(job_id, "test-worker", lease_s=0.05, max_attempts=3).attempt
    wait_until(lambda: not store.redis.exists(f"gs:{{{job_id}}}:lease"), 2, "lease lapsed")
    store.reap_lapsed(max_attempts=3)
    assert store.get_job(job_id).status is JobStatus.QUEUED
    assert store.renew_lease(job_id, attempt, 10) is True
    assert store.get_job(job_id).status is JobStatus.RUNNING


def test_a_tolerance_stop_holds_across_a_resume_at_the_stopping_step(store: Store) -> None:
    # The seed's loss shrinks by 0.64 a step; tol_loss 1e-3 stops the job at step 15, the
    # first step whose loss differs from the one before by less.
    spec = SEED_LONG.model_copy(update={"stop": StopSpec(tol_loss=1e-3)})
    _, whole = run_once(store, spec, torch.device("cpu"), Settings())
    assert len(whole) == 16
    # Hand-overs only when 15 rows are recorded: the first attempt stores steps 0..14 and
    # hands the job back, so the second starts at the stopping step itself.
    settings = Settings(flush_max_steps=15, flush_interval_s=60)
    attempts, resumed = run_with_hand_back(store, spec, torch.device("cpu"), settings)
    assert attempts[0].steps == 15 and attempts[1].steps == 1
    assert resumed == whole


def test_the_claim_and_the_finish_set_and_clear_the_workers_current_job(store: Store) -> None:
    # No round trips of their own: the claim script marks the job as the worker's current
    # one, and the script that ends the attempt (here the finishing flush) clears it.
    worker = f"test-{time.time_ns()}@host"
    store.heartbeat({"name": worker, "device": "cpu", "queues": "test-nobody"}, ttl_s=30)
    job_id, _ = store.create_job(SPEC, "cpu", "test-nobody", "test")
    claim = store.claim_job(job_id, worker, lease_s=10, max_attempts=3)
    assert store.redis.hget(f"gs:worker:{worker}", "current_job") == job_id.encode()
    reply = store.flush_steps(
        job_id, claim.attempt, _chunk(0, 10), None, 10, finish=JobStatus.SUCCEEDED, worker=worker
    )
    assert reply == "finished"
    assert store.redis.hget(f"gs:worker:{worker}", "current_job") is None
    # A claim by a worker whose entry lapsed writes no entry for it.
    lapsed = f"lapsed-{time.time_ns()}@host"
    other, _ = store.create_job(SPEC, "cpu", "test-nobody", "test")
    store.claim_job(other, lapsed, lease_s=10, max_attempts=3)
    assert not store.redis.exists(f"gs:worker:{lapsed}")
    store.unregister_worker(worker)
    store.cancel_job(other)
