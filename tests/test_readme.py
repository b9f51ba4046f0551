"""The README's example commands and the examples/ folder, run as a user runs them: the shell
block under "Using it" in bash against a real stack, examples/client.py as a script, and every
example spec (a job's, or a sweep's: a top-level `base`) through the API's own validation."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli.stack import Stack
from services.config import get_settings
from services.schemas import JobSpec, SweepSpec
from services.sweeps import expand

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
VENV_BIN = Path(sys.executable).parent


def _tested_block() -> str:
    """The shell block the README marks as run by this test."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- tested: tests/test_readme.py -->\n```sh\n(.*?)```", readme, re.S)
    assert found, "README.md lost its tested example block"
    # `.venv/bin/` is the virtual environment of a checkout; here, the one running the tests.
    return found.group(1).replace(".venv/bin/", f"{VENV_BIN}/")


def _run(stack: Stack, argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GRADSTREAM_URL=stack.api_url, GRADSTREAM_API_KEY=stack.api_key)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_the_readme_example_block_runs_as_written(stack: Stack) -> None:
    result = _run(stack, ["bash", "-euo", "pipefail", "-c", _tested_block()])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    # The tutorial's worked example, exactly, from the event stream.
    assert 'data: {"step":0,"loss":1.0,"grads":{"w":[-2.0]},"params":{"w":[1.0]}}' in out
    assert "event: done" in out
    # `after=7` is exclusive: steps 8 and 9 only.
    page = json.loads(next(line for line in out.splitlines() if line.startswith('{"steps"')))
    assert [record["step"] for record in page["steps"]] == [8, 9]
    assert "succeeded" in out


def test_the_client_example_runs(stack: Stack) -> None:
    result = _run(stack, [sys.executable, str(EXAMPLES / "client.py")])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "step 0: loss 1 w [1.0]"
    assert "succeeded: final w" in result.stdout
    assert lines[-1] == "stored steps after 4: [5, 6, 7, 8, 9]"


@pytest.mark.parametrize(
    "path", sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in {".json", ".yaml"})
)
def test_every_example_spec_is_a_valid_job_or_sweep(path: str) -> None:
    text = (EXAMPLES / path).read_text()
    spec = yaml.safe_load(text) if path.endswith(".yaml") else json.loads(text)
    if "base" not in spec:
        JobSpec.model_validate(spec)
        return
    # A sweep: the SweepSpec, and every member a JobSpec (as the API checks them at submit).
    sweep = SweepSpec.model_validate(spec)
    members = expand(sweep, get_settings().max_sweep_members)
    assert members and all(isinstance(member.spec, JobSpec) for member in members)
