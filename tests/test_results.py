"""Results through the real stack: fit quality against numpy's least squares, predict, and the
stop rules with the reason the JobView gives."""

from typing import Any

import numpy as np
import pytest

from api.client import Client
from cli.stack import Stack
from tests.conftest import SEED_EXAMPLE
from tests.faults import endless_spec

RNG = np.random.default_rng(11)
X = RNG.normal(size=(200, 3))
W_TRUE, B_TRUE = np.array([1.5, -2.0, 0.5]), 0.3
Y = X @ W_TRUE + B_TRUE + 0.01 * RNG.normal(size=200)


def _known_weights_job(**fields: Any) -> dict[str, Any]:
    return {
        "data": {"x": X.tolist(), "y": Y.tolist()},
        "bias": True,
        "optimizer": {"name": "sgd", "lr": 0.1},
        "steps": 400,
        "device": "cpu",
        **fields,
    }


def test_result_reports_fit_quality_and_the_least_squares_gap(client: Client) -> None:
    view = client.wait(client.submit(_known_weights_job())["id"])
    assert view["status"] == "succeeded", view
    result = view["result"]
    design = np.hstack([X.astype(np.float32).astype(np.float64), np.ones((200, 1))])
    target = Y.astype(np.float32).astype(np.float64)
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)
    np.testing.assert_allclose(result["lstsq_params"]["w"], solution[:3], rtol=1e-9)
    assert result["lstsq_params"]["b"] == pytest.approx(solution[3], rel=1e-9)
    np.testing.assert_allclose(solution[:3], W_TRUE, atol=0.01)  # the known weights
    final = np.array([*result["params"]["w"], result["params"]["b"]])
    mse = float(np.mean((design @ final - target) ** 2))
    assert result["full_loss"] == pytest.approx(mse, rel=1e-9)
    assert result["lstsq_loss"] == pytest.approx(np.mean((design @ solution - target) ** 2))
    assert 0 <= result["lstsq_gap"] < 1e-6
    assert (
        result["r2"] == pytest.approx(1 - mse / np.var(target), rel=1e-9) and result["r2"] > 0.999
    )


def test_predict_uses_the_final_parameters(client: Client, stack: Stack) -> None:
    view = client.wait(client.submit(_known_weights_job(steps=50))["id"])
    w, b = np.array(view["result"]["params"]["w"]), view["result"]["params"]["b"]
    rows = [[1.0, 2.0, 3.0], [-1.0, 0.0, 0.5]]
    response = client.http.post(f"/v1/jobs/{view['id']}/predict", json={"x": rows})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["y_hat"], np.array(rows) @ w + b, rtol=1e-12)
    huge = client.http.post(f"/v1/jobs/{view['id']}/predict", json={"x": [[1e308, 1e308, 0.0]]})
    assert huge.status_code == 200 and huge.json()["y_hat"] == [None]  # overflow: null, not 500
    wrong = client.http.post(f"/v1/jobs/{view['id']}/predict", json={"x": [[1.0, 2.0]]})
    assert wrong.status_code == 422 and wrong.json()["detail"][0]["loc"] == ["body", "x"]
    queued = client.submit({**SEED_EXAMPLE, "device": "cuda"})  # no gpu worker: no result
    early = client.http.post(f"/v1/jobs/{queued['id']}/predict", json={"x": [[1.0]]})
    assert early.status_code == 409 and early.json()["status"] == "queued"
    client.cancel(queued["id"])
    with Client(stack.api_url, stack.keys["bob"]) as bob:
        theirs = bob.http.post(f"/v1/jobs/{view['id']}/predict", json={"x": rows})
        assert theirs.status_code == 404


@pytest.mark.parametrize(
    ("stop", "reason"),
    [
        ({"tol_loss": 1e-7}, "tol_loss: the loss changed by"),
        ({"tol_grad": 1e-3}, "tol_grad: the gradient norm was"),
        ({"max_seconds": 0.5}, "max_seconds: 0.5 s had passed"),
    ],
)
def test_stop_rules_end_the_job_early_and_say_why(
    client: Client, stop: dict[str, float], reason: str
) -> None:
    # A tolerance stops the job at a step its numbers fix; the clock stops it only if it
    # cannot run all its steps first, however fast the machine: an endless job.
    if "max_seconds" in stop:
        spec = {**endless_spec(), "stop": stop}
    else:
        spec = _known_weights_job(steps=200_000, stop=stop)
    view = client.wait(client.submit(spec)["id"])
    assert view["status"] == "succeeded", view
    assert (
        view["stop_reason"].startswith(reason) and view["result"]["stopped"] == view["stop_reason"]
    )
    assert 0 < view["steps_done"] < spec["steps"]
    stored = list(client.steps(view["id"]))
    assert [s["step"] for s in stored] == list(range(view["steps_done"]))
    assert f"at step {view['steps_done'] - 1}" in view["stop_reason"]
