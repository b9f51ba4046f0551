"""A fuzz run of the OpenAPI spec with schemathesis, bounded in examples and time, with all its
checks: no 5xx, every response matches the schema the API publishes, what the schema allows
is accepted and what it refuses is refused; then again with an invalid key, which
every route behind a key answers with a 401 (unless FastAPI refuses the request before it
looks at the key: a method the route lacks, a body that is not JSON).

Its own Redis, API and CPU worker, with small limits so that fuzzed jobs end within a few
steps. Most generated job and dataset ids are those of real ones made first (a finished job,
one with a bias, a diverged one, an uploaded dataset), so that steps, events, predict and
results are fuzzed against real data."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

from api.client import Client
from cli.stack import Stack
from tests.conftest import SEED_EXAMPLE

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
ENV = {
    "GRADSTREAM_MAX_STEPS": "20",
    "GRADSTREAM_MAX_ELEMENTS": "10000",
    "GRADSTREAM_MAX_ACTIVE_JOBS_PER_TENANT": "100000",
    "GRADSTREAM_SUBMITS_PER_MINUTE": "100000",
}
REAL_JOBS = [
    SEED_EXAMPLE,
    {"data": {"x": [[1.0, 2.0], [3.0, 4.0]], "y": [1.0, 0.0]}, "bias": True, "steps": 20},
    # Overflows float32 at step 0: its step, result and events hold nulls.
    {"data": {"x": [[1e30]], "y": [1.0]}, "init": {"w": [1.0]}, "steps": 5},
]
# Routes that need no key.
OPEN_PATHS = {"/healthz", "/readyz", "/metrics"}


def _config(path: Path, job_ids: list[str], dataset_ids: list[str]) -> Path:
    """schemathesis.toml: every check; real ids for most generated ids (the others are 404s);
    event streams read for 3 s at most (a job queued behind the fuzzed ones streams for longer).

    Positive-data acceptance (a request the schema allows must not be a 4xx but 401, 403, 404,
    409, 429) is off for three bodies whose rules JSON Schema cannot state, as each depends on
    another value: a job's spec (x's rows all one width, a y per row, init.w a value per
    feature, an uploaded dataset that exists, and the server's limits: max_steps,
    max_elements), an uploaded dataset (the CSV must have the column the `target` parameter
    names, and its rows numbers), and predict's rows (as wide as that job's features)."""
    path.write_text(
        f"""
[checks]
enabled = true

[dictionaries.jobs]
values = {json.dumps(job_ids)}

[dictionaries.datasets]
values = {json.dumps(dataset_ids)}

[parameters]
"path.job_id" = {{ dictionary = "jobs", probability = 0.8 }}
"path.dataset_id" = {{ dictionary = "datasets", probability = 0.8 }}

[[operations]]
include-path-regex = "/events$"
request-timeout = 3

[[operations]]
include-method = "POST"
include-path = ["/v1/jobs", "/v1/datasets", "/v1/jobs/{{job_id}}/predict"]
checks.positive_data_acceptance.enabled = false
"""
    )
    return path


class Answer(NamedTuple):
    method: str
    path: str
    status: int
    body: str


def _schemathesis(
    stack: Stack, config: Path, key: str, run_dir: Path, *options: str
) -> tuple[subprocess.CompletedProcess[str], list[Answer]]:
    """A schemathesis run with `key`, and every answer it got (from its HAR report)."""
    run_dir.mkdir()
    har = run_dir / "answers.har"
    result = subprocess.run(
        [
            str(SCHEMATHESIS),
            "--config-file",
            str(config),
            "run",
            f"{stack.api_url}/openapi.json",
            "--seed",
            "1",
            "--request-timeout",
            "10",
            "-H",
            f"Authorization: Bearer {key}",
            "--report",
            "har",
            "--report-har-path",
            str(har),
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=run_dir,  # its example database and reports stay out of the checkout
    )
    entries: list[dict[str, Any]] = (
        json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    )
    answers = [
        Answer(
            entry["request"]["method"],
            httpx.URL(entry["request"]["url"]).path,
            entry["response"]["status"],
            entry["response"]["content"].get("text", ""),
        )
        for entry in entries
    ]
    return result, answers


def _real_data(stack: Stack) -> tuple[list[str], list[str]]:
    with Client(stack.api_url, stack.api_key, timeout=10) as client:
        jobs = [client.submit(spec)["id"] for spec in REAL_JOBS]
        for job_id in jobs:
            client.wait(job_id, timeout=60)
        upload = client.http.post(
            "/v1/datasets",
            content=b"a,b,y\n1,2,3\n4,5,6\n7,8,9\n",
            headers={"content-type": "text/csv"},
        )
        assert upload.status_code == 201, upload.text
    return jobs, [upload.json()["id"]]


def _answered_before_the_key(answer: Answer) -> bool:
    """What FastAPI answers before a route's dependencies (the key among them) run: a method
    the route lacks, a body that is not JSON."""
    return (
        answer.status == 405
        or (answer.status == 400 and "error parsing the body" in answer.body)
        or (answer.status == 422 and '"type":"json_invalid"' in answer.body)
    )


def test_fuzzing_the_openapi_spec_finds_no_server_error(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "stack", env=ENV, tenants=("fuzz",))
    try:
        stack.start_redis()
        stack.start_api()
        stack.start_worker("cpu")
        stack.wait_for_workers({"cpu"})
        job_ids, dataset_ids = _real_data(stack)
        config = _config(tmp_path / "schemathesis.toml", job_ids, dataset_ids)
        valid, answers = _schemathesis(
            stack, config, stack.api_key, tmp_path / "valid", "--max-examples", "50"
        )
        # Coverage and fuzzing only: a stateful run would find no links to follow.
        invalid, refusals = _schemathesis(
            stack,
            config,
            "not-a-key-of-anyone",
            tmp_path / "invalid",
            *("--phases", "coverage,fuzzing", "--max-examples", "10"),
        )
    finally:
        stack.stop()
    for name, result in [("a valid key", valid), ("an invalid key", invalid)]:
        print(f"--- {name}\n{result.stdout[-3000:]}")
        if result.returncode != 0:
            pytest.fail(
                f"schemathesis with {name} found problems:\n"
                f"{result.stdout[-8000:]}\n{result.stderr[-2000:]}"
            )

    def read(path_end: str, content: str) -> bool:
        return any(
            a.status == 200 and a.path.endswith(path_end) and content in a.body for a in answers
        )

    # The real jobs and dataset were read: an event stream to its end, steps, predictions.
    assert read("/events", "event: done") and read("/steps", '"step":0')
    assert read("/predict", '"y_hat"') and read(dataset_ids[0], '"samples"')
    not_refused = [
        (a.method, a.path, a.status)
        for a in refusals
        if a.path not in OPEN_PATHS and a.status != 401 and not _answered_before_the_key(a)
    ]
    assert refusals and not_refused == []
