"""Sweeps at scale (issue 21): a sweep's inline data is stored once, not once per member, and
a group's (rows, members) tensors are bounded by a setting that splits groups and that
routing's memory estimate accounts for. Against the session's Redis and CPU worker."""

import json
import math
import random
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from api.client import Client
from cli.stack import Stack
from services.config import Settings
from services.errors import StoreUnavailable, SweepRejected
from services.queue import CPU_QUEUE, GPU_QUEUE, group_bytes, route_job
from services.schemas import JobSpec, SweepSpec
from services.store import Store, keys
from services.sweeps import expand, submit_sweep

TENANTS = ("ines", "jon", "kim")
# Each group holds at most this many rows x members (GRADSTREAM_MAX_GROUP_ELEMENTS).
GROUP_ELEMENTS = 1000


@pytest.fixture(scope="module")
def bounded(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API of its own (on the session's Redis, so the session's CPU worker runs its
    groups) whose groups hold at most GROUP_ELEMENTS rows x members."""
    api = Stack(tmp_path_factory.mktemp("bounded"), tenants=TENANTS)
    api.redis_url = stack.redis_url
    try:
        api.start_api(GRADSTREAM_MAX_GROUP_ELEMENTS=str(GROUP_ELEMENTS))
        yield api
    finally:
        api.stop()


def _client(api: Stack, tenant: str) -> Client:
    return Client(api.api_url, api.keys[tenant], timeout=60)


def _inline(samples: int, features: int, seed: int) -> dict[str, Any]:
    rows = random.Random(seed)
    x = [[round(rows.uniform(-1, 1), 6) for _ in range(features)] for _ in range(samples)]
    return {"x": x, "y": [round(sum(row) / features, 6) for row in x]}


def _used(redis_client: "redis.Redis", tenant: str) -> int:
    return int(redis_client.get(keys.tenant_storage(tenant)) or 0)


def _sweep_datasets(redis_client: "redis.Redis") -> set[bytes]:
    """Every sweep's own dataset in Redis (the uploads have no `sweep` field)."""
    found = redis_client.scan_iter(match=keys.dataset_key("*"), count=1000)
    return {key for key in found if redis_client.hexists(key, "sweep")}


def test_inline_data_is_stored_once_and_1024_members_train_on_one_worker_without_a_lost_lease(
    bounded: Stack, stack: Stack, redis_client: "redis.Redis"
) -> None:
    # 2 000 x 10 inline (~ 0.25 MB of JSON), 1 024 members: each member's spec used to carry it
    # all (1 024 x 0.25 MB reserved, and parsed by the worker before its lease keeper ran).
    data = _inline(2000, 10, seed=21)
    body_bytes = len(json.dumps(data))
    assert body_bytes > 200_000
    lrs = [round(0.0005 * (i + 1), 6) for i in range(1024)]
    spec = {
        "name": "wide inline",
        "base": {"data": data, "optimizer": {"name": "sgd"}, "steps": 3, "device": "cpu"},
        "grid": {"optimizer.lr": lrs},
    }
    before = _used(redis_client, "alice")
    with Client(stack.api_url, stack.api_key, timeout=60) as alice:
        sweep = alice.submit_sweep(spec)
        # Each member's spec names one dataset: its size does not depend on the data's.
        member_ids = [member["id"] for member in alice.sweep(sweep["id"])["members"]]
        assert len(member_ids) == 1024
        specs = [redis_client.hget(keys.job_key(i), "spec") for i in member_ids]
        assert max(len(s) for s in specs) < 1000
        record = redis_client.hgetall(keys.sweep_key(sweep["id"]))
        owned = record[b"owned"].decode()
        assert owned == keys.sweep_dataset_id(sweep["id"], "data")
        assert {json.loads(s)["data"]["dataset_id"] for s in specs} == {owned}
        # One dataset: the float32 numbers, once.
        stored = int(redis_client.hget(keys.dataset_key(owned), "stored"))
        assert stored == 4 * 2000 * (10 + 1)
        # The tenant keeps the sweep's spec (the inline data as given, once), the dataset, its
        # event stream (the `queued` event so far), and per member its small spec and its
        # steps: far less than one copy of the data each.
        # One snapshot: the worker may be flushing (events written, members ending) meanwhile.
        snapshot = redis_client.pipeline(transaction=True)
        snapshot.hmget(keys.sweep_key(sweep["id"]), "bytes", "events_bytes")
        for member_id in member_ids:
            snapshot.hget(keys.job_key(member_id), "bytes")
        snapshot.get(keys.tenant_storage("alice"))
        (sweep_bytes, events_bytes), *members, used = snapshot.execute()
        assert int(sweep_bytes) - int(events_bytes) == len(record[b"spec"]) + stored
        members_bytes = sum(int(b) for b in members)
        assert int(used) - before == int(sweep_bytes) + members_bytes
        assert members_bytes < 1024 * 1000 + 1024 * 3 * 4 * 21 < body_bytes * 10

        view = alice.wait_sweep(sweep["id"], timeout=120)
        assert view["status"] == "succeeded" and view["counts"] == {"succeeded": 1024}
        # Every member and group in one attempt: no lease lapsed, no attempt was lost.
        for member_id in member_ids:
            attempt, lost = redis_client.hmget(keys.job_key(member_id), "attempt", "lost")
            assert (int(attempt), int(lost)) == (1, 0), member_id
        for group_id in record[b"groups"].split():
            fields = redis_client.hmget(keys.job_key(group_id.decode()), "attempt", "lost")
            assert [int(v) for v in fields] == [1, 0]
        # The members' results are the inline data's: the worker loaded the dataset once.
        assert all(m["final_loss"] is not None for m in view["members"])
        info = alice.http.get(f"/v1/datasets/{owned}").json()
        assert info["sweep"] == sweep["id"] and info["format"] == "inline"
        assert (info["samples"], info["features"], info["loads"]) == (2000, 10, 1)
        job = alice.get(member_ids[0])
        assert job["spec"]["data"]["dataset_id"] == owned
        # The sweep's own spec keeps the data as given; the listing summarises it.
        assert alice.sweep(sweep["id"])["spec"]["base"]["data"]["x"] == data["x"]

        # It is the sweep's: no job trains on it, and it goes with the sweep, not before.
        refused = alice.http.post(
            "/v1/jobs", json={"data": {"dataset_id": owned}, "steps": 1, "device": "cpu"}
        )
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"][0]["loc"] == ["body", "data", "dataset_id"]
        kept = alice.http.delete(f"/v1/datasets/{owned}")
        assert kept.status_code == 409 and sweep["id"] in kept.json()["detail"]
        alice.delete_sweep(sweep["id"])
    assert not redis_client.exists(keys.dataset_key(owned))
    assert _used(redis_client, "alice") == before


def test_an_idempotent_retry_makes_no_second_dataset(
    bounded: Stack, redis_client: "redis.Redis"
) -> None:
    # Queued until cancelled (no gpu worker), with inline training and validation data.
    base = {
        "data": _inline(50, 3, seed=1),
        "eval": {"data": _inline(20, 3, seed=2)},
        "steps": 1_000,
        "device": "cuda",
    }
    spec = {"base": base, "grid": {"optimizer.lr": [0.01, 0.02]}}
    before = _sweep_datasets(redis_client)
    with _client(bounded, "ines") as ines:
        key = {"Idempotency-Key": "inline-once"}
        first = ines.http.post("/v1/sweeps", json=spec, headers=key)
        again = ines.http.post("/v1/sweeps", json=spec, headers=key)
        assert first.status_code == 201 and again.json()["id"] == first.json()["id"]
        sweep_id = first.json()["id"]
        made = _sweep_datasets(redis_client) - before
        # The training data and the validation set: one dataset each, for the one sweep.
        assert made == {
            keys.dataset_key(keys.sweep_dataset_id(sweep_id, part)).encode()
            for part in ("data", "eval")
        }
        member = ines.get(first.json()["members"][0]["id"])
        assert member["spec"]["eval"]["data"]["dataset_id"] == keys.sweep_dataset_id(
            sweep_id, "eval"
        )
        ines.cancel_sweep(sweep_id)
        ines.wait_sweep(sweep_id, timeout=10)
        ines.delete_sweep(sweep_id)
    assert _sweep_datasets(redis_client) == before
    assert _used(redis_client, "ines") == 0


def test_a_sweep_discarded_after_a_failed_enqueue_leaves_no_dataset(
    store: Store, redis_client: "redis.Redis"
) -> None:
    spec = SweepSpec.model_validate(
        {"base": {"data": _inline(40, 2, seed=3), "steps": 5}, "grid": {"optimizer.lr": [0.1]}}
    )

    def broker_down(*_: Any) -> None:
        raise ConnectionError("broker down")

    before = _sweep_datasets(redis_client)
    with pytest.raises(StoreUnavailable):
        submit_sweep(store, spec, Settings(), "discarded", enqueue=broker_down)
    assert _sweep_datasets(redis_client) == before
    assert _used(redis_client, "discarded") == 0


def test_a_dataset_in_use_is_known_from_its_users_not_by_reading_every_active_job(
    bounded: Stack, redis_client: "redis.Redis"
) -> None:
    csv = b"a,b,y\n" + b"".join(f"{i},{i % 7},{i % 3}\n".encode() for i in range(30))
    with _client(bounded, "jon") as jon:
        dataset = jon.upload_dataset(csv)["id"]
        # Validating on it counts as using it (a queued job: no gpu worker takes it).
        job = jon.submit(
            {
                "data": {"synthetic": {"n": 10, "d": 2}},
                "eval": {"data": {"dataset_id": dataset}},
                "steps": 10,
                "device": "cuda",
            }
        )
        busy = jon.http.delete(f"/v1/datasets/{dataset}")
        assert busy.status_code == 409 and busy.json()["job"] == job["id"]
        users = keys.dataset_users("jon", dataset)
        assert redis_client.smembers(users) == {job["id"].encode()}
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


def _rows_of(redis_client: "redis.Redis", sweep_id: str) -> list[int]:
    """Each stored group's member count, in group order."""
    groups = redis_client.hget(keys.sweep_key(sweep_id), "groups") or b""
    return [
        len((redis_client.hget(keys.job_key(g.decode()), "members") or b"").split())
        for g in groups.split()
    ]


def test_a_sweep_past_the_group_bound_is_split_and_trains_as_the_unsplit_one(
    bounded: Stack, stack: Stack, redis_client: "redis.Redis"
) -> None:
    # 100 training rows and 20 validation rows: 120 rows per member, so 8 members per group
    # of 1 000 rows x members; 20 members make groups of 8, 8 and 4.
    spec = {
        "base": {
            "data": {"synthetic": {"n": 100, "d": 3, "seed": 5}},
            "eval": {"data": _inline(20, 3, seed=6)},
            "optimizer": {"name": "sgd", "momentum": 0.5},
            "steps": 20,
            "device": "cpu",
        },
        "grid": {"optimizer.lr": [round(0.01 * (i + 1), 4) for i in range(20)]},
    }
    with _client(bounded, "kim") as kim, Client(stack.api_url, stack.api_key, timeout=60) as alice:
        split = kim.submit_sweep(spec)
        whole = alice.submit_sweep(spec)  # the session's API: the default bound, one group
        assert _rows_of(redis_client, split["id"]) == [8, 8, 4]
        assert all(n * 120 <= GROUP_ELEMENTS for n in _rows_of(redis_client, split["id"]))
        assert _rows_of(redis_client, whole["id"]) == [20]
        split_view = kim.wait_sweep(split["id"], timeout=60)
        whole_view = alice.wait_sweep(whole["id"], timeout=60)
        assert split_view["counts"] == whole_view["counts"] == {"succeeded": 20}
        # Batched matmuls of 8 and of 20 columns may round apart: equal to float32 rounding.
        for a, b in zip(split_view["members"], whole_view["members"], strict=True):
            assert a["values"] == b["values"]
            for name in ("final_loss", "final_val_loss"):
                assert math.isclose(a[name], b[name], rel_tol=1e-5, abs_tol=1e-9), (name, a, b)
            params = kim.get(a["id"])["result"]["params"]["w"]
            reference = alice.get(b["id"])["result"]["params"]["w"]
            assert all(
                math.isclose(p, r, rel_tol=1e-5, abs_tol=1e-7)
                for p, r in zip(params, reference, strict=True)
            )
        # A member past the bound alone is refused, naming the data and the setting.
        alone = {**spec, "base": {**spec["base"], "data": {"synthetic": {"n": 990, "d": 3}}}}
        refused = kim.http.post("/v1/sweeps", json=alone)
        assert refused.status_code == 422, refused.text
        detail = refused.json()["detail"][0]
        assert detail["loc"] == ["body", "base", "data"]
        assert "max_group_elements" in detail["msg"] and "1010 rows" in detail["msg"]
        kim.delete_sweep(split["id"])
        alice.delete_sweep(whole["id"])


def test_routing_estimates_a_groups_memory_from_its_members() -> None:
    settings = Settings()
    spec = JobSpec.model_validate(
        {"data": {"synthetic": {"n": 1_000_000, "d": 10}}, "steps": 1000, "device": "auto"}
    )
    both = {CPU_QUEUE, GPU_QUEUE}
    one, many = group_bytes(spec, 1), group_bytes(spec, 1024)
    # The data once, then a few float32 (rows,) tensors per member.
    assert 44_000_000 <= one < 100_000_000
    assert many > 1024 * 4 * 4 * 1_000_000 > 16 * 10**9
    gpu = {GPU_QUEUE: 80 * 10**9, CPU_QUEUE: 128 * 10**9}
    assert route_job(spec, both, settings, 1, gpu).queue == GPU_QUEUE
    assert route_job(spec, both, settings, 1024, gpu).queue == GPU_QUEUE
    small_gpu = {GPU_QUEUE: 8 * 10**9, CPU_QUEUE: 128 * 10**9}
    route = route_job(spec, both, settings, 1024, small_gpu)
    assert route.queue == CPU_QUEUE
    assert route.reason == (
        f"auto: cpu (needs ~{many} bytes; the largest live gpu has {8 * 10**9})"
    )
    assert route_job(spec, both, settings, 1, small_gpu).queue == GPU_QUEUE
    # Without a cpu worker the gpu is the only place, whatever the estimate.
    assert route_job(spec, {GPU_QUEUE}, settings, 1024, small_gpu).queue == GPU_QUEUE


def test_a_sweeps_validation_set_is_validated_once_for_all_members() -> None:
    # Like its data: validating the same inline validation set once per member took 15 s for
    # 1 024 members over a 1 MB eval.data.
    base = {"data": {"synthetic": {"n": 50, "d": 3}}, "eval": {"data": _inline(20, 3, seed=7)}}
    spec = SweepSpec.model_validate({"base": base, "grid": {"optimizer.lr": [0.1, 0.2, 0.3]}})
    members = expand(spec, 10)
    validation = members[0].spec.eval.data if members[0].spec.eval else None
    assert validation is not None and validation.samples == 20
    assert all(m.spec.eval is not None and m.spec.eval.data is validation for m in members)
    bad = {**base, "eval": {"data": {"x": [[1.0, 2.0, 3.0]], "y": [1.0, 2.0]}}}
    with pytest.raises(SweepRejected) as refused:
        expand(SweepSpec.model_validate({"base": bad, "grid": {"optimizer.lr": [0.1]}}), 10)
    assert refused.value.errors == [
        (("base", "eval", "data", "y"), "Value error, y has 2 values but x has 1 rows")
    ]
