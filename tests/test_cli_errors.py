"""The CLI's errors are one line on stderr saying what to do, with exit code 2 for what was
typed wrong and 1 for the rest; a traceback only with --debug. (Errors the API answers: in
tests/test_cli.py, against the real stack.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.stack import free_port

SYNTHETIC_HELP = "--synthetic takes N,D: samples and features as whole numbers, e.g. --synthetic"


def _gradstream(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    # Nothing listens on this port: a command that reached for the API would say so.
    env = {**os.environ, "GRADSTREAM_URL": f"http://127.0.0.1:{free_port()}"}
    env.pop("GRADSTREAM_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_a_missing_spec_file(tmp_path: Path) -> None:
    out = _gradstream("submit", str(tmp_path / "nope.json"))
    assert out.returncode == 2
    assert _one_error_line(out) == (
        f"error: cannot read the spec file {tmp_path / 'nope.json'}: No such file or directory"
    )


def test_a_malformed_json_spec(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text('{"data": {"synthetic": {"n": 10, "d": 2}},\n "steps": }\n')
    out = _gradstream("submit", str(spec))
    assert out.returncode == 2
    assert _one_error_line(out) == (
        f"error: {spec} is not valid JSON: Expecting value (line 2, column 11; *.yaml is read "
        "as YAML)"
    )


def test_a_malformed_yaml_spec(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("data: [1, 2\nsteps: 3\n")
    out = _gradstream("submit", str(spec))
    assert out.returncode == 2
    assert _one_error_line(out) == (
        f"error: {spec} is not valid YAML: expected ',' or ']', but got ':' (line 2, column 6)"
    )


def test_a_spec_that_is_not_a_mapping() -> None:
    out = _gradstream("submit", "-", stdin="[1, 2]")
    assert out.returncode == 2
    assert _one_error_line(out) == (
        "error: - holds no JobSpec: it must be a mapping with `data`, `steps`, …"
    )


def test_no_data_at_all() -> None:
    out = _gradstream("submit", "--steps", "5")
    assert out.returncode == 2
    assert _one_error_line(out) == "error: give a spec file with data, or --synthetic N,D"


@pytest.mark.parametrize("value", ["1000x10", "1000", "a,b", "1000,10,3", "-5,3", "1e3,2", ""])
def test_a_malformed_synthetic_shape(value: str) -> None:
    out = _gradstream("submit", "--synthetic", value)
    assert out.returncode == 2
    assert _one_error_line(out) == f"error: {SYNTHETIC_HELP} 1000,10 (not {value!r})"


def test_click_usage_errors_are_one_line_too() -> None:
    out = _gradstream("submit", "--stepz", "3")
    assert out.returncode == 2
    line = _one_error_line(out)
    assert line.startswith("error: No such option: --stepz")
    assert line.endswith("(see `python -m cli.main submit --help`)")
    out = _gradstream("steps", "0" * 32, "--format", "xml")
    assert out.returncode == 2
    assert "'xml' is not one of 'jsonl', 'csv'" in _one_error_line(out)


@pytest.mark.parametrize("command", [["jobs"], ["workers"], ["submit", "--synthetic", "10,2"]])
def test_the_api_not_running(command: list[str]) -> None:
    port = free_port()
    out = _gradstream(*command, "--url", f"http://127.0.0.1:{port}")
    assert out.returncode == 1
    assert _one_error_line(out) == (
        f"error: cannot reach the API at http://127.0.0.1:{port}: is `gradstream up` running? "
        "(set GRADSTREAM_URL or --url to its address)"
    )


def test_debug_shows_the_traceback() -> None:
    out = _gradstream("--debug", "jobs")
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "ConnectError" in out.stderr
    assert len(out.stderr.splitlines()) > 5


def test_help_says_what_gradstream_is() -> None:
    out = _gradstream("--help")
    assert out.returncode == 0
    assert "composition root" not in out.stdout
    assert "trains linear-regression models as a service" in out.stdout
