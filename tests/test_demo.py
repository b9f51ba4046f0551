"""`make demo`'s command: its own private stack, the tutorial's example live, a clean stop."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from cli.main import SEED_EXAMPLE


def _processes_using(redis_url: str) -> list[str]:
    """Processes whose environment or command line names this Redis (the stack's processes)."""
    found = []
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                if redis_url.encode() in environ.read():
                    found.append(pid)
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"redis-server\0--port\0" + port.encode() in cmdline.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def test_demo_prints_the_tutorials_steps_live_and_stops_everything() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "up", "--demo", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == SEED_EXAMPLE["steps"]
    first = r"step +0 +loss 1\.0 +\|grad\| 2 +dLoss/dw \[-2\.0\] +w \[1\.0\]$"
    assert re.match(first, steps[0]), steps[0]
    losses = [float(re.search(r"loss (\S+)", line).group(1)) for line in steps]  # type: ignore[union-attr]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]
    assert "succeeded" in lines[-1]
    # The run directory is gone, and so is every process of the stack: redis, worker, API.
    run_dir = re.search(r"logs in (\S+)\)", lines[0]).group(1)  # type: ignore[union-attr]
    assert not os.path.exists(run_dir)
    redis_url = re.search(r"Redis (redis://\S+)", result.stdout).group(1)  # type: ignore[union-attr]
    assert _processes_using(redis_url) == []


def test_up_stops_everything_on_ctrl_c_even_when_started_with_sigint_ignored(
    tmp_path: Path,
) -> None:
    # As `gradstream up &` in a script starts it: a non-interactive shell's background job
    # inherits SIGINT ignored.
    up_argv = [sys.executable, "-m", "cli.main", "up", "--port", "0", "--data-dir", str(tmp_path)]
    with subprocess.Popen(
        ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *up_argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as up:
        try:
            assert up.stdout is not None
            output = ""
            while "Ctrl-C stops everything" not in output:
                line = up.stdout.readline()
                assert line, output  # the stack stopped before it was ready
                output += line
            redis_url = re.search(r"Redis (redis://\S+)", output).group(1)  # type: ignore[union-attr]
            assert len(_processes_using(redis_url)) >= 3  # redis, worker (and its child), API
            up.send_signal(signal.SIGINT)
            assert up.wait(timeout=30) == 0
            assert _processes_using(redis_url) == []
        finally:
            if up.poll() is None:
                up.kill()
