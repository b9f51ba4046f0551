"""The whole path: HTTP submit -> Celery prefork worker -> Redis -> SSE and JSON reads."""

from itertools import pairwise

import numpy as np
import pytest

from api.client import Client
from tests.conftest import SEED_EXAMPLE
from tests.faults import endless_spec

SEED_STEP_0 = {"step": 0, "loss": 1.0, "grads": {"w": [-2.0]}, "params": {"w": [1.0]}}


def test_seed_example_step_0_arrives_exactly_over_sse(client: Client) -> None:
    job = client.submit(SEED_EXAMPLE)
    assert job["status"] == "queued"
    events = list(client.stream(job["id"]))
    steps = [e.data for e in events if e.event == "step"]
    assert steps[0] == SEED_STEP_0
    assert [s["step"] for s in steps] == list(range(10))
    losses = [s["loss"] for s in steps]
    assert all(later < earlier for earlier, later in pairwise(losses))
    done = events[-1]
    assert done.event == "done"
    assert done.data["status"] == "succeeded"
    assert done.data["steps_done"] == 10
    assert done.data["worker"].startswith("cpu-")
    # The result is the parameters after the last update and the last step's loss.
    last = steps[-1]
    w_after = np.float32(last["params"]["w"][0]) - np.float32(0.1) * np.float32(
        last["grads"]["w"][0]
    )
    result = done.data["result"]
    assert result["params"] == {"w": [float(w_after)]} and result["loss"] == last["loss"]
    assert result["stopped"] == done.data["stop_reason"] == "ran all 10 steps"
    # On all the data (one sample): the loss at the final w, R² undefined (y has no variance),
    # and the least-squares solution w = 2 with loss 0.
    assert result["full_loss"] == pytest.approx((2.0 - w_after) ** 2, rel=1e-6)
    assert result["r2"] is None
    assert result["lstsq_params"] == {"w": [2.0]} and result["lstsq_loss"] == 0.0


def test_submit_answers_201_with_location(client: Client) -> None:
    response = client.http.post("/v1/jobs", json=SEED_EXAMPLE)
    assert response.status_code == 201
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["spec"]["device"] == "cpu" and job["device"] == "cpu"
    assert job["created_at"].endswith("Z") and len(job["created_at"]) == len(
        "2026-01-01T00:00:00.000000Z"
    )
    assert client.wait(job["id"], timeout=30)["status"] == "succeeded"


def _oracle_gradients(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, b: float
) -> tuple[np.ndarray, float]:
    """Closed form of d/dw, d/db of mean((x w + b - y)^2): 2/N X^T r and 2/N sum(r)."""
    r = x @ w + b - y
    return 2 / len(y) * x.T @ r, 2 / len(y) * r.sum()


def test_gradients_match_closed_form_oracle_with_bias(client: Client) -> None:
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(32, 3)), rng.normal(size=32)
    spec = {
        "data": {"x": x.tolist(), "y": y.tolist()},
        "bias": True,
        "init": {"w": [0.5, -0.25, 1.0], "b": 0.3},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "steps": 50,
        "device": "cpu",
    }
    job = client.submit(spec)
    assert client.wait(job["id"], timeout=30)["status"] == "succeeded"
    steps = list(client.steps(job["id"]))
    assert len(steps) == 50
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    for record in steps:
        w = np.array(record["params"]["w"], dtype=np.float64)
        gw, gb = _oracle_gradients(
            x32.astype(np.float64), y32.astype(np.float64), w, record["params"]["b"]
        )
        # Training runs in float32; the oracle in float64: agreement to float32 precision.
        np.testing.assert_allclose(record["grads"]["w"], gw, rtol=1e-5, atol=1e-6)
        assert record["grads"]["b"] == pytest.approx(gb, rel=1e-5, abs=1e-6)


def test_long_run_converges_to_least_squares(client: Client) -> None:
    spec = {
        "data": {"synthetic": {"n": 200, "d": 4, "noise": 0.1, "seed": 3}},
        "bias": True,
        "optimizer": {"name": "sgd", "lr": 0.1},
        "steps": 2000,
        "device": "cpu",
    }
    job = client.submit(spec)
    view = client.wait(job["id"], timeout=60)
    assert view["status"] == "succeeded"
    steps = list(client.steps(job["id"]))
    assert [s["step"] for s in steps] == list(range(2000))
    # The same data, regenerated here from the seed, solved in closed form.
    from services.schemas import JobSpec
    from services.training import build_dataset

    x, y = build_dataset(JobSpec.model_validate(spec))
    design = np.hstack([x.numpy().astype(np.float64), np.ones((len(y), 1))])
    solution, *_ = np.linalg.lstsq(design, y.numpy().astype(np.float64), rcond=None)
    learned = np.array([*view["result"]["params"]["w"], view["result"]["params"]["b"]])
    # Stated tolerance: every parameter within 1e-4 of the least-squares solution.
    np.testing.assert_allclose(learned, solution, atol=1e-4)


def test_nan_loss_ends_diverged_with_finite_steps_kept(client: Client) -> None:
    spec = {
        "data": {"x": [[10.0], [20.0]], "y": [1.0, 2.0]},
        "optimizer": {"name": "sgd", "lr": 10.0},
        "steps": 500,
        "device": "cpu",
    }
    job = client.submit(spec)
    view = client.wait(job["id"], timeout=30)
    assert view["status"] == "diverged"
    steps = list(client.steps(job["id"]))
    last = steps[-1]
    assert view["steps_done"] == len(steps) < 500
    assert f"step {last['step']}" in view["error"]
    assert last["loss"] is None or last["grads"]["w"][0] is None
    for record in steps[:-1]:
        assert record["loss"] is not None and record["grads"]["w"][0] is not None
    assert view["result"] is None


def test_cancel_running_job_stops_at_a_step_boundary(client: Client) -> None:
    job = client.submit(endless_spec())  # running until cancelled, however fast the machine
    for event in client.stream(job["id"]):
        if event.event == "step":
            break
    response = client.http.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] in ("cancelling", "cancelled")
    view = client.wait(job["id"], timeout=10)
    assert view["status"] == "cancelled"
    steps = list(client.steps(job["id"]))
    assert [s["step"] for s in steps] == list(range(view["steps_done"]))
    assert client.http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
