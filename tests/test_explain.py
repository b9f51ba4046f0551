"""The tutorial's explain view: each step's computational graph, from autograd, served in the
step records and shown by `gradstream show --explain`."""

import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from api.client import Client
from cli.stack import Stack
from tests.conftest import SEED_EXAMPLE


def _explained(client: Client, spec: dict[str, Any]) -> list[dict[str, Any]]:
    job = client.submit({**spec, "record": {"explain": True}})
    assert client.wait(job["id"])["status"] == "succeeded"
    return list(client.steps(job["id"]))


def test_the_tutorials_worked_example_is_step_0(client: Client) -> None:
    steps = _explained(client, SEED_EXAMPLE)
    y_hat, s, loss = steps[0]["explain"]["nodes"]
    assert (y_hat["value"], s["value"], loss["value"]) == ([1.0], [-1.0], 1.0)  # y_hat, s, Loss
    assert loss["local"] == {"loss/s": [-2.0]}  # dLoss/ds = 2s = -2
    assert s["local"] == {"s/y_hat": [1.0]}  # ds/dy_hat = 1
    assert y_hat["local"] == {"y_hat/w": [[1.0]]}  # dy_hat/dw = x = 1
    assert s["grad"] == y_hat["grad"] == [-2.0] and loss["grad"] == 1.0
    assert steps[0]["explain"]["chain"]["w"] == [-2.0] == steps[0]["grads"]["w"]  # dLoss/dw
    # The rest of the record is what it always is.
    assert {k: v for k, v in steps[0].items() if k != "explain"} == {
        "step": 0,
        "loss": 1.0,
        "grads": {"w": [-2.0]},
        "params": {"w": [1.0]},
    }


def test_each_steps_chain_rule_gives_autograds_gradient(client: Client) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 2))
    spec = {
        "data": {"x": x.tolist(), "y": rng.normal(size=5).tolist()},
        "bias": True,
        "optimizer": {"lr": 0.1},
        "steps": 6,
        "device": "cpu",
    }
    for step in _explained(client, spec):
        graph = step["explain"]
        y_hat, s, loss = graph["nodes"]
        x32 = x.astype(np.float32)
        np.testing.assert_allclose(y_hat["local"]["y_hat/w"], x32, rtol=1e-6)
        assert y_hat["local"]["y_hat/b"] == [1.0] * 5
        np.testing.assert_allclose(loss["local"]["loss/s"], 2 * np.array(s["value"]) / 5, rtol=1e-6)
        np.testing.assert_allclose(graph["chain"]["w"], step["grads"]["w"], rtol=1e-5, atol=1e-7)
        assert graph["chain"]["b"] == pytest.approx(step["grads"]["b"], rel=1e-5, abs=1e-7)
        assert loss["value"] == pytest.approx(step["loss"], rel=1e-6)


def test_explain_is_for_small_full_batch_jobs(client: Client) -> None:
    big = {"data": {"synthetic": {"n": 100, "d": 2}}, "record": {"explain": True}}
    response = client.http.post("/v1/jobs", json=big)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "record"]
    batched = {**SEED_EXAMPLE, "data": {"x": [[1.0], [2.0]], "y": [1.0, 2.0]}, "batch_size": 1}
    response = client.http.post("/v1/jobs", json={**batched, "record": {"explain": True}})
    assert response.status_code == 422 and "full batch" in response.text


def test_gradstream_show_explain_prints_the_graph(client: Client, stack: Stack) -> None:
    job = client.submit({**SEED_EXAMPLE, "record": {"explain": True}})
    client.wait(job["id"])
    env = {**os.environ, "GRADSTREAM_URL": stack.api_url, "GRADSTREAM_API_KEY": stack.api_key}
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "show", job["id"], "--explain"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "y_hat = x @ w" in text and "= [1.0]" in text
    assert "local ds/dy_hat = [1.0]" in text and "local dloss/ds = [-2.0]" in text
    assert "dLoss/dw = [-2.0]" in text
