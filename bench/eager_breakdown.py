"""Where an eager job's time goes, in process (for diagnosis; what a user sees is
`bench/worker_loop.py`): the tutorial's hand-written loop, the trainer's recorded step alone
(rows written, nothing flushed), and a whole attempt through services.runner.run_job against a
real redis-server, split into set-up (claim to first step), the step loop, the result, and
the CPU time the flushes took (packing, sending, reading the reply: on the loop thread, which
sends each flush script and reads its reply at the next hand-over).

    .venv/bin/python bench/eager_breakdown.py [--repeat 3] [--cases ...]
"""

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.worker_loop import CASES, tutorial_loop
from cli.stack import temporary_stack
from services import runner
from services.attempts import Outcome
from services.config import Settings
from services.runner import StepRecorder, run_job
from services.schemas import JobSpec
from services.store import Store
from services.training import Trainer


def recorded_steps(spec: JobSpec) -> float:
    """The trainer's eager step writing its rows into a recorder, nothing flushed: steps/s."""
    started = time.perf_counter()
    trainer = Trainer(spec, torch.device("cpu"))
    recorder = StepRecorder(trainer.layout, min(4096, spec.steps), torch.device("cpu"), 0)
    for _ in range(spec.steps):
        if recorder.full:
            recorder.swap(trainer.theta, None)
        trainer.step(recorder.next_row())
    return spec.steps / (time.perf_counter() - started)


def attempt(store: Store, spec: JobSpec, settings: Settings) -> dict[str, float]:
    """One attempt through run_job: seconds of each part, and the CPU time the flushes took
    (packing, sending and reading replies: on the loop thread itself since issue 23)."""
    flushes: list[float] = []
    send = runner.JobAttempt._send

    def timed_send(self: runner.JobAttempt, *args: object, **kwargs: object) -> object:
        started = time.thread_time()
        receive = send(self, *args, **kwargs)  # type: ignore[arg-type]
        sent = time.thread_time() - started

        def timed_receive() -> runner.Flushed:
            started = time.thread_time()
            try:
                return receive()
            finally:
                flushes.append(sent + time.thread_time() - started)

        return timed_receive

    runner.JobAttempt._send = timed_send  # type: ignore[assignment,method-assign]
    try:
        job_id, _ = store.create_job(spec, "cpu", "bench-no-consumer", "bench")
        started = time.perf_counter()
        result = run_job(store, job_id, "bench", torch.device("cpu"), settings)
        total = time.perf_counter() - started
    finally:
        runner.JobAttempt._send = send  # type: ignore[method-assign]
    assert result.outcome is Outcome.SUCCEEDED, result
    loop = result.loop_s
    return {
        "total": total,
        "setup": total - loop - result.result_s,
        "loop": loop,
        "result": result.result_s,
        "flush_cpu": sum(flushes),
        "flushes": len(flushes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=["seed 1x1 (tutorial)", "1000x10"])
    parser.add_argument("--flush-interval", type=float, default=None, help="seconds (a setting)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    with temporary_stack("gradstream-bench-") as stack:
        # Eager steps only: a long case could otherwise run compiled where a shape is cached.
        settings = Settings(redis_url=stack.start_redis(), compile_steps=False)
        if args.flush_interval is not None:
            settings = settings.model_copy(update={"flush_interval_s": args.flush_interval})
        store = Store.from_url(settings.redis_url)
        for name in args.cases:
            fields, steps = CASES[name]
            spec = JobSpec.model_validate({**fields, "steps": steps, "device": "cpu"})
            attempt(store, spec, settings)  # warm
            tutorial, recorded, parts = [], [], []
            for _ in range(args.repeat):
                tutorial.append(tutorial_loop(spec))
                recorded.append(recorded_steps(spec))
                parts.append(attempt(store, spec, settings))
            hand = statistics.median(tutorial)
            med = {key: statistics.median(p[key] for p in parts) for key in parts[0]}
            us = 1e6 / steps
            print(
                f"{name:<20} steps {steps:>6}  per step: tutorial {1e6 / hand:5.1f} us"
                f"  recorded step {1e6 / statistics.median(recorded):5.1f} us"
                f"  attempt {med['total'] * us:5.1f} us = set-up {med['setup'] * us:4.1f}"
                f" + loop {med['loop'] * us:5.1f} + result {med['result'] * us:4.1f};"
                f"  flush CPU {med['flush_cpu'] * us:4.1f} us/step"
                f" ({med['flushes']:.0f} flushes, {med['flush_cpu'] / med['flushes'] * 1e6:.0f}"
                f" us each);  attempt/tutorial rate {steps / (med['total'] * hand):.2f}"
            )


if __name__ == "__main__":
    main()
