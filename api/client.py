"""A Python client for the gradstream API (httpx; imports nothing of the server, no torch)."""

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "diverged"})


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event: `step` (with `id`), `status`, or `done`."""

    event: str
    data: dict[str, Any]
    id: str | None = None


class GradstreamError(Exception):
    """The API answered with an error status."""

    def __init__(self, status_code: int, detail: Any) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Events from the lines of a text/event-stream body; comments (keep-alives) are skipped."""
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield Event(
                    fields.get("event", "message"), json.loads("\n".join(data)), fields.get("id")
                )
            fields, data = {}, []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            else:
                fields[name] = value


class Client:
    """Submit, read, watch and cancel jobs. URL and key default to GRADSTREAM_URL/_API_KEY."""

    def __init__(
        self, url: str | None = None, api_key: str | None = None, timeout: float = 30
    ) -> None:
        url = url or os.environ.get("GRADSTREAM_URL", DEFAULT_URL)
        api_key = api_key or os.environ.get("GRADSTREAM_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.is_error:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise GradstreamError(response.status_code, detail)
        return response.json()

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(self._json(self.http.post("/v1/jobs", json=spec)))

    def get(self, job_id: str) -> dict[str, Any]:
        return dict(self._json(self.http.get(f"/v1/jobs/{job_id}")))

    def jobs(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return list(self._json(self.http.get("/v1/jobs", params=params))["jobs"])

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._json(self.http.post(f"/v1/jobs/{job_id}/cancel")))

    def workers(self) -> list[dict[str, Any]]:
        return list(self._json(self.http.get("/v1/workers"))["workers"])

    def steps(self, job_id: str, after: int = -1, page: int = 5000) -> Iterator[dict[str, Any]]:
        """Every stored step after `after`, page by page (ends where the stored history ends)."""
        while True:
            body = self._json(
                self.http.get(f"/v1/jobs/{job_id}/steps", params={"after": after, "limit": page})
            )
            yield from body["steps"]
            if body["next"] is None or not body["steps"]:
                return
            after = body["next"]

    def wait(self, job_id: str, timeout: float = 600, poll: float = 0.2) -> dict[str, Any]:
        """Poll until the job finishes; its final JobView."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.get(job_id)
            if view["status"] in TERMINAL:
                return view
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {view['status']} after {timeout} s")
            time.sleep(poll)

    def stream(
        self, job_id: str, last_event_id: int | None = None, retries: int = 5
    ) -> Iterator[Event]:
        """Live events of a job until `done`; a dropped connection resumes after the last step."""
        failures = 0
        while True:
            headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
            try:
                with self.http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers=headers,
                    timeout=httpx.Timeout(30, read=60),
                ) as response:
                    if response.is_error:
                        response.read()
                        self._json(response)
                    for event in parse_sse(response.iter_lines()):
                        failures = 0
                        if event.id is not None:
                            last_event_id = int(event.id)
                        yield event
                        if event.event == "done":
                            return
            except (httpx.TransportError, httpx.RemoteProtocolError):
                failures += 1
                if failures > retries:
                    raise
                time.sleep(min(2.0, 0.2 * 2**failures))
