"""Held-out evaluation (DESIGN §11) through the real stack: every evaluated record's val_loss is
the validation MSE at that record's parameters, a holdout is the seed's randperm, sweeps rank by
the metric the user names, and bad eval specs are 422s naming the field with nothing stored.

The numbers are checked against an independent oracle: float64 numpy on the same rows."""

import json
import math
from typing import Any

import numpy as np
import pytest
import redis
import torch

from api.client import Client
from services.config import Settings
from services.store import Store
from services.sweeps_math import halving_rungs, rank_by_loss
from tests.attempts import assert_rungs_apart, members_steps, run_groups, store_sweep

RNG = np.random.default_rng(20)
X = RNG.standard_normal((24, 3)).round(3)
Y = (X @ np.array([0.5, -1.0, 2.0]) + 0.1 * RNG.standard_normal(24)).round(3)
X_VAL = RNG.standard_normal((15, 3)).round(3)
Y_VAL = (X_VAL @ np.array([0.5, -1.0, 2.0]) + 0.1 * RNG.standard_normal(15)).round(3)


def _mse(x: np.ndarray, y: np.ndarray, w: list[float]) -> float:
    """The oracle: mean squared error in float64 of the float32 data the worker trains on."""
    x32, y32 = x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)
    return float(np.mean((x32 @ np.array(w, dtype=np.float64) - y32) ** 2))


def _job(**changes: Any) -> dict[str, Any]:
    spec = {
        "data": {"x": X.tolist(), "y": Y.tolist()},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "steps": 20,
        "device": "cpu",
    }
    return {**spec, **changes}


def test_explicit_validation_set_val_loss_is_the_mse_at_each_records_params(
    client: Client,
) -> None:
    spec = _job(eval={"data": {"x": X_VAL.tolist(), "y": Y_VAL.tolist()}, "every": 3})
    view = client.wait(client.submit(spec)["id"], timeout=60)
    assert view["status"] == "succeeded"
    steps = list(client.steps(view["id"]))
    # Every third step and the last one are evaluated; no other record has the field.
    assert [s["step"] for s in steps if "val_loss" in s] == [0, 3, 6, 9, 12, 15, 18, 19]
    for record in steps:
        if "val_loss" in record:
            want = _mse(X_VAL, Y_VAL, record["params"]["w"])
            assert math.isclose(record["val_loss"], want, rel_tol=1e-5), record
        assert math.isclose(record["loss"], _mse(X, Y, record["params"]["w"]), rel_tol=1e-5)
    result = view["result"]
    final = result["params"]["w"]
    assert math.isclose(result["val_loss"], _mse(X_VAL, Y_VAL, final), rel_tol=1e-9)
    metrics = result["metrics"]
    assert set(metrics) == {"train", "val"}
    assert set(metrics["val"]) == {"mse", "rmse", "mae", "r2"}
    assert metrics["val"]["mse"] == result["val_loss"]
    assert math.isclose(metrics["val"]["rmse"], math.sqrt(result["val_loss"]), rel_tol=1e-12)
    assert math.isclose(metrics["train"]["mse"], _mse(X, Y, final), rel_tol=1e-9)
    residual = X_VAL.astype(np.float32) @ np.array(final, dtype=np.float64) - Y_VAL.astype(
        np.float32
    )
    assert math.isclose(metrics["val"]["mae"], float(np.abs(residual).mean()), rel_tol=1e-9)


def test_holdout_rows_are_the_seeds_randperm(client: Client) -> None:
    spec = _job(eval={"holdout": 0.25, "seed": 7, "every": 5})
    view = client.wait(client.submit(spec)["id"], timeout=60)
    assert view["status"] == "succeeded"
    # DESIGN §11: positions 0 .. round(f n) - 1 of randperm(n, seed) validate.
    order = torch.randperm(24, generator=torch.Generator().manual_seed(7)).numpy()
    held, train = order[:6], np.setdiff1d(np.arange(24), order[:6])
    steps = list(client.steps(view["id"]))
    assert [s["step"] for s in steps if "val_loss" in s] == [0, 5, 10, 15, 19]
    for record in steps:
        w = record["params"]["w"]
        assert math.isclose(record["loss"], _mse(X[train], Y[train], w), rel_tol=1e-5)
        if "val_loss" in record:
            assert math.isclose(record["val_loss"], _mse(X[held], Y[held], w), rel_tol=1e-5)
    # Any other split gives other numbers: the first val_loss pins the rows down.
    other = torch.randperm(24, generator=torch.Generator().manual_seed(8)).numpy()[:6]
    assert not math.isclose(steps[0]["val_loss"], _mse(X[other], Y[other], [0.0] * 3), rel_tol=1e-3)


def test_validation_set_from_an_uploaded_dataset(client: Client) -> None:
    header = "a,b,c,y\n"
    rows = "".join(f"{a},{b},{c},{y}\n" for (a, b, c), y in zip(X_VAL, Y_VAL, strict=True))
    dataset = client.upload_dataset((header + rows).encode())
    spec = _job(eval={"data": {"dataset_id": dataset["id"]}, "every": 10})
    view = client.wait(client.submit(spec)["id"], timeout=60)
    assert view["status"] == "succeeded", view
    steps = list(client.steps(view["id"]))
    assert [s["step"] for s in steps if "val_loss" in s] == [0, 10, 19]
    for record in steps:
        if "val_loss" in record:
            want = _mse(X_VAL, Y_VAL, record["params"]["w"])
            assert math.isclose(record["val_loss"], want, rel_tol=1e-5)
    # Listings show an inline validation set's shape, not its numbers (DESIGN §10).
    inline = client.submit(_job(eval={"data": {"x": X_VAL.tolist(), "y": Y_VAL.tolist()}}))
    listed = next(job for job in client.jobs(limit=50) if job["id"] == inline["id"])
    assert listed["spec"]["eval"]["data"] == {"inline": {"samples": 15, "features": 3}}
    client.wait(inline["id"], timeout=60)


BAD_EVAL = {
    "holdout zero": ({"holdout": 0}, ["eval", "holdout"]),
    "holdout one": ({"holdout": 1}, ["eval", "holdout"]),
    "holdout above one": ({"holdout": 1.5}, ["eval", "holdout"]),
    "holdout leaves no validation row": ({"holdout": 0.01}, ["eval"]),
    "holdout leaves no training row": ({"holdout": 0.99}, ["eval"]),
    "every zero": ({"holdout": 0.2, "every": 0}, ["eval", "every"]),
    "holdout and data": (
        {"holdout": 0.2, "data": {"x": [[1.0, 2.0, 3.0]], "y": [1.0]}},
        ["eval"],
    ),
    "neither holdout nor data": ({"every": 2}, ["eval"]),
    "validation set of another width": ({"data": {"x": [[1.0, 2.0]], "y": [1.0]}}, ["eval"]),
    "synthetic validation set": ({"data": {"synthetic": {"n": 5, "d": 3}}}, ["eval"]),
    "unknown dataset": ({"data": {"dataset_id": "0" * 64}}, ["eval", "data", "dataset_id"]),
}


@pytest.mark.parametrize("name", list(BAD_EVAL))
def test_bad_eval_is_a_422_naming_the_field_and_nothing_is_stored(
    name: str, client: Client, redis_client: "redis.Redis"
) -> None:
    evaluation, field = BAD_EVAL[name]
    jobs_before = redis_client.zcard("gs:jobs")
    response = client.http.post("/v1/jobs", json=_job(eval=evaluation))
    assert response.status_code == 422, response.text
    locations = [error["loc"] for error in response.json()["detail"]]
    assert ["body", *field] in [loc[: len(field) + 1] for loc in locations], locations
    assert redis_client.zcard("gs:jobs") == jobs_before


def test_nan_in_eval_is_a_renderable_422(client: Client, redis_client: "redis.Redis") -> None:
    body = json.dumps(_job()).removesuffix("}") + ', "eval": {"holdout": NaN}}'
    jobs_before = redis_client.zcard("gs:jobs")
    response = client.http.post(
        "/v1/jobs", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert ["body", "eval", "holdout"] in [error["loc"] for error in response.json()["detail"]]
    assert redis_client.zcard("gs:jobs") == jobs_before


def test_metric_val_loss_needs_eval(client: Client, redis_client: "redis.Redis") -> None:
    sweeps_before = redis_client.zcard("gs:jobs")
    sweep = {"base": _job(), "grid": {"optimizer.lr": [0.1, 0.2]}, "metric": "val_loss"}
    response = client.http.post("/v1/sweeps", json=sweep)
    assert response.status_code == 422, response.text
    assert ["body", "metric"] in [error["loc"][:2] for error in response.json()["detail"]]
    assert redis_client.zcard("gs:jobs") == sweeps_before
    assert client.http.post("/v1/sweeps", json={**sweep, "metric": "mae"}).status_code == 422


# Noisy data, 10 training rows of 8 features and 40 held out: weight decay 0 fits the noise
# (the lowest training loss, the highest validation loss), 0.3 generalises best. The values
# at the rungs are far apart by construction (checked below), so no rounding can flip them.
WEIGHT_DECAY_SWEEP = {
    "base": {
        "data": {"synthetic": {"n": 50, "d": 8, "noise": 2.0, "seed": 1}},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "eval": {"holdout": 0.8, "seed": 0, "every": 50},
        "steps": 900,
        "device": "cpu",
    },
    "grid": {"optimizer.weight_decay": [0.0, 0.1, 0.3, 1.0]},
    "early_stop": {"name": "successive_halving", "min_steps": 300, "eta": 2},
}
WEIGHT_DECAY_RUNGS = halving_rungs(300, 2, 900)


@pytest.mark.parametrize(
    ("metric", "survivor"), [("val_loss", 0.3), ("loss", 0.0)], ids=["val_loss", "loss"]
)
def test_weight_decay_sweep_ranked_by_the_metric_the_user_names(
    client: Client, metric: str, survivor: float
) -> None:
    view = client.wait_sweep(client.submit_sweep({**WEIGHT_DECAY_SWEEP, "metric": metric})["id"])
    assert view["status"] == "succeeded" and view["spec"]["metric"] == metric
    members = {m["values"]["optimizer.weight_decay"]: m for m in view["members"]}
    steps = {m["id"]: list(client.steps(m["id"])) for m in view["members"]}
    members_at = [(m["status"], steps[m["id"]]) for m in view["members"]]
    assert_rungs_apart(members_at, WEIGHT_DECAY_RUNGS, metric)
    # Rung 300 keeps the best 2 of 4 by the metric at step 299, rung 600 the best of those 2.
    assert members[survivor]["status"] == "succeeded"
    assert view["counts"] == {"pruned": 3, "succeeded": 1}
    assert view["best"]["values"] == {"optimizer.weight_decay": survivor}
    if metric == "val_loss":
        assert members[0.0]["status"] == "pruned" and members[0.0]["steps_done"] == 300
        reason = client.get(members[0.0]["id"])["stop_reason"]
        assert "by the val_loss of step 299" in reason
        best = members[survivor]
        assert view["best"]["final_val_loss"] == best["final_val_loss"] is not None
        assert best["val_loss"] == steps[best["id"]][-1]["val_loss"]
        # The sweep's progress events carry each member's last evaluated val_loss.
        progress = [e.data for e in client.sweep_events(view["id"]) if e.event == "progress"]
        at_rung = [p["members"][best["id"]] for p in progress if best["id"] in p["members"]]
        rung = next(update for update in at_rung if update["step"] == 299)
        assert math.isclose(rung["val_loss"], steps[best["id"]][299]["val_loss"], rel_tol=1e-9)
    else:
        # Ranked by the training loss, weight decay 0 "wins": it fits the noise best.
        assert members[0.0]["steps_done"] == 900


def test_compiled_and_eager_group_steps_keep_the_same_members(store: Store) -> None:
    cpu = torch.device("cpu")
    outcomes = []
    for settings in (
        Settings(compile_steps=False),
        Settings(compile_steps=True, cpu_compile_s=0.0, compile_block_steps=16),
    ):
        sweep = store_sweep(store, WEIGHT_DECAY_SWEEP)
        results = run_groups(store, sweep.id, cpu, settings)
        outcomes.append(([result.stepper for result in results], members_steps(store, sweep.id)))
    (eager, eager_steps), (compiled, compiled_steps) = outcomes
    assert eager == ["eager"] and compiled == ["compiled"]
    assert_rungs_apart(eager_steps, WEIGHT_DECAY_RUNGS, "val_loss")
    assert_rungs_apart(compiled_steps, WEIGHT_DECAY_RUNGS, "val_loss")
    assert [status for status, _ in eager_steps] == ["pruned", "pruned", "succeeded", "pruned"]
    assert [status for status, _ in compiled_steps] == [status for status, _ in eager_steps]
    for (_, mine), (_, reference) in zip(compiled_steps, eager_steps, strict=True):
        assert [s["step"] for s in mine] == [s["step"] for s in reference]
        assert [s["step"] for s in mine if "val_loss" in s] == [
            s["step"] for s in reference if "val_loss" in s
        ]
        for got, want in zip(mine, reference, strict=True):
            for key in ("loss", "val_loss"):
                if key in want:
                    assert math.isclose(got[key], want[key], rel_tol=1e-5), (key, got, want)


def test_values_within_the_rank_tolerance_are_ranked_by_member_order() -> None:
    # 1.0 and 1.000001 are equal within 1e-5: member order decides, whichever is lower.
    assert rank_by_loss([1.000001, 1.0, 2.0], rtol=1e-5) == [0, 1, 2]
    assert rank_by_loss([1.0, 1.000001, 2.0], rtol=1e-5) == [0, 1, 2]
    # Without a tolerance the lower value goes first.
    assert rank_by_loss([1.000001, 1.0, 2.0]) == [1, 0, 2]
    # Far apart: the values decide; missing values rank last.
    assert rank_by_loss([None, 3.0, 1.0, math.nan], rtol=1e-5) == [2, 1, 0, 3]
    # A run of ties is measured from its lowest value, so the order does not depend on where
    # the list starts: 1.0, 1.000009 tie; 1.000018 is past 1.0's tolerance.
    assert rank_by_loss([1.000018, 1.000009, 1.0], rtol=1e-5) == [1, 2, 0]
