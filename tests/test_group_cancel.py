"""Cancels that reach a sweep's group just before a rung (services/group_runner.py): the
members a cancel ended leave before the rung ranks, so the cut ranks only members still
training, and a group the cancels leave with one member (or none) ends cleanly, never failed.
Groups run in this process, as a worker's pool child runs them; the cancels are sent between
two chunks, through the very store the attempt flushes by."""

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from cli.stack import Stack
from services.attempts import Outcome
from services.config import Settings
from services.redis_clients import direct_client
from services.store import Store
from services.store.sweeps import GroupFlushed
from tests.attempts import assert_rungs_apart, members_steps, run_groups, store_sweep

CPU = torch.device("cpu")
# Chunks of 16 steps by count only (no timer, no compiled blocks): the rung at 48 ends the
# third chunk, and the cancels go out with the second chunk's flush, so that the rung's chunk
# trains while its reply (the members cancelled) is on its way.
SETTINGS = Settings(flush_max_steps=16, flush_interval_s=60, compile_steps=False)
RUNG = 48
# Four plain-SGD members halved at step 48 of 80 (rungs at 48 only): each lr three times the
# last, so their losses at the rung lie far apart, the smallest lr's the highest.
SWEEP: dict[str, Any] = {
    "base": {
        "data": {"synthetic": {"n": 256, "d": 4, "noise": 0.1, "seed": 5}},
        "optimizer": {"name": "sgd"},
        "steps": 80,
        "device": "cpu",
    },
    "grid": {"optimizer.lr": [0.001, 0.003, 0.01, 0.03]},
    "early_stop": {"name": "successive_halving", "min_steps": RUNG, "eta": 2},
}


class CancellingStore(Store):
    """The store, which cancels `cancel` (member ids) just before the attempt's second flush
    is applied, as a user's cancel arriving between two chunks would."""

    cancel: tuple[str, ...] = ()
    flushes = 0

    def flush_group(self, *args: Any, **kwargs: Any) -> GroupFlushed:
        self.flushes += 1
        if self.flushes == 2:
            for member_id in self.cancel:
                assert self.cancel_job(member_id, "test") == "cancelling"
        return super().flush_group(*args, **kwargs)


@pytest.fixture
def cancelling(stack: Stack) -> Iterator[CancellingStore]:
    store = CancellingStore(direct_client(stack.redis_url))
    yield store
    store.redis.close()


def test_all_but_one_cancelled_before_a_rung_leaves_the_last_to_finish(
    cancelling: CancellingStore,
) -> None:
    sweep = store_sweep(cancelling, SWEEP)
    ids = [member.id for member in sweep.members]
    # The one left has the highest loss at the rung: ranked with the cancelled, it was cut.
    cancelling.cancel = tuple(ids[1:])
    [result] = run_groups(cancelling, sweep.id, CPU, SETTINGS)
    assert result.outcome is Outcome.SUCCEEDED, result
    view = cancelling.get_sweep(sweep.id)
    assert view.status.value == "succeeded"
    assert view.counts == {"succeeded": 1, "cancelled": 3}
    assert [m.steps_done for m in view.members] == [80, 32, 32, 32]
    assert cancelling.get_job(ids[0]).stop_reason == "ran all 80 steps"


def test_a_rung_ranks_only_the_members_still_training(cancelling: CancellingStore) -> None:
    sweep = store_sweep(cancelling, SWEEP)
    ids = [member.id for member in sweep.members]
    cancelling.cancel = tuple(ids[3:])  # the best at the rung: ranked, it took a survivor's place
    [result] = run_groups(cancelling, sweep.id, CPU, SETTINGS)
    assert result.outcome is Outcome.SUCCEEDED, result
    view = cancelling.get_sweep(sweep.id)
    assert view.status.value == "succeeded"
    assert view.counts == {"succeeded": 2, "pruned": 1, "cancelled": 1}
    members = members_steps(cancelling, sweep.id)
    assert_rungs_apart(members, [RUNG])  # the three at the rung: none within a rounding
    running = {
        m.id: steps[RUNG - 1]["loss"]
        for m, (_, steps) in zip(view.members, members, strict=True)
        if m.status.value != "cancelled"
    }
    assert len(running) == 3
    [pruned] = [m for m in view.members if m.status.value == "pruned"]
    assert pruned.id == max(running, key=running.__getitem__)  # the worst of the three
    reason = cancelling.get_job(pruned.id).stop_reason or ""
    assert reason.startswith(f"pruned at rung {RUNG} (successive halving, eta 2): rank 3 of 3")
    assert [m.steps_done for m in view.members if m.status.value == "succeeded"] == [80, 80]
