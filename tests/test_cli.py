"""Every `gradstream` client command against the real stack, through its own process."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from api.client import Client
from cli.main import _f32, _loss
from cli.stack import Stack
from tests.conftest import SEED_EXAMPLE


def _run(stack: Stack, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "GRADSTREAM_URL": stack.api_url,
        "GRADSTREAM_API_KEY": stack.api_key if key is None else key,
        "COLUMNS": "160",  # the progress bar's width off a terminal
    }
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_submit_a_yaml_spec_and_watch_it_line_by_line(stack: Stack, tmp_path: Path) -> None:
    spec = tmp_path / "seed.yaml"
    spec.write_text(
        "data: {x: [[1.0]], y: [2.0]}\ninit: {w: [1.0]}\noptimizer: {lr: 0.1}\n"
        "steps: 10\ndevice: cpu\n"
    )
    out = _run(stack, "submit", str(spec), "--watch", "--lines")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines[0]) == 32  # the job id
    assert "step    0  loss 1.0           |grad| 2           dLoss/dw [-2.0]  w [1.0]" in lines
    assert lines[-1].startswith("succeeded: ")


def test_submit_from_flags_then_show_steps_and_jobs(stack: Stack) -> None:
    out = _run(
        stack,
        "submit",
        "--synthetic",
        "50,3",
        "--steps",
        "20",
        "--lr",
        "0.05",
        "--bias",
        "--device",
        "cpu",
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    with Client(stack.api_url, stack.api_key) as client:
        assert client.wait(job_id)["status"] == "succeeded"
    shown = json.loads(_run(stack, "show", job_id).stdout)
    assert shown["spec"]["steps"] == 20 and shown["spec"]["bias"] is True
    assert shown["spec"]["data"]["synthetic"]["n"] == 50
    jsonl = [
        json.loads(line)
        for line in _run(stack, "steps", job_id, "--format", "jsonl").stdout.splitlines()
    ]
    assert [r["step"] for r in jsonl] == list(range(20)) and "b" in jsonl[0]["grads"]
    # Tidy CSV: a column per value, one header row, the API's exact floats.
    csv_out = _run(stack, "steps", job_id, "--format", "csv").stdout.splitlines()
    assert csv_out[0] == ("w_0,w_1,w_2,b,grad_w_0,grad_w_1,grad_w_2,grad_b,loss,step,epoch,batch")
    assert len(csv_out) == 21
    step_7 = jsonl[7]
    expected = [*step_7["params"]["w"], step_7["params"]["b"], *step_7["grads"]["w"]]
    expected += [step_7["grads"]["b"], step_7["loss"]]
    row = csv_out[8].split(",")
    assert [float(v) for v in row[:9]] == expected
    assert row[9:] == ["7", "7", "0"]  # a full-batch step is one epoch of one batch
    listed = _run(stack, "jobs", "--limit", "50").stdout
    assert job_id in listed and "succeeded" in listed


# 40 of 50 rows for training, 10 held out; val_loss at steps 0, 5, 10 and the last, 11.
EVAL_SPEC = {
    "data": {"synthetic": {"n": 50, "d": 2, "seed": 3}},
    "steps": 12,
    "eval": {"holdout": 0.2, "every": 5},
    "device": "cpu",
}
EVALUATED = [0, 5, 10, 11]


def test_a_job_with_eval_shows_val_loss_in_watch_steps_show_and_jobs(
    stack: Stack, client: Client
) -> None:
    job = client.wait(client.submit(EVAL_SPEC)["id"], timeout=60)
    assert job["status"] == "succeeded"
    job_id, result = job["id"], job["result"]
    records = list(client.steps(job_id))
    assert [r["step"] for r in records if "val_loss" in r] == EVALUATED

    # A line per step: val_loss where evaluated, blank (the same width) where not.
    lines = _run(stack, "watch", job_id, "--lines").stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 12 and len({line.index("|grad|") for line in steps}) == 1
    for line, record in zip(steps, records, strict=True):
        if "val_loss" in record:
            assert f"  val_loss {_f32(record['val_loss'])} " in line
        else:
            assert "val_loss" not in line
    assert lines[-1].startswith("succeeded: ") and '"val_loss": ' in lines[-1]
    bar = _run(stack, "watch", job_id, "--progress").stdout
    assert f"val_loss {_f32(records[-1]['val_loss'])}" in bar
    assert bar.rstrip().endswith(
        f"succeeded: ran all 12 steps; val_loss {_loss(result['val_loss'])}"
    )

    # CSV: val_loss after every other column, empty at the steps that were not evaluated.
    csv_out = _run(stack, "steps", job_id, "--format", "csv").stdout.splitlines()
    assert csv_out[0] == "w_0,w_1,grad_w_0,grad_w_1,loss,step,epoch,batch,val_loss"
    for line, record in zip(csv_out[1:], records, strict=True):
        cells = line.split(",")
        assert cells[5] == str(record["step"]) and float(cells[4]) == record["loss"]
        assert cells[-1] == (repr(record["val_loss"]) if "val_loss" in record else "")

    shown = json.loads(_run(stack, "show", job_id).stdout)["result"]
    assert shown["val_loss"] == result["val_loss"] == result["metrics"]["val"]["mse"]
    assert set(shown["metrics"]) == {"train", "val"}
    listed = _run(stack, "jobs", "--limit", "100").stdout.splitlines()
    assert listed[0].split()[4:8] == ["FINAL", "LOSS", "VAL", "LOSS"]
    row = next(line for line in listed if line.startswith(job_id)).split()
    assert row[4:6] == [_loss(result["full_loss"]), _loss(result["val_loss"])]


def test_watch_exits_non_zero_on_a_diverged_job(stack: Stack, client: Client) -> None:
    job = client.submit({**SEED_EXAMPLE, "optimizer": {"lr": 1e30}, "steps": 50})
    out = _run(stack, "watch", job["id"], "--lines")
    assert out.returncode == 1
    assert "diverged" in out.stdout.splitlines()[-1]


def test_watch_with_a_progress_bar(stack: Stack, client: Client) -> None:
    job = client.submit({**SEED_EXAMPLE, "steps": 200})
    out = _run(stack, "watch", job["id"], "--progress")
    assert out.returncode == 0, out.stderr
    assert "200/200" in out.stdout and "loss" in out.stdout and "|grad|" in out.stdout
    assert out.stdout.rstrip().endswith("succeeded: ran all 200 steps")


def test_cancel_and_workers(stack: Stack, client: Client) -> None:
    queued = client.submit({**SEED_EXAMPLE, "device": "cuda"})  # no gpu worker: it waits
    out = _run(stack, "cancel", queued["id"])
    assert out.returncode == 0 and out.stdout.strip() == "cancelled"
    again = _run(stack, "cancel", queued["id"])
    assert again.returncode == 1 and "already finished" in again.stderr
    workers = [line.rstrip() for line in _run(stack, "workers").stdout.splitlines()]
    assert workers[0].split() == ["NAME", "DEVICE", "QUEUES", "JOB", "HEARTBEAT"]
    cpu = next(line for line in workers[1:] if line.startswith("cpu"))
    assert re.search(r" cpu +cpu +— +\d+ s ago$", cpu), cpu
    assert "None" not in "\n".join(workers)


@pytest.mark.parametrize("command", [["jobs"], ["workers"], ["show", "0" * 32]])
def test_a_wrong_key_is_one_line_saying_which_key_to_use(stack: Stack, command: list[str]) -> None:
    out = _run(stack, *command, key="not-a-key-of-anyone")
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "error: invalid API key: set GRADSTREAM_API_KEY or --api-key to a key of this API "
        "(`gradstream up` prints its key)"
    ]


@pytest.mark.parametrize("command", [["show"], ["watch"], ["steps"], ["cancel"]])
def test_an_unknown_job_is_one_line(stack: Stack, command: list[str]) -> None:
    out = _run(stack, *command, "0" * 32)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"error: job '{'0' * 32}' not found (`gradstream jobs` lists yours)"
    ]


def test_a_rejected_spec_prints_each_field_on_its_own_line(stack: Stack) -> None:
    out = _run(stack, "submit", "--synthetic", "10,2", "--lr", "-1", "--steps", "0")
    assert out.returncode == 2
    assert sorted(out.stderr.splitlines()) == [
        "error: spec.optimizer.lr: Input should be greater than 0",
        "error: spec.steps: Input should be greater than or equal to 1",
    ]
    assert out.stdout == ""


def test_submit_watch_exits_1_when_the_job_does_not_succeed(stack: Stack) -> None:
    out = _run(stack, "submit", "--synthetic", "20,2", "--lr", "1e30", "--watch", "--lines")
    assert out.returncode == 1, out.stderr
    assert out.stdout.splitlines()[-1].startswith("diverged: ")
    assert out.stderr == ""
