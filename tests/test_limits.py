"""Per-request and per-tenant limits, on an API of their own with small limits (same Redis and
CPU worker as the session's): just under is accepted, just over is refused naming the limit,
and nothing is queued."""

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from api.client import Client
from cli.stack import Stack, wait_until
from services.store.keys import tenant_index
from tests.conftest import SEED_EXAMPLE

LIMITS = {
    "GRADSTREAM_MAX_BODY_BYTES": "65536",
    "GRADSTREAM_MAX_DATASET_BYTES": "4096",
    "GRADSTREAM_MAX_DATASETS_PER_TENANT": "2",
    "GRADSTREAM_MAX_STEPS": "1000",
    "GRADSTREAM_MAX_ELEMENTS": "5000",
    "GRADSTREAM_MAX_ACTIVE_JOBS_PER_TENANT": "3",
    "GRADSTREAM_MAX_SSE_PER_TENANT": "2",
    "GRADSTREAM_SUBMITS_PER_MINUTE": "6",
    "GRADSTREAM_SSE_SEND_TIMEOUT_S": "1",
    "GRADSTREAM_SSE_KEEPALIVE_S": "1",
}
TENANTS = ("carol", "dave", "erin", "frank", "gina", "hank")
QUEUED = {**SEED_EXAMPLE, "device": "cuda"}  # no gpu worker: it stays queued


@pytest.fixture(scope="module")
def limited(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    api = Stack(tmp_path_factory.mktemp("limited"), tenants=TENANTS)
    api.redis_url = stack.redis_url
    try:
        api.start_api(**LIMITS)
        yield api
    finally:
        api.stop()


def _client(api: Stack, tenant: str) -> Client:
    return Client(api.api_url, api.keys[tenant], timeout=10)


def _jobs_of(redis_client: "redis.Redis", tenant: str) -> int:
    return int(redis_client.zcard(tenant_index(tenant)))


def _refused(response: httpx.Response, status: int, limit: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert limit in json.dumps(body), body
    return body


def _wait_for_a_fresh_minute() -> None:
    # Submits are counted per clock minute: start well inside one.
    if 60 - time.time() % 60 < 15:
        time.sleep(60 - time.time() % 60 + 0.1)


def test_steps_and_elements_just_under_pass_and_just_over_are_refused(
    limited: Stack, redis_client: "redis.Redis"
) -> None:
    with _client(limited, "frank") as frank:
        under = frank.http.post("/v1/jobs", json={**QUEUED, "steps": 1000})
        assert under.status_code == 201
        frank.cancel(under.json()["id"])
        before = _jobs_of(redis_client, "frank")
        body = _refused(frank.http.post("/v1/jobs", json={**QUEUED, "steps": 1001}), 422, "steps")
        assert body["detail"][0]["loc"] == ["body", "steps"]
        data = {"synthetic": {"n": 5, "d": 1001}}
        over = {**QUEUED, "data": data, "init": None}
        body = _refused(frank.http.post("/v1/jobs", json=over), 422, "5000")
        assert body["detail"][0]["loc"] == ["body", "data"]
        assert _jobs_of(redis_client, "frank") == before
        data = {"synthetic": {"n": 5, "d": 1000}}
        under = frank.http.post("/v1/jobs", json={**QUEUED, "data": data, "init": None})
        assert under.status_code == 201, under.text
        frank.cancel(under.json()["id"])


def test_queued_and_running_jobs_per_tenant(limited: Stack, redis_client: "redis.Redis") -> None:
    _wait_for_a_fresh_minute()
    with _client(limited, "carol") as carol:
        jobs = [carol.submit(QUEUED) for _ in range(3)]
        before = _jobs_of(redis_client, "carol")
        _refused(carol.http.post("/v1/jobs", json=QUEUED), 429, "max_active_jobs_per_tenant")
        assert _jobs_of(redis_client, "carol") == before
        carol.cancel(jobs[0]["id"])  # one slot free again
        jobs.append(carol.submit(QUEUED))
        for job in jobs[1:]:
            carol.cancel(job["id"])


def test_a_sweep_counts_as_one_active_job_whatever_its_members(limited: Stack) -> None:
    _wait_for_a_fresh_minute()
    sweep = {"base": QUEUED, "grid": {"optimizer.lr": [0.1, 0.2, 0.3, 0.4, 0.5]}}
    with _client(limited, "hank") as hank:
        first = hank.submit_sweep(sweep)  # five queued members: one active job
        job = hank.submit(QUEUED)
        second = hank.submit_sweep(sweep)
        _refused(hank.http.post("/v1/jobs", json=QUEUED), 429, "max_active_jobs_per_tenant")
        _refused(hank.http.post("/v1/sweeps", json=sweep), 429, "max_active_jobs_per_tenant")
        # The members are jobs all the same: listed by status, and by their sweep.
        queued = hank.http.get("/v1/jobs", params={"status": "queued"}).json()["jobs"]
        assert sum(row["sweep"] == first["id"] for row in queued) == 5
        hank.cancel_sweep(first["id"])  # its members end: one slot free again
        assert hank.sweep(first["id"])["status"] == "cancelled"
        third = hank.submit(QUEUED)
        for finished in (job, third):
            hank.cancel(finished["id"])
        hank.cancel_sweep(second["id"])


def test_submits_per_minute_with_retry_after(limited: Stack, redis_client: "redis.Redis") -> None:
    _wait_for_a_fresh_minute()
    with _client(limited, "dave") as dave:
        for _ in range(6):
            dave.cancel(dave.submit(QUEUED)["id"])
        before = _jobs_of(redis_client, "dave")
        response = dave.http.post("/v1/jobs", json=QUEUED)
        _refused(response, 429, "submits_per_minute")
        assert 0 < int(response.headers["Retry-After"]) <= 60
        assert _jobs_of(redis_client, "dave") == before


def test_body_size_just_under_passes_and_over_is_413(
    limited: Stack, redis_client: "redis.Redis"
) -> None:
    with _client(limited, "gina") as gina:
        body = json.dumps(QUEUED).encode()
        headers = {"Content-Type": "application/json"}
        under = body + b" " * (65536 - len(body))
        response = gina.http.post("/v1/jobs", content=under, headers=headers)
        assert response.status_code == 201, response.text
        gina.cancel(response.json()["id"])
        before = _jobs_of(redis_client, "gina")
        over = _refused(
            gina.http.post("/v1/jobs", content=under + b" ", headers=headers), 413, "max_body_bytes"
        )
        assert "65536" in over["detail"]

        # No Content-Length: the limit applies while the chunks arrive.
        def chunks() -> Iterator[bytes]:
            yield under
            yield b" "

        _refused(
            gina.http.post("/v1/jobs", content=chunks(), headers=headers), 413, "max_body_bytes"
        )
        assert _jobs_of(redis_client, "gina") == before


def test_dataset_uploads_have_their_own_size_limit(limited: Stack) -> None:
    with _client(limited, "gina") as gina:
        content = b"a,y\n1,2\n3,4\n"
        under = content + b"\n" * (4096 - len(content))  # blank lines: no rows
        response = gina.http.post("/v1/datasets", content=under)
        assert response.status_code == 201 and response.json()["samples"] == 2
        _refused(gina.http.post("/v1/datasets", content=under + b"\n"), 413, "max_dataset_bytes")

        def chunks() -> Iterator[bytes]:
            yield under
            yield b"\n"

        _refused(gina.http.post("/v1/datasets", content=chunks()), 413, "max_dataset_bytes")


def test_datasets_per_tenant(limited: Stack) -> None:
    with _client(limited, "carol") as carol:
        first = carol.http.post("/v1/datasets", content=b"a,y\n1,2\n")
        second = carol.http.post("/v1/datasets", content=b"a,y\n1,3\n")
        assert (first.status_code, second.status_code) == (201, 201)
        _refused(
            carol.http.post("/v1/datasets", content=b"a,y\n1,4\n"), 429, "max_datasets_per_tenant"
        )
        assert carol.http.post("/v1/datasets", content=b"a,y\n1,2\n").status_code == 200  # has it


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_100_mb_chunked_body_is_refused_with_api_memory_flat(limited: Stack) -> None:
    url = urlsplit(limited.api_url)
    before = _rss_kib(limited.api_process.pid)
    chunk = b" " * (1 << 20)
    sent = 0
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {limited.keys['gina']}\r\n".encode()
            + b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            while sent < 100 << 20 and not select.select([sock], [], [], 0)[0]:
                sock.sendall(b"100000\r\n" + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        reply = sock.recv(65536).decode(errors="replace")
    after = _rss_kib(limited.api_process.pid)
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert sent < 100 << 20  # refused before the client got to the end
    assert after - before < 20 * 1024, (before, after)  # KiB: flat, not 100 MB


class _Streams:
    """Event-stream requests of one tenant, all closed at the end."""

    def __init__(self, api: Stack, tenant: str) -> None:
        self.http = httpx.Client(base_url=api.api_url, headers=api.auth(tenant), timeout=10)

    def open(self, job_id: str) -> httpx.Response:
        request = self.http.build_request("GET", f"/v1/jobs/{job_id}/events")
        response = self.http.send(request, stream=True)
        if response.status_code != 200:
            response.read()
        return response

    def __enter__(self) -> "_Streams":
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()


def test_sse_connections_per_tenant_and_a_stalled_reader_is_dropped(limited: Stack) -> None:
    with _client(limited, "erin") as erin, _Streams(limited, "erin") as streams:
        waiting = erin.submit(QUEUED)
        # A finished job with ~24 KB per step: 300 steps are more than socket buffers hold.
        wide = erin.submit(
            {
                "data": {"synthetic": {"n": 4, "d": 1000}},
                "optimizer": {"lr": 1e-4},
                "steps": 300,
                "device": "cpu",
            }
        )
        assert erin.wait(wide["id"], timeout=120)["status"] == "succeeded"

        first = streams.open(waiting["id"])
        assert first.status_code == 200
        # A reader that never reads, with a small receive buffer.
        url = urlsplit(limited.api_url)
        with socket.socket() as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.connect((url.hostname, url.port))
            stalled.sendall(
                f"GET /v1/jobs/{wide['id']}/events HTTP/1.1\r\nHost: x\r\n".encode()
                + f"Authorization: Bearer {limited.keys['erin']}\r\n\r\n".encode()
            )
            # Its slot is taken before its response begins: wait for that (peeked, read below).
            stalled.settimeout(10)
            wait_until(
                lambda: stalled.recv(12, socket.MSG_PEEK) == b"HTTP/1.1 200", 10, "stalled stream"
            )
            _refused(streams.open(waiting["id"]), 429, "max_sse_per_tenant")
            # After the send timeout (1 s) the server drops the stalled reader, freeing its slot.
            deadline = time.monotonic() + 15
            while (again := streams.open(waiting["id"])).status_code != 200:
                assert time.monotonic() < deadline, again.text
                time.sleep(0.5)
            again.close()
            first.close()
            received = b""
            while chunk := stalled.recv(1 << 16):
                received += chunk
        assert received.startswith(b"HTTP/1.1 200") and b"event: step" in received
        assert b"event: done" not in received  # cut off, not finished
        erin.cancel(waiting["id"])
