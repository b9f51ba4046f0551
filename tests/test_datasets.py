"""Dataset uploads (CSV, .npy, .npz) through the real API, stored once per content hash, and
jobs on them through the real worker, which moves a dataset from Redis once."""

import io
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from api.client import Client
from cli.stack import Stack

RNG = np.random.default_rng(5)
X = RNG.normal(size=(30, 2)).round(3)
Y = (X @ np.array([2.0, -1.0]) + 0.5).round(3)


def _csv(x: np.ndarray = X, y: np.ndarray = Y, header: str = "a,b,y") -> bytes:
    lines = [header] + [f"{r[0]},{r[1]},{t}" for r, t in zip(x, y, strict=True)]
    return ("\n".join(lines) + "\n").encode()


def _upload(client: Client, content: bytes, **params: str) -> httpx.Response:
    return client.http.post("/v1/datasets", content=content, params=params)


def _job(dataset_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "data": {"dataset_id": dataset_id},
        "bias": True,
        "optimizer": {"lr": 0.1},
        "steps": 300,
        "device": "cpu",
        **fields,
    }


def test_csv_upload_round_trip_and_a_job_on_it(client: Client) -> None:
    content = _csv(header="a,b,target")
    response = _upload(client, content, target="target")
    assert response.status_code in (200, 201), response.text
    info = response.json()
    assert (info["samples"], info["features"], info["format"]) == (30, 2, "csv")
    assert info["columns"] == ["a", "b"] and info["target"] == "target"
    assert info["bytes"] == len(content) and len(info["id"]) == 64
    assert client.http.get(f"/v1/datasets/{info['id']}").json() == info
    view = client.wait(client.submit(_job(info["id"]))["id"])
    assert view["status"] == "succeeded", view
    assert view["spec"]["data"]["dataset_id"] == info["id"]
    design = np.hstack([X.astype(np.float32), np.ones((30, 1))]).astype(np.float64)
    solution, *_ = np.linalg.lstsq(design, Y.astype(np.float32).astype(np.float64), rcond=None)
    np.testing.assert_allclose(view["result"]["lstsq_params"]["w"], solution[:2], rtol=1e-9)
    assert view["result"]["r2"] > 0.999


@pytest.mark.parametrize("kind", ["npy", "npz"])
def test_numpy_uploads_round_trip(client: Client, kind: str) -> None:
    buffer = io.BytesIO()
    if kind == "npy":
        np.save(buffer, np.hstack([X, Y[:, None]]))
    else:
        np.savez(buffer, x=X, y=Y)
    info = _upload(client, buffer.getvalue()).json()
    assert (info["samples"], info["features"], info["format"]) == (30, 2, kind)
    assert info["columns"] is None
    view = client.wait(client.submit(_job(info["id"], steps=20))["id"])
    assert view["status"] == "succeeded"
    steps = list(client.steps(view["id"]))
    # Step 0 at w = 0, b = 0: the loss is mean(y^2) over the float32 data.
    assert steps[0]["loss"] == pytest.approx(float(np.mean(Y.astype(np.float32) ** 2)), rel=1e-6)


@pytest.mark.parametrize(
    ("content", "params", "message"),
    [
        (b"a,b,y\n1,2,3\n4,5\n", {}, "row 3 has 2 cells; the header has 3"),
        (b"a,b,y\n1,2,3\n4,x,6\n", {}, "row 3, column 'b': 'x' is not a number"),
        (b"a,b,y\n1,2,3\n", {"target": "price"}, "no target column 'price'"),
        (b"a,b,y\n1,nan,3\n", {}, "is not finite"),
        (b"", {}, "the CSV is empty"),
        (b"\x93NUMPY garbage", {}, "not a readable .npy"),
        (b"\xff\xfe\x00binary", {}, "not CSV text"),
    ],
)
def test_malformed_uploads_are_422_saying_why(
    client: Client, content: bytes, params: dict[str, str], message: str
) -> None:
    response = _upload(client, content, **params)
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"][0]["msg"]


def test_the_same_file_is_stored_once_and_stays_its_tenants(
    client: Client, stack: Stack, redis_client: "redis.Redis"
) -> None:
    content = _csv(y=Y + 1)
    first = _upload(client, content)
    again = _upload(client, content)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json() == again.json()
    dataset_id = first.json()["id"]
    assert redis_client.keys(f"gs:dataset:{dataset_id}*") == [f"gs:dataset:{dataset_id}".encode()]
    with Client(stack.api_url, stack.keys["bob"]) as bob:
        # Not bob's until he uploads it himself: a 404, and a job on it a 422.
        assert bob.http.get(f"/v1/datasets/{dataset_id}").status_code == 404
        refused = bob.http.post("/v1/jobs", json=_job(dataset_id))
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["loc"] == ["body", "data", "dataset_id"]
        theirs = _upload(bob, content)
        assert theirs.status_code == 201 and theirs.json()["id"] == dataset_id
        assert theirs.json()["created_at"] == first.json()["created_at"]  # not written again
    mismatch = client.http.post("/v1/jobs", json=_job(dataset_id, init={"w": [1.0]}))
    assert mismatch.status_code == 422 and mismatch.json()["detail"][0]["loc"] == ["body", "init"]


def test_a_sweep_on_one_dataset_moves_it_once_per_worker(client: Client) -> None:
    info = _upload(client, _csv(y=Y * 3)).json()
    assert info["loads"] == 0
    jobs = [
        client.submit(_job(info["id"], steps=50, optimizer={"lr": lr}))
        for lr in (0.01, 0.03, 0.1, 0.3)
    ]
    for job in jobs:
        assert client.wait(job["id"])["status"] == "succeeded"
    # The session has one CPU worker with one pool process: one load from Redis.
    assert client.http.get(f"/v1/datasets/{info['id']}").json()["loads"] == 1


def test_a_compressed_npz_that_would_explode_is_refused_before_it_is_read(client: Client) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros((2_000_000, 100)), y=np.zeros(2_000_000))
    assert len(buffer.getvalue()) < 3_000_000  # 1.6 GB of float64 once read
    response = _upload(client, buffer.getvalue())
    assert response.status_code == 422 and "max_elements" in response.json()["detail"][0]["msg"]


def test_the_same_csv_with_another_target_is_another_dataset(client: Client) -> None:
    content = _csv(header="a,b,y")
    by_y = _upload(client, content).json()
    by_b = _upload(client, content, target="b").json()
    assert by_y["id"] != by_b["id"]
    assert (by_y["target"], by_y["columns"]) == ("y", ["a", "b"])
    assert (by_b["target"], by_b["columns"]) == ("b", ["a", "y"])
