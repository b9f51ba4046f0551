"""Running attempts in the test process, as a worker's pool child runs them (no Celery): for
checks of the step loop itself on any device, CPU here and CUDA in tests/gpu."""

import threading
from collections.abc import Iterable
from itertools import pairwise
from typing import Any

import numpy as np
import torch

from services.attempts import AttemptResult, Outcome
from services.config import Settings
from services.runner import run_job
from services.schemas import JobSpec, SweepSpec, SweepView
from services.store import Store, keys
from services.sweeps import submit_sweep


def stored_steps(store: Store, job_id: str) -> list[dict[str, Any]]:
    """Every stored step, page after page (a page is bounded in bytes too)."""
    steps: list[dict[str, Any]] = []
    after: int | None = -1
    while after is not None:
        records, after = store.read_steps(job_id, after, 10**9)
        steps += records
        if not records:
            break
    return steps


def run_once(
    store: Store, spec: JobSpec, device: torch.device, settings: Settings
) -> tuple[AttemptResult, list[dict[str, Any]]]:
    """One job in one attempt: the attempt's result and the steps it stored."""
    job_id, _ = store.create_job(spec, str(device), "test-nobody", "test")
    result = run_job(store, job_id, "test-worker", device, settings)
    return result, stored_steps(store, job_id)


def run_with_hand_back(
    store: Store,
    spec: JobSpec,
    device: torch.device,
    settings: Settings,
    resume_settings: Settings | None = None,
) -> tuple[list[AttemptResult], list[dict[str, Any]]]:
    """One job in two attempts (`hand_back_and_resume`): their results and the stored steps."""
    job_id, _ = store.create_job(spec, str(device), "test-nobody", "test")
    attempts = hand_back_and_resume(store, job_id, device, settings, resume_settings)
    return attempts, stored_steps(store, job_id)


def hand_back_and_resume(
    store: Store,
    unit_id: str,
    device: torch.device,
    settings: Settings,
    resume_settings: Settings | None = None,
) -> list[AttemptResult]:
    """Two attempts at a job or a sweep's group: the first is told to drain (as on a worker's
    shutdown), so it checkpoints and hands it back at its first flush; the second, on a worker
    with `resume_settings` (else the same settings), resumes from there."""
    drain = threading.Event()
    drain.set()
    first = run_job(store, unit_id, "test-worker", device, settings, drain)
    assert first.outcome is Outcome.RELEASED, first
    second = run_job(store, unit_id, "test-worker", device, resume_settings or settings)
    return [first, second]


def store_sweep(
    store: Store, spec: dict[str, Any], settings: Settings | None = None, tenant: str = "test"
) -> SweepView:
    """A sweep stored as the API stores it, its groups sent to no worker: the caller runs
    them (`run_groups`)."""
    sweep = SweepSpec.model_validate(spec)
    return submit_sweep(store, sweep, settings or Settings(), tenant, enqueue=lambda *_: None)


def run_groups(
    store: Store,
    sweep_id: str,
    device: torch.device,
    settings: Settings,
    drain: bool = False,
    resume_settings: Settings | None = None,
) -> list[AttemptResult]:
    """One attempt of each of the sweep's groups (the last attempt's results); with `drain`,
    two (`hand_back_and_resume`, the second with `resume_settings`)."""
    results = []
    for group_id in store.redis.hget(keys.sweep_key(sweep_id), "groups").decode().split():
        if drain:
            attempts = hand_back_and_resume(store, group_id, device, settings, resume_settings)
            results.append(attempts[-1])
        else:
            results.append(run_job(store, group_id, "test-worker", device, settings))
    return results


def members_steps(store: Store, sweep_id: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """Each member's status and stored steps, in member order."""
    return [
        (member.status.value, stored_steps(store, member.id))
        for member in store.get_sweep(sweep_id).members
    ]


def step_values(steps: list[dict[str, Any]]) -> np.ndarray:
    """loss, dLoss/dw, dLoss/db (a job with a bias) and w of every step, as float64."""
    rows = [
        [s["loss"], *s["grads"]["w"], *([s["grads"]["b"]] if "b" in s["grads"] else [])]
        + s["params"]["w"]
        for s in steps
    ]
    return np.array(rows, dtype=np.float64)


# How far apart (relative to the higher) the values ranked at a rung must be for a test to
# compare which members two steppers or two CPUs keep: they agree to float32 rounding (~1e-7
# relative), so a margin this wide cannot flip a cut, and ranking ties (GRADSTREAM_RANK_RTOL,
# 1e-5) never come into it (DESIGN §11).
RANK_MARGIN = 0.02


def assert_rungs_apart(
    members: list[tuple[str, list[dict[str, Any]]]], rungs: Iterable[int], metric: str = "loss"
) -> None:
    """At each rung, the values of `metric` that ranked the members there (step `rung - 1` of
    each member that reached it) lie more than RANK_MARGIN apart, pair by pair: so far apart by
    the sweep's construction that no stepper's rounding can change who is pruned. A change of
    the sweep that brings two members close fails here, not as a flaky comparison."""
    for rung in rungs:
        values = sorted(steps[rung - 1][metric] for _, steps in members if len(steps) >= rung)
        assert len(values) > 1, f"no ranking at rung {rung}"
        closest = min((high - low) / abs(high) for low, high in pairwise(values))
        assert closest > RANK_MARGIN, f"rung {rung}: {metric} {values} only {closest:.2g} apart"


def assert_members_agree(
    got: list[tuple[str, list[dict[str, Any]]]], want: list[tuple[str, list[dict[str, Any]]]]
) -> None:
    """Two runs of a sweep (`members_steps`) ended alike: each member's status and steps, its
    values to float32 rounding (another stepper rounds a little differently)."""
    assert [status for status, _ in got] == [status for status, _ in want]
    for (_, mine), (_, reference) in zip(got, want, strict=True):
        assert [s["step"] for s in mine] == [s["step"] for s in reference]
        np.testing.assert_allclose(step_values(mine), step_values(reference), rtol=1e-5, atol=1e-6)
