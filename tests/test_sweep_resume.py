"""A sweep resumes exactly (DESIGN §9, §5 for every member): its groups' worker killed by a
real SIGKILL of its pool processes mid-sweep, or shut down warm (SIGTERM: checkpoint and hand
back), and every member then stores exactly the steps, ends with exactly the status, result
and stop reason, of the same sweep run uninterrupted on the same worker (compared bit for
bit), successive halving pruning the same members at a rung after the interruption.

That last part needs the interruption to come before step 2 000, and nothing holds a running
group at a chosen step: it is a margin, not a construction. The workers flush every 100 steps
(by count), the test interrupts as soon as every member has stored its first chunk, and each
group then has ~1 800 steps of a 4-member step over 10 000 rows to go (seconds here; a
tenth of a second even on the fastest core) before the last rung; the test fails loudly
("interrupted too late") rather than passing without the rung."""

import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from api.client import Client
from cli.stack import Stack, child_pids, stop_process, wait_until
from tests.faults import FAULT_ENV, redis_and_api

# Two sweeps (one group each: a group shares its optimizer's name), trained at once by one
# worker with two pool processes. Rungs at 1000 and 2000 of 3000 steps, eta 2: 4 -> 2 -> 1.
DATA = {"synthetic": {"n": 10_000, "d": 8, "noise": 0.1, "seed": 14}}
HALVING = {"name": "successive_halving", "min_steps": 1000, "eta": 2}
SWEEPS = {
    "sgd-momentum": {
        "name": "sgd with momentum",
        "base": {"data": DATA, "optimizer": {"name": "sgd"}, "steps": 3000, "device": "cpu"},
        "grid": {"optimizer.lr": [0.003, 0.01], "optimizer.momentum": [0.5, 0.9]},
        "early_stop": HALVING,
    },
    "adam": {
        "name": "adam, cosine schedule",
        "base": {
            "data": DATA,
            "optimizer": {"name": "adam", "schedule": {"name": "cosine", "eta_min": 1e-4}},
            "steps": 3000,
            "device": "cpu",
        },
        "grid": {
            "optimizer.lr": [0.001, 0.02],
            "optimizer.betas": [[0.9, 0.999], [0.8, 0.99]],
        },
        "early_stop": HALVING,
    },
}
RUNGS = (1000, 2000)
# Chunks by count only: the first is stored at step 100 however fast the machine.
FLUSH_ENV = {"GRADSTREAM_FLUSH_MAX_STEPS": "100", "GRADSTREAM_FLUSH_INTERVAL_S": "60"}
MEMBER_FIELDS = ("status", "steps_done", "result", "stop_reason", "error")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with redis_and_api(tmp_path_factory.mktemp("sweep-resume"), FAULT_ENV) as local:
        yield local


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[Client]:
    with Client(stack.api_url, stack.api_key, timeout=10) as client:
        yield client


def start_worker(stack: Stack, api: Client) -> "subprocess.Popen[bytes]":
    """A CPU worker with two pool processes (both groups at once), registered."""
    worker = stack.start_worker("cpu", concurrency=2, **FLUSH_ENV)
    wait_until(
        lambda: any(w["name"].startswith(f"cpu-{worker.pid}@") for w in api.workers()),
        60,
        f"worker {worker.pid} registered",
    )
    return worker


@pytest.fixture(scope="module")
def references(stack: Stack, api: Client) -> dict[str, dict[str, Any]]:
    """Each sweep run uninterrupted on a worker like the ones the tests interrupt: per
    sweep, its members' views and stored steps, in member order."""
    worker = start_worker(stack, api)
    try:
        ids = {name: api.submit_sweep(spec)["id"] for name, spec in SWEEPS.items()}
        return {name: recorded(api, api.wait_sweep(ids[name], timeout=120)) for name in ids}
    finally:
        stop_process(worker)


def assert_close_fit(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Two results' least-squares references agree to float64 rounding."""
    assert got.keys() == want.keys()
    for key, value in got.items():
        if value is None or want[key] is None:
            assert value == want[key], key
            continue
        mine = value["w"] + [value.get("b", 0.0)] if isinstance(value, dict) else [value]
        theirs = want[key]
        theirs = theirs["w"] + [theirs.get("b", 0.0)] if isinstance(theirs, dict) else [theirs]
        assert mine == pytest.approx(theirs, rel=1e-9, abs=1e-12), key


def recorded(api: Client, sweep: dict[str, Any]) -> dict[str, Any]:
    """What a sweep stored, member by member (in member order), checked exactly once."""
    members = []
    for member in sweep["members"]:
        view = api.get(member["id"])
        steps = list(api.steps(member["id"]))
        # The least-squares reference is LAPACK's, in float64, computed in each worker process:
        # its last digits may differ between processes. It is compared apart, to 1e-12.
        reference_fit = {
            key: view["result"].pop(key)
            for key in ("lstsq_params", "lstsq_loss", "lstsq_gap")
            if view["result"] and key in view["result"]
        }
        # Exactly once: steps 0 .. steps_done-1, each once, in order.
        assert [s["step"] for s in steps] == list(range(view["steps_done"])), member["id"]
        members.append(
            {
                "values": member["values"],
                "in_sweep": {k: v for k, v in member.items() if k != "id"},
                "view": {field: view[field] for field in MEMBER_FIELDS},
                "attempt": view["attempt"],
                "steps": steps,
                "reference_fit": reference_fit,
            }
        )
    return {"status": sweep["status"], "counts": sweep["counts"], "members": members}


def assert_resumed_exactly(
    api: Client, ids: dict[str, str], references: dict[str, dict[str, Any]], stored_then: int
) -> None:
    """Both sweeps ended as their references did, member for member, bit for bit; each
    group's second attempt finished it; a pruning rung fell after the interruption."""
    assert stored_then < RUNGS[-1], f"interrupted too late ({stored_then} steps stored)"
    for name, sweep_id in ids.items():
        reference = references[name]
        resumed = recorded(api, api.wait_sweep(sweep_id, timeout=120))
        assert resumed["status"] == reference["status"] == "succeeded"
        assert resumed["counts"] == reference["counts"] == {"pruned": 3, "succeeded": 1}
        pruned_at = sorted(m["view"]["steps_done"] for m in resumed["members"])
        assert pruned_at == [1000, 1000, 2000, 3000], pruned_at
        for got, want in zip(resumed["members"], reference["members"], strict=True):
            assert got["values"] == want["values"]
            assert got["view"] == want["view"], (name, got["values"])
            assert_close_fit(got["reference_fit"], want["reference_fit"])
            assert got["in_sweep"] == want["in_sweep"], (name, got["values"])
            assert got["steps"] == want["steps"], (name, got["values"])
            # Members that went on past the interruption ran on in the group's attempt 2.
            if got["view"]["steps_done"] > stored_then:
                assert got["attempt"] == 2, (name, got["values"], got["attempt"])


def submit_and_wait_for_steps(api: Client, at_least: int) -> tuple[dict[str, str], int]:
    """Both sweeps submitted; once every member of both stored `at_least` steps: their ids."""
    ids = {name: api.submit_sweep(spec)["id"] for name, spec in SWEEPS.items()}

    def stored() -> list[int]:
        return [m["steps_done"] for i in ids.values() for m in api.sweep(i)["members"]]

    wait_until(lambda: min(stored()) >= at_least, 60, f"{at_least} steps stored", interval=0.02)
    return ids, max(stored())


def test_a_sweep_resumes_bit_for_bit_after_its_pool_processes_are_killed(
    stack: Stack, api: Client, references: dict[str, dict[str, Any]]
) -> None:
    worker = start_worker(stack, api)
    try:
        ids, _ = submit_and_wait_for_steps(api, 1)
        for child in child_pids(worker.pid):
            os.kill(child, signal.SIGKILL)
        # Nothing is stored until the lapsed leases hand the groups to attempt 2.
        stored_then = max(m["steps_done"] for i in ids.values() for m in api.sweep(i)["members"])
        assert_resumed_exactly(api, ids, references, stored_then)
    finally:
        stop_process(worker)


def test_a_sweep_handed_back_on_a_warm_shutdown_resumes_bit_for_bit(
    stack: Stack, api: Client, references: dict[str, dict[str, Any]]
) -> None:
    worker = start_worker(stack, api)
    try:
        ids, _ = submit_and_wait_for_steps(api, 1)
        worker.send_signal(signal.SIGTERM)
        worker.wait(15)  # a warm shutdown: the groups checkpoint and go back to the queue
    finally:
        stop_process(worker)
    views = {name: api.sweep(sweep_id) for name, sweep_id in ids.items()}
    stored_then = max(m["steps_done"] for view in views.values() for m in view["members"])
    for view in views.values():
        assert view["status"] == "running", view
        assert {m["status"] for m in view["members"]} <= {"queued", "pruned"}, view
    # A handed-back group's running members are queued with it, saying why, as jobs are.
    queued = [
        m["id"] for view in views.values() for m in view["members"] if m["status"] == "queued"
    ]
    assert queued
    for member_id in queued:
        reason = api.get(member_id)["route_reason"]
        assert reason.startswith("requeued: its worker is shutting down"), reason
    replacement = start_worker(stack, api)
    try:
        assert_resumed_exactly(api, ids, references, stored_then)
    finally:
        stop_process(replacement)
