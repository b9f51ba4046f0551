"""Worker peak memory for a 10^6 x 100 job against the dataset's size.

    .venv/bin/python bench/worker_memory.py [--n 1000000 --d 100]

Runs a real worker; reads its pool process's resident memory when idle (after its warm-up)
and its peak (VmHWM) once the job finished; prints the peak above idle against the bytes of
x and y (float32), and the ratio (target: at most 2).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.client import Client
from cli.stack import child_pids, temporary_stack


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    with temporary_stack("gradstream-bench-") as stack:
        stack.start_redis()
        stack.start_api()
        worker = stack.start_worker("cpu")
        stack.wait_for_workers({"cpu"})
        (child,) = child_pids(worker.pid)
        idle = _status_kib(child, "VmRSS") * 1024
        spec = {
            "data": {"synthetic": {"n": args.n, "d": args.d}},
            "optimizer": {"name": "sgd", "lr": 0.01},
            "steps": args.steps,
            "device": "cpu",
        }
        with Client(stack.api_url, stack.api_key, timeout=30) as api:
            view = api.wait(api.submit(spec)["id"], timeout=600)
        assert view["status"] == "succeeded", view
        peak = _status_kib(child, "VmHWM") * 1024
        dataset = 4 * args.n * (args.d + 1)
        above = peak - idle
        print(
            f"{args.n}x{args.d} job  dataset {dataset / 2**20:.0f} MiB  worker idle "
            f"{idle / 2**20:.0f} MiB  peak {peak / 2**20:.0f} MiB  peak above idle "
            f"{above / 2**20:.0f} MiB  ratio {above / dataset:.2f} (target <= 2)"
        )


if __name__ == "__main__":
    main()
