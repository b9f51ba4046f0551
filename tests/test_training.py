"""The training core against independent oracles: the tutorial's numbers and closed forms."""

from itertools import pairwise

import numpy as np
import pytest
import torch

from services.config import Settings
from services.queue import CPU_QUEUE, GPU_QUEUE, Device, estimated_seconds, route_job
from services.records import Chunk, expand_chunk
from services.runner import StepRecorder, pack
from services.schemas import JobSpec
from services.training import Trainer, build_dataset, compute_device, step_at_cursor

CPU = torch.device("cpu")


def _spec(**fields: object) -> JobSpec:
    base: dict[str, object] = {"data": {"x": [[1.0]], "y": [2.0]}, "init": {"w": [1.0]}}
    return JobSpec.model_validate({**base, **fields})


def _run(spec: JobSpec, steps: int) -> tuple[Trainer, torch.Tensor]:
    trainer = Trainer(spec, CPU)
    rows = torch.empty(steps, trainer.layout.width)
    for i in range(steps):
        trainer.step(rows[i])
    return trainer, rows


def test_tutorial_forward_backward_update() -> None:
    # x=1, y=2, w=1: y_hat = 1, s = -1, loss = s^2 = 1, dLoss/dw = 2 s x = -2.
    _, rows = _run(_spec(optimizer={"lr": 0.1}), 2)
    assert rows[0].tolist() == [1.0, -2.0, 1.0]
    # The update: w <- w - lr * dLoss/dw = 1 - 0.1 * (-2) = 1.2 (in float32).
    assert rows[1, 2].item() == np.float32(1.0) - np.float32(0.1) * np.float32(-2.0)


def test_recorded_params_are_those_of_the_forward_pass() -> None:
    trainer, rows = _run(_spec(optimizer={"lr": 0.5}, steps=3), 3)
    # Each row's params are the previous row's params after its update (no aliasing).
    for before, after in pairwise(rows):
        assert after[2] == before[2] - np.float32(0.5) * before[1]
    assert trainer.params()[0] == rows[2, 2] - np.float32(0.5) * rows[2, 1]


def test_same_problem_in_plain_torch_matches_step_for_step() -> None:
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]])
    y = torch.tensor([1.0, -2.0, 0.5])
    spec = JobSpec.model_validate(
        {
            "data": {"x": x.tolist(), "y": y.tolist()},
            "bias": True,
            "init": {"w": [0.1, 0.2], "b": -0.3},
            "optimizer": {"lr": 0.05},
        }
    )
    _, rows = _run(spec, 20)
    w = torch.tensor([0.1, 0.2], requires_grad=True)
    b = torch.tensor(-0.3, requires_grad=True)
    for row in rows:
        loss = ((x @ w + b - y) ** 2).mean()
        loss.backward()
        assert w.grad is not None and b.grad is not None
        expected = [loss.item(), *w.grad.tolist(), b.grad.item(), *w.tolist(), b.item()]
        # Same math, other kernels (a view of one parameter vector vs two tensors): equal to
        # float32 rounding, not bit for bit.
        np.testing.assert_allclose(row.tolist(), expected, rtol=1e-6, atol=1e-7)
        with torch.no_grad():
            w -= 0.05 * w.grad
            b -= 0.05 * b.grad
        w.grad, b.grad = None, None


def test_synthetic_data_is_reproducible_by_seed() -> None:
    spec = _spec(data={"synthetic": {"n": 50, "d": 3, "seed": 11}}, init=None, bias=True)
    x1, y1 = build_dataset(spec)
    x2, y2 = build_dataset(spec)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = _spec(data={"synthetic": {"n": 50, "d": 3, "seed": 12}}, init=None)
    assert not torch.equal(build_dataset(other)[0], x1)


def test_recorder_cuts_chunk_after_first_non_finite_step() -> None:
    spec = _spec(data={"x": [[10.0], [20.0]], "y": [1.0, 2.0]}, init=None, optimizer={"lr": 10.0})
    trainer = Trainer(spec, CPU)
    recorder = StepRecorder(trainer.layout, 1000, CPU, first=0)
    while not recorder.full:
        trainer.step(recorder.next_row())
    recorded = recorder.swap(trainer.theta, b"")
    assert recorded is not None and recorder.first == 1000 and recorder.count == 0
    packed = pack(recorded, trainer.layout)
    assert packed.diverged_at is not None
    records = expand_chunk(packed.chunk)
    assert records[-1]["step"] == packed.diverged_at == packed.chunk.last
    assert None in (records[-1]["loss"], records[-1]["grads"]["w"][0])
    assert all(r["loss"] is not None for r in records[:-1])


def test_recorder_alternates_buffers_so_a_chunk_in_flight_is_not_overwritten() -> None:
    trainer = Trainer(_spec(optimizer={"lr": 0.1}), CPU)
    recorder = StepRecorder(trainer.layout, 4, CPU, first=0)
    for _ in range(3):
        trainer.step(recorder.next_row())
    assert int(recorder.cursor) == 0
    first = recorder.swap(trainer.theta, b"")
    assert first is not None
    # The checkpoint is the parameters after step 2's update, taken at the hand-over.
    theta_after_3 = trainer.params().clone()
    assert first.checkpoint.step == 3
    assert first.checkpoint.theta == theta_after_3.numpy().tobytes()
    assert int(recorder.cursor) == 4  # a captured graph now writes into the other half
    kept = first.rows.clone()
    for _ in range(4):
        trainer.step(recorder.next_row())
    assert torch.equal(first.rows, kept)
    assert first.checkpoint.theta == theta_after_3.numpy().tobytes()
    second = recorder.swap(trainer.theta, b"")
    assert second is not None and second.first == 3 and len(second.rows) == 4
    assert second.checkpoint.step == 7 and int(recorder.cursor) == 0
    assert recorder.swap(trainer.theta, b"") is None


def test_chunk_expansion_skips_steps_up_to_after() -> None:
    rows = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    chunk = Chunk(first=10, count=5, features=1, bias=False, rows=rows.tobytes())
    assert [r["step"] for r in expand_chunk(chunk, after=12)] == [13, 14]
    assert expand_chunk(chunk, after=9)[0] == {
        "step": 10,
        "loss": 0.0,
        "grads": {"w": [1.0]},
        "params": {"w": [2.0]},
    }
    assert expand_chunk(chunk, after=14) == []


@pytest.mark.parametrize(
    ("text", "queue", "env"),
    [
        ("cpu", CPU_QUEUE, {"CUDA_VISIBLE_DEVICES": "", "GRADSTREAM_DEVICE": "cpu"}),
        ("cuda:0", GPU_QUEUE, {"CUDA_VISIBLE_DEVICES": "0", "GRADSTREAM_DEVICE": "cuda:0"}),
        ("cuda:3", GPU_QUEUE, {"CUDA_VISIBLE_DEVICES": "3", "GRADSTREAM_DEVICE": "cuda:3"}),
    ],
)
def test_device_parsing_queue_and_pinning(text: str, queue: str, env: dict[str, str]) -> None:
    device = Device.parse(text)
    assert str(device) == text
    assert device.queue == queue
    assert device.pinning_env() == env


@pytest.mark.parametrize("text", ["gpu", "cuda", "cuda:x", "cuda:-1", "tpu:0", ""])
def test_unknown_devices_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        Device.parse(text)


def test_compute_device_inside_a_pinned_worker() -> None:
    assert compute_device("cpu") == CPU
    if torch.cuda.is_available():
        # CUDA_VISIBLE_DEVICES=N leaves one GPU, which torch numbers 0.
        assert compute_device("cuda:3") == torch.device("cuda", 0)
    else:
        assert compute_device("cuda:0", cuda_fallback_cpu=True) == CPU
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            compute_device("cuda:0")


def test_auto_routing_by_cost_model_and_live_workers() -> None:
    settings = Settings()
    small = _spec(device="auto")
    large = _spec(device="auto", data={"synthetic": {"n": 100_000, "d": 100}}, init=None)
    both = {CPU_QUEUE, GPU_QUEUE}
    assert route_job(small, both, settings).queue == CPU_QUEUE
    assert route_job(large, both, settings).queue == GPU_QUEUE
    assert route_job(large, {CPU_QUEUE}, settings).queue == CPU_QUEUE
    assert route_job(small, {GPU_QUEUE}, settings).queue == GPU_QUEUE
    assert route_job(small, set(), settings).queue == CPU_QUEUE
    assert route_job(_spec(device="cuda"), {CPU_QUEUE}, settings).queue == GPU_QUEUE
    assert route_job(_spec(device="cpu"), both, settings).queue == CPU_QUEUE
    reason = route_job(large, both, settings).reason
    assert reason.startswith("auto: gpu (estimated ") and "s on cpu" in reason


def test_cost_model_crosses_over_where_the_gpu_step_beats_the_cpu_step() -> None:
    settings = Settings()

    def faster(elements: int, steps: int) -> str:
        cpu = estimated_seconds("cpu", elements, steps, settings)
        return "cpu" if cpu < estimated_seconds("cuda", elements, steps, settings) else "cuda"

    # The tutorial's 10 steps: eager GPU steps (~500 µs of kernel launches) lose.
    assert faster(1, 10) == "cpu"
    # 1000x10 for 100 steps: the ~30 ms graph capture is not repaid by 24 µs steps ...
    assert faster(10_000, 100) == "cpu"
    # ... for 10 000 steps it is.
    assert faster(10_000, 10_000) == "cuda"
    # 10^6 x 100: 1.5 ns per element on one CPU thread against a few ms on the GPU.
    assert faster(10**8, 100) == "cuda"
    # Graphs off: the eager GPU step stays launch-bound at 1000x10, however long the job.
    settings = Settings(cuda_graphs=False)
    assert faster(10_000, 10_000) == "cpu"


@pytest.mark.parametrize("bias", [False, True])
def test_the_step_a_cuda_graph_captures_records_what_the_eager_step_records(bias: bool) -> None:
    # What CudaGraphStep captures, run eagerly here: same rows, bit for bit, at the cursor.
    spec = _spec(data={"synthetic": {"n": 64, "d": 3}}, init=None, bias=bias)
    eager, captured = Trainer(spec, CPU), Trainer(spec, CPU)
    rows = torch.empty(20, eager.layout.width)
    storage = torch.full((25, eager.layout.width), float("nan"))
    cursor, row = torch.tensor(5), torch.empty(eager.layout.width)
    for step in range(20):
        eager.step(rows[step])
        step_at_cursor(captured, row, storage, cursor)
    assert int(cursor) == 25
    assert torch.equal(storage[5:], rows) and torch.equal(captured.params(), eager.params())
    assert storage[:5].isnan().all()
