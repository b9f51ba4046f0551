"""Scrapes of the API's /metrics and of a worker's own, whose figures move when a job runs."""

import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.client import Client
from cli.stack import Stack, free_port, stop_process, wait_until
from tests.conftest import SEED_EXAMPLE
from tests.faults import endless_spec


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


def test_sweeps_by_status_and_member_steps_move_when_a_sweep_runs(
    stack: Stack, client: Client
) -> None:
    def sweeps(scrape: dict[tuple[str, tuple[tuple[str, str], ...]], float], status: str) -> float:
        return scrape[("gradstream_sweeps", (("status", status),))]

    before = _scrape(stack)
    assert {"queued", "running", "succeeded", "failed", "cancelled"} <= {
        dict(labels)["status"] for name, labels in before if name == "gradstream_sweeps"
    }
    # Three members of 10 steps; at the rung of 2 steps the best third goes on: 3 * 2 + 8 = 14
    # member-steps.
    halving = {
        "base": {**SEED_EXAMPLE, "steps": 10},
        "grid": {"optimizer.lr": [0.1, 0.01, 0.2]},
        "early_stop": {"name": "successive_halving", "min_steps": 2, "eta": 3},
    }
    done = client.wait_sweep(client.submit_sweep(halving)["id"], timeout=60)
    assert done["status"] == "succeeded" and done["counts"] == {"pruned": 2, "succeeded": 1}
    endless = {"base": endless_spec(), "grid": {"optimizer.lr": [0.01]}}  # runs until cancelled
    running = client.submit_sweep(endless)
    try:
        wait_until(
            lambda: client.sweep(running["id"])["status"] == "running", 30, "a running sweep"
        )
        middle = _scrape(stack)
    finally:
        client.cancel_sweep(running["id"])
    assert sweeps(middle, "succeeded") == sweeps(before, "succeeded") + 1
    assert sweeps(middle, "running") == sweeps(before, "running") + 1
    assert sweeps(middle, "queued") == sweeps(before, "queued")  # both left queued
    member_steps = ("gradstream_member_steps_total", ())
    assert middle[member_steps] >= before[member_steps] + 14
    assert client.wait_sweep(running["id"], timeout=30)["status"] == "cancelled"
    client.delete_sweep(done["id"])
    after = _scrape(stack)
    assert sweeps(after, "running") == sweeps(before, "running")
    assert sweeps(after, "cancelled") == sweeps(before, "cancelled") + 1
    assert sweeps(after, "succeeded") == sweeps(before, "succeeded")  # deleted: not counted
    # The halving sweep's 14, then what the cancelled one stored, each counted once.
    stored = sum(member["steps_done"] for member in client.sweep(running["id"])["members"])
    assert after[member_steps] == before[member_steps] + 14 + stored


def test_sse_clients_counts_the_streams_open_now(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # An API of its own (same Redis): no stream of another test is counted with ours.
    api = Stack(tmp_path_factory.mktemp("metrics"), tenants=("ivy",))
    api.redis_url = stack.redis_url

    def clients() -> float:
        return _scrape(api)[("gradstream_sse_clients", ())]

    try:
        api.start_api()
        with Client(api.api_url, api.api_key, timeout=10) as ivy:
            job = ivy.submit({**SEED_EXAMPLE, "device": "cuda"})  # no gpu worker: stays queued
            assert clients() == 0
            with ivy.http.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
                assert events.status_code == 200
                wait_until(lambda: clients() == 1, 10, "the open stream counted")
            wait_until(lambda: clients() == 0, 10, "the closed stream no longer counted")
            ivy.cancel(job["id"])
    finally:
        api.stop()


def test_a_worker_serves_its_own_metrics(stack: Stack, client: Client) -> None:
    port = free_port()
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli.main",
            "worker",
            "--device",
            "cuda:0",
            "--metrics-port",
            str(port),
        ],
        env=stack.env(GRADSTREAM_CUDA_FALLBACK_CPU="1"),  # alone on the gpu queue, on the CPU
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        stack.wait_for_workers({"gpu"})
        job = client.submit({**SEED_EXAMPLE, "steps": 40, "device": "cuda"})
        assert client.wait(job["id"])["status"] == "succeeded"
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        # Written by the pool process that ran the job, served by the worker's main process.
        assert samples[("gradstream_worker_steps_total", ())] == 40
        assert samples[("gradstream_worker_flushes_total", ())] >= 1
        assert samples[("gradstream_worker_flush_seconds_count", ())] >= 1
        assert samples[("gradstream_worker_attempts_total", (("outcome", "succeeded"),))] == 1
    finally:
        stop_process(worker)
