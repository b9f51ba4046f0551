"""Redis failover (README "Redis failover"): a real primary, replica and three sentinels, a
real worker and API configured by the sentinel settings only, and the primary SIGKILLed
mid-job. The job must go on with its steps exactly once and equal, bit for bit, to an
uninterrupted run — also when the promoted replica had missed the primary's last writes.
Jobs and sweeps here are endless (tests/faults.py): still running when the primary dies,
however fast the machine; once they have gone on well past the failover, the test cancels
them and compares what they stored."""

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from api.client import Client
from cli.stack import Stack, child_pids, free_port, wait_until
from services.config import Settings
from services.errors import StoreUnavailable
from services.queue import celery_config
from services.store import Store
from services.store.keys import ckpt_key, job_key, lease_key, sweep_key
from tests.faults import (
    assert_cancelled_exactly,
    cancel,
    endless_spec,
    wait_for_steps,
)
from tests.sentinels import ReplicatedRedis

# A lease shorter than a failover (2.3-2.5 s here): it lapses during the outage, and the
# reapers must leave it to its attempt to renew once Redis is back.
FAILOVER_ENV = {
    "GRADSTREAM_LEASE_S": "2",
    "GRADSTREAM_REAPER_INTERVAL_S": "0.5",
    "GRADSTREAM_WORKER_HEARTBEAT_S": "0.5",
    "GRADSTREAM_WORKER_TTL_S": "3",
    "GRADSTREAM_ORPHAN_AFTER_S": "5",
    "GRADSTREAM_SSE_KEEPALIVE_S": "1",
}
# Generous: failing it means broken, not slow (the README's figure is measured apart).
API_BACK_WITHIN_S = 30


class Failover:
    """A Stack whose Redis is `redis` (reached through its sentinels), with an API and one
    CPU worker."""

    def __init__(self, run_dir: Path) -> None:
        self.stack = Stack(run_dir, env=FAILOVER_ENV)
        self.redis = ReplicatedRedis(self.stack)

    def start(self) -> None:
        self.redis.start()
        self.stack.base_env.update(self.redis.env())
        self.stack.redis_url = self.redis.url
        self.stack.start_api()
        self.worker = self.stack.start_worker("cpu")
        self.stack.wait_for_workers({"cpu"})

    def worker_log(self) -> str:
        logs = self.stack.run_dir.glob("worker-cpu-*.log")
        return "".join(path.read_text(errors="replace") for path in logs)


@pytest.fixture
def failover(tmp_path: Path) -> Iterator[Failover]:
    local = Failover(tmp_path)
    try:
        local.start()
        yield local
    finally:
        local.stack.stop()


@pytest.fixture
def api(failover: Failover) -> Iterator[Client]:
    with Client(failover.stack.api_url, failover.stack.api_key, timeout=10) as client:
        yield client


def _answers(api_url: str) -> bool:
    return httpx.get(api_url + "/readyz", timeout=1).status_code == 200


def test_a_job_goes_on_exactly_across_a_failover(failover: Failover, api: Client) -> None:
    spec = endless_spec(seed=31)
    job = api.submit(spec)
    # A watcher, so that the API's stream reader holds a connection to the old primary.
    watching = api.stream(job["id"])
    wait_until(lambda: next(watching).event == "step", 30, "a streamed step")
    wait_for_steps(api, job["id"], 2000)
    # The attempt stays paused until its lease has lapsed on the promoted replica, as at the
    # end of its longest retry pause; then it must renew the lapsed lease itself. The worker's
    # main process (its reaper) is paused too until the attempt has renewed: a reap racing
    # the renew would make the outcome a matter of the machine's speed (the reaper's hold-off
    # after an outage is a lease, the renew's retry under a second).
    (pool_process,) = child_pids(failover.worker.pid)
    paused = [failover.worker.pid, pool_process]
    for pid in paused:
        os.kill(pid, signal.SIGSTOP)
    try:
        paused_at = api.get(job["id"])["steps_done"]
        old = failover.redis.kill_primary()
        new = failover.redis.wait_for_failover(old)
        promoted = failover.redis.client(new)
        wait_until(lambda: not promoted.exists(lease_key(job["id"])), 30, "the lease lapsed")
        os.kill(pool_process, signal.SIGCONT)
        paused.remove(pool_process)
        # Attempt 1's lease again, renewed by the attempt on the new primary.
        wait_until(lambda: promoted.get(lease_key(job["id"])) == b"1", 60, "the lease renewed")
        promoted.close()
    finally:
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
    assert new == failover.redis.replica_port
    wait_until(lambda: _answers(failover.stack.api_url), API_BACK_WITHIN_S, "API answers")
    wait_for_steps(api, job["id"], paused_at + 2000, timeout=120, outage=True)
    # The attempt rode the outage out: its lapsed lease was not taken for a lost worker.
    assert cancel(api, job["id"])["attempt"] == 1
    assert_cancelled_exactly(api, job["id"], spec)
    assert "lost its worker" not in failover.worker_log()
    # The streams reach the new primary too: the whole job, as stored.
    streamed = [event.data for event in api.stream(job["id"]) if event.event == "step"]
    assert streamed == list(api.steps(job["id"]))
    watching.close()


def test_writes_the_failover_lost_are_recomputed_from_the_checkpoint(
    failover: Failover, api: Client
) -> None:
    spec = endless_spec(seed=32)
    job = api.submit(spec)
    wait_for_steps(api, job["id"], 2000)
    failover.redis.cut_replication()
    primary = failover.redis.client(failover.redis.primary_port)
    replica = failover.redis.client(failover.redis.replica_port)
    kept = int(replica.hget(job_key(job["id"]), "steps_done"))
    # The primary takes flushes the replica never sees.
    wait_until(
        lambda: int(primary.hget(job_key(job["id"]), "steps_done")) > kept + 1000, 30, "lost"
    )
    lost = int(primary.hget(job_key(job["id"]), "steps_done"))
    primary.close()
    # What the replica holds is consistent: its stream ends at its checkpoint.
    assert int(replica.hget(job_key(job["id"]), "steps_done")) == kept
    assert int(replica.hget(ckpt_key(job["id"]), "step")) == kept
    replica.close()
    failover.redis.wait_for_failover(failover.redis.kill_primary())
    # Recomputed from the checkpoint, past the steps the failover lost.
    wait_for_steps(api, job["id"], lost + 1000, timeout=120, outage=True)
    # The running attempt's next flush found the stream shorter and handed the job back.
    assert "Redis lost the attempt's latest steps" in failover.worker_log()
    assert cancel(api, job["id"])["attempt"] == 2
    assert_cancelled_exactly(api, job["id"], spec)


SWEEP = {
    "name": "failover",
    "base": {**endless_spec(seed=33), "optimizer": {"name": "sgd"}},
    "grid": {"optimizer.lr": [0.005, 0.01], "optimizer.momentum": [0.0, 0.9]},
}


def _members_steps(api: Client, sweep_id: str, at_least: int) -> list[list[dict[str, object]]]:
    """Once every member of the (endless) sweep stored `at_least` steps (riding out 503s), the
    sweep cancelled: each member's stored steps, checked exactly once."""
    wait_until(
        lambda: min(m["steps_done"] for m in api.sweep(sweep_id)["members"]) >= at_least,
        120,
        f"{at_least} steps a member",
    )
    api.cancel_sweep(sweep_id)
    assert api.wait_sweep(sweep_id, timeout=30)["status"] == "cancelled"
    recorded = []
    for member in api.sweep(sweep_id)["members"]:
        steps = list(api.steps(member["id"]))
        assert [s["step"] for s in steps] == list(range(api.get(member["id"])["steps_done"]))
        recorded.append(steps)
    return recorded


def test_a_sweep_goes_on_exactly_across_a_failover_that_lost_writes(
    failover: Failover, api: Client
) -> None:
    sweep_id = api.submit_sweep(SWEEP)["id"]
    primary = failover.redis.client(failover.redis.primary_port)
    (group,) = primary.hget(sweep_key(sweep_id), "groups").decode().split()
    wait_until(lambda: int(primary.hget(job_key(group), "steps_done")) >= 2000, 60, "steps")
    failover.redis.cut_replication()
    replica = failover.redis.client(failover.redis.replica_port)
    kept = int(replica.hget(job_key(group), "steps_done"))
    replica.close()
    wait_until(lambda: int(primary.hget(job_key(group), "steps_done")) > kept, 30, "lost writes")
    lost = int(primary.hget(job_key(group), "steps_done"))
    primary.close()
    failover.redis.wait_for_failover(failover.redis.kill_primary())
    # Past the steps the failover lost, then an uninterrupted run of the same sweep as far.
    compared = lost + 1000
    resumed = _members_steps(api, sweep_id, compared)
    assert "Redis lost the attempt's latest steps" in failover.worker_log()
    reference = _members_steps(api, api.submit_sweep(SWEEP)["id"], compared)
    assert [steps[:compared] for steps in resumed] == [steps[:compared] for steps in reference]


def test_a_write_to_a_demoted_primary_is_an_outage(tmp_path: Path) -> None:
    # A client still connected to a primary that the sentinels demoted is answered READONLY:
    # the store reports Redis unavailable (the runner retries), never an error of the job.
    stack = Stack(tmp_path)
    try:
        primary, replica = free_port(), free_port()
        stack.start_redis_server("primary", primary)
        stack.start_redis_server("replica", replica, replicaof=f"127.0.0.1 {primary}")
        store = Store.from_url(f"redis://127.0.0.1:{replica}/0")
        with pytest.raises(StoreUnavailable, match="Redis is unavailable") as raised:
            store.renew_lease("a-job", 1, 1.0)
        assert "read only replica" in str(raised.value.__cause__)  # for the log
        store.redis.close()
    finally:
        stack.stop()


def test_sentinel_settings_reach_celery_and_refuse_a_malformed_list() -> None:
    settings = Settings(
        redis_url="redis://:secret@unused:6379/2",
        redis_sentinels="10.0.0.1:26379, 10.0.0.2:26380",
        redis_master="main",
        redis_sentinel_password="sentinel-secret",
    )
    config = celery_config(settings)
    assert config["broker_url"] == (
        "sentinel://:secret@10.0.0.1:26379/2;sentinel://:secret@10.0.0.2:26380/2"
    )
    options = config["broker_transport_options"]
    assert options["master_name"] == "main"
    assert options["sentinel_kwargs"]["password"] == "sentinel-secret"
    assert options["visibility_timeout"] == settings.visibility_timeout_s
    with pytest.raises(ValidationError, match="redis_sentinels: 'sentinel' is not host:port"):
        Settings(redis_sentinels="sentinel")
