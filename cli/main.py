"""`gradstream`: start the processes (up, api, worker) and use the API (submit, watch, ...).

`api`, `worker` and `up` start processes by module path; every other command talks to the API
over HTTP through api.client. Every error a command raises ends in `Cli.main`, which prints it
as one line on stderr (a traceback only with --debug).
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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from api.client import TERMINAL, Client, Event, GradstreamError
from cli.stack import (
    FolderInUse,
    Stack,
    lock_data_dir,
    stored_api_key,
    visible_gpus,
)
from services.auth import parse_api_keys
from services.config import default_data_dir, get_settings
from services.queue import Device
from services.schemas import JobSpec, JobStatus

HELP = (
    "gradstream trains linear-regression models as a service and shows every step's loss, "
    "gradients and parameters live. `gradstream up` runs it on this machine; the other "
    "commands talk to its API (GRADSTREAM_URL, GRADSTREAM_API_KEY)."
)

# Exit codes: 2 for a usage error (bad flags, a bad spec, a bad key, an unknown job: the command
# as typed cannot work), 1 for the rest (a job that did not succeed, the API down or failing).
USAGE = 2
FAILED = 1


@dataclass
class Options:
    """The global options, shared with the error handler through click's context object."""

    debug: bool = False


class Cli(TyperGroup):
    """gradstream's command group: the one place where errors become lines on stderr."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        options = Options()
        try:
            result = super().main(
                args,
                prog_name,
                complete_var,
                standalone_mode=False,
                windows_expand_args=windows_expand_args,
                obj=options,
                **extra,
            )
            code = result if isinstance(result, int) else 0
        except typer.Abort:
            _print_error("aborted")
            code = FAILED
        except typer.TyperException as exc:  # click's (typer's copy) usage errors, CommandError
            # With no arguments the help is printed already (typer's own check, by name too).
            if type(exc).__name__ != "NoArgsIsHelpError":
                ctx = getattr(exc, "ctx", None)  # a usage error's command
                hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
                _print_error(exc.format_message() + hint)
            code = exc.exit_code
        except Exception as exc:
            if options.debug:
                raise
            lines, code = explain_error(exc)
            for line in lines:
                _print_error(line)
        if standalone_mode:
            sys.exit(code)
        return code


def _print_error(line: str) -> None:
    typer.echo(f"error: {line}", err=True)


def _api_url(exc: httpx.RequestError) -> str:
    try:
        url = exc.request.url
    except RuntimeError:  # raised outside a request: no URL to name
        return "the API"
    return str(url.copy_with(path="/", query=None, fragment=None)).rstrip("/")


def explain_error(exc: Exception) -> tuple[list[str], int]:
    """What to tell the user about an error a command raised, a line each, and the exit code."""
    if isinstance(exc, GradstreamError):
        return _explain_answer(exc)
    if isinstance(exc, httpx.ConnectError):
        url = _api_url(exc)
        return [
            f"cannot reach the API at {url}: is `gradstream up` running? "
            "(set GRADSTREAM_URL or --url to its address)"
        ], FAILED
    if isinstance(exc, httpx.TimeoutException):
        return [f"the API at {_api_url(exc)} did not answer in time: try again"], FAILED
    if isinstance(exc, httpx.TransportError):
        return [f"lost the connection to the API at {_api_url(exc)}: {exc}"], FAILED
    if isinstance(exc, TimeoutError | RuntimeError):
        return [str(exc)], FAILED
    return [f"{type(exc).__name__}: {exc} (gradstream --debug ... shows where)"], FAILED


def _explain_answer(exc: GradstreamError) -> tuple[list[str], int]:
    detail = exc.detail
    status = exc.status_code
    if status == 422 and isinstance(detail, list):
        return [f"{_field(e.get('loc', []))}: {e.get('msg', e)}" for e in detail], USAGE
    text = detail if isinstance(detail, str) else json.dumps(detail)
    if status == 401:
        return [
            f"{text}: set GRADSTREAM_API_KEY or --api-key to a key of this API "
            "(`gradstream up` prints its key)"
        ], USAGE
    if status == 404:
        listing = "sweeps" if text.startswith("sweep ") else "jobs"
        return [f"{text} (`gradstream {listing}` lists yours)"], USAGE
    if status in (400, 403, 413):
        return [f"{text} (HTTP {status})"], USAGE
    return [f"{text} (HTTP {status})"], FAILED


def _field(loc: list[Any]) -> str:
    """A validation error's location as the user wrote it: `spec.optimizer.lr`, `spec.data.x[0]`
    for the body of a submit, `--status` for a query parameter."""
    if len(loc) == 2 and loc[0] == "query":
        return f"--{loc[1]}"
    head = "spec" if loc[:1] == ["body"] else str(loc[0]) if loc else "request"
    for part in loc[1:]:
        head += f"[{part}]" if isinstance(part, int) else f".{part}"
    return head


class CommandError(typer.TyperException):
    """What a command tells the user when it cannot go on: one line, and the exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _fail(message: str, code: int = FAILED) -> NoReturn:
    raise CommandError(message, code)


app = typer.Typer(
    cls=Cli,
    no_args_is_help=True,
    add_completion=False,
    help=HELP,
    pretty_exceptions_show_locals=False,  # locals hold API keys
)


@app.callback(help=HELP)
def _global_options(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="show a traceback on errors")] = False,
) -> None:
    ctx.ensure_object(Options).debug = debug


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
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="API processes sharing the port; each reads a watched job from Redis once "
            "for all of its SSE clients (default: uvicorn's, $WEB_CONCURRENCY or 1)",
        ),
    ] = None,
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
    if workers is not None:
        argv += ["--workers", str(workers)]
    os.execv(sys.executable, argv)


DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="where Redis's AOF, the logs and the API key live between runs "
        "(default: $XDG_DATA_HOME/gradstream or ~/.local/share/gradstream; "
        "with --demo: a temporary folder)",
    ),
]


def _stop_on_sigterm(*_: object) -> None:
    raise KeyboardInterrupt  # stop the way Ctrl-C does, through `finally`


@app.command()
def up(
    port: Annotated[int, typer.Option(help="API port (0: any free port)")] = 8000,
    demo: Annotated[bool, typer.Option(help="run the tutorial's example, then stop")] = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Run the local stack: a private redis-server, one CPU worker (+1 per GPU) and the API."""
    started = time.monotonic()
    # A background job of a non-interactive shell (`gradstream up &` in a script) starts with
    # SIGINT ignored, and Python keeps it so: install the handler explicitly, so that Ctrl-C
    # and `kill -INT` stop the stack. SIGTERM (a supervisor, `kill`) stops it the same way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    throwaway = demo and data_dir is None
    folder = Path(tempfile.mkdtemp(prefix="gradstream-")) if throwaway else data_dir
    folder = folder or default_data_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = lock_data_dir(folder)
    except FolderInUse as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot use {folder} as the data folder: {exc.strerror} (try another --data-dir)")
    try:
        api_key = None if throwaway else stored_api_key(folder / "api-key")
    except (OSError, RuntimeError) as exc:
        lock.close()
        _fail(str(exc))
    stack = Stack(folder, api_key=api_key)
    try:
        typer.echo(f"starting redis-server, workers and the API (data and logs in {folder})")
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
        typer.echo(f"  dashboard: {stack.api_url}/#key={stack.api_key}")
        if demo:
            _run_demo(stack.api_url, stack.api_key, started)
        else:
            typer.echo("Ctrl-C stops everything")
            while all(p.poll() is None for _, p in stack.processes):
                time.sleep(0.5)
            dead = [name for name, p in stack.processes if p.poll() is not None]
            _fail(f"{', '.join(dead)} exited; logs in {folder}")
    except KeyboardInterrupt:
        typer.echo("stopping")
    except typer.Exit:  # a RuntimeError too: the demo's job did not succeed
        raise
    except (TimeoutError, RuntimeError) as exc:
        _fail(f"{exc} (logs in {folder})")
    finally:
        # A second Ctrl-C must not cut the stop short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        lock.close()
        if throwaway:
            shutil.rmtree(folder, ignore_errors=True)


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


SHOWN_VALUES = 4  # of a vector, on a step's line; the rest are counted, not printed


def _f32_head(values: list[float | None]) -> str:
    """The first values of a vector, and how many more there are: `[0.1, 0.2, … 8 more]`."""
    shown = ", ".join(_f32(v) for v in values[:SHOWN_VALUES])
    more = len(values) - SHOWN_VALUES
    return f"[{shown}, … {more} more]" if more > 0 else f"[{shown}]"


VAL_LOSS_WIDTH = len("  val_loss ") + 12


def _format_step(step: dict[str, Any], evaluated: bool = False) -> str:
    """One line per step, however wide the model: loss, gradient norm, the first values. A job
    with eval (`evaluated`) has a val_loss column, blank at the steps it was not evaluated; a
    step of a sparse job (record.every) that kept no gradients shows its loss only."""
    val_loss = ""
    if "val_loss" in step:
        val_loss = f"  val_loss {_f32(step['val_loss']):<12}"
    elif evaluated:
        val_loss = " " * VAL_LOSS_WIDTH
    text = f"step {step['step']:>4}  loss {_f32(step['loss']):<12}{val_loss}"
    if "grads" not in step:
        return text
    grads, params = step["grads"], step["params"]
    text += (
        f"  |grad| {_norm(step):<10}  dLoss/dw {_f32_head(grads['w'])}  w {_f32_head(params['w'])}"
    )
    if "b" in grads:
        text += f"  dLoss/db {_f32(grads['b'])}  b {_f32(params['b'])}"
    return text


def _norm(step: dict[str, Any]) -> str:
    """The gradient's Euclidean norm, 4 significant digits; nan if any part was not finite."""
    values = [*step["grads"]["w"], *([step["grads"]["b"]] if "b" in step["grads"] else [])]
    if any(v is None for v in values):
        return "nan"
    return f"{math.sqrt(sum(v * v for v in values)):.4g}"


def _time(text: str) -> str:
    """An API time as the CLI prints every time: ISO 8601 UTC to the second, with Z."""
    return _parse_time(text).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _age(text: str) -> str:
    """How long ago an API time was: `2 s ago`, `5 min ago`, `3 h ago`."""
    seconds = max(0.0, (datetime.now(UTC) - _parse_time(text)).total_seconds())
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def _client(url: str | None, api_key: str | None) -> Client:
    return Client(url, api_key)


JOB_SPEC = "JobSpec: it must be a mapping with `data`, `steps`, …"
SWEEP_SPEC = "SweepSpec: it must be a mapping with `base` and a `grid` or `random`"


def _read_spec(spec_file: str, holds: str = JOB_SPEC) -> dict[str, Any]:
    """A spec (`holds` says which) from a JSON or YAML file (by its suffix), or stdin for `-`."""
    is_yaml = spec_file.endswith((".yaml", ".yml"))
    try:
        text = sys.stdin.read() if spec_file == "-" else Path(spec_file).read_text()
    except OSError as exc:
        _fail(f"cannot read the spec file {spec_file}: {exc.strerror}", USAGE)
    try:
        spec = yaml.safe_load(text) if is_yaml else json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        _fail(f"{spec_file} is not valid JSON: {exc.msg} ({where}; *.yaml is read as YAML)", USAGE)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed"
        _fail(f"{spec_file} is not valid YAML: {problem}{where}", USAGE)
    if not isinstance(spec, dict):
        _fail(f"{spec_file} holds no {holds}", USAGE)
    return spec


def _parse_synthetic(value: str) -> tuple[int, int]:
    parts = value.split(",")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        _fail(
            f"--synthetic takes N,D: samples and features as whole numbers, "
            f"e.g. --synthetic 1000,10 (not {value!r})",
            USAGE,
        )
    return int(parts[0]), int(parts[1])


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
    spec = _read_spec(spec_file) if spec_file is not None else {}
    if synthetic is not None:
        n, d = _parse_synthetic(synthetic)
        spec["data"] = {"synthetic": {"n": n, "d": d}}
    if "data" not in spec:
        _fail("give a spec file with data, or --synthetic N,D", USAGE)
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
        job = client.submit(spec)
        typer.echo(job["id"])
        if watch_job:
            _watch(client, job["id"], progress)


def _watch(client: Client, job_id: str, progress: bool | None = None) -> None:
    """Follow a job's events until `done`: a progress bar with the loss (and val_loss, for a
    job with eval) and the gradient norm, or a line per step. Exit 1 unless the job
    succeeded."""
    if progress is None:
        progress = sys.stdout.isatty()
    spec = client.get(job_id)["spec"]
    view = _watch_with_bar(client, job_id, spec) if progress else _watch_lines(client, job_id, spec)
    if view["status"] != "succeeded":
        raise typer.Exit(FAILED)


def _evaluated(spec: dict[str, Any]) -> bool:
    """Whether a job's records carry val_loss (at its evaluated steps): it has eval."""
    return spec.get("eval") is not None


def _result_val_loss(view: dict[str, Any]) -> str:
    """`; val_loss X` for a finished job with eval (its validation loss at the final
    parameters), else nothing."""
    result = view.get("result") or {}
    if result.get("val_loss") is None:
        return ""
    return f"; val_loss {_loss(result['val_loss'])}"


def _stream_ended(job_id: str) -> NoReturn:
    _fail(f"the event stream ended before job {job_id} did: `gradstream watch {job_id}` resumes")


def _watch_lines(client: Client, job_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    evaluated = _evaluated(spec)
    for event in client.stream(job_id):
        if event.event == "step":
            typer.echo(_format_step(event.data, evaluated))
        elif event.event == "status":
            typer.echo(f"status: {event.data['status']}")
        elif event.event == "done":
            view: dict[str, Any] = event.data
            typer.echo(f"{view['status']}: {json.dumps(view['result'] or view['error'])}")
            return view
    _stream_ended(job_id)


def _watch_with_bar(client: Client, job_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    # A job with eval: the last evaluated step's val_loss beside the loss.
    val_loss = "  val_loss {task.fields[val_loss]}" if _evaluated(spec) else ""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TextColumn(f"loss {{task.fields[loss]}}{val_loss}  |grad| {{task.fields[grad]}}  ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=Console(force_terminal=True)) as bar:
        task = bar.add_task(
            job_id[:12], total=spec["steps"], status="", loss="-", val_loss="-", grad="-"
        )
        for event in client.stream(job_id):
            if event.event == "step":
                step = event.data
                bar.update(
                    task, completed=step["step"] + 1, loss=_f32(step["loss"]), grad=_norm(step)
                )
                if "val_loss" in step:
                    bar.update(task, val_loss=_f32(step["val_loss"]))
            elif event.event == "status":
                bar.update(task, status=event.data["status"])
            elif event.event == "done":
                view: dict[str, Any] = event.data
                bar.update(task, status=view["status"], completed=view["steps_done"])
                bar.stop()
                ended = view.get("stop_reason") or ""
                typer.echo(f"{view['status']}: {ended}{_result_val_loss(view)}")
                return view
    _stream_ended(job_id)


@app.command()
def watch(
    job_id: str, progress: ProgressOpt = None, url: UrlOpt = None, api_key: KeyOpt = None
) -> None:
    """Follow a job live until it ends, resuming if dropped; exit 1 unless it succeeds."""
    with _client(url, api_key) as client:
        _watch(client, job_id, progress)


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
    """Print a job as the API's JSON, or with --explain one step's backpropagation."""
    with _client(url, api_key) as client:
        if not explain:
            typer.echo(json.dumps(client.get(job_id), indent=2))
            return
        record = next(iter(client.steps(job_id, after=step - 1, page=1)), None)
    if record is None or record["step"] != step:
        _fail(f"job {job_id} has no step {step} stored", USAGE)
    if "explain" not in record:
        if "grads" not in record:  # a step of a sparse job (record.every) that keeps its loss
            _fail(f"job {job_id} kept no gradients at step {step} (record.every)", USAGE)
        _fail(f"job {job_id} was not run with record.explain: true", USAGE)
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


def _print_table(table: Table) -> None:
    # Wide enough off a terminal that ids and times are never wrapped or cut.
    Console(width=max(160, shutil.get_terminal_size().columns)).print(table)


@app.command()
def jobs(
    status: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option()] = 20,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """List your jobs, newest first, as a table."""
    with _client(url, api_key) as client:
        listed = client.jobs(status, limit)
    table = Table(
        "ID",
        "STATUS",
        "DEVICE",
        "STEPS",
        "FINAL LOSS",
        "VAL LOSS",
        "CREATED",
        "WHY IT ENDED",
        box=None,
        pad_edge=False,
    )
    table.columns[0].no_wrap = True
    for job in listed:
        steps = f"{job['steps_done']}/{job['spec']['steps']}"
        ended = job.get("stop_reason") or ""
        created = _time(job["created_at"])
        final, val = _final_losses(job)
        table.add_row(job["id"], job["status"], job["device"], steps, final, val, created, ended)
    _print_table(table)


def _final_losses(job: dict[str, Any]) -> tuple[str, str]:
    """A finished job's loss at its final parameters (on the training rows; the last step's
    where the worker did not compute it) and, with eval, its validation loss; `—` for none."""
    result = job.get("result")
    if result is None:
        return UNKNOWN, UNKNOWN
    final = result.get("full_loss")
    final = result["loss"] if final is None else final
    val = _loss(result["val_loss"]) if result.get("val_loss") is not None else UNKNOWN
    return _loss(final), val


@app.command()
def cancel(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Cancel a job."""
    with _client(url, api_key) as client:
        typer.echo(client.cancel(job_id)["status"])


@app.command()
def delete(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Delete an ended job: its record, steps and checkpoint (cancel a running one first)."""
    with _client(url, api_key) as client:
        client.delete(job_id)
    typer.echo(f"deleted {job_id}")


class StepsFormat(StrEnum):
    jsonl = "jsonl"
    csv = "csv"


def csv_header(record: dict[str, Any], evaluated: bool = False) -> list[str]:
    """The CSV columns of a job whose first step is `record`: w_0…, b, grad_w_0…, grad_b,
    loss, step, epoch, batch (b and grad_b only with a bias), then val_loss for a job with
    eval (`evaluated`). val_loss comes last so that every other column keeps its place
    whether or not a job has eval. Step 0 keeps its parameters whatever record.every is."""
    weights = [f"w_{i}" for i in range(len(record["params"]["w"]))]
    bias = ["b"] if "b" in record["params"] else []
    params = weights + bias
    columns = [*params, *(f"grad_{name}" for name in params), "loss", "step", "epoch", "batch"]
    return [*columns, "val_loss"] if evaluated else columns


def csv_row(record: dict[str, Any], evaluated: bool = False, params: int = 0) -> list[Any]:
    """A step's values in csv_header's order. A full-batch step is one epoch of one batch;
    a value that was not finite (null in the API's JSON) is written `nan`; val_loss is empty
    at a step that was not evaluated, and the `params` parameter and as many gradient columns
    at a step of a sparse job (record.every) that kept none."""
    values: list[Any]
    if "params" in record:
        kept, grads = record["params"], record["grads"]
        values = [*kept["w"], *([kept["b"]] if "b" in kept else [])]
        values += [*grads["w"], *([grads["b"]] if "b" in grads else [])]
        values = ["nan" if v is None else v for v in values]
    else:
        values = [""] * (2 * params)
    floats = [*values, "nan" if record["loss"] is None else record["loss"]]
    row = [*floats, record["step"], record.get("epoch", record["step"]), record.get("batch", 0)]
    if evaluated:
        val_loss = record.get("val_loss", "")
        row.append("nan" if val_loss is None else val_loss)
    return row


@app.command()
def steps(
    job_id: str,
    format: Annotated[StepsFormat, typer.Option(help="jsonl (the API's records) or csv")] = (
        StepsFormat.jsonl
    ),
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Export a job's stored steps: a JSON record a line, or CSV with a column per value (and
    val_loss last, empty where not evaluated, for a job with eval)."""
    with _client(url, api_key) as client:
        if format is StepsFormat.jsonl:
            for record in client.steps(job_id):
                typer.echo(json.dumps(record))
            return
        evaluated = _evaluated(client.get(job_id)["spec"])
        writer = csv.writer(sys.stdout, lineterminator="\n")
        params = 0
        for i, record in enumerate(client.steps(job_id)):
            if i == 0:
                header = csv_header(record, evaluated)
                params = header.index("loss") // 2
                writer.writerow(header)
            writer.writerow(csv_row(record, evaluated, params))


@app.command()
def workers(url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """List live workers as a table: device, queues, current job, last heartbeat."""
    with _client(url, api_key) as client:
        listed = client.workers()
    table = Table("NAME", "DEVICE", "QUEUES", "JOB", "HEARTBEAT", box=None, pad_edge=False)
    table.columns[0].no_wrap = True
    for w in listed:
        device = w["device"]
        if device != "cpu" and w.get("device_name"):  # a GPU's model; a CPU's says little
            device += f" ({w['device_name']})"
        queues = ",".join(w["queues"])
        table.add_row(w["name"], device, queues, w["current_job"] or "—", _age(w["heartbeat_at"]))
    _print_table(table)


# Sweeps (DESIGN §9): `gradstream sweep FILE` submits one (and with --watch follows it),
# `gradstream sweeps` lists them, `gradstream sweep show|watch|cancel|delete ID` work on one.


class SweepCommands(TyperGroup):
    """`gradstream sweep`'s subcommands, where a first argument that names none of them is a
    spec file: `gradstream sweep FILE` is `gradstream sweep submit FILE`."""

    # ctx is click's Context, of the copy of click typer carries (typer._click, private).
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and (args[0] == "-" or args[0][:1] != "-"):
            args = ["submit", *args]
        return super().parse_args(ctx, args)


sweep_app = typer.Typer(
    cls=SweepCommands,
    no_args_is_help=True,
    help="Submit a sweep (`gradstream sweep FILE [--watch]`, short for `sweep submit`), or "
    "show, watch, cancel or delete one.",
)
app.add_typer(sweep_app, name="sweep")

TopOpt = Annotated[int, typer.Option("--top", help="members on the leaderboard", min=1)]
LEADERBOARD = 10  # members the watch view shows
UNKNOWN = "—"  # no value yet (a member with no step stored)


@dataclass
class MemberRow:
    """A member as the CLI shows it, kept current from the sweep's events."""

    index: int  # its place in the sweep: ties rank by it
    id: str
    values: dict[str, Any]
    status: str
    steps_done: int
    steps: int  # what it runs unless it is stopped early
    loss: float | None = None  # the last step's
    final_loss: float | None = None  # the result's full-batch loss
    val_loss: float | None = None  # the last evaluated step's (a sweep with eval)
    final_val_loss: float | None = None  # the result's

    def rank_key(self, metric: str = "loss") -> tuple[bool, float, int]:
        """Lower is better: the metric's final value, else its last one; none last."""
        if metric == "val_loss":
            final, last = self.final_val_loss, self.val_loss
        else:
            final, last = self.final_loss, self.loss
        value = final if final is not None else last
        return (value is None, value or 0.0, self.index)


class SweepBoard:
    """A sweep as its watcher sees it: its members' steps, losses and statuses, updated by
    each event of the sweep's stream, ranked by the sweep's metric (DESIGN §11): `loss`, or
    `val_loss` (with val_loss columns, as for any sweep whose base has eval).

    The API's `best` counts values within GRADSTREAM_RANK_RTOL of each other as ties (member
    order decides); this board sorts the values as they are, so two members that near-tie may
    stand in the other order here."""

    def __init__(self, view: dict[str, Any]) -> None:
        self.id: str = view["id"]
        spec = view["spec"]
        self.metric: str = spec.get("metric") or "loss"
        self.evaluated = spec["base"].get("eval") is not None
        default = spec["base"].get("steps", JobSpec.model_fields["steps"].default)
        self.members = {
            m["id"]: MemberRow(
                index,
                m["id"],
                m["values"],
                m["status"],
                m["steps_done"],
                steps=int(m["values"].get("steps", default)),
            )
            for index, m in enumerate(view["members"])
        }
        # The swept paths, in the order the spec gives them.
        self.paths = list(dict.fromkeys(path for m in view["members"] for path in m["values"]))
        self.update(view)

    def update(self, view: dict[str, Any]) -> None:
        """Take in a SweepView (read at the start, and again once `done` says it ended)."""
        self.view = view
        self.status: str = view["status"]
        for member in view["members"]:
            row = self.members.get(member["id"])
            if row is not None:
                row.status, row.steps_done = member["status"], member["steps_done"]
                row.loss, row.final_loss = member["loss"], member["final_loss"]
                row.val_loss = member.get("val_loss")
                row.final_val_loss = member.get("final_val_loss")

    def apply(self, event: Event) -> None:
        if event.event == "status":
            self.status = event.data["status"]
        elif event.event == "progress":
            for member_id, moved in event.data["members"].items():
                row = self.members.get(member_id)
                if row is not None:
                    row.status, row.loss = moved["status"], moved["loss"]
                    row.steps_done = moved["step"] + 1
                    if "val_loss" in moved:  # the flush had an evaluated step
                        row.val_loss = moved["val_loss"]
        elif event.event == "done":  # a summary: the watch reads the whole view for the board
            self.status = event.data["status"]

    def member_steps(self) -> tuple[int, int]:
        """Member-steps done, and in all: a member that ended early counts what it did."""
        rows = self.members.values()
        done = sum(row.steps_done for row in rows)
        total = sum(row.steps_done if row.status in TERMINAL else row.steps for row in rows)
        return done, total

    def ranked(self) -> list[MemberRow]:
        return sorted(self.members.values(), key=lambda row: row.rank_key(self.metric))

    def ranked_by(self) -> str:
        """What the leaderboard is ordered by, in words."""
        last = "last evaluated" if self.metric == "val_loss" else "last"
        return f"ranked by final {self.metric} (else the {last} {self.metric})"

    def counts(self) -> str:
        """Members per status, in the statuses' order: `3 running, 6 pruned`."""
        rows = self.members.values()
        found = {status: sum(row.status == status for row in rows) for status in JobStatus}
        return ", ".join(f"{n} {status}" for status, n in found.items() if n) or "no members"

    def table(self, top: int | None = None) -> Table:
        """The leaderboard: the best `top` members (all by default), best first (ranked_by()
        says by what: a line printed under it)."""
        losses = ["LOSS", "VAL LOSS", "FINAL LOSS", "FINAL VAL LOSS"]
        if not self.evaluated:
            losses = ["LOSS", "FINAL LOSS"]
        table = Table("RANK", "ID", *self.paths, "STATUS", "STEPS", *losses)
        table.box, table.pad_edge = None, False
        table.columns[1].no_wrap = True
        for rank, row in enumerate(self.ranked()[:top], start=1):
            values = [_value(row.values.get(path)) for path in self.paths]
            last = [_loss(row.loss, row.steps_done)]
            final = [_loss(row.final_loss, 0)]
            if self.evaluated:
                last.append(_loss(row.val_loss, row.steps_done))
                final.append(_loss(row.final_val_loss, 0))
            table.add_row(
                str(rank),
                row.id,
                *values,
                row.status,
                f"{row.steps_done}/{row.steps}",
                *last,
                *final,
            )
        return table

    def progress_line(self) -> str:
        """What a progress event changed, on one line: member-steps, counts, the best so far
        by the sweep's metric."""
        done, total = self.member_steps()
        line = f"member-steps {done}/{total}  {self.counts()}"
        best = self.ranked()[0] if self.members else None
        value = None if best is None else best.val_loss if self.metric == "val_loss" else best.loss
        if best is not None and value is not None:
            line += f"  best {best.id} {self.metric} {_loss(value)} ({_values(best.values)})"
        return line

    def best_final(self) -> float | None:
        """The API's best member's final value of the metric (None: no best yet)."""
        best = self.view.get("best")
        if best is None:
            return None
        value: float | None = best["final_val_loss" if self.metric == "val_loss" else "final_loss"]
        return value

    def best_text(self) -> str:
        """What the API's best member scored and what it swept: `final loss X (lr=0.1)`, or
        `final val_loss X (…)` for a val_loss sweep."""
        values = _values(self.view["best"]["values"])
        return f"final {self.metric} {_loss(self.best_final())} ({values})"

    def final_line(self) -> str:
        """The sweep's end: its status, counts and best member."""
        line = f"{self.status}: {self.counts()}"
        best = self.view.get("best")
        return line if best is None else f"{line}; best {best['id']} {self.best_text()}"


def _value(value: Any) -> str:
    if value is None:
        return UNKNOWN
    return value if isinstance(value, str) else json.dumps(value)


def _values(values: dict[str, Any]) -> str:
    return ", ".join(f"{path}={_value(value)}" for path, value in values.items())


def _loss(value: float | None, steps_done: int = 1) -> str:
    """A sweep's loss as the float32 it is (`_f32`; a progress event's carries 14 digits, the
    result's full-batch loss more), `nan` for one that was not finite, `—` for none yet."""
    if value is None:
        return "nan" if steps_done else UNKNOWN
    try:
        return _f32(struct.unpack("f", struct.pack("f", value))[0])
    except OverflowError:  # beyond float32's range
        return f"{value:.7g}"


def _sweep_ended(sweep_id: str) -> NoReturn:
    _fail(
        f"the event stream ended before sweep {sweep_id} did: "
        f"`gradstream sweep watch {sweep_id}` resumes"
    )


def _watch_sweep(client: Client, sweep_id: str, progress: bool | None, top: int) -> None:
    """Follow a sweep until it ends: a live leaderboard on a terminal, else a line per event.
    Exit 1 unless the sweep succeeded."""
    board = SweepBoard(client.sweep(sweep_id))
    if progress is None:
        progress = sys.stdout.isatty()
    if progress:
        _watch_sweep_live(client, board, top)
    else:
        _watch_sweep_lines(client, board, top)
    if board.status != "succeeded":
        raise typer.Exit(FAILED)


def _watch_sweep_lines(client: Client, board: SweepBoard, top: int) -> None:
    for event in client.sweep_events(board.id):
        board.apply(event)
        # The stream's history of statuses, in order: a connection's first `status` (no id)
        # says only where the sweep is now, which the history replayed after it reaches too.
        if event.event == "status" and event.id is not None:
            typer.echo(f"status: {board.status}")
        elif event.event == "progress":
            typer.echo(board.progress_line())
        elif event.event == "done":
            board.update(client.sweep(board.id))
            _print_table(board.table(top))
            typer.echo(board.ranked_by())
            typer.echo(board.final_line())
            return
    _sweep_ended(board.id)


def _watch_sweep_live(client: Client, board: SweepBoard, top: int) -> None:
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("member-steps  {task.fields[counts]}  ETA"),
        TimeRemainingColumn(),
    ]
    bar = Progress(*columns)
    task = bar.add_task(board.id[:12], total=None, counts="")

    def screen() -> Group:
        done, total = board.member_steps()
        bar.update(task, completed=done, total=total, counts=board.counts())
        return Group(bar, board.table(top), Text(board.ranked_by()))

    drawn = 0.0
    with Live(screen(), console=Console(force_terminal=True), auto_refresh=False) as live:
        for event in client.sweep_events(board.id):
            board.apply(event)
            if event.event == "done":
                board.update(client.sweep(board.id))
            # At most 10 frames a second: a backlog replayed on connect comes all at once.
            if event.event == "done" or time.monotonic() - drawn > 0.1:
                live.update(screen(), refresh=True)
                drawn = time.monotonic()
            if event.event == "done":
                break
        else:
            _sweep_ended(board.id)
    typer.echo(board.final_line())


@sweep_app.command("submit")
def sweep_submit(
    spec_file: Annotated[
        str, typer.Argument(help="a SweepSpec file (JSON, or YAML by its suffix), - for stdin")
    ],
    watch_sweep: Annotated[bool, typer.Option("--watch", help="follow it until it ends")] = False,
    progress: ProgressOpt = None,
    top: TopOpt = LEADERBOARD,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Submit a sweep from a spec file; print its id, then its members and groups."""
    spec = _read_spec(spec_file, SWEEP_SPEC)
    with _client(url, api_key) as client:
        view = client.submit_sweep(spec)
        typer.echo(view["id"])
        members, groups = view["member_count"], view["groups"]
        typer.echo(
            f"{members} member{'s' * (members != 1)} in {groups} group{'s' * (groups != 1)}: "
            f"{view['status']}"
        )
        if watch_sweep:
            _watch_sweep(client, view["id"], progress, top)


@sweep_app.command("watch")
def sweep_watch(
    sweep_id: str,
    progress: ProgressOpt = None,
    top: TopOpt = LEADERBOARD,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Follow a sweep live until it ends, resuming if dropped; exit 1 unless it succeeds."""
    with _client(url, api_key) as client:
        _watch_sweep(client, sweep_id, progress, top)


def _halving_lines(view: dict[str, Any]) -> list[str]:
    """Where halving cut each group, one line a group, when a sweep of several groups cut
    any: halving ranks within a group, so each keeps its own winners."""
    groups = view.get("group_details") or []
    if len(groups) < 2 or not any(group["rungs"] for group in groups):
        return []
    lines = []
    for position, group in enumerate(groups, start=1):
        cuts = ", ".join(f"{c['ranked']} -> {c['kept']} at {c['step']}" for c in group["rungs"])
        lines.append(
            f"  group {position} ({group['members']} members, {group['status']}): "
            f"{cuts or 'no cut'}"
        )
    return ["halving ranks within each group:", *lines]


TIMES = (("created", "created_at"), ("started", "started_at"), ("finished", "finished_at"))


@sweep_app.command("show")
def sweep_show(
    sweep_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="the API's SweepView as JSON")] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Print a sweep: its status, counts, best member and every member ranked by its metric."""
    with _client(url, api_key) as client:
        view = client.sweep(sweep_id)
    if as_json:
        typer.echo(json.dumps(view, indent=2))
        return
    board = SweepBoard(view)
    name = f" ({view['name']})" if view["name"] else ""
    typer.echo(f"sweep {view['id']}{name}: {view['status']}")
    times = [f"{what} {_time(view[field])}" for what, field in TIMES if view[field] is not None]
    typer.echo(", ".join(times))
    members, groups = view["member_count"], view["groups"]
    typer.echo(f"{members} members in {groups} group{'s' * (groups != 1)}: {board.counts()}")
    for line in _halving_lines(view):
        typer.echo(line)
    if view["best"] is not None:
        typer.echo(f"best {view['best']['id']}: {board.best_text()}")
    typer.echo("")
    _print_table(board.table())
    typer.echo(board.ranked_by())


@sweep_app.command("cancel")
def sweep_cancel(sweep_id: str, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Cancel every unfinished member of a sweep (running ones stop at their next flush)."""
    with _client(url, api_key) as client:
        view = client.cancel_sweep(sweep_id)  # counts of every member, members of a page
    counts = ", ".join(f"{view['counts'][s]} {s}" for s in JobStatus if s in view["counts"])
    typer.echo(f"{view['status']}: {counts or 'no members'}")


@sweep_app.command("delete")
def sweep_delete(sweep_id: str, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Delete an ended sweep and all its members (cancel a running one first)."""
    with _client(url, api_key) as client:
        client.delete_sweep(sweep_id)
    typer.echo(f"deleted {sweep_id}")


@app.command()
def sweeps(
    limit: Annotated[int, typer.Option()] = 20,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """List your sweeps, newest first, as a table."""
    with _client(url, api_key) as client:
        listed = client.sweeps(limit)
    table = Table(
        "ID",
        "NAME",
        "STATUS",
        "MEMBERS",
        "COUNTS",
        "METRIC",
        "BEST",
        "CREATED",
        box=None,
        pad_edge=False,
    )
    table.columns[0].no_wrap = True
    for summary in listed:  # SweepSummary rows: counts and best, no members
        metric = summary["spec"].get("metric") or "loss"
        best = summary["best"]
        best_final = None if best is None else best[f"final_{metric}"]
        counts = ", ".join(f"{n} {status}" for status, n in summary["counts"].items())
        table.add_row(
            summary["id"],
            summary["name"] or UNKNOWN,
            summary["status"],
            str(summary["member_count"]),
            counts or "no members",
            metric,
            UNKNOWN if best_final is None else _loss(best_final),
            _time(summary["created_at"]),
        )
    _print_table(table)


if __name__ == "__main__":
    app()
