"""Worker logs: JSON lines off a terminal, each line of a job's attempt with its ids."""

import json
import time

from api.client import Client
from cli.stack import Stack, stop_process, wait_until
from tests.conftest import SEED_EXAMPLE


def test_worker_logs_are_json_lines_with_the_job_and_attempt(stack: Stack, client: Client) -> None:
    worker = stack.start_worker("cpu")
    log_path = stack.run_dir / f"worker-cpu-{len(stack.processes) - 1}.log"
    try:
        wait_until(lambda: "ready" in log_path.read_text(), 60, "worker ready")
        job = None
        # The session's worker may take it: submit until this worker has run one.
        deadline = time.monotonic() + 60
        while job is None or job["id"] not in log_path.read_text():
            assert time.monotonic() < deadline, "the new worker ran no job"
            job = client.submit({**SEED_EXAMPLE, "steps": 5})
            client.wait(job["id"])
        lines = [
            json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")
        ]
        assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
        about_job = [line for line in lines if job["id"] in line["msg"]]
        runner_lines = [line for line in about_job if line["logger"] == "services.runner"]
        assert runner_lines and all(
            line["job_id"] == job["id"] and line["attempt"] == 1 for line in runner_lines
        )
    finally:
        stop_process(worker)
