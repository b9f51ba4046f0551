"""The CUDA path, on a real GPU: not part of `make test` (no GPU there); bench/gpu_check.sh runs
these on a GPU machine. Real redis-server, real worker processes, as in the rest of the suite.
"""

import warnings
from typing import Any

import numpy as np
import pytest
import torch

from api.client import Client
from cli.main import SEED_EXAMPLE
from cli.stack import Stack, stop_process
from services.attempts import Outcome
from services.config import Settings
from services.runner import StepRecorder
from services.schemas import JobSpec
from services.store import Store
from services.training import Trainer, compute_device
from tests.attempts import run_once, run_with_hand_back

if not torch.cuda.is_available():  # collected only by an explicit `pytest tests/gpu`
    raise RuntimeError("tests/gpu need a CUDA device; run them with bench/gpu_check.sh")

CUDA = torch.device("cuda", 0)
SEED_STEP_0 = {"step": 0, "loss": 1.0, "grads": {"w": [-2.0]}, "params": {"w": [1.0]}}

CASES = {
    "seed 1x1": {
        "data": {"x": [[1.0]], "y": [2.0]},
        "init": {"w": [1.0]},
        "optimizer": {"lr": 0.1},
    },
    "1000x10 bias": {
        "data": {"synthetic": {"n": 1000, "d": 10, "noise": 0.1}},
        "bias": True,
        "optimizer": {"lr": 0.05},
    },
    "4096x33 bias": {
        "data": {"synthetic": {"n": 4096, "d": 33, "seed": 7}},
        "bias": True,
        "optimizer": {"lr": 0.02},
    },
}


def _spec(fields: dict[str, Any], steps: int) -> JobSpec:
    return JobSpec.model_validate({**fields, "steps": steps, "device": "cuda"})


def _values(steps: list[dict[str, Any]]) -> np.ndarray:
    """loss, grads and params of every step as one float64 array (steps x values)."""

    def flat(named: dict[str, Any]) -> list[float]:
        return [float(v) for value in named.values() for v in np.ravel(value)]

    rows = [[s["loss"], *flat(s["grads"]), *flat(s["params"])] for s in steps]
    return np.array(rows, dtype=np.float64)


@pytest.mark.parametrize("case", list(CASES))
def test_graph_steps_match_eager_steps_step_for_step(store: Store, case: str) -> None:
    spec = _spec(CASES[case], 300)
    # Small chunks: many hand-overs, so the graph's device-side cursor crosses both halves.
    settings = Settings(flush_max_steps=64)
    eager, eager_steps = run_once(
        store, spec, CUDA, settings.model_copy(update={"cuda_graphs": False})
    )
    graph, graph_steps = run_once(store, spec, CUDA, settings)
    assert (eager.stepper, graph.stepper) == ("eager", "cuda-graph")
    assert eager.outcome is graph.outcome is Outcome.SUCCEEDED
    assert [s["step"] for s in graph_steps] == list(range(300))
    ours, reference = _values(graph_steps), _values(eager_steps)
    exact = int((ours == reference).all(axis=1).sum())
    print(
        f"{case}: {exact}/300 steps bit-identical, max |diff| {np.abs(ours - reference).max():.3g}"
    )
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)


def test_seed_example_is_exact_through_the_graph(store: Store) -> None:
    result, steps = run_once(store, _spec(CASES["seed 1x1"], 200), CUDA, Settings())
    assert result.stepper == "cuda-graph" and result.steps == 200
    assert steps[0] == SEED_STEP_0


def test_short_jobs_run_eager_steps(store: Store) -> None:
    result, steps = run_once(store, _spec(CASES["seed 1x1"], 10), CUDA, Settings())
    assert result.stepper == "eager" and steps[0] == SEED_STEP_0


def test_chunks_come_back_through_pinned_memory(store: Store) -> None:
    trainer = Trainer(_spec(CASES["1000x10 bias"], 10), CUDA)
    recorder = StepRecorder(trainer.layout, 8, CUDA, first=0)
    for _ in range(5):
        trainer.step(recorder.next_row())
    recorded = recorder.swap(trainer.theta, None)
    assert recorded is not None and recorded.ready is not None
    assert recorded.rows.is_pinned() and recorded.theta.is_pinned()
    recorded.wait()
    assert torch.equal(recorded.rows, recorder.storage[:5].cpu())
    assert torch.equal(recorded.theta, trainer.params().cpu())


def test_a_flush_of_a_stateful_optimizer_never_syncs_the_device(store: Store) -> None:
    # Adam's buffers come back like the parameters: copies into pinned memory queued behind
    # the steps. With sync debug mode "error", any synchronising call in the hand-over raises.
    spec = _spec({**CASES["1000x10 bias"], "optimizer": {"name": "adam", "lr": 0.01}}, 10)
    trainer = Trainer(spec, CUDA)
    recorder = StepRecorder(trainer.layout, 8, CUDA, first=0)
    for _ in range(5):
        trainer.step(recorder.next_row())
    try:
        with warnings.catch_warnings():  # "a prototype feature": said once, not an error here
            warnings.simplefilter("ignore")
            torch.cuda.set_sync_debug_mode("error")
        recorded = recorder.swap(trainer.theta, trainer.optimizer_snapshot())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert recorded is not None and recorded.optimizer is not None
    buffers = recorded.optimizer["optimizer"]["state"][0]
    assert buffers["exp_avg"].is_pinned() and buffers["exp_avg_sq"].is_pinned()
    trainer.step(recorder.next_row())  # changes the live buffers in place, after the copies
    recorded.wait()
    resumed = Trainer(spec, CUDA)
    checkpoint = recorded.checkpoint
    resumed.load_state(checkpoint.theta, checkpoint.optimizer, checkpoint.step)
    live = Trainer(spec, CUDA)
    for _ in range(5):
        live.step(torch.empty(live.layout.width, device=CUDA))
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(
            resumed.optimizer.state[resumed.theta][name], live.optimizer.state[live.theta][name]
        )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_job_handed_back_resumes_bit_for_bit_on_the_gpu(store: Store, optimizer: str) -> None:
    fields = {**CASES["1000x10 bias"], "optimizer": {"name": optimizer, "lr": 0.01}}
    spec = _spec(fields, 400)
    settings = Settings(flush_max_steps=64)
    whole_result, whole = run_once(store, spec, CUDA, settings)
    attempts, resumed = run_with_hand_back(store, spec, CUDA, settings)
    stepper = "cuda-graph" if optimizer == "sgd" else "eager"
    assert [a.stepper for a in (whole_result, *attempts)] == [stepper] * 3
    assert 0 < attempts[0].steps < 400
    assert resumed == whole


def test_a_gpu_worker_runs_cuda_and_auto_jobs_end_to_end(stack: Stack) -> None:
    assert compute_device("cuda:0") == CUDA
    worker = stack.start_worker("cuda:0")  # no CPU fallback: it must find the GPU
    try:
        stack.wait_for_workers({"cpu", "gpu"})
        with Client(stack.api_url, stack.api_key, timeout=30) as api:
            gpu = [w for w in api.workers() if "gpu" in w["queues"]]
            assert gpu and gpu[0]["device"] == "cuda:0"
            assert gpu[0]["device_name"] == torch.cuda.get_device_name(0)
            assert gpu[0]["memory_bytes"] > 0
            job = api.submit({**SEED_EXAMPLE, "steps": 200, "device": "cuda"})
            events = [e for e in api.stream(job["id"]) if e.event == "step"]
            view = api.wait(job["id"])
            assert view["status"] == "succeeded" and view["device"] == "cuda"
            stored = list(api.steps(job["id"]))
            assert len(events) == len(stored) == 200 and stored[0] == SEED_STEP_0
            # A big problem with both workers live: the cost model picks the GPU.
            big = api.submit(
                {"data": {"synthetic": {"n": 200_000, "d": 100}}, "steps": 100, "device": "auto"}
            )
            assert big["device"] == "cuda", big["route_reason"]
            assert api.wait(big["id"])["status"] == "succeeded"
    finally:
        stop_process(worker)


def test_stateful_optimizers_and_mini_batches_run_eager_on_the_gpu(store: Store) -> None:
    fields = {
        **CASES["1000x10 bias"],
        "optimizer": {"name": "adam", "lr": 0.01, "schedule": {"name": "cosine"}},
        "batch_size": 128,
    }
    gpu, gpu_steps = run_once(store, _spec(fields, 100), CUDA, Settings())
    cpu, cpu_steps = run_once(store, _spec(fields, 100), torch.device("cpu"), Settings())
    assert gpu.stepper == "eager" and gpu.outcome is cpu.outcome is Outcome.SUCCEEDED
    assert [(s["epoch"], s["batch"]) for s in gpu_steps] == [
        (s["epoch"], s["batch"]) for s in cpu_steps
    ]
    np.testing.assert_allclose(_values(gpu_steps), _values(cpu_steps), rtol=1e-4, atol=1e-5)


def test_the_explain_view_on_the_gpu(store: Store) -> None:
    fields = {**CASES["seed 1x1"], "record": {"explain": True}}
    result, steps = run_once(store, _spec(fields, 100), CUDA, Settings())
    assert result.stepper == "eager"
    y_hat, s, loss = steps[0]["explain"]["nodes"]
    assert (y_hat["value"], s["value"], loss["value"]) == ([1.0], [-1.0], 1.0)
    assert loss["local"] == {"loss/s": [-2.0]} and s["local"] == {"s/y_hat": [1.0]}
    assert y_hat["local"] == {"y_hat/w": [[1.0]]} and steps[0]["explain"]["chain"]["w"] == [-2.0]


def test_graph_evaluates_the_steps_eager_steps_evaluate(store: Store) -> None:
    # The graph computes the validation loss every step; the records keep the evaluated ones.
    fields = {**CASES["1000x10 bias"], "eval": {"holdout": 0.2, "seed": 1, "every": 10}}
    spec = _spec(fields, 300)
    settings = Settings(flush_max_steps=64)
    eager, eager_steps = run_once(
        store, spec, CUDA, settings.model_copy(update={"cuda_graphs": False})
    )
    graph, graph_steps = run_once(store, spec, CUDA, settings)
    assert (eager.stepper, graph.stepper) == ("eager", "cuda-graph")
    evaluated = [s["step"] for s in graph_steps if "val_loss" in s]
    assert evaluated == [s["step"] for s in eager_steps if "val_loss" in s]
    assert evaluated == [*range(0, 300, 10), 299]
    np.testing.assert_allclose(
        [s["val_loss"] for s in graph_steps if "val_loss" in s],
        [s["val_loss"] for s in eager_steps if "val_loss" in s],
        rtol=1e-5,
    )
    np.testing.assert_allclose(_values(graph_steps), _values(eager_steps), rtol=1e-6, atol=1e-6)
