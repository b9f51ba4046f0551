"""What a worker knows of the shapes it has compiled: the cost model counts a compile as done
(free) when this process has compiled the shape's block, as cheap when Inductor's on-disk cache
holds its code (a marker beside the cache says so), and in full otherwise; and a worker
compiles the shapes its cache's workers ran lately when it starts (a short list kept in the
cache's folder), besides GRADSTREAM_COMPILE_WARM_SHAPES."""

import json
from pathlib import Path

import pytest
import torch

from cli.stack import Stack, stop_process, wait_until
from services.attempts import choose_stepper
from services.config import Settings
from services.queue import CompiledAt, compiles
from services.runner import note_recent_shape, shapes_to_warm
from services.schemas import JobSpec
from services.store import Store
from services.training import block_cached, inductor_cache_dir, mark_cached, recent_shapes_file
from tests.attempts import run_once
from tests.test_compiled import compiled_spec

CPU = torch.device("cpu")
# The cost model's figures, given here so that no default moves a decision: an eager step
# 250 µs, a compiled one 10 µs (the scalar problem's elements cost nothing next to them).
COSTS = {
    "cpu_step_fixed_s": 250e-6,
    "cpu_compiled_step_fixed_s": 10e-6,
    "cpu_compile_s": 10.0,
    "cpu_compile_cached_s": 2.0,
}
COMPILED_SHAPE = (16384, 8, True, 16, 0)  # tests/test_compiled.py's, in blocks of 16


def scalar(steps: int) -> JobSpec:
    return JobSpec.model_validate(
        {"data": {"x": [[1.0]], "y": [2.0]}, "init": {"w": [1.0]}, "steps": steps, "device": "cpu"}
    )


def test_the_cost_model_charges_a_compile_by_where_the_shape_is_compiled() -> None:
    settings = Settings(**COSTS)
    tutorial = scalar(20_000)  # 5 s eager, 0.2 s of compiled steps
    assert not compiles(tutorial, settings)  # 10 s to compile: not repaid
    assert compiles(tutorial, settings, compiled_at=CompiledAt.PROCESS)  # 0.2 s
    assert compiles(tutorial, settings, compiled_at=CompiledAt.DISK)  # 2.2 s
    assert not compiles(scalar(4_000), settings, compiled_at=CompiledAt.DISK)  # 2.04 s > 1 s
    # Free, but only for a whole block of steps: a shorter job has none to run.
    assert compiles(scalar(16), settings, compiled_at=CompiledAt.PROCESS)
    assert not compiles(scalar(15), settings, compiled_at=CompiledAt.PROCESS)
    # A compile from the cache costs at most a compile (GRADSTREAM_CPU_COMPILE_S=0: any job).
    free = Settings(**{**COSTS, "cpu_compile_s": 0.0})
    assert compiles(scalar(16), free, compiled_at=CompiledAt.DISK)
    off = Settings(**COSTS, compile_steps=False)
    assert not compiles(tutorial, off, compiled_at=CompiledAt.PROCESS)


def test_a_shape_marked_in_the_compile_cache_is_compiled_and_the_same_spec_unmarked_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # an empty cache: no markers
    settings, spec = Settings(**COSTS), scalar(20_000)
    shape = (1, 1, False, 16, 0)
    assert not block_cached(shape)
    assert choose_stepper(spec, settings, 20_000, False, True, shape=shape) == "eager"
    mark_cached(shape)  # as a compile of the shape leaves it
    assert block_cached(shape) and not block_cached((1, 1, True, 16, 0))
    assert choose_stepper(spec, settings, 20_000, False, True, shape=shape) == "compiled"
    assert choose_stepper(spec, settings, 20_000, False, False, shape=shape) == "eager"


def test_a_job_runs_compiled_when_an_earlier_job_in_this_process_compiled_its_shape(
    store: Store,
) -> None:
    # The second job's cost model counts a cold compile (10 s) and one from Inductor's
    # on-disk cache (a million seconds here) as not repaid by its 700 steps: only this
    # process's own compile, by the first job, can make it compiled.
    first, later = Settings(cpu_compile_s=0), Settings(cpu_compile_cached_s=1e6)
    spec = compiled_spec(700)
    assert not compiles(spec, later) and compiles(spec, later, compiled_at=CompiledAt.PROCESS)
    assert run_once(store, spec, CPU, first)[0].stepper == "compiled"
    assert block_cached(COMPILED_SHAPE)  # the compile left its marker beside Inductor's cache
    result, steps = run_once(store, spec, CPU, later)
    assert result.stepper == "compiled" and [s["step"] for s in steps] == list(range(700))
    # One row fewer: a shape of its own, never compiled here, runs eager steps.
    other = JobSpec.model_validate(
        {**spec.model_dump(mode="json"), "data": {"synthetic": {"n": 16383, "d": 8}}}
    )
    assert run_once(store, other, CPU, later)[0].stepper == "eager"


def test_the_recent_shapes_are_kept_most_recent_first_bounded_and_warmed(
    tmp_path: Path,
) -> None:
    settings = Settings(
        compile_cache_dir=str(tmp_path), compile_recent_shapes=3, compile_warm_shapes="1x1"
    )
    for samples in (2, 3, 4, 5, 3):
        note_recent_shape(settings, (samples, 1, False, 16, 0))
    note_recent_shape(settings, (800, 10, True, 16, 200))
    path = Path(recent_shapes_file(str(tmp_path)))
    assert path.parent == Path(inductor_cache_dir(str(tmp_path)))
    assert json.loads(path.read_text()) == ["800x10+b+v200", "3x1", "5x1"]
    # What a pool process compiles when it starts: the configured shapes, then the recent.
    assert shapes_to_warm(settings) == ["1x1", "800x10+b+v200", "3x1", "5x1"]
    fewer = Settings(compile_cache_dir=str(tmp_path), compile_recent_shapes=1)
    assert shapes_to_warm(fewer) == ["800x10+b+v200"]
    off = Settings(compile_cache_dir=str(tmp_path), compile_recent_shapes=0)
    note_recent_shape(off, (9, 9, False, 16, 0))
    assert shapes_to_warm(off) == [] and "9x9" not in path.read_text()


def test_a_job_that_could_run_compiled_puts_its_shape_first_among_the_recent(
    store: Store, tmp_path: Path
) -> None:
    settings = Settings(compile_cache_dir=str(tmp_path), compile_recent_shapes=4)
    path = Path(recent_shapes_file(str(tmp_path)))
    assert run_once(store, scalar(5), CPU, settings)[0].steps == 5  # under a block: not kept
    scheduled = compiled_spec(32, schedule={"name": "step"})  # an lr schedule: never compiled
    run_once(store, scheduled, CPU, settings)
    assert not path.exists()
    run_once(store, scalar(20), CPU, settings)  # kept, however it ran
    run_once(store, compiled_spec(32), CPU, settings)
    assert json.loads(path.read_text()) == ["16384x8+b", "1x1"]


def test_a_worker_compiles_its_recent_shapes_when_it_starts(stack: Stack, tmp_path: Path) -> None:
    # A cache of its own, which the list names a shape of; the worker compiles it there
    # (from scratch: tens of seconds on a small machine) and marks it.
    cache = tmp_path / "inductor"
    path = Path(recent_shapes_file(str(cache)))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(["3x2+b"]))
    worker = stack.start_worker(
        "cpu", GRADSTREAM_COMPILE_CACHE_DIR=str(cache), GRADSTREAM_COMPILE_RECENT_SHAPES="4"
    )
    log = stack.run_dir / f"worker-cpu-{len(stack.processes) - 1}.log"
    try:
        wait_until(lambda: "compiled steps warmed for 3x2+b" in log.read_text(), 180, "warmed")
    finally:
        stop_process(worker)
    markers = list(path.parent.glob("gradstream-compiled/*/3x2+b.block16"))
    assert len(markers) == 1, markers
