"""A scrape of /metrics whose figures move when a job runs."""

import httpx
from prometheus_client.parser import text_string_to_metric_families

from api.client import Client
from cli.stack import Stack
from tests.conftest import SEED_EXAMPLE


def _scrape(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{stack.api_url}/metrics", timeout=10)  # open, like /healthz
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_move_when_a_job_runs(stack: Stack, client: Client) -> None:
    before = _scrape(stack)
    job = client.submit({**SEED_EXAMPLE, "steps": 25})
    assert client.wait(job["id"])["status"] == "succeeded"
    after = _scrape(stack)
    assert after[("gradstream_steps_total", ())] >= before[("gradstream_steps_total", ())] + 25
    assert after[("gradstream_flushes_total", ())] > before[("gradstream_flushes_total", ())]
    succeeded = ("gradstream_jobs", (("status", "succeeded"),))
    assert after[succeeded] >= before[succeeded] + 1
    assert after[("gradstream_workers", (("device", "cpu"),))] >= 1
    assert ("gradstream_queue_depth", (("queue", "gpu"),)) in after
    assert after[("gradstream_sse_clients", ())] >= 0
