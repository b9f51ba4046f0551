"""`gradstream sweep …` and `gradstream sweeps` against the real stack, through the CLI's own
process: submit and watch (a line per event off a terminal, a live leaderboard on one), the
list, show, cancel and delete, a sweep ranked by val_loss, and errors as one line each."""

import json
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from api.client import Client
from cli.main import _loss
from cli.stack import Stack, stop_process
from tests.conftest import HELD_OUT_SWEEP, SEED_EXAMPLE
from tests.faults import endless_spec
from tests.test_cli import _run

# The tutorial's problem at three learning rates: loss_k = (1 - 2 lr)^(2k), so at the rung of
# 2 steps (the loss of step 1: 0.36, 0.64, 0.9604) lr 0.2 goes on and the others are pruned;
# 3 * 2 + 8 = 14 member-steps in all.
HALVING = {
    "name": "seed lrs",
    "base": SEED_EXAMPLE,
    "grid": {"optimizer.lr": [0.1, 0.01, 0.2]},
    "early_stop": {"name": "successive_halving", "min_steps": 2, "eta": 3},
}
# Runs until cancelled, however fast the machine.
ENDLESS = {"base": endless_spec(), "grid": {"optimizer.lr": [0.001, 0.01]}}
PROGRESS_LINE = re.compile(r"^member-steps (\d+)/(\d+)  (\d+ [a-z]+(, \d+ [a-z]+)*)(  best .*)?$")


def _spec_file(tmp_path: Path, spec: dict[str, Any], name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec) if name.endswith(".yaml") else json.dumps(spec))
    return path


def _row(line: str) -> list[str]:
    return line.split()


def test_sweep_file_watch_prints_a_line_per_event_then_the_leaderboard(
    stack: Stack, client: Client, tmp_path: Path
) -> None:
    out = _run(stack, "sweep", str(_spec_file(tmp_path, HALVING)), "--watch", "--lines")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    sweep_id = lines[0]
    assert len(sweep_id) == 32
    view = client.sweep(sweep_id)
    lr_01, lr_001, lr_02 = (member["id"] for member in view["members"])
    best = view["best"]
    assert best["id"] == lr_02
    assert lines[1:4] == ["3 members in 1 group: queued", "status: queued", "status: running"]
    progress = [line for line in lines if line.startswith("member-steps")]
    assert progress and all(PROGRESS_LINE.match(line) for line in progress), progress
    done = [int(found[1]) for line in progress if (found := PROGRESS_LINE.match(line))]
    assert done == sorted(done)
    assert progress[-1].startswith(
        f"member-steps 14/14  1 succeeded, 2 pruned  best {lr_02} loss "
    ), progress[-1]
    assert progress[-1].endswith(" (optimizer.lr=0.2)")
    table = lines[lines.index(progress[-1]) + 1 :]
    assert _row(table[0]) == [
        "RANK",
        "ID",
        "optimizer.lr",
        "STATUS",
        "STEPS",
        "LOSS",
        "FINAL",
        "LOSS",
    ]
    final = _loss(best["final_loss"])
    loss_01, loss_001, loss_02 = (_loss(member["loss"]) for member in view["members"])
    assert _row(table[1]) == ["1", lr_02, "0.2", "succeeded", "10/10", loss_02, final]
    assert _row(table[2]) == ["2", lr_01, "0.1", "pruned", "2/10", loss_01, "—"]
    assert _row(table[3]) == ["3", lr_001, "0.01", "pruned", "2/10", loss_001, "—"]
    assert (loss_01, loss_001) == ("0.6399999", "0.96040004")  # (1 - 2 lr)^2, float32
    assert table[4:] == [
        "ranked by final loss (else the last loss)",
        f"succeeded: 1 succeeded, 2 pruned; best {lr_02} final loss {final} (optimizer.lr=0.2)",
    ]
    assert out.stderr == ""


def test_sweep_watch_with_a_live_leaderboard(stack: Stack, client: Client, tmp_path: Path) -> None:
    spec = _spec_file(tmp_path, HALVING, "sweep.json")
    out = _run(stack, "sweep", "submit", str(spec), "--watch", "--progress", "--top", "2")
    assert out.returncode == 0, out.stderr
    assert "14/14" in out.stdout and "member-steps" in out.stdout and "RANK" in out.stdout
    best = client.sweep(out.stdout.splitlines()[0])["best"]
    assert out.stdout.rstrip().endswith(
        f"succeeded: 1 succeeded, 2 pruned; best {best['id']} final loss "
        f"{_loss(best['final_loss'])} (optimizer.lr=0.2)"
    )


def test_sweep_watch_exits_1_when_no_member_succeeds(stack: Stack, tmp_path: Path) -> None:
    diverging = {"base": SEED_EXAMPLE, "grid": {"optimizer.lr": [1e30, 1e31]}}
    out = _run(stack, "sweep", "submit", str(_spec_file(tmp_path, diverging)), "--watch", "--lines")
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-2:] == ["ranked by final loss (else the last loss)", "failed: 2 diverged"]
    assert [_row(line)[3:] for line in lines[-4:-2]] == [["diverged", "2/10", "nan", "—"]] * 2
    assert out.stderr == ""


def test_sweeps_lists_them_and_sweep_show_ranks_the_members(stack: Stack, client: Client) -> None:
    view = client.wait_sweep(client.submit_sweep(HALVING)["id"], timeout=60)
    lr_01, lr_001, lr_02 = (member["id"] for member in view["members"])
    final = _loss(view["best"]["final_loss"])
    listed = _run(stack, "sweeps", "--limit", "100")
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()
    assert _row(rows[0]) == [
        "ID",
        "NAME",
        "STATUS",
        "MEMBERS",
        "COUNTS",
        "METRIC",
        "BEST",
        "CREATED",
    ]
    row = next(line for line in rows if line.startswith(view["id"]))
    created = view["created_at"][:19] + "Z"  # to the second, in UTC
    assert _row(row) == [
        view["id"],
        "seed",
        "lrs",
        "succeeded",
        "3",
        "1",
        "succeeded,",
        "2",
        "pruned",
        "loss",
        final,
        created,
    ]
    shown = _run(stack, "sweep", "show", view["id"])
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"sweep {view['id']} (seed lrs): succeeded"
    assert re.fullmatch(r"created \S+Z, started \S+Z, finished \S+Z", lines[1]), lines[1]
    assert lines[2:5] == [
        "3 members in 1 group: 1 succeeded, 2 pruned",
        f"best {lr_02}: final loss {final} (optimizer.lr=0.2)",
        "",
    ]
    assert [_row(line)[:5] for line in lines[6:9]] == [
        ["1", lr_02, "0.2", "succeeded", "10/10"],
        ["2", lr_01, "0.1", "pruned", "2/10"],
        ["3", lr_001, "0.01", "pruned", "2/10"],
    ]
    assert lines[9:] == ["ranked by final loss (else the last loss)"]
    as_json = json.loads(_run(stack, "sweep", "show", view["id"], "--json").stdout)
    assert as_json["id"] == view["id"] and as_json["groups"] == 1


def test_a_sweep_with_eval_is_ranked_by_val_loss_with_its_columns(
    stack: Stack, client: Client, tmp_path: Path
) -> None:
    out = _run(stack, "sweep", str(_spec_file(tmp_path, HELD_OUT_SWEEP)), "--watch", "--lines")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    view = client.sweep(lines[0])
    assert view["spec"]["metric"] == "val_loss"
    lr_01, lr_0001, lr_001 = view["members"]
    assert view["best"]["id"] == lr_0001["id"]
    # By construction the training loss orders them the other way round.
    assert lr_01["final_loss"] < lr_001["final_loss"] < lr_0001["final_loss"]
    final_val = _loss(view["best"]["final_val_loss"])

    progress = [line for line in lines if line.startswith("member-steps")]
    assert progress[-1].startswith(
        f"member-steps 30/30  3 succeeded  best {lr_0001['id']} val_loss "
    ), progress[-1]
    table = lines[lines.index(progress[-1]) + 1 :]
    assert _row(table[0]) == [
        "RANK",
        "ID",
        "optimizer.lr",
        "STATUS",
        "STEPS",
        *("LOSS", "VAL", "LOSS", "FINAL", "LOSS", "FINAL", "VAL", "LOSS"),
    ]
    rows = [_row(line) for line in table[1:4]]
    assert [(row[1], row[2]) for row in rows] == [
        (lr_0001["id"], "0.001"),
        (lr_001["id"], "0.01"),
        (lr_01["id"], "0.1"),
    ]
    for row, member in zip(rows, (lr_0001, lr_001, lr_01), strict=True):
        assert row[3:] == [
            "succeeded",
            "10/10",
            _loss(member["loss"]),
            _loss(member["val_loss"]),
            _loss(member["final_loss"]),
            _loss(member["final_val_loss"]),
        ]
    assert table[4:] == [
        "ranked by final val_loss (else the last evaluated val_loss)",
        f"succeeded: 3 succeeded; best {lr_0001['id']} final val_loss {final_val} "
        "(optimizer.lr=0.001)",
    ]

    shown = _run(stack, "sweep", "show", view["id"]).stdout.splitlines()
    assert shown[3] == f"best {lr_0001['id']}: final val_loss {final_val} (optimizer.lr=0.001)"
    assert [_row(line)[1] for line in shown[6:9]] == [row[1] for row in rows]
    listed = _run(stack, "sweeps", "--limit", "100").stdout.splitlines()
    row = _row(next(line for line in listed if line.startswith(view["id"])))
    assert row[-3:-1] == ["val_loss", final_val]


def test_sweep_cancel_and_delete(stack: Stack, client: Client, tmp_path: Path) -> None:
    out = _run(stack, "sweep", str(_spec_file(tmp_path, ENDLESS)))
    assert out.returncode == 0, out.stderr
    sweep_id, members = out.stdout.splitlines()
    assert members == "2 members in 1 group: queued"
    try:
        live = _run(stack, "sweep", "delete", sweep_id)
        assert live.returncode == 1
        assert live.stderr.splitlines()[0].startswith(f"error: sweep {sweep_id} is ")
        assert live.stderr.splitlines()[0].endswith(": cancel it first (HTTP 409)")
        cancelled = _run(stack, "sweep", "cancel", sweep_id)
        assert cancelled.returncode == 0, cancelled.stderr
        assert re.fullmatch(r"(running|cancelled): .*cancel.*", cancelled.stdout.strip())
    finally:
        view = client.wait_sweep(sweep_id, timeout=30)
    assert view["status"] == "cancelled"
    again = _run(stack, "sweep", "cancel", sweep_id)
    assert again.returncode == 1
    assert again.stderr.splitlines() == [
        f"error: sweep {sweep_id} has already ended (cancelled) (HTTP 409)"
    ]
    deleted = _run(stack, "sweep", "delete", sweep_id)
    assert deleted.returncode == 0 and deleted.stdout == f"deleted {sweep_id}\n"
    gone = _run(stack, "sweep", "show", sweep_id)
    assert gone.returncode == 2
    assert gone.stderr.splitlines() == [
        f"error: sweep {sweep_id} not found (`gradstream sweeps` lists yours)"
    ]


@pytest.mark.parametrize("command", [["show"], ["watch"], ["cancel"], ["delete"]])
def test_an_unknown_sweep_is_one_line(stack: Stack, command: list[str]) -> None:
    out = _run(stack, "sweep", *command, "0" * 32)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"error: sweep {'0' * 32} not found (`gradstream sweeps` lists yours)"
    ]


def test_a_rejected_sweep_prints_each_field_on_its_own_line(stack: Stack, tmp_path: Path) -> None:
    bad = {"base": {**SEED_EXAMPLE, "steps": 0}, "grid": {"optimizer.lr": [0.1, -1.0]}}
    out = _run(stack, "sweep", str(_spec_file(tmp_path, bad)))
    assert out.returncode == 2
    assert sorted(out.stderr.splitlines()) == [
        "error: spec.base.steps: Input should be greater than or equal to 1",
        "error: spec.grid.optimizer.lr[1]: Input should be greater than 0",
    ]
    assert out.stdout == ""


def test_a_file_that_holds_no_sweep_spec(stack: Stack, tmp_path: Path) -> None:
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    out = _run(stack, "sweep", str(listed))
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"error: {listed} holds no SweepSpec: it must be a mapping with `base` and a `grid` "
        "or `random`"
    ]


def test_sweep_watch_resumes_when_the_api_restarts(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # An API of its own (same Redis), killed and started again on its port mid-watch.
    api = Stack(tmp_path_factory.mktemp("sweep-watch"), tenants=("ivy",))
    api.redis_url = stack.redis_url
    lines: queue.Queue[str] = queue.Queue()

    def next_progress(timeout: float) -> str:
        while True:
            line = lines.get(timeout=timeout)
            if line.startswith("member-steps"):
                return line

    try:
        port = int(api.start_api().rsplit(":", 1)[1])
        with Client(api.api_url, api.api_key, timeout=10) as ivy:
            sweep_id = ivy.submit_sweep(ENDLESS)["id"]
            argv = [sys.executable, "-m", "cli.main", "sweep", "watch", sweep_id, "--lines"]
            env = api.env(GRADSTREAM_URL=api.api_url, GRADSTREAM_API_KEY=api.api_key)
            with subprocess.Popen(
                argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            ) as watcher:
                try:
                    assert watcher.stdout is not None and watcher.stderr is not None
                    stdout = watcher.stdout
                    reader = threading.Thread(
                        target=lambda: [lines.put(line.rstrip("\n")) for line in stdout]
                    )
                    reader.start()
                    # Two events, so that a replay from the start would go back to the first.
                    seen = [next_progress(30), next_progress(30)]
                    stop_process(api.api_process, grace=0)  # the API dies mid-stream
                    api.start_api(port)
                    seen.append(next_progress(30))  # after the reconnect
                    ivy.cancel_sweep(sweep_id)
                    watcher.wait(30)
                    reader.join(10)  # the reader has had every line
                    stderr = watcher.stderr.read()
                finally:
                    watcher.kill()
        assert watcher.returncode == 1, stderr  # cancelled: not a success
        assert stderr == ""
        while not lines.empty():
            seen.append(lines.get())
        assert seen[-1] == "cancelled: 2 cancelled"
        progress = [line for line in seen if line.startswith("member-steps")]
        done = [int(found[1]) for line in progress if (found := PROGRESS_LINE.match(line))]
        assert len(done) == len(progress), progress
        # Resumed after the last event seen (Last-Event-ID), not replayed from the start.
        assert done == sorted(done), done
    finally:
        api.stop()
