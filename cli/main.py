"""`gradstream`: start the processes (up, api, worker) and use the API (submit, watch, ...).

The composition root: `api`, `worker` and `up` start processes by module path; every other
command talks to the API over HTTP through api.client.
"""

import csv
import json
import math
import os
import shutil
import signal
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from api.client import Client, GradstreamError
from cli.stack import Stack, visible_gpus
from services.auth import parse_api_keys
from services.config import get_settings
from services.queue import Device

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)

UrlOpt = Annotated[str | None, typer.Option("--url", help="API URL (default: $GRADSTREAM_URL)")]
KeyOpt = Annotated[str | None, typer.Option("--api-key", help="API key ($GRADSTREAM_API_KEY)")]
ProgressOpt = Annotated[
    bool | None,
    typer.Option(
        "--progress/--lines", help="a progress bar (default on a terminal), or a line per step"
    ),
]

# The tutorial's worked example: x=1, y=2, w=1 gives loss 1 and dLoss/dw = -2 at step 0.
SEED_EXAMPLE: dict[str, Any] = {
    "data": {"x": [[1.0]], "y": [2.0]},
    "init": {"w": [1.0]},
    "bias": False,
    "optimizer": {"name": "sgd", "lr": 0.1},
    "steps": 10,
    "device": "cpu",
}


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def worker(
    device: Annotated[str, typer.Option(help="cpu or cuda:N")] = "cpu",
    concurrency: Annotated[int, typer.Option(help="jobs at once (cpu only; a GPU runs 1)")] = 1,
    loglevel: Annotated[str, typer.Option()] = "info",
    metrics_port: Annotated[
        int | None, typer.Option(help="serve this worker's Prometheus metrics on this port")
    ] = None,
) -> None:
    """Start a Celery worker pinned to one device, consuming its queue (cpu or gpu)."""
    try:
        pinned = Device.parse(device)
    except ValueError as exc:
        _fail(str(exc), 2)
    env = {**os.environ, **pinned.pinning_env()}
    if metrics_port is not None:
        # Before the worker imports prometheus_client: its pool processes then write their
        # metrics to files the main process serves (multiprocess mode).
        env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gradstream-metrics-")
        env["GRADSTREAM_WORKER_METRICS_PORT"] = str(metrics_port)
    if pinned.kind == "cuda":
        if pinned.index not in visible_gpus() and not get_settings().cuda_fallback_cpu:
            _fail(f"no GPU {pinned.index} here (nvidia-smi -L lists the GPUs)", 2)
        concurrency = 1  # one job per GPU: jobs would otherwise compete for its memory
    # exec: the worker keeps this pid, so its node name and signals refer to one process.
    name = f"{pinned.kind}{pinned.index if pinned.index is not None else ''}-{os.getpid()}@%h"
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.app",
        "worker",
        "-Q",
        pinned.queue,
        "-c",
        str(concurrency),
        "-P",
        "prefork",
        "-n",
        name,
        "-l",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]
    os.execve(sys.executable, argv, env)


@app.command()
def api(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
) -> None:
    """Start the HTTP API (uvicorn)."""
    settings = get_settings()
    try:
        keys = parse_api_keys(settings.api_keys.get_secret_value())
    except (OSError, ValueError) as exc:
        _fail(f"GRADSTREAM_API_KEYS: {exc}", code=2)
    if not keys and not settings.auth_disabled:
        _fail(
            "no API keys configured: set GRADSTREAM_API_KEYS to tenant:key pairs separated by "
            "commas (or the path of a file of them), or GRADSTREAM_AUTH_DISABLED=1 for "
            "development only",
            code=2,
        )
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "api.main:create_app",
        "--host",
        host,
        "--port",
        str(port),
        "--no-access-log",
    ]
    os.execv(sys.executable, argv)


@app.command()
def up(
    port: Annotated[int, typer.Option(help="API port (0: any free port)")] = 8000,
    demo: Annotated[bool, typer.Option(help="run the tutorial's example, then stop")] = False,
) -> None:
    """Run the local stack: a private redis-server, one CPU worker (+1 per GPU) and the API."""
    started = time.monotonic()
    # SIGTERM (a supervisor, `kill`) stops the stack like Ctrl-C does, through `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run_dir = Path(tempfile.mkdtemp(prefix="gradstream-"))
    stack = Stack(run_dir)
    try:
        typer.echo(f"starting redis-server, workers and the API (logs in {run_dir})")
        stack.start_redis(maxmemory_bytes=get_settings().redis_maxmemory_bytes)
        stack.start_worker("cpu")
        gpus = visible_gpus()
        for index in gpus:
            stack.start_worker(f"cuda:{index}")
        stack.start_api(port or None)
        stack.wait_for_workers({"cpu", "gpu"} if gpus else {"cpu"})
        typer.echo(
            f"ready in {time.monotonic() - started:.1f} s: API {stack.api_url}, "
            f"Redis {stack.redis_url}"
        )
        typer.echo(
            f"  GRADSTREAM_URL={stack.api_url} GRADSTREAM_API_KEY={stack.api_key} gradstream jobs"
        )
        typer.echo(f"  curl -H 'Authorization: Bearer {stack.api_key}' {stack.api_url}/v1/jobs")
        if demo:
            _run_demo(stack.api_url, stack.api_key, started)
        else:
            typer.echo("Ctrl-C stops everything")
            while all(p.poll() is None for _, p in stack.processes):
                time.sleep(0.5)
            dead = [name for name, p in stack.processes if p.poll() is not None]
            _fail(f"{', '.join(dead)} exited; logs in {run_dir}")
    except KeyboardInterrupt:
        typer.echo("stopping")
    except (TimeoutError, RuntimeError) as exc:
        _fail(f"{exc} (logs in {run_dir})")
    finally:
        stack.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def _run_demo(url: str, api_key: str, started: float) -> None:
    with Client(url, api_key) as client:
        typer.echo(f"submitting the tutorial's example: {json.dumps(SEED_EXAMPLE)}")
        job = client.submit(SEED_EXAMPLE)
        typer.echo(f"job {job['id']}: {job['status']} on {job['device']}")
        first = True
        for event in client.stream(job["id"]):
            if event.event == "step":
                if first:
                    typer.echo(f"(first step {time.monotonic() - started:.1f} s after start)")
                    first = False
                typer.echo(_format_step(event.data))
            elif event.event == "done":
                view = event.data
                typer.echo(
                    f"job {view['id']} {view['status']}: result {json.dumps(view['result'])}"
                )
                if view["status"] != "succeeded":
                    raise typer.Exit(1)


def _f32(value: float | None) -> str:
    """The shortest decimal that reads back as the same float32 (the API sends exact float64s)."""
    if value is None:
        return "nan"
    for digits in range(1, 10):
        text = f"{value:.{digits}g}"
        if struct.unpack("f", struct.pack("f", float(text)))[0] == value:
            break
    return text if any(c in text for c in ".en") else text + ".0"


def _f32s(values: Any) -> str:
    if isinstance(values, list):
        return "[" + ", ".join(_f32s(v) for v in values) + "]"
    return _f32(values)


def _format_step(step: dict[str, Any]) -> str:
    grads, params = step["grads"], step["params"]
    text = (
        f"step {step['step']:>4}  loss {_f32(step['loss']):<12}"
        f"  dLoss/dw {_f32s(grads['w'])}  w {_f32s(params['w'])}"
    )
    if "b" in grads:
        text += f"  dLoss/db {_f32s(grads['b'])}  b {_f32s(params['b'])}"
    return text


def _client(url: str | None, api_key: str | None) -> Client:
    return Client(url, api_key)


@app.command()
def submit(
    spec_file: Annotated[
        str | None, typer.Argument(help="a JobSpec file (JSON, or YAML by its suffix), - for stdin")
    ] = None,
    synthetic: Annotated[
        str | None, typer.Option(help="synthetic data N,D (instead of a spec file's data)")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="steps to run")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate")] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd, adam or adamw")] = None,
    bias: Annotated[bool | None, typer.Option("--bias/--no-bias", help="learn b")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto")] = None,
    watch_job: Annotated[bool, typer.Option("--watch", help="follow it until it ends")] = False,
    progress: ProgressOpt = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Submit a job from a spec file and/or flags (flags override the file); print its id."""
    spec: dict[str, Any] = {}
    if spec_file is not None:
        text = sys.stdin.read() if spec_file == "-" else Path(spec_file).read_text()
        is_yaml = spec_file.endswith((".yaml", ".yml"))
        spec = yaml.safe_load(text) if is_yaml else json.loads(text)
    if synthetic is not None:
        n, d = (int(v) for v in synthetic.split(","))
        spec["data"] = {"synthetic": {"n": n, "d": d}}
    if "data" not in spec:
        _fail("give a spec file with data, or --synthetic N,D", code=2)
    optimizer_spec = dict(spec.get("optimizer") or {})
    for key, value in (("lr", lr), ("name", optimizer)):
        if value is not None:
            optimizer_spec[key] = value
    if optimizer_spec:
        spec["optimizer"] = optimizer_spec
    for key, value in (("steps", steps), ("bias", bias), ("device", device)):
        if value is not None:
            spec[key] = value
    with _client(url, api_key) as client:
        try:
            job = client.submit(spec)
        except GradstreamError as exc:
            _fail(str(exc))
        typer.echo(job["id"])
        if watch_job:
            _watch(client, job["id"], progress)


def _watch(client: Client, job_id: str, progress: bool | None = None) -> None:
    """Follow a job's events until `done`: a progress bar with the loss and the gradient norm,
    or a line per step. Exit 1 unless the job succeeded."""
    if progress is None:
        progress = sys.stdout.isatty()
    view = _watch_with_bar(client, job_id) if progress else _watch_lines(client, job_id)
    if view["status"] != "succeeded":
        raise typer.Exit(1)


def _watch_lines(client: Client, job_id: str) -> dict[str, Any]:
    for event in client.stream(job_id):
        if event.event == "step":
            typer.echo(_format_step(event.data))
        elif event.event == "status":
            typer.echo(f"status: {event.data['status']}")
        elif event.event == "done":
            view: dict[str, Any] = event.data
            typer.echo(f"{view['status']}: {json.dumps(view['result'] or view['error'])}")
            return view
    raise GradstreamError(0, "the stream ended without done")


def _grad_norm(step: dict[str, Any]) -> float:
    values = [v for v in _flat(step["grads"].values()) if v is not None]
    return math.sqrt(sum(v * v for v in values))


def _flat(values: Any) -> list[float | None]:
    out: list[float | None] = []
    for value in values:
        out.extend(_flat(value) if isinstance(value, list) else [value])
    return out


def _watch_with_bar(client: Client, job_id: str) -> dict[str, Any]:
    total = client.get(job_id)["spec"]["steps"]
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TextColumn("loss {task.fields[loss]}  |grad| {task.fields[grad]}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=Console(force_terminal=True)) as bar:
        task = bar.add_task(job_id[:12], total=total, status="", loss="-", grad="-")
        for event in client.stream(job_id):
            if event.event == "step":
                step = event.data
                bar.update(
                    task,
                    completed=step["step"] + 1,
                    loss=_f32(step["loss"]),
                    grad=f"{_grad_norm(step):.4g}",
                )
            elif event.event == "status":
                bar.update(task, status=event.data["status"])
            elif event.event == "done":
                view: dict[str, Any] = event.data
                bar.update(task, status=view["status"], completed=view["steps_done"])
                bar.stop()
                typer.echo(f"{view['status']}: {view.get('stop_reason') or ''}")
                return view
    raise GradstreamError(0, "the stream ended without done")


@app.command()
def watch(
    job_id: str, progress: ProgressOpt = None, url: UrlOpt = None, api_key: KeyOpt = None
) -> None:
    """Follow a job live until it ends (resumes after a dropped connection); exit 1 unless it
    succeeded."""
    with _client(url, api_key) as client:
        try:
            _watch(client, job_id, progress)
        except GradstreamError as exc:
            _fail(str(exc))


@app.command()
def show(
    job_id: str,
    explain: Annotated[
        bool, typer.Option(help="the step's computational graph (a job with record.explain)")
    ] = False,
    step: Annotated[int, typer.Option(help="the step --explain shows")] = 0,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Print a job as JSON, or with --explain one step's backpropagation, node by node."""
    with _client(url, api_key) as client:
        try:
            if not explain:
                typer.echo(json.dumps(client.get(job_id), indent=2))
                return
            record = next(iter(client.steps(job_id, after=step - 1, page=1)), None)
        except GradstreamError as exc:
            _fail(str(exc))
        if record is None or record["step"] != step:
            _fail(f"job {job_id} has no step {step} stored")
        if "explain" not in record:
            _fail(f"job {job_id} was not run with record.explain: true")
        typer.echo(_format_explain(record))


def _format_explain(record: dict[str, Any]) -> str:
    graph = record["explain"]
    lines = [f"step {record['step']}: the computational graph, as autograd saw it"]
    for node in graph["nodes"]:
        lines.append(f"  {node['node']:<5} = {node['op']:<13} = {_f32s(node['value'])}")
        lines.append(f"        dLoss/d{node['node']} = {_f32s(node['grad'])}  (flowing in)")
        for name, value in node["local"].items():
            top, bottom = name.split("/")
            lines.append(f"        local d{top}/d{bottom} = {_f32s(value)}")
    chain = graph["chain"]
    lines.append(f"  chain rule: {chain['rule']}")
    for name in ("w", "b"):
        if name in chain:
            lines.append(f"    dLoss/d{name} = {_f32s(chain[name])}")
    return "\n".join(lines)


@app.command()
def jobs(
    status: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option()] = 20,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """List your jobs, newest first, as a table."""
    with _client(url, api_key) as client:
        try:
            listed = client.jobs(status, limit)
        except GradstreamError as exc:
            _fail(str(exc))
    table = Table("job", "status", "device", "steps", "created", "why it ended", box=None)
    table.columns[0].no_wrap = True
    for job in listed:
        steps = f"{job['steps_done']}/{job['spec']['steps']}"
        ended = job.get("stop_reason") or ""
        table.add_row(job["id"], job["status"], job["device"], steps, job["created_at"], ended)
    Console(width=max(160, shutil.get_terminal_size().columns)).print(table)


@app.command()
def cancel(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Cancel a job."""
    with _client(url, api_key) as client:
        try:
            typer.echo(client.cancel(job_id)["status"])
        except GradstreamError as exc:
            _fail(str(exc))


@app.command()
def delete(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Delete an ended job: its record, steps and checkpoint (cancel a running one first)."""
    with _client(url, api_key) as client:
        try:
            client.delete(job_id)
        except GradstreamError as exc:
            _fail(str(exc))
        typer.echo(f"deleted {job_id}")


@app.command()
def steps(
    job_id: str,
    format: Annotated[str, typer.Option(help="jsonl or csv")] = "jsonl",
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Export a job's stored steps."""
    with _client(url, api_key) as client:
        records = client.steps(job_id)
        if format == "jsonl":
            for record in records:
                typer.echo(json.dumps(record))
            return
        writer = csv.writer(sys.stdout)
        writer.writerow(["step", "loss", "grads", "params"])
        for record in records:
            writer.writerow(
                [
                    record["step"],
                    record["loss"],
                    json.dumps(record["grads"]),
                    json.dumps(record["params"]),
                ]
            )


@app.command()
def workers(url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """List live workers."""
    with _client(url, api_key) as client:
        for w in client.workers():
            typer.echo(
                f"{w['name']}  {w['device']:<7}  {','.join(w['queues']):<4}  job {w['current_job']}"
            )


if __name__ == "__main__":
    app()
