"""A sweep member's result is the result of its JobSpec run alone as a job (DESIGN §9, "a
member is a job"): the same keys, and numbers computed alike. Groups and jobs run in this
process, as a worker's pool child runs them."""

from typing import Any

import numpy as np
import pytest
import torch

from services.config import Settings
from services.runner import run_job
from services.store import Store
from services.training import build_dataset, split_holdout
from tests.attempts import run_groups, store_sweep

CPU = torch.device("cpu")
EAGER = Settings(compile_steps=False)
# Two members with a bias and a holdout (so results carry val_loss and metrics.val), still
# short of the optimum after 60 steps (a gap to the least-squares solution to report).
SWEEP: dict[str, Any] = {
    "base": {
        "data": {"synthetic": {"n": 300, "d": 4, "noise": 0.2, "seed": 11}},
        "bias": True,
        "eval": {"holdout": 0.25, "seed": 2},
        "optimizer": {"name": "sgd"},
        "steps": 60,
        "device": "cpu",
    },
    "grid": {"optimizer.lr": [0.01, 0.03]},
}


def _flat(values: dict[str, Any]) -> list[float]:
    return [*values["w"], values["b"]]


def test_a_members_result_is_its_jobs_result(store: Store) -> None:
    sweep = store_sweep(store, SWEEP)
    [group] = run_groups(store, sweep.id, CPU, EAGER)
    assert group.stepper == "eager"
    members = [store.get_job(member.id) for member in store.get_sweep(sweep.id).members]

    # The oracle: the training rows in float64 (the holdout's split), and numpy's solution.
    spec = members[0].spec
    assert spec.eval is not None and spec.eval.holdout is not None
    x32, y32, _, _ = split_holdout(*build_dataset(spec), spec.eval.holdout, spec.eval.seed)
    x = np.hstack([x32.double().numpy(), np.ones((len(y32), 1))])
    y = y32.double().numpy()
    solution = np.linalg.lstsq(x, y, rcond=None)[0]
    lstsq_loss = float(np.mean((x @ solution - y) ** 2))

    for member in members:
        assert member.result is not None
        job_id, _ = store.create_job(member.spec, "cpu", "test-nobody", "test")
        run_job(store, job_id, "test-worker", CPU, EAGER)
        job_result = store.get_job(job_id).result
        assert job_result is not None
        # The fields each result holds (those stored), not the model's defaults.
        mine = member.result.model_dump(exclude_unset=True)
        job = job_result.model_dump(exclude_unset=True)
        assert sorted(mine) == sorted(job)
        assert mine["stepper"] == job["stepper"] == "eager"

        # Computed identically from the data: the least-squares solution and its loss.
        for result in (mine, job):
            np.testing.assert_allclose(_flat(result["lstsq_params"]), solution, rtol=1e-9)
            assert result["lstsq_loss"] == pytest.approx(lstsq_loss, rel=1e-9)
        # Computed identically from each one's final parameters (float64, all training rows).
        for result in (mine, job):
            full_loss = float(np.mean((x @ np.array(_flat(result["params"])) - y) ** 2))
            assert result["full_loss"] == pytest.approx(full_loss, rel=1e-9)
            assert result["r2"] == pytest.approx(1 - full_loss / float(np.var(y)), rel=1e-9)
            assert result["lstsq_gap"] == pytest.approx(full_loss - lstsq_loss, rel=1e-9)
        # Member and job train by different (batched, single) steps: equal to float32 rounding.
        assert mine["full_loss"] > 1.05 * mine["lstsq_loss"]  # still a gap to report
        for key in ("full_loss", "r2", "lstsq_gap", "val_loss", "loss"):
            assert mine[key] == pytest.approx(job[key], rel=1e-5), key
        np.testing.assert_allclose(_flat(mine["params"]), _flat(job["params"]), rtol=1e-5)
        for side in ("train", "val"):
            for name, value in job["metrics"][side].items():
                assert mine["metrics"][side][name] == pytest.approx(value, rel=1e-5), name
