"""What one request of a wide job's history costs the API: a job of 10 000 parameters (each
step record ~500 kB of JSON), replayed over SSE, then read with the default `/steps` page
(in that order, so that each peak is its own), against a real API, worker and Redis. Prints
per read: the bytes and steps it returned, its time, and the API process's peak memory
(VmHWM) after it.

    .venv/bin/python bench/page_size.py [--steps 500]
"""

import argparse
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.client import Client
from cli.stack import temporary_stack


def peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    spec = {
        "data": {"synthetic": {"n": 8, "d": 10_000}},
        "optimizer": {"lr": 1e-5},
        "steps": args.steps,
        "device": "cpu",
    }
    with temporary_stack("gradstream-page-") as stack:
        stack.start_redis()
        stack.start_api()
        stack.start_worker("cpu")
        stack.wait_for_workers({"cpu"})
        api_pid = stack.api_process.pid
        with Client(stack.api_url, stack.api_key, timeout=600) as client:
            job = client.submit(spec)
            client.wait(job["id"], timeout=600)
            rest = peak_mib(api_pid)
            print(f"job of {args.steps} steps x 10000 parameters; API peak at rest {rest:.0f} MiB")
            started = time.perf_counter()
            received = 0
            headers = {"Authorization": f"Bearer {stack.api_key}"}
            url = f"{stack.api_url}/v1/jobs/{job['id']}/events"
            with httpx.stream("GET", url, headers=headers, timeout=600) as events:
                for line in events.iter_lines():
                    received += len(line) + 1
                    if line.startswith("event: done"):
                        break
            elapsed = time.perf_counter() - started
            print(
                f"SSE replay (whole job)     {received / 2**20:8.1f} MiB  "
                f"{args.steps:4d} steps  {elapsed:6.2f} s  API peak {peak_mib(api_pid):6.0f} MiB"
            )
            started = time.perf_counter()
            response = client.http.get(f"/v1/jobs/{job['id']}/steps")  # the default page
            elapsed = time.perf_counter() - started
            page = response.json()
            print(
                f"GET /steps (default page)  {len(response.content) / 2**20:8.1f} MiB  "
                f"{len(page['steps']):4d} steps  {elapsed:6.2f} s  "
                f"API peak {peak_mib(api_pid):6.0f} MiB"
            )


if __name__ == "__main__":
    main()
