"""Routing with two real workers, one per queue: a job lands only on a worker of its queue.

This machine has no GPU, so the gpu-queue worker computes on the CPU
(GRADSTREAM_CUDA_FALLBACK_CPU=1); what is asserted is which worker took each job.
"""

from pathlib import Path

from api.client import Client
from cli.stack import Stack, stop_process, wait_until
from tests.faults import endless_spec


def _spec(device: str) -> dict[str, object]:
    return {
        "data": {"x": [[1.0], [2.0]], "y": [2.0, 4.0]},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "steps": 20,
        "device": device,
    }


def _live_queues(client: Client) -> set[str]:
    return {q for w in client.workers() for q in w["queues"]}


def _depths(client: Client) -> dict[str, int]:
    return {q["name"]: q["depth"] for q in client.http.get("/v1/workers").json()["queues"]}


def test_jobs_run_only_on_workers_of_their_queue(stack: Stack, client: Client) -> None:
    assert "gpu" not in _live_queues(client)
    # The stack is shared: earlier tests may have left cuda jobs waiting in 'gpu'.
    gpu_before = _depths(client).get("gpu", 0)
    waiting = client.submit(_spec("cuda"))
    assert waiting["device"] == "cuda"
    view = client.get(waiting["id"])
    assert view["status"] == "queued"
    assert view["route_reason"] == "asked for cuda; waiting: no live worker for queue 'gpu'"
    assert client.submit(_spec("auto"))["route_reason"] == "auto: cpu (no gpu worker live)"
    # GET /v1/workers reports each queue's waiting jobs: the cuda job sits in 'gpu'.
    depths = _depths(client)
    assert depths["gpu"] == gpu_before + 1 and set(depths) == {"cpu", "gpu"}

    gpu = stack.start_worker("cuda:0", GRADSTREAM_CUDA_FALLBACK_CPU="1")
    try:
        stack.wait_for_workers({"gpu"})
        # The job that waited is not lost: the gpu worker takes it once it is live.
        assert client.wait(waiting["id"], timeout=30)["worker"].startswith("cuda0-")

        jobs = [client.submit(_spec(device)) for device in ["cpu", "cuda"] * 4]
        for job in jobs:
            view = client.wait(job["id"], timeout=30)
            assert view["status"] == "succeeded"
            expected = "cpu-" if job["spec"]["device"] == "cpu" else "cuda0-"
            assert view["worker"].startswith(expected), (job["spec"]["device"], view["worker"])

        small_auto = client.submit(_spec("auto"))
        assert small_auto["device"] == "cpu"
        assert small_auto["route_reason"].startswith("auto: cpu (estimated ")

        registered = {w["device"]: w for w in client.workers()}
        assert registered["cuda:0"]["queues"] == ["gpu"]
        assert registered["cpu"]["queues"] == ["cpu"]
        assert registered["cpu"]["memory_bytes"] > 0
        assert registered["cpu"]["name"].startswith("cpu-")

        # Pinned before the pool forks: the gpu worker sees only GPU 0 and runs one job at a time.
        environ = Path(f"/proc/{gpu.pid}/environ").read_bytes().split(b"\0")
        assert b"CUDA_VISIBLE_DEVICES=0" in environ
        assert b"GRADSTREAM_DEVICE=cuda:0" in environ
        cmdline = Path(f"/proc/{gpu.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[cmdline.index(b"-Q") + 1] == b"gpu"
        assert cmdline[cmdline.index(b"-c") + 1] == b"1"
    finally:
        stop_process(gpu)
    # A warm shutdown removes the registry entry at once (a killed worker's lapses by TTL).
    wait_until(lambda: "gpu" not in _live_queues(client), 10, "gpu worker unregistered")


def test_current_job_is_shown_while_a_job_runs(client: Client) -> None:
    job = client.submit(endless_spec())  # running until cancelled, however fast the machine
    wait_until(
        lambda: any(w["current_job"] == job["id"] for w in client.workers()), 20, "current_job"
    )
    client.cancel(job["id"])
    assert client.wait(job["id"], timeout=10)["status"] == "cancelled"
    wait_until(lambda: all(w["current_job"] is None for w in client.workers()), 10, "idle worker")
