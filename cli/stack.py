"""Local processes: a private redis-server, workers and the API, started and stopped together.

Used by `gradstream up` (and so `make demo`) and by the tests, which need the same real
processes. Each process runs in its own session, so stopping it stops its children too.
"""

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import httpx
import redis

from services.auth import MIN_KEY_LENGTH, new_api_key


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll `check` until it is true; TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # not up yet: connection refused and the like
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout} s")
        time.sleep(interval)


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError(
            "redis-server not found: install it (Debian/Ubuntu: apt-get install redis-server; "
            "macOS: brew install redis), or run `make demo`, which installs it as root"
        )
    return path


def visible_gpus() -> list[int]:
    """GPU indexes nvidia-smi reports (none without it), restricted by CUDA_VISIBLE_DEVICES."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = [i for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        allowed = {int(v) for v in visible.split(",") if v.strip().isdigit()}
        gpus = [g for g in gpus if g in allowed]
    return gpus


def default_maxmemory() -> int:
    """A quarter of this machine's RAM: Redis holds every job's steps, but shares the machine
    with the workers and the API."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


class Stack:
    """A set of local processes sharing one private Redis, all stopped by `stop()`.

    The API it starts accepts one generated key per tenant in `tenants` (`keys`); `api_key` is
    the first tenant's, which the stack itself uses (given, it is that tenant's key instead).
    """

    def __init__(
        self,
        run_dir: Path,
        env: dict[str, str] | None = None,
        tenants: tuple[str, ...] = ("local",),
        api_key: str | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.base_env = env or {}
        self.keys = {tenant: new_api_key() for tenant in tenants}
        if api_key is not None:
            self.keys[tenants[0]] = api_key
        self.api_key = self.keys[tenants[0]]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.redis_url = ""
        self.redis_process: subprocess.Popen[bytes]
        self.api_url = ""
        self.api_process: subprocess.Popen[bytes]
        self._logs: list[IO[bytes]] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start a process of the stack (stopped by `stop()`), its output in `name`.log."""
        log = open(self.run_dir / f"{name}.log", "ab")  # noqa: SIM115 (closed in stop())
        self._logs.append(log)
        process = subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.processes.append((name, process))
        return process

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, **self.base_env, "PYTHONUNBUFFERED": "1"}
        api_keys = ",".join(f"{tenant}:{key}" for tenant, key in self.keys.items())
        env.update(GRADSTREAM_REDIS_URL=self.redis_url, GRADSTREAM_API_KEYS=api_keys, **extra)
        # Archived step history lives beside the stack's Redis data unless told otherwise.
        env.setdefault("GRADSTREAM_ARCHIVE_URL", str(self.archive_dir))
        return env

    @property
    def archive_dir(self) -> Path:
        """The local folder archived jobs go to (without GRADSTREAM_ARCHIVE_URL set)."""
        return self.run_dir / "archive"

    def auth(self, tenant: str | None = None) -> dict[str, str]:
        """The Authorization header of `tenant` (default: the stack's own)."""
        key = self.api_key if tenant is None else self.keys[tenant]
        return {"Authorization": f"Bearer {key}"}

    def start_redis(self, port: int | None = None, maxmemory_bytes: int = 0) -> str:
        """A private redis-server with AOF fsync'd every second and a memory ceiling
        (`maxmemory_bytes`, or a quarter of this machine's RAM) past which it refuses writes,
        never evicting job data. Started again on the same port and folder, it comes back with
        what the AOF kept."""
        port = port or free_port()
        self.redis_process = self.start_redis_server("redis", port, maxmemory_bytes)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        return self.redis_url

    def start_redis_server(
        self, name: str, port: int, maxmemory_bytes: int = 0, **options: str
    ) -> subprocess.Popen[bytes]:
        """A redis-server as `start_redis` describes, its data in the folder `name`, with
        `options` added (`requirepass`, `replicaof`: a replica); returns once it answers."""
        data_dir = self.run_dir / name
        data_dir.mkdir(exist_ok=True)
        settings = {
            "port": str(port),
            "bind": "127.0.0.1",
            "dir": str(data_dir),
            "save": "",
            "appendonly": "yes",
            "appendfsync": "everysec",
            "maxmemory": str(maxmemory_bytes or default_maxmemory()),
            "maxmemory-policy": "noeviction",
            **{option.replace("_", "-"): value for option, value in options.items()},
        }
        argv = [redis_server_binary()]
        for option, value in settings.items():
            argv += [f"--{option}", value]
        process = self.spawn(name, argv, dict(os.environ))
        client = redis.Redis(
            port=port, password=options.get("requirepass"), socket_connect_timeout=1
        )
        try:
            wait_until(lambda: bool(client.ping()), 30, f"redis-server on port {port}")
        finally:
            client.close()
        return process

    def kill_redis(self) -> int:
        """SIGKILL redis-server (no shutdown save); its port, to start it again on."""
        self.redis_process.kill()
        self.redis_process.wait(10)
        self.processes = [(n, p) for n, p in self.processes if p is not self.redis_process]
        return int(self.redis_url.rsplit(":", 1)[1].split("/")[0])

    def start_worker(
        self, device: str = "cpu", concurrency: int = 1, **extra_env: str
    ) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "cli.main", "worker", "--device", device]
        argv += ["--concurrency", str(concurrency)]
        name = f"worker-{device.replace(':', '')}-{len(self.processes)}"
        return self.spawn(name, argv, self.env(**extra_env))

    def start_api(self, port: int | None = None, workers: int = 1, **extra_env: str) -> str:
        """Start an API of `workers` processes (the stack's `api_url` from now on) and wait
        until it is ready."""
        port = port or free_port()
        argv = [sys.executable, "-m", "cli.main", "api", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--workers", str(workers)]
        self.api_process = self.spawn(f"api-{port}", argv, self.env(**extra_env))
        self.api_url = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: httpx.get(self.api_url + "/readyz", timeout=1).status_code == 200, 30, "API"
        )
        return self.api_url

    def wait_for_workers(self, queues: set[str], timeout: float = 60) -> None:
        def registered() -> bool:
            response = httpx.get(self.api_url + "/v1/workers", headers=self.auth(), timeout=2)
            workers = response.json()["workers"]
            return queues <= {q for w in workers for q in w["queues"]}

        wait_until(registered, timeout, f"workers for queues {sorted(queues)}", interval=0.1)

    def stop(self, grace: float = 10) -> None:
        """Stop every process (newest first): SIGTERM, then SIGKILL after `grace` seconds."""
        for _, process in reversed(self.processes):
            stop_process(process, grace)
        self.processes.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()


class FolderInUse(RuntimeError):
    """Another `gradstream up` holds this data folder."""


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold `data_dir/up.pid` (with this process's pid in it) locked for as long as the returned
    file stays open: one `gradstream up` per folder, as two redis-servers on one AOF would
    corrupt it. An flock, so a crashed `up` leaves no stale lock behind."""
    pid_file = open(data_dir / "up.pid", "a+")  # noqa: SIM115 (held open while up runs)
    try:
        fcntl.flock(pid_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid_file.seek(0)
        holder = pid_file.read().strip() or "?"
        pid_file.close()
        raise FolderInUse(
            f"another `gradstream up` (pid {holder}) is using {data_dir}: stop it, "
            "or give this one another --data-dir"
        ) from None
    pid_file.truncate(0)
    pid_file.write(f"{os.getpid()}\n")
    pid_file.flush()
    return pid_file


def stored_api_key(path: Path) -> str:
    """The API key kept in `path`, made on first use and readable by its owner only."""
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = new_api_key()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as key_file:
            key_file.write(key + "\n")
    if len(key) < MIN_KEY_LENGTH:
        raise RuntimeError(f"{path} holds no valid API key: delete it, and a new one is made")
    return key


@contextlib.contextmanager
def temporary_stack(prefix: str, env: dict[str, str] | None = None) -> Iterator[Stack]:
    """A Stack in a temporary folder, stopped and removed on exit (benchmarks, soak runs)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as run_dir:
        stack = Stack(Path(run_dir), env)
        try:
            yield stack
        finally:
            stack.stop()


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (a Celery worker's pool processes)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()]


def stop_process(process: "subprocess.Popen[bytes]", grace: float = 10) -> None:
    """SIGTERM the process (a Celery worker then shuts down warm), SIGKILL its group after
    `grace` seconds; whatever is left of the group after it exits is killed too."""
    if process.poll() is None:
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(5)
