"""`gradstream up` keeps its data folder: Redis's AOF, the logs and the API key outlive a stop,
so jobs, their steps and dashboard links do too; one `up` per folder at a time."""

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from api.client import Client
from tests.conftest import SEED_EXAMPLE


def _up_argv(data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "cli.main", "up", "--port", "0", "--data-dir", str(data_dir)]


class RunningUp:
    """A `gradstream up` process, its output read line by line by a thread (so that every
    wait has a deadline), its API URL and key once it is ready."""

    def __init__(self, data_dir: Path, timeout: float = 120) -> None:
        self.process = subprocess.Popen(
            _up_argv(data_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.wait_for("Ctrl-C stops everything", timeout)
        found = re.search(r"GRADSTREAM_URL=(\S+) GRADSTREAM_API_KEY=(\S+)", self.output)
        assert found, self.output
        self.url, self.key = found.group(1), found.group(2)

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                self.lines.put(line)
        self.lines.put("")  # end of output

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if not line:
                self.kill()
                raise AssertionError(f"no {text!r} after {timeout} s:\n{self.output}")
            self.output += line

    def stop(self, signum: signal.Signals) -> None:
        """Stop it with `signum`, and require a clean exit."""
        self.process.send_signal(signum)
        assert self.process.wait(timeout=60) == 0, self.output
        self.reader.join(10)
        while not self.lines.empty():
            self.output += self.lines.get()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.reader.join(10)


def test_up_keeps_jobs_steps_and_key_across_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "gradstream"
    up = RunningUp(data_dir)
    try:
        key_file = data_dir / "api-key"
        assert key_file.read_text().strip() == up.key
        assert key_file.stat().st_mode & 0o777 == 0o600

        # A second `up` on the same folder is refused at once, in one line naming the first.
        second = subprocess.run(_up_argv(data_dir), capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert second.stderr.splitlines() == [
            f"error: another `gradstream up` (pid {up.process.pid}) is using {data_dir}: "
            "stop it, or give this one another --data-dir"
        ]

        with Client(up.url, up.key, timeout=10) as client:
            job = client.submit({**SEED_EXAMPLE, "steps": 30})
            assert client.wait(job["id"], timeout=60)["status"] == "succeeded"
            steps = list(client.steps(job["id"]))
        assert len(steps) == 30
        up.stop(signal.SIGTERM)
        assert "stopping" in up.output
    finally:
        up.kill()

    again = RunningUp(data_dir)
    try:
        assert again.key == up.key  # the same key: links with `#key=` still work
        with Client(again.url, again.key, timeout=10) as client:
            view = client.get(job["id"])
            assert view["status"] == "succeeded" and view["steps_done"] == 30
            assert list(client.steps(job["id"])) == steps
        again.stop(signal.SIGINT)
    finally:
        again.kill()
    logs = {path.name for path in data_dir.glob("*.log")}
    assert {"redis.log", "worker-cpu-1.log"} <= logs, logs
