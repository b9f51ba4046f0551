"""Bad bodies against the API's event loop: how long a 422 for an 8 MiB body of bad items
takes, how long it holds up every other request of the API process meanwhile, and its size.

    .venv/bin/python bench/validation_stall.py [--repeat 3]

A real API (uvicorn) on a private redis-server, no worker. A probe thread sends GET /healthz
every 5 ms; while one body is posted to POST /v1/jobs, the stall is the longest /healthz
answer that overlapped it (FastAPI parses and validates a body in the event loop, so a
slow 422 holds up every request of that process). Each body is at most the default
max_body_bytes (8 MiB); each case is posted `--repeat` times and the slowest is shown.
"""

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.stack import temporary_stack

MAX_BODY_BYTES = 8 * 1024 * 1024
PROBE_INTERVAL_S = 0.005


def filled(prefix: str, item: str, suffix: str, head: str = "") -> bytes:
    """prefix + head + as many `item`s, comma-separated, as fit in MAX_BODY_BYTES + suffix."""
    room = MAX_BODY_BYTES - len(prefix) - len(head) - len(suffix)
    count = room // (len(item) + 1)
    return (prefix + head + ",".join([item] * count) + suffix).encode()


def unknown_keys() -> bytes:
    prefix, suffix, keys = '{"data":{"x":[[1.0]],"y":[2.0]}', "}", []
    size = len(prefix) + len(suffix)
    while size < MAX_BODY_BYTES - 32:
        keys.append(f',"k{len(keys)}":0')
        size += len(keys[-1])
    return (prefix + "".join(keys) + suffix).encode()


def valid_job() -> bytes:
    # The floor: a valid body of the same size (2M samples of one feature), accepted and
    # queued (no worker runs it); its 201 echoes the spec.
    prefix, middle, suffix = '{"data":{"x":[', '],"y":[', "]}}"
    samples = (MAX_BODY_BYTES - len(prefix) - len(middle) - len(suffix)) // 4
    return (
        prefix + ",".join(["1"] * samples) + middle + ",".join(["2"] * samples) + suffix
    ).encode()


CASES: dict[str, Callable[[], bytes]] = {
    "reference: valid, 2M samples": valid_job,
    "y: 2M strings": lambda: filled('{"data":{"x":[[1.0]],"y":[', '"a"', "]}}", "1,2,3,"),
    "x: 1.4M bad rows": lambda: filled('{"data":{"x":[', '["a"]', '],"y":[1.0]}}', "[1],[2],"),
    "x: a row of 2M strings": lambda: filled('{"data":{"x":[[', '"a"', ']],"y":[1.0]}}', "1,"),
    "x: 2.8M items, ragged": lambda: filled('{"data":{"x":[[1,2],', "[1]", '],"y":[1]}}'),
    "data: x and synthetic": lambda: filled(
        '{"data":{"synthetic":{"n":1,"d":1},"x":[', "1", '],"y":[1]}}'
    ),
    "init.w: 4M values": lambda: filled(
        '{"data":{"x":[[1.0]],"y":[2.0]},"init":{"w":[', "1", "]}}"
    ),
    "unknown field, 4M values": lambda: filled(
        '{"data":{"x":[[1.0]],"y":[2.0]},"extra":[', "1", "]}"
    ),
    "1M unknown fields": unknown_keys,
}


class HealthProbe(threading.Thread):
    """GET /healthz every PROBE_INTERVAL_S; `longest(start, end)` is the longest answer that
    overlapped that span."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.samples: list[tuple[float, float]] = []  # (sent, answered)
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=120) as http:
            while not self.stopping.is_set():
                sent = time.perf_counter()
                http.get(self.url + "/healthz").raise_for_status()
                answered = time.perf_counter()
                self.samples.append((sent, answered))
                time.sleep(max(0.0, sent + PROBE_INTERVAL_S - answered))

    def longest(self, start: float, end: float) -> float:
        return max((b - a for a, b in self.samples if a < end and b > start), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    bodies = {name: build() for name, build in CASES.items()}
    with temporary_stack("gradstream-bench-") as stack:
        stack.start_redis()
        stack.start_api()
        probe = HealthProbe(stack.api_url)
        probe.start()
        headers = {**stack.auth(), "content-type": "application/json"}
        with httpx.Client(base_url=stack.api_url, headers=headers, timeout=300) as http:
            time.sleep(1)
            idle = probe.longest(time.perf_counter() - 1, time.perf_counter())
            print(f"{'idle (1 s, no body)':28} {'':31} /healthz max {idle * 1e3:7.1f} ms")
            for name, body in bodies.items():
                worst = (0.0, 0.0, 0, 0)
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    response = http.post("/v1/jobs", content=body)
                    end = time.perf_counter()
                    time.sleep(0.2)  # a probe sent just before the end has answered
                    stall = probe.longest(start, end)
                    worst = max(
                        worst, (end - start, stall, response.status_code, len(response.content))
                    )
                took, stall, status, size = worst
                print(
                    f"{name:28} {len(body) / 2**20:4.1f} MiB  {status}  in {took * 1e3:7.0f} ms"
                    f"  /healthz max {stall * 1e3:7.1f} ms  response {size:>9} bytes",
                    flush=True,
                )
        probe.stopping.set()
        probe.join(10)


if __name__ == "__main__":
    main()
