"""A slow watcher across the archive switch (issue "Nothing lost, third pass"): what a user's
client receives when it reads a job's events more slowly than the job runs, while the job
ends and its steps leave Redis for the archive under it.

    .venv/bin/python bench/archive_switch.py [--steps 30000] [--pause-ms 0.3] [--join-at 0.5]

A real stack (`gradstream up`'s parts: a private redis-server, the API with pages of 64 KiB,
one worker whose archiver runs every 0.5 s with a hot window of 0, so a job's stream is
archived as soon as it ends) runs a scalar job of `--steps` steps; one watcher
(api.client.Client.stream from step 0) joins once `--join-at` of the steps are stored, so it
starts with a backlog of many pages, and sleeps `--pause-ms` after each event: it is still in
that backlog when the stream leaves Redis. Prints when
the job ended and when it was archived (seconds from the submit) against where the watcher
was then, and what the watcher got: the longest run of consecutive steps from step 0 (the
whole job when nothing was lost), gaps, duplicates, and whether it ended with `done`.
"""

import argparse
import itertools
import sys
import threading
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.client import Client
from cli.stack import temporary_stack
from services.store import keys

LONG = {"data": {"x": [[1.0]], "y": [2.0]}, "init": {"w": [1.0]}, "optimizer": {"lr": 0.01}}


def longest_run(steps: list[int]) -> tuple[int, int, int]:
    """The consecutive steps from 0 at the start of `steps`, the gaps and the repeats."""
    run = 0
    while run < len(steps) and steps[run] == run:
        run += 1
    gaps = sum(1 for a, b in itertools.pairwise(steps) if b > a + 1)
    repeats = len(steps) - len(set(steps))
    return run, gaps, repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--pause-ms", type=float, default=0.3)
    parser.add_argument("--join-at", type=float, default=0.5)
    args = parser.parse_args()
    env = {"GRADSTREAM_HOT_RETENTION_S": "0", "GRADSTREAM_ARCHIVE_INTERVAL_S": "0.5"}
    with temporary_stack("gradstream-switch-", env) as stack:
        stack.start_redis()
        stack.start_api(GRADSTREAM_MAX_PAGE_BYTES=str(64 * 1024))
        stack.start_worker("cpu")
        stack.wait_for_workers({"cpu"})
        store = redis.Redis.from_url(stack.redis_url)
        with Client(stack.api_url, stack.api_key, timeout=60) as api:
            started = time.monotonic()
            job_id = api.submit({**LONG, "steps": args.steps, "device": "cpu"})["id"]
            received: list[int] = []
            moments: dict[str, tuple[float, int]] = {}
            done = threading.Event()

            def watch_record() -> None:  # when the job ended, and when its stream left Redis
                while not done.is_set():
                    record = store.hmget(keys.job_key(job_id), "finished_at", "archived")
                    at = (time.monotonic() - started, len(received))
                    if record[0] and "ended" not in moments:
                        moments["ended"] = at
                    if record[1] and "archived" not in moments:
                        moments["archived"] = at
                    time.sleep(0.05)

            recorder = threading.Thread(target=watch_record, daemon=True)
            recorder.start()
            join = int(args.join_at * args.steps)
            while api.get(job_id)["steps_done"] < join:
                time.sleep(0.01)
            ended_with = None
            for event in api.stream(job_id):
                if event.event == "step":
                    received.append(int(event.data["step"]))
                    time.sleep(args.pause_ms / 1000)
                elif event.event == "done":
                    ended_with = event.data.get("status")
            read_s = time.monotonic() - started
            done.set()
            recorder.join()
    run, gaps, repeats = longest_run(received)
    ended, archived = moments.get("ended"), moments.get("archived")
    print(
        f"job of {args.steps} steps, watcher pausing {args.pause_ms} ms an event; "
        f"job ended at {ended[0]:.1f} s (watcher at step {ended[1]}), "
        if ended
        else "job end not seen, ",
        end="",
    )
    print(
        f"archived at {archived[0]:.1f} s (watcher at step {archived[1]})"
        if archived
        else "not archived while watched",
    )
    print(
        f"watcher read {len(received)} steps in {read_s:.1f} s: longest gap-free run from step "
        f"0: {run} steps ({run / args.steps:.3f} of the job), {gaps} gaps, {repeats} repeated, "
        f"ended with done ({ended_with})",
        flush=True,
    )


if __name__ == "__main__":
    main()
