"""The async client against the real stack (the sync one is used by every other test)."""

import asyncio
import subprocess
import sys

from api.client import AsyncClient, Client, GradstreamError
from cli.stack import Stack
from tests.conftest import SEED_EXAMPLE


def test_async_client_submits_streams_resumes_and_reads_back(stack: Stack) -> None:
    async def scenario() -> None:
        async with AsyncClient(stack.api_url, stack.api_key) as client:
            job = await client.submit({**SEED_EXAMPLE, "steps": 50})
            events = [e async for e in client.stream(job["id"])]
            steps = [e.data for e in events if e.event == "step"]
            assert [s["step"] for s in steps] == list(range(50))
            assert events[-1].event == "done" and events[-1].data["status"] == "succeeded"
            assert steps[0] == {
                "step": 0,
                "loss": 1.0,
                "grads": {"w": [-2.0]},
                "params": {"w": [1.0]},
            }
            # Resuming after step 29 gives steps 30 .. 49, then done.
            resumed = [
                e.data["step"] async for e in client.stream(job["id"], 29) if e.event == "step"
            ]
            assert resumed == list(range(30, 50))
            assert [s async for s in client.steps(job["id"], page=7)] == steps
            assert (await client.wait(job["id"]))["status"] == "succeeded"
            assert job["id"] in [j["id"] for j in await client.jobs()]
            try:
                await client.cancel(job["id"])
            except GradstreamError as exc:
                assert exc.status_code == 409
            else:
                raise AssertionError("cancelling a finished job must be a 409")

    asyncio.run(scenario())


def test_async_client_uploads_predicts_lists_workers_and_deletes(stack: Stack) -> None:
    async def scenario() -> None:
        async with AsyncClient(stack.api_url, stack.api_key) as client:
            dataset = await client.upload_dataset(b"a,y\n1,2\n2,4\n3,6\n")
            assert dataset["samples"] == 3 and dataset["features"] == 1
            spec = {"data": {"dataset_id": dataset["id"]}, "optimizer": {"lr": 0.1}, "steps": 200}
            job = await client.wait((await client.submit({**spec, "device": "cpu"}))["id"], 60)
            assert job["status"] == "succeeded"
            (y_hat,) = await client.predict(job["id"], [[4.0]])
            assert abs(y_hat - 8.0) < 1e-3
            assert any(w["device"] == "cpu" for w in await client.workers())
            await client.delete(job["id"])
            await client.delete_dataset(dataset["id"])
            try:
                await client.get(job["id"])
            except GradstreamError as exc:
                assert exc.status_code == 404
            else:
                raise AssertionError("a deleted job must be a 404")

    asyncio.run(scenario())


def test_async_client_submits_follows_lists_and_deletes_a_sweep(stack: Stack) -> None:
    spec = {"base": SEED_EXAMPLE, "grid": {"optimizer.lr": [0.1, 0.2]}}

    async def scenario() -> None:
        async with AsyncClient(stack.api_url, stack.api_key) as client:
            sweep = await client.submit_sweep(spec)
            events = [e async for e in client.sweep_events(sweep["id"])]
            assert events[0].event == "status" and events[-1].event == "done"
            assert events[-1].data["status"] == "succeeded"
            first = next(int(e.id) for e in events if e.event == "progress" and e.id)
            resumed = [e async for e in client.sweep_events(sweep["id"], first)]
            ids = [int(e.id) for e in events if e.id]
            assert [int(e.id) for e in resumed if e.id] == [i for i in ids if i > first]
            view = await client.wait_sweep(sweep["id"], 30)
            assert view["best"]["values"] == {"optimizer.lr": 0.2}
            assert (await client.sweep(sweep["id"]))["counts"] == {"succeeded": 2}
            assert sweep["id"] in [s["id"] for s in await client.sweeps(100)]
            try:
                await client.cancel_sweep(sweep["id"])
            except GradstreamError as exc:
                assert exc.status_code == 409  # it has ended
            else:
                raise AssertionError("cancelling an ended sweep must be a 409")
            await client.delete_sweep(sweep["id"])
            try:
                await client.sweep(sweep["id"])
            except GradstreamError as exc:
                assert exc.status_code == 404
            else:
                raise AssertionError("a deleted sweep must be a 404")

    asyncio.run(scenario())


def test_the_client_module_needs_neither_torch_nor_the_server() -> None:
    code = (
        "import sys, api.client; "
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('torch', 'services', 'fastapi')]; "
        "assert not loaded, loaded"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_both_clients_carry_val_loss_and_the_metrics_of_a_job_with_eval(stack: Stack) -> None:
    spec = {
        "data": {"synthetic": {"n": 50, "d": 2, "seed": 4}},
        "steps": 7,
        "eval": {"holdout": 0.2, "every": 3},
        "device": "cpu",
    }

    async def scenario() -> None:
        async with AsyncClient(stack.api_url, stack.api_key) as client:
            job = await client.wait((await client.submit(spec))["id"], 60)
            streamed = [e.data async for e in client.stream(job["id"]) if e.event == "step"]
            stored = [s async for s in client.steps(job["id"])]
        with Client(stack.api_url, stack.api_key) as sync:
            assert list(sync.steps(job["id"])) == stored == streamed
            assert sync.get(job["id"])["result"] == job["result"]
        # val_loss at the evaluated steps (every 3rd and the last), absent from the others.
        assert [s["step"] for s in stored if "val_loss" in s] == [0, 3, 6]
        assert all(isinstance(s["val_loss"], float) for s in stored if "val_loss" in s)
        result = job["result"]
        assert set(result["metrics"]) == {"train", "val"}
        assert set(result["metrics"]["val"]) == {"mse", "rmse", "mae", "r2"}
        assert result["val_loss"] == result["metrics"]["val"]["mse"]

    asyncio.run(scenario())
