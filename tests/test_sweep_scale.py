"""Sweeps at scale (issue 21): a dataset's delete asks its users, not every active job.
Against the session's Redis and CPU worker."""

from collections.abc import Iterator

import pytest
import redis

from api.client import Client
from cli.stack import Stack
from services.store import keys

TENANTS = ("ines", "jon", "kim")


@pytest.fixture(scope="module")
def bounded(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API of its own (on the session's Redis, so the session's CPU worker runs its
    groups) with tenants of its own."""
    api = Stack(tmp_path_factory.mktemp("bounded"), tenants=TENANTS)
    api.redis_url = stack.redis_url
    try:
        api.start_api()
        yield api
    finally:
        api.stop()


def _client(api: Stack, tenant: str) -> Client:
    return Client(api.api_url, api.keys[tenant], timeout=60)


def test_a_dataset_in_use_is_known_from_its_users_not_by_reading_every_active_job(
    bounded: Stack, redis_client: "redis.Redis"
) -> None:
    csv = b"a,b,y\n" + b"".join(f"{i},{i % 7},{i % 3}\n".encode() for i in range(30))
    with _client(bounded, "jon") as jon:
        dataset = jon.upload_dataset(csv)["id"]
        users = keys.dataset_users("jon", dataset)
        # Validating on it counts as using it (a queued job: no gpu worker takes it).
        job = jon.submit(
            {
                "data": {"synthetic": {"n": 10, "d": 2}},
                "eval": {"data": {"dataset_id": dataset}},
                "steps": 10,
                "device": "cuda",
            }
        )
        assert redis_client.smembers(users) == {job["id"].encode()}
        busy = jon.http.delete(f"/v1/datasets/{dataset}")
        assert busy.status_code == 409 and busy.json()["job"] == job["id"]
        jon.cancel(job["id"])
        # A sweep on it is one user, whatever its members.
        sweep = jon.submit_sweep(
            {
                "base": {"data": {"dataset_id": dataset}, "steps": 10, "device": "cuda"},
                "grid": {"optimizer.lr": [0.1, 0.2, 0.3]},
            }
        )
        assert redis_client.smembers(users) == {sweep["id"].encode()}
        busy = jon.http.delete(f"/v1/datasets/{dataset}")
        assert busy.status_code == 409 and "sweep" in busy.json()["detail"]
        jon.cancel_sweep(sweep["id"])
        jon.wait_sweep(sweep["id"], timeout=10)
        assert redis_client.scard(users) == 0
        jon.delete_dataset(dataset)
        jon.delete(job["id"])
        jon.delete_sweep(sweep["id"])
