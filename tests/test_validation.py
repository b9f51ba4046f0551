"""Bad input: a 422 that names the field, and nothing stored or queued. Unknown ids: 404."""

from typing import Any

import pytest
import redis
from jsonschema import Draft202012Validator

from api.client import Client
from tests.conftest import SEED_EXAMPLE


def _with(**changes: Any) -> dict[str, Any]:
    return {**SEED_EXAMPLE, **changes}


BAD_SPECS = {
    "mismatched lengths": (_with(data={"x": [[1.0], [2.0]], "y": [1.0]}), ["data", "y"]),
    "ragged rows": (
        _with(data={"x": [[1.0, 2.0], [3.0]], "y": [1.0, 2.0]}, init=None),
        ["data", "x"],
    ),
    "empty data": (_with(data={"x": [], "y": []}), ["data", "x"]),
    "no data": (_with(data={}), ["data"]),
    "steps zero": (_with(steps=0), ["steps"]),
    "steps negative": (_with(steps=-3), ["steps"]),
    "lr zero": (_with(optimizer={"name": "sgd", "lr": 0}), ["optimizer", "lr"]),
    "lr negative": (_with(optimizer={"name": "sgd", "lr": -0.1}), ["optimizer", "lr"]),
    "unknown field": (_with(epochs=3), ["epochs"]),
    "unknown nested field": (
        _with(optimizer={"name": "sgd", "lr": 0.1, "beta": 1}),
        ["optimizer", "beta"],
    ),
    "unknown device": (_with(device="tpu"), ["device"]),
    "unknown optimizer": (_with(optimizer={"name": "rmsprop", "lr": 0.1}), ["optimizer", "name"]),
    "init w of wrong length": (_with(init={"w": [1.0, 2.0]}), ["init"]),
    "bias init without bias": (_with(init={"w": [1.0], "b": 1.0}), ["init"]),
    "steps over the limit": (_with(steps=10**9), ["steps"]),
    "synthetic too large": (
        _with(data={"synthetic": {"n": 10**6, "d": 1000}}, init=None),
        ["data"],
    ),
}


@pytest.mark.parametrize("name", list(BAD_SPECS))
def test_bad_spec_is_a_422_naming_the_field_and_never_queued(
    name: str, client: Client, redis_client: "redis.Redis"
) -> None:
    spec, field = BAD_SPECS[name]
    jobs_before = redis_client.zcard("gs:jobs")
    response = client.http.post("/v1/jobs", json=spec)
    assert response.status_code == 422, response.text
    locations = [error["loc"] for error in response.json()["detail"]]
    assert ["body", *field] in [loc[: len(field) + 1] for loc in locations], locations
    assert redis_client.zcard("gs:jobs") == jobs_before


NON_FINITE_BODIES = {
    "NaN in x": ('{"data": {"x": [[NaN]], "y": [2.0]}, "steps": 1}', ["data", "x", 0, 0]),
    "Infinity in y": ('{"data": {"x": [[1.0]], "y": [Infinity]}, "steps": 1}', ["data", "y", 0]),
    "-Infinity in lr": (
        '{"data": {"x": [1.0], "y": [2.0]}, "optimizer": {"lr": -Infinity}}',
        ["optimizer", "lr"],
    ),
    "NaN in init": ('{"data": {"x": [1.0], "y": [2.0]}, "init": {"w": [NaN]}}', ["init", "w", 0]),
    "NaN in noise": (
        '{"data": {"synthetic": {"n": 2, "d": 1, "noise": NaN}}}',
        ["data", "synthetic", "noise"],
    ),
}


@pytest.mark.parametrize("name", list(NON_FINITE_BODIES))
def test_nan_and_infinity_are_refused_with_a_renderable_422(
    name: str, client: Client, redis_client: "redis.Redis"
) -> None:
    body, loc = NON_FINITE_BODIES[name]
    jobs_before = redis_client.zcard("gs:jobs")
    response = client.http.post(
        "/v1/jobs", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert ["body", *loc] in [error["loc"] for error in response.json()["detail"]]
    assert "NaN" not in response.text.replace('"NaN"', "").replace("'NaN'", "")
    assert redis_client.zcard("gs:jobs") == jobs_before


def test_flat_x_is_one_feature(client: Client) -> None:
    job = client.submit(_with(data={"x": [1.0, 2.0], "y": [2.0, 4.0]}))
    assert job["spec"]["data"]["x"] == [[1.0], [2.0]]
    client.wait(job["id"], timeout=30)


def test_defaults_fill_init_and_device(client: Client) -> None:
    job = client.submit({"data": {"x": [[1.0, 2.0]], "y": [1.0]}, "bias": True})
    assert job["spec"]["device"] == "auto" and job["device"] == "cpu"
    assert job["route_reason"].startswith("auto")
    view = client.wait(job["id"], timeout=30)
    first = next(iter(client.steps(view["id"])))
    assert first["params"] == {"w": [0.0, 0.0], "b": 0.0}


UNKNOWN = "0" * 32


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/jobs/{id}"),
        ("GET", "/v1/jobs/{id}/steps"),
        ("GET", "/v1/jobs/{id}/events"),
        ("POST", "/v1/jobs/{id}/cancel"),
    ],
)
@pytest.mark.parametrize("job_id", [UNKNOWN, "not-a-job-id", "{x}"])
def test_unknown_job_is_404_on_every_route(
    client: Client, method: str, path: str, job_id: str
) -> None:
    response = client.http.request(method, path.format(id=job_id))
    assert response.status_code == 404
    assert "not found" in response.json()["detail"]


def test_bad_query_parameters_are_422(client: Client) -> None:
    job = client.submit(SEED_EXAMPLE)
    assert client.http.get(f"/v1/jobs/{job['id']}/steps", params={"limit": 0}).status_code == 422
    assert client.http.get(f"/v1/jobs/{job['id']}/steps", params={"limit": 5001}).status_code == 422
    assert client.http.get(f"/v1/jobs/{job['id']}/steps", params={"after": -2}).status_code == 422
    assert client.http.get("/v1/jobs", params={"status": "sleeping"}).status_code == 422
    bad_cursor = client.http.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "abc"})
    assert bad_cursor.status_code == 422
    client.wait(job["id"], timeout=30)


@pytest.mark.parametrize("cursor", [2**63, 10**30])
def test_step_cursors_past_64_bits_are_a_422_naming_them(client: Client, cursor: int) -> None:
    # They were a 500: Redis refuses such a stream id.
    job = client.submit(SEED_EXAMPLE)
    client.wait(job["id"], timeout=30)
    steps, events = f"/v1/jobs/{job['id']}/steps", f"/v1/jobs/{job['id']}/events"
    responses = {
        ("steps", "query", "after"): client.http.get(steps, params={"after": cursor}),
        ("events", "query", "after"): client.http.get(events, params={"after": cursor}),
        ("events", "header", "last-event-id"): client.http.get(
            events, headers={"Last-Event-ID": str(cursor)}
        ),
    }
    for (route, *loc), response in responses.items():
        assert response.status_code == 422, (route, loc, response.text)
        assert [error["loc"] for error in response.json()["detail"]] == [loc]
    # The largest 64-bit step is a cursor past every step.
    assert client.http.get(steps, params={"after": 2**63 - 1}).json()["steps"] == []
    last = client.http.get(events, headers={"Last-Event-ID": str(2**63 - 1)})
    assert "event: step" not in last.text and "event: done" in last.text


MAX_BODY_BYTES = 8 * 1024 * 1024  # the default max_body_bytes, which the test API keeps


def _filled(prefix: str, item: str, suffix: str) -> bytes:
    """prefix + as many comma-separated `item`s as fit in MAX_BODY_BYTES + suffix."""
    count = (MAX_BODY_BYTES - len(prefix) - len(suffix)) // (len(item) + 1)
    return (prefix + ",".join([item] * count) + suffix).encode()


def _unknown_fields(size: int) -> str:
    """`"kk": 0, "k1": 0, "k2": 0, …}` of about `size` characters."""
    fields, length = ['"kk": 0'], 8
    while length < size:
        fields.append(f'"k{len(fields)}": 0')
        length += len(fields[-1]) + 2
    return ", ".join(fields) + "}"


HUGE_BAD_BODIES = {
    "y of 2M strings after three numbers": (
        _filled('{"data": {"x": [[1.0]], "y": [1, 2, 3, ', '"a"', "]}}"),
        ["data", "y", 3],
    ),
    "x of 1.4M bad rows after two good ones": (
        _filled('{"data": {"x": [[1], [2], ', '["a"]', '], "y": [1.0]}}'),
        ["data", "x", 2, 0],
    ),
    "x of one row of 2M strings": (
        _filled('{"data": {"x": [[1, ', '"a"', ']], "y": [1.0]}}'),
        ["data", "x", 0, 1],
    ),
    "init.w of 4M values": (
        _filled('{"data": {"x": [[1.0]], "y": [2.0]}, "init": {"w": [', "1", "]}}"),
        ["init"],
    ),
    "an unknown field of 4M values": (
        _filled('{"data": {"x": [[1.0]], "y": [2.0]}, "extra": [', "1", "]}"),
        ["extra"],
    ),
    "600k unknown fields": (
        ('{"data": {"x": [[1.0]], "y": [2.0]}, ' + _unknown_fields(MAX_BODY_BYTES - 50)).encode(),
        [],
    ),
}


@pytest.mark.parametrize("name", list(HUGE_BAD_BODIES))
def test_a_422_for_8_mib_of_bad_items_is_small_and_names_the_first(
    name: str, client: Client
) -> None:
    # Before: millions of errors or the whole input echoed, a 422 of 8 to 300 MB built in the
    # API's event loop (bench/validation_stall.py measures the stall).
    body, loc = HUGE_BAD_BODIES[name]
    assert len(body) > MAX_BODY_BYTES - 16
    response = client.http.post(
        "/v1/jobs", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == 422, response.text[:2000]
    assert len(response.content) < 1000, response.text[:2000]
    first = response.json()["detail"][0]
    assert first["loc"] == ["body", *loc], first
    if not loc:  # the unknown fields are counted, and the first one named
        assert "'kk'" in first["msg"] and first["type"] == "extra_forbidden"


def test_past_twenty_errors_a_422_counts_the_rest(client: Client) -> None:
    unknown = {f"top{i}": 0 for i in range(20)}
    optimizer = {"lr": 0.1, **{f"opt{i}": 0 for i in range(20)}}
    response = client.http.post("/v1/jobs", json=_with(optimizer=optimizer, **unknown))
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert len(detail) == 21
    shown = [error["loc"] for error in detail[:20]]
    assert shown == [["body", "optimizer", f"opt{i}"] for i in range(20)]
    assert detail[20] == {
        "type": "too_many_errors",
        "loc": ["body"],
        "msg": "20 more errors not shown",
    }


def _refused_by_schema(openapi: dict[str, Any], schema: dict[str, Any], value: Any) -> bool:
    """Whether `value` fails `schema`, a part of the published OpenAPI document."""
    validator = Draft202012Validator({**openapi, **schema})
    return not validator.is_valid(value)


def test_what_the_schema_allows_the_api_accepts_for_the_requests_fuzzing_found(
    client: Client,
) -> None:
    # Requests the schema allowed and the API refused (schemathesis's positive-data check):
    # each is now refused by the schema too, and what stays allowed is accepted.
    openapi = client.http.get("/openapi.json").json()
    spec = {"$ref": "#/components/schemas/JobSpec"}
    mixed = {"data": {"dataset_id": "0" * 64, "x": [], "y": []}}
    assert _refused_by_schema(openapi, spec, mixed)
    assert client.http.post("/v1/jobs", json=mixed).status_code == 422
    assert not _refused_by_schema(openapi, spec, {"data": {"x": [1.0, 2.0], "y": [1.0, 2.0]}})

    job = client.wait(client.submit(SEED_EXAMPLE)["id"], timeout=30)
    predict = {"$ref": "#/components/schemas/PredictRequest"}
    assert _refused_by_schema(openapi, predict, {"x": [[]]})
    assert client.http.post(f"/v1/jobs/{job['id']}/predict", json={"x": [[]]}).status_code == 422
    flat = {"x": [1.0, 2.0]}  # a flat x is one feature, in the schema as in the API
    assert not _refused_by_schema(openapi, predict, flat)
    assert client.http.post(f"/v1/jobs/{job['id']}/predict", json=flat).status_code == 200

    events = openapi["paths"]["/v1/jobs/{job_id}/events"]["get"]["parameters"]
    cursor = next(p for p in events if p["name"] == "last-event-id")["schema"]
    assert _refused_by_schema(openapi, cursor, None)
    upload = openapi["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]["text/csv"]
    assert _refused_by_schema(openapi, upload["schema"], "")


def test_a_405_allows_every_method_of_the_path(client: Client) -> None:
    answer = client.http.request("OPTIONS", "/v1/jobs/0123456789abcdef0123456789abcdef")
    assert answer.status_code == 405 and answer.headers["allow"] == "DELETE, GET"
