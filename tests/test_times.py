"""Every time the API answers with, in a body or an SSE event, is in one format: ISO 8601 UTC
with microseconds and `Z` (2026-11-27T10:00:00.000000Z), never `+00:00` or epoch seconds."""

import re
from typing import Any

from api.client import Client
from tests.conftest import SEED_EXAMPLE

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def _times(value: Any, path: str = "") -> dict[str, Any]:
    """Every field named `*_at` in a JSON value, by its path."""
    found = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if key.endswith("_at") and item is not None:
                found[f"{path}{key}"] = item
            found.update(_times(item, f"{path}{key}."))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found.update(_times(item, f"{path[:-1]}[{i}]."))
    return found


def test_every_time_in_answers_and_events_is_iso_8601_utc(client: Client) -> None:
    job = client.wait(client.submit(SEED_EXAMPLE)["id"], timeout=30)
    events = [event.data for event in client.stream(job["id"])]
    token = client.http.post(f"/v1/jobs/{job['id']}/stream-token").json()
    dataset = client.upload_dataset(b"a,y\n1,2\n3,4\n")
    answers = {
        "job": job,
        "jobs": client.jobs(),
        "events": events,
        "workers": client.workers(),
        "stream token": token,
        "dataset": client.http.get(f"/v1/datasets/{dataset['id']}").json(),
    }
    times = _times(answers)
    # Each kind of time is there: the job's three, the done event's, a heartbeat, and so on.
    for path in ("job.created_at", "job.started_at", "job.finished_at", "stream token.expires_at"):
        assert path in times, sorted(times)
    assert any(p.startswith("events[") for p in times) and "workers[0].heartbeat_at" in times
    assert "dataset.created_at" in times
    wrong = {path: value for path, value in times.items() if not ISO_UTC.fullmatch(str(value))}
    assert wrong == {}
