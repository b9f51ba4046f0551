"""Sweeps end to end (DESIGN §9) against the real stack: members are jobs whose records equal
the same spec run alone, successive halving prunes at its rungs, one event stream follows the
whole sweep, cancel and delete reach every member, and bad sweeps are 422s naming the place."""

import asyncio
import json
import math
import random
import time
from typing import Any

import httpx
import pytest
import redis
import torch

from api.client import AsyncClient, Client, GradstreamError
from cli.stack import Stack
from services.config import Settings
from services.schemas import SweepSpec
from services.store import Store, keys
from tests.attempts import run_groups, store_sweep
from tests.conftest import SEED_EXAMPLE

SEED_SWEEP = {"name": "seed lrs", "base": SEED_EXAMPLE, "grid": {"optimizer.lr": [0.1, 0.05, 0.2]}}
HALVING = {
    "base": {
        "data": {"synthetic": {"n": 200, "d": 4, "seed": 3}},
        "optimizer": {"name": "adam"},
        "steps": 18,
        "device": "cpu",
    },
    "grid": {"optimizer.lr": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]},
    "early_stop": {"name": "successive_halving", "min_steps": 2, "eta": 3},
}


WATCHERS = 20


def _xreads(redis_client: "redis.Redis") -> int:
    """XREAD calls Redis has served (the SSE tails are its only callers)."""
    stats = redis_client.info("commandstats").get("cmdstat_xread", {})
    return int(stats.get("calls", 0))


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12)


def _same_record(a: dict[str, Any], b: dict[str, Any]) -> bool:
    flat = [
        (a["loss"], b["loss"]),
        *zip(a["grads"]["w"], b["grads"]["w"], strict=True),
        *zip(a["params"]["w"], b["params"]["w"], strict=True),
    ]
    return a["step"] == b["step"] and all(_close(x, y) for x, y in flat)


def test_members_are_jobs_whose_steps_equal_the_spec_run_alone(client: Client) -> None:
    sweep = client.submit_sweep(SEED_SWEEP)
    assert sweep["status"] == "queued" and sweep["counts"] == {"queued": 3}
    view = client.wait_sweep(sweep["id"], timeout=60)
    assert view["status"] == "succeeded" and view["counts"] == {"succeeded": 3}
    lrs = [member["values"]["optimizer.lr"] for member in view["members"]]
    assert lrs == [0.1, 0.05, 0.2]
    assert view["best"]["values"] == {"optimizer.lr": 0.2}  # the fastest of the three
    listed = client.http.get("/v1/jobs", params={"sweep": sweep["id"]}).json()["jobs"]
    assert [job["id"] for job in listed] == [member["id"] for member in view["members"]]
    for member, lr in zip(view["members"], lrs, strict=True):
        job = client.get(member["id"])
        assert job["sweep"] == sweep["id"] and job["spec"]["optimizer"]["lr"] == lr
        assert job["status"] == "succeeded" and job["stop_reason"] == "ran all 10 steps"
        steps = list(client.steps(member["id"]))
        alone = client.submit({**SEED_EXAMPLE, "optimizer": {"name": "sgd", "lr": lr}})
        client.wait(alone["id"], timeout=30)
        reference = list(client.steps(alone["id"]))
        assert len(steps) == 10
        assert all(_same_record(a, b) for a, b in zip(steps, reference, strict=True))
    # The tutorial's worked example, exactly, as step 0 of the lr 0.1 member.
    first = next(client.steps(view["members"][0]["id"]))
    assert first == {"step": 0, "loss": 1.0, "grads": {"w": [-2.0]}, "params": {"w": [1.0]}}


def test_successive_halving_prunes_at_each_rung_by_the_loss_before_it(client: Client) -> None:
    view = client.wait_sweep(client.submit_sweep(HALVING)["id"], timeout=60)
    assert view["status"] == "succeeded"
    assert view["counts"] == {"pruned": 8, "succeeded": 1}
    # Rungs at 2 and 6 of 18 steps: 9 members -> 3 -> 1.
    done = sorted(member["steps_done"] for member in view["members"])
    assert done == [2] * 6 + [6] * 2 + [18]
    assert sum(done) == 9 * 2 + 3 * 4 + 1 * 12
    losses = {
        member["id"]: [record["loss"] for record in client.steps(member["id"])]
        for member in view["members"]
    }
    for rung in (2, 6):
        reached = [m for m in view["members"] if m["steps_done"] >= rung]
        went_on = {m["id"] for m in reached if m["steps_done"] > rung}
        at_rung = sorted(reached, key=lambda m: losses[m["id"]][rung - 1])
        assert {m["id"] for m in at_rung[: len(went_on)]} == went_on  # the best go on
    pruned = next(m for m in view["members"] if m["status"] == "pruned")
    reason = client.get(pruned["id"])["stop_reason"]
    assert reason.startswith(f"pruned at rung {pruned['steps_done']} (successive halving, eta 3)")
    assert view["best"]["id"] == next(m["id"] for m in view["members"] if m["steps_done"] == 18)


def test_one_stream_follows_the_whole_sweep_and_resumes(client: Client) -> None:
    sweep = client.submit_sweep({**HALVING, "grid": {"optimizer.lr": [0.01, 0.1, 1.0]}})
    events = list(client.sweep_events(sweep["id"]))
    kinds = [event.event for event in events]
    assert kinds[0] == "status" and kinds[-1] == "done"
    progress = [event for event in events if event.event == "progress"]
    assert progress, kinds
    final = events[-1].data  # the sweep's summary: its members are the view's
    assert final["status"] == "succeeded" and final["id"] == sweep["id"]
    last = {}
    for event in progress:
        last.update(event.data["members"])
    assert set(last) == {member["id"] for member in client.sweep(sweep["id"])["members"]}
    assert {update["status"] for update in last.values()} <= {"succeeded", "pruned"}
    ids = [int(event.id) for event in events if event.id is not None]
    assert ids == sorted(ids)
    # Resuming after the first progress event gives what followed it, then done.
    after = int(progress[0].id or 0)
    resumed = list(client.sweep_events(sweep["id"], last_event_id=after))
    assert [int(e.id) for e in resumed if e.id] == [i for i in ids if i > after]


def test_cancel_reaches_every_member_and_delete_removes_them(client: Client) -> None:
    spec = {
        "base": {"data": {"synthetic": {"n": 1000, "d": 10}}, "steps": 1_000_000, "device": "cpu"},
        "grid": {"optimizer.lr": [0.001, 0.01]},
        "random": {"count": 2, "space": {"optimizer.momentum": {"uniform": [0.0, 0.9]}}},
    }
    sweep = client.submit_sweep(spec)
    assert len(sweep["members"]) == 4
    with pytest.raises(GradstreamError) as live:
        client.delete_sweep(sweep["id"])
    assert live.value.status_code == 409
    client.cancel_sweep(sweep["id"])
    view = client.wait_sweep(sweep["id"], timeout=30)
    assert view["status"] == "cancelled" and view["counts"] == {"cancelled": 4}
    with pytest.raises(GradstreamError) as again:
        client.cancel_sweep(sweep["id"])
    assert again.value.status_code == 409
    with pytest.raises(GradstreamError) as member:  # a member goes with its sweep
        client.delete(view["members"][0]["id"])
    assert member.value.status_code == 409 and "delete the sweep" in str(member.value)
    client.delete_sweep(sweep["id"])
    for path in (f"/v1/sweeps/{sweep['id']}", f"/v1/jobs/{view['members'][0]['id']}"):
        assert client.http.get(path).status_code == 404


def test_a_bad_sweep_is_a_422_naming_the_place(client: Client) -> None:
    bad_lr = {**SEED_SWEEP, "grid": {"optimizer.lr": [0.1, -1.0]}}
    detail = client.http.post("/v1/sweeps", json=bad_lr).json()["detail"]
    assert detail[0]["loc"] == ["body", "grid", "optimizer.lr", 1]
    unknown = {**SEED_SWEEP, "grid": {"optimizer.epochs": [1]}}
    assert client.http.post("/v1/sweeps", json=unknown).status_code == 422
    stop = {**SEED_SWEEP, "base": {**SEED_EXAMPLE, "stop": {"tol_loss": 1e-3}}}
    detail = client.http.post("/v1/sweeps", json=stop).json()["detail"]
    assert detail[0]["loc"][:3] == ["body", "base", "stop"]


def test_another_tenants_sweep_and_members_are_404(stack: Stack, client: Client) -> None:
    sweep = client.submit_sweep(SEED_SWEEP)
    with httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.keys['bob']}"}
    ) as bob:
        assert bob.get(f"/v1/sweeps/{sweep['id']}").status_code == 404
        assert bob.get(f"/v1/jobs/{sweep['members'][0]['id']}").status_code == 404
        assert bob.post(f"/v1/sweeps/{sweep['id']}/cancel").status_code == 404
        assert bob.get("/v1/jobs", params={"sweep": sweep["id"]}).status_code == 404


def test_many_watchers_of_a_sweep_share_one_redis_reader(
    stack: Stack, client: Client, redis_client: "redis.Redis"
) -> None:
    spec = {
        "base": {"data": {"synthetic": {"n": 2000, "d": 10}}, "steps": 20000, "device": "cpu"},
        "grid": {"optimizer.lr": [0.001, 0.01, 0.03, 0.1]},
    }
    sweep = client.submit_sweep(spec)
    reads_before = _xreads(redis_client)

    async def watch() -> list[tuple[str | None, str]]:
        async with AsyncClient(stack.api_url, stack.api_key) as watcher:
            return [(e.id, e.event) async for e in watcher.sweep_events(sweep["id"])]

    async def watch_all() -> list[list[tuple[str | None, str]]]:
        return await asyncio.gather(*(watch() for _ in range(WATCHERS)))

    seen = asyncio.run(watch_all())
    reads = _xreads(redis_client) - reads_before
    assert all(events == seen[0] for events in seen)  # every watcher saw the same stream
    assert seen[0][-1][1] == "done"
    progress = sum(kind == "progress" for _, kind in seen[0])
    # One tail reads the sweep's stream (a read per few events, and a keep-alive read per
    # second), not one per watcher: without it, reads would be WATCHERS times the events.
    assert reads < 2 * progress + 20, (reads, progress)


def test_an_idempotency_key_makes_a_retried_sweep_submit_return_the_same_sweep(
    stack: Stack, client: Client, redis_client: "redis.Redis"
) -> None:
    # On cuda, which no worker of the stack serves: the sweep stays queued, its groups'
    # messages stay in the gpu queue, where they can be counted.
    spec = {**SEED_SWEEP, "base": {**SEED_EXAMPLE, "device": "cuda"}}
    key = {"Idempotency-Key": f"sweep-{time.time_ns()}"}
    jobs_before, messages_before = redis_client.zcard("gs:jobs"), redis_client.llen("gpu")
    first = client.http.post("/v1/sweeps", json=spec, headers=key)
    messages = redis_client.llen("gpu")
    again = client.http.post("/v1/sweeps", json=spec, headers=key)
    assert first.status_code == again.status_code == 201
    assert again.headers["Location"] == f"/v1/sweeps/{first.json()['id']}"
    assert again.json()["id"] == first.json()["id"]
    assert [m["id"] for m in again.json()["members"]] == [m["id"] for m in first.json()["members"]]
    assert redis_client.zcard("gs:jobs") == jobs_before + 3  # one set of members
    assert messages == messages_before + again.json()["groups"]
    assert redis_client.llen("gpu") == messages  # its groups were enqueued once
    another = {"Idempotency-Key": f"another-{time.time_ns()}"}
    other = client.http.post("/v1/sweeps", json=spec, headers=another)
    with Client(stack.api_url, stack.keys["bob"], timeout=10) as bob:
        theirs = bob.http.post("/v1/sweeps", json=spec, headers=key).json()
        assert bob.http.get(f"/v1/sweeps/{first.json()['id']}").status_code == 404
        bob.cancel_sweep(theirs["id"])
    assert len({first.json()["id"], other.json()["id"], theirs["id"]}) == 3
    spaced = client.http.post("/v1/sweeps", json=spec, headers={"Idempotency-Key": "x y"})
    assert spaced.status_code == 422
    client.cancel_sweep(other.json()["id"])
    client.cancel_sweep(first.json()["id"])
    assert client.wait_sweep(first.json()["id"], timeout=10)["status"] == "cancelled"
    client.delete_sweep(first.json()["id"])
    # The deleted sweep's key is free again: the same submit makes a new sweep.
    renewed = client.http.post("/v1/sweeps", json=spec, headers=key).json()
    assert renewed["id"] != first.json()["id"]
    client.cancel_sweep(renewed["id"])


def test_the_listing_and_the_done_event_stay_small_whatever_the_sweep(client: Client) -> None:
    # Half a megabyte of inline data and 200 members: the listing's row and the stream's
    # `done` event say how the sweep stands (counts, best, the data's shape), not every member
    # nor the data (DESIGN §10); GET /v1/sweeps/{id} has both.
    rows = random.Random(21)
    x = [[round(rows.uniform(-1, 1), 6) for _ in range(10)] for _ in range(5000)]
    y = [round(sum(row), 6) for row in x]
    base = {"data": {"x": x, "y": y}, "optimizer": {"name": "sgd"}, "steps": 2, "device": "cpu"}
    assert len(json.dumps(base["data"])) > 500_000
    lrs = [round(0.001 * (i + 1), 6) for i in range(200)]
    sweep = client.submit_sweep({"name": "wide", "base": base, "grid": {"optimizer.lr": lrs}})
    events = list(client.sweep_events(sweep["id"]))
    assert events[-1].event == "done"
    done = events[-1].data
    assert len(json.dumps(done)) < 10_000 and "members" not in done
    assert done["status"] == "succeeded" and done["counts"] == {"succeeded": 200}
    listing = client.http.get("/v1/sweeps", params={"limit": 100})
    row = next(s for s in listing.json()["sweeps"] if s["id"] == sweep["id"])
    assert len(json.dumps(row)) < 10_000 and "members" not in row
    assert row["spec"]["base"]["data"] == {"inline": {"samples": 5000, "features": 10}}
    assert row["member_count"] == 200 and row["counts"] == {"succeeded": 200}
    assert row["best"] == done["best"] and row["best"] is not None
    whole = client.sweep(sweep["id"])  # the single GET keeps the spec and every member
    assert len(whole["members"]) == 200 and whole["spec"]["base"]["data"]["x"] == x
    client.delete_sweep(sweep["id"])


def test_the_sweep_stream_keeps_its_latest_events_and_an_older_cursor_gets_reset(
    client: Client, store: Store, redis_client: "redis.Redis"
) -> None:
    # A progress event per flush of a group: flushing every step, 60 steps give 60 events,
    # of which the stream keeps the latest 12.
    keep = 12
    spec = {
        "base": {**SEED_EXAMPLE, "steps": 60},
        "grid": {"optimizer.lr": [0.01, 0.02, 0.03]},
    }
    sweep = store_sweep(store, spec, Settings(sweep_events_keep=keep), tenant="alice")
    settings = Settings(flush_max_steps=1, flush_interval_s=60, compile_steps=False)
    run_groups(store, sweep.id, torch.device("cpu"), settings)
    stream = keys.sweep_events_key(sweep.id)
    assert redis_client.xlen(stream) <= keep
    last = int(redis_client.hget(keys.sweep_key(sweep.id), "seq"))
    assert last > 60  # every event was sent; the oldest were let go
    # A watcher resuming from an event no longer kept: `reset`, then every member's state as
    # one progress event, then what is kept after it (here: done).
    resumed = list(client.sweep_events(sweep.id, last_event_id=2))
    kinds = [event.event for event in resumed]
    assert kinds == ["status", "reset", "progress", "done"], kinds
    assert resumed[1].data == {"kept_from": last - keep + 1}
    state = resumed[2].data["members"]
    assert {member_id: update["step"] for member_id, update in state.items()} == {
        member.id: 59 for member in sweep.members
    }
    assert {update["status"] for update in state.values()} == {"succeeded"}
    # A cursor still kept resumes as before, without reset.
    recent = list(client.sweep_events(sweep.id, last_event_id=last - 3))
    assert "reset" not in [event.event for event in recent]
    assert [int(event.id) for event in recent if event.id] == [last - 2, last - 1, last]
    client.delete_sweep(sweep.id)


def test_a_sweeps_view_pages_its_members_but_counts_and_best_are_of_all(client: Client) -> None:
    # The seed's problem from w = 0: each step scales w - 2 by (1 - 5 lr), so the larger the lr
    # (up to 0.15 here), the lower the final loss, each ~20 % below the last: the best member
    # is the last, on the second page.
    lrs = [round(0.001 * (i + 1), 6) for i in range(150)]
    base = {"data": {"x": [[1.0], [2.0]], "y": [2.0, 4.0]}, "init": {"w": [0.0]}, "steps": 5}
    spec = {"name": "paged", "base": {**base, "device": "cpu"}, "grid": {"optimizer.lr": lrs}}
    sweep_id = client.submit_sweep(spec)["id"]
    assert client.wait_sweep(sweep_id, timeout=60)["status"] == "succeeded"
    first = client.sweep_page(sweep_id)
    assert len(first["members"]) == 100 and first["members_next"] == "99"
    second = client.sweep_page(sweep_id, 100, first["members_next"])
    assert [m["index"] for m in second["members"]] == list(range(100, 150))
    assert second["members_next"] is None
    everyone = first["members"] + second["members"]
    assert client.sweep(sweep_id)["members"] == everyone
    lowest = min(everyone, key=lambda m: m["final_loss"])
    assert lowest["index"] == 149
    best = {
        "id": lowest["id"],
        "values": {"optimizer.lr": 0.15},
        "final_loss": lowest["final_loss"],
    }
    for page in (first, second, client.sweep_page(sweep_id, 1)):
        assert page["counts"] == {"succeeded": 150} and page["member_count"] == 150
        assert page["best"] == {**best, "final_val_loss": None}
    for params, field in [
        ({"members_limit": 0}, "members_limit"),
        ({"members_limit": 1001}, "members_limit"),
        ({"members_cursor": "x"}, "members_cursor"),
    ]:
        response = client.http.get(f"/v1/sweeps/{sweep_id}", params=params)
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["query", field]
    client.delete_sweep(sweep_id)


def test_a_sweep_stored_before_its_record_kept_counts_reads_them_from_its_members(
    stack: Stack, client: Client
) -> None:
    # A record without member_count and c:<status> (written before sweeps kept them): its view
    # counts, ranks and pages by reading every member, and says what the new record says.
    lrs = [0.01, 0.02, 0.03, 0.04, 0.05]
    base = {"data": {"x": [[1.0], [2.0]], "y": [2.0, 4.0]}, "init": {"w": [0.0]}, "steps": 5}
    spec = {"base": {**base, "device": "cpu"}, "grid": {"optimizer.lr": lrs}}
    sweep_id = client.submit_sweep(spec)["id"]
    assert client.wait_sweep(sweep_id, timeout=60)["status"] == "succeeded"
    pages = [client.sweep_page(sweep_id, 2), client.sweep_page(sweep_id, 2, "1")]
    store = redis.Redis.from_url(stack.redis_url)
    record = keys.sweep_key(sweep_id)
    kept = [name for name in store.hkeys(record) if name.startswith(b"c:")]
    assert kept and store.hdel(record, "member_count", *kept) == len(kept) + 1
    store.close()
    assert [client.sweep_page(sweep_id, 2), client.sweep_page(sweep_id, 2, "1")] == pages
    client.delete_sweep(sweep_id)


def test_halving_ranks_within_each_group_and_the_view_shows_each_groups_cuts(
    client: Client,
) -> None:
    # A group shares its optimizer: over optimizer.name, two groups of 9, each cut 9 -> 3 -> 1
    # at rungs 2 and 6 on its own, each keeping a winner (ASHA, across groups, is not built).
    lrs = [0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1]
    spec = {**HALVING, "grid": {"optimizer.name": ["adam", "sgd"], "optimizer.lr": lrs}}
    view = client.wait_sweep(client.submit_sweep(spec)["id"], timeout=60)
    assert view["status"] == "succeeded" and view["groups"] == 2
    assert view["counts"] == {"pruned": 16, "succeeded": 2}
    cuts = [{"step": 2, "ranked": 9, "kept": 3}, {"step": 6, "ranked": 3, "kept": 1}]
    groups = view["group_details"]
    assert [(g["members"], g["status"], g["steps_done"], g["rungs"]) for g in groups] == [
        (9, "succeeded", 18, cuts)
    ] * 2
    for position, name in enumerate(["adam", "sgd"]):
        members = [m for m in view["members"] if m["group"] == position]
        assert {m["values"]["optimizer.name"] for m in members} == {name}
        assert [m["status"] for m in members].count("succeeded") == 1
    client.delete_sweep(view["id"])


def test_the_sweep_stream_counts_in_its_tenants_storage_until_the_sweep_is_deleted(
    store: Store, redis_client: "redis.Redis"
) -> None:
    # 60 steps flushed one by one: 60-odd events written, the latest 12 kept; what the tenant
    # keeps for them is what the stream holds (each event's id, field names and values),
    # counted as they are written and given back as they are trimmed, and freed with the sweep.
    tenant = f"events-{keys.new_job_id()}"  # a tenant of its own: nobody else's bytes
    spec = {"base": {**SEED_EXAMPLE, "steps": 60}, "grid": {"optimizer.lr": [0.01, 0.02, 0.03]}}
    sweep = store_sweep(store, spec, Settings(sweep_events_keep=12), tenant=tenant)
    settings = Settings(flush_max_steps=1, flush_interval_s=60, compile_steps=False)
    run_groups(store, sweep.id, torch.device("cpu"), settings)
    entries = redis_client.xrange(keys.sweep_events_key(sweep.id))
    assert len(entries) == 12
    kept = sum(
        len(entry_id) + sum(len(name) + len(value) for name, value in fields.items())
        for entry_id, fields in entries
    )
    record = redis_client.hgetall(keys.sweep_key(sweep.id))
    assert int(record[b"events_bytes"]) == kept
    # The sweep also keeps its inline data, once: the seed's x and y as float32, 8 bytes.
    spec_bytes = len(SweepSpec.model_validate(spec).model_dump_json()) + 8
    assert int(redis_client.hget(keys.dataset_key(record[b"owned"].decode()), "stored")) == 8
    assert int(record[b"bytes"]) == spec_bytes + kept
    members = sum(int(redis_client.hget(keys.job_key(m.id), "bytes")) for m in sweep.members)
    assert int(redis_client.get(keys.tenant_storage(tenant))) == members + spec_bytes + kept
    store.delete_sweep(sweep.id, tenant)
    assert int(redis_client.get(keys.tenant_storage(tenant))) == 0
