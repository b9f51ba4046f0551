"""The SSE wire: frames, resume by Last-Event-ID, keep-alives, and agreement with GET /steps."""

import socket
import struct

import httpx

from api.client import Client, parse_sse
from cli.stack import Stack, wait_until
from tests.conftest import SEED_EXAMPLE


def _spec(steps: int) -> dict[str, object]:
    return {
        "data": {"x": [[1.0, 2.0], [3.0, 4.0]], "y": [1.0, 0.0]},
        "bias": True,
        "optimizer": {"name": "sgd", "lr": 0.01},
        "steps": steps,
        "device": "cpu",
    }


def test_reconnect_with_last_event_id_resumes_exactly_once(stack: Stack, client: Client) -> None:
    job = client.submit(_spec(3000))
    first: list[dict[str, object]] = []
    with httpx.stream(
        "GET", f"{stack.api_url}/v1/jobs/{job['id']}/events", headers=stack.auth(), timeout=30
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in parse_sse(response.iter_lines()):
            if event.event == "step":
                assert event.id == str(event.data["step"])
                first.append(event.data)
                if len(first) == 25:
                    break  # the client drops the connection mid-job
    k = first[-1]["step"]
    assert k == 24

    rest = [e for e in client.stream(job["id"], last_event_id=24)]
    steps = [e.data for e in rest if e.event == "step"]
    assert rest[-1].event == "done" and rest[-1].data["status"] == "succeeded"
    assert [s["step"] for s in steps] == list(range(25, 3000))
    assert first + steps == list(client.steps(job["id"]))


def test_control_frames_carry_no_id_and_keepalives_flow(stack: Stack, client: Client) -> None:
    # A cuda job with no gpu worker waits, so its stream has nothing but keep-alives to send.
    waiting = client.submit({**_spec(5), "device": "cuda"})
    lines: list[str] = []
    with httpx.stream(
        "GET", f"{stack.api_url}/v1/jobs/{waiting['id']}/events", headers=stack.auth(), timeout=30
    ) as response:
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith(": keep-alive"):
                break
    assert "event: status" in lines
    status_at = lines.index("event: status")
    assert lines[status_at + 1].startswith("data: ")  # no id: line between
    client.cancel(waiting["id"])

    job = client.submit(_spec(5))
    client.wait(job["id"], timeout=30)
    with httpx.stream(
        "GET", f"{stack.api_url}/v1/jobs/{job['id']}/events", headers=stack.auth(), timeout=30
    ) as response:
        body = response.read().decode()
    frames = [frame for frame in body.split("\n\n") if frame.startswith("event:")]
    kinds = [frame.splitlines()[0] for frame in frames]
    assert kinds == ["event: status"] + ["event: step"] * 5 + ["event: done"]
    for frame in frames:
        has_id = any(line.startswith("id:") for line in frame.splitlines())
        assert has_id == frame.startswith("event: step")


def test_stream_of_finished_job_sends_rest_then_done(client: Client) -> None:
    job = client.submit(_spec(40))
    client.wait(job["id"], timeout=30)
    events = list(client.stream(job["id"], last_event_id=35))
    assert [e.event for e in events] == ["status"] + ["step"] * 4 + ["done"]
    assert [e.data["step"] for e in events if e.event == "step"] == [36, 37, 38, 39]
    assert events[0].data == {"status": "succeeded", "steps_done": 40}


def test_after_in_the_query_resumes_like_last_event_id(stack: Stack, client: Client) -> None:
    # For EventSource, which cannot set the header when it opens a new stream.
    job = client.submit(_spec(30))
    client.wait(job["id"])
    url = f"{stack.api_url}/v1/jobs/{job['id']}/events"
    with httpx.stream(
        "GET", url, params={"after": 24}, headers=stack.auth(), timeout=30
    ) as response:
        events = list(parse_sse(response.iter_lines()))
    assert [int(e.id) for e in events if e.event == "step" and e.id] == list(range(25, 30))
    assert events[-1].event == "done"


def test_a_client_gone_mid_replay_is_one_log_line(stack: Stack, client: Client) -> None:
    # A browser closed while 30 000 steps replay: the API notices at its next write and
    # stops, with one line naming the job, instead of writing on (asyncio logging each write
    # to the dead socket: "socket.send() raised exception.").
    job = client.submit({**SEED_EXAMPLE, "steps": 30_000})
    client.wait(job["id"], timeout=60)
    log = next(stack.run_dir.glob("api-*.log"))
    before = log.read_text(errors="replace").count("socket.send() raised exception")
    port = int(stack.api_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        request = (
            f"GET /v1/jobs/{job['id']}/events HTTP/1.1\r\nHost: test\r\n"
            f"Authorization: Bearer {stack.api_key}\r\n\r\n"
        )
        raw.sendall(request.encode())
        raw.recv(4096)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
    line = f"SSE client of job {job['id']} went away mid-stream"
    wait_until(lambda: line in log.read_text(errors="replace"), 15, "the one log line")
    text = log.read_text(errors="replace")
    assert text.count(line) == 1
    assert text.count("socket.send() raised exception") == before
