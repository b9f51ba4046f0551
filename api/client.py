"""Python clients for the gradstream API, sync (Client) and async (AsyncClient): httpx only,
nothing of the server and no torch, so `api/client.py` can be copied into any project."""

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
SWEEP_ENDED = frozenset({"succeeded", "failed", "cancelled"})
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "diverged", "pruned"})


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


class ServiceUnavailable(GradstreamError):
    """HTTP 503: the API cannot reach Redis just now (a restart, a failover); try again. The
    event streams do, resuming after the last event they gave."""


class SSEParser:
    """Server-Sent Events from the lines of a text/event-stream body, one line at a time;
    comments (keep-alives) are skipped."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.data: list[str] = []

    def feed(self, line: str) -> Event | None:
        """The event this line completes, if any."""
        if line == "":
            event = None
            if self.data:
                fields = self.fields
                data = json.loads("\n".join(self.data))
                event = Event(fields.get("event", "message"), data, fields.get("id"))
            self.fields, self.data = {}, []
            return event
        if not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                self.data.append(value)
            else:
                self.fields[name] = value
        return None


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Events from the lines of a text/event-stream body."""
    parser = SSEParser()
    for line in lines:
        if (event := parser.feed(line)) is not None:
            yield event


def _error(response: httpx.Response) -> GradstreamError:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = response.text
    kind = ServiceUnavailable if response.status_code == 503 else GradstreamError
    return kind(response.status_code, detail)


def _auth(api_key: str | None) -> dict[str, str]:
    api_key = api_key or os.environ.get("GRADSTREAM_API_KEY")
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


# A dropped stream (or one the API cannot serve for now: a 503) is retried, backing off up to
# 2 s, for STREAM_OUTAGE_S without an event by default: the longest a Redis failover may take
# (the server's GRADSTREAM_REDIS_OUTAGE_S, 60 s, which docs/deploy.md sizes the sentinels for).
STREAM_OUTAGE_S = 60.0
# GET /v1/sweeps/{id} pages its members: members per page by default, and at most.
MEMBERS_PAGE = 100
MAX_MEMBERS_PAGE = 1000


def _members_params(limit: int, cursor: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"members_limit": limit}
    if cursor is not None:
        params["members_cursor"] = cursor
    return params


def _joined(view: dict[str, Any], page: dict[str, Any]) -> dict[str, Any]:
    """`view` with the members of its next `page` after its own."""
    return {
        **view,
        "members": view["members"] + page["members"],
        "members_next": page["members_next"],
    }


def _backoff(failures: int) -> float:
    return min(2.0, 0.2 * 2.0**failures)


def _pause(failures: int) -> float:
    """The wait before a stream's next try: `_backoff`, jittered (0.5 to 1.5 times, the same
    on average) so that clients dropped together (an API restart) do not all come back at the
    same moment."""
    return _backoff(failures) * random.uniform(0.5, 1.5)


class StreamError(GradstreamError):
    """An event stream ended with a `gone` event: the API cannot serve it, and retrying will
    not change that (410: the job's archived steps are missing)."""


def retries_within(seconds: float) -> int:
    """How many retries, backing off as streams do, wait `seconds` in all."""
    retries, waited = 0, 0.0
    while waited < seconds:
        retries += 1
        waited += _backoff(retries)
    return retries


STREAM_RETRIES = retries_within(STREAM_OUTAGE_S)


# What a stream retries: the connection dropped or refused, or the API's Redis out of reach.
_RETRIED = (httpx.TransportError, ServiceUnavailable)


def _gave_up(failures: int, retries: int) -> bool:
    """Whether a stream stops retrying: `failures` counts the connections in a row that gave
    no new event with an id (a step, a sweep's progress); the `status` each connection begins
    with does not count, or a stream that cannot go on would reconnect forever."""
    return failures > retries


_STREAM_TIMEOUT = httpx.Timeout(30, read=60)  # keep-alives come every 15 s


class Client:
    """Submit, read, watch and cancel jobs. URL and key default to GRADSTREAM_URL/_API_KEY."""

    def __init__(
        self, url: str | None = None, api_key: str | None = None, timeout: float = 30
    ) -> None:
        url = url or os.environ.get("GRADSTREAM_URL", DEFAULT_URL)
        self.http = httpx.Client(base_url=url, headers=_auth(api_key), timeout=timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.is_error:
            raise _error(response)
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

    def delete(self, job_id: str) -> None:
        """Delete an ended job and everything stored of it (409 while queued or running)."""
        response = self.http.delete(f"/v1/jobs/{job_id}")
        if response.is_error:
            raise _error(response)

    def delete_dataset(self, dataset_id: str) -> None:
        """Drop this tenant's dataset (409 while a queued or running job uses it)."""
        response = self.http.delete(f"/v1/datasets/{dataset_id}")
        if response.is_error:
            raise _error(response)

    def workers(self) -> list[dict[str, Any]]:
        return list(self._json(self.http.get("/v1/workers"))["workers"])

    def predict(self, job_id: str, x: list[list[float]]) -> list[float]:
        body = self._json(self.http.post(f"/v1/jobs/{job_id}/predict", json={"x": x}))
        return list(body["y_hat"])

    def upload_dataset(self, content: bytes, target: str = "y") -> dict[str, Any]:
        """Upload CSV, .npy or .npz bytes; the dataset's info (its id is the bytes' sha256)."""
        response = self.http.post("/v1/datasets", content=content, params={"target": target})
        return dict(self._json(response))

    def submit_sweep(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Submit a SweepSpec; its SweepView (queued), each member a job."""
        return dict(self._json(self.http.post("/v1/sweeps", json=spec)))

    def sweep_page(
        self, sweep_id: str, limit: int = MEMBERS_PAGE, cursor: str | None = None
    ) -> dict[str, Any]:
        """The SweepView with one page of its members (after `cursor`, a `members_next`)."""
        params = _members_params(limit, cursor)
        return dict(self._json(self.http.get(f"/v1/sweeps/{sweep_id}", params=params)))

    def sweep(self, sweep_id: str) -> dict[str, Any]:
        """The SweepView with every member: its pages followed (`members_next`) and joined
        (counts, best and groups are the first page's)."""
        view = self.sweep_page(sweep_id, MAX_MEMBERS_PAGE)
        while view["members_next"] is not None:
            page = self.sweep_page(sweep_id, MAX_MEMBERS_PAGE, view["members_next"])
            view = _joined(view, page)
        return view

    def sweeps(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest sweeps as summaries: counts and best, no members (`sweep()` has them)."""
        return list(self._json(self.http.get("/v1/sweeps", params={"limit": limit}))["sweeps"])

    def cancel_sweep(self, sweep_id: str) -> dict[str, Any]:
        return dict(self._json(self.http.post(f"/v1/sweeps/{sweep_id}/cancel")))

    def delete_sweep(self, sweep_id: str) -> None:
        response = self.http.delete(f"/v1/sweeps/{sweep_id}")
        if response.is_error:
            raise _error(response)

    def wait_sweep(self, sweep_id: str, timeout: float = 600, poll: float = 0.2) -> dict[str, Any]:
        """Poll until the sweep ends; its final SweepView."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.sweep_page(sweep_id, 1)  # polls read one member, not all
            if view["status"] in SWEEP_ENDED:
                return self.sweep(sweep_id)
            if time.monotonic() > deadline:
                raise TimeoutError(f"sweep {sweep_id} still {view['status']} after {timeout} s")
            time.sleep(poll)

    def sweep_events(
        self, sweep_id: str, last_event_id: int | None = None, retries: int = STREAM_RETRIES
    ) -> Iterator[Event]:
        """The sweep's events until `done`; a dropped connection resumes after the last one."""
        return self._events(f"/v1/sweeps/{sweep_id}/events", last_event_id, retries)

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
        self, job_id: str, last_event_id: int | None = None, retries: int = STREAM_RETRIES
    ) -> Iterator[Event]:
        """Live events of a job until `done`; a dropped connection resumes after the last step."""
        return self._events(f"/v1/jobs/{job_id}/events", last_event_id, retries)

    def _events(self, path: str, last_event_id: int | None, retries: int) -> Iterator[Event]:
        failures = 0
        while True:
            headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
            try:
                with self.http.stream(
                    "GET", path, headers=headers, timeout=_STREAM_TIMEOUT
                ) as response:
                    if response.is_error:
                        response.read()
                        raise _error(response)
                    for event in parse_sse(response.iter_lines()):
                        if event.event == "gone":
                            raise StreamError(event.data["status"], event.data["detail"])
                        if event.id is not None:
                            failures, last_event_id = 0, int(event.id)
                        yield event
                        if event.event == "done":
                            return
            except _RETRIED:  # RemoteProtocolError (peer closed mid-stream) included
                if _gave_up(failures := failures + 1, retries):
                    raise
            else:  # ended without `done` (the API dropped a watcher that lagged, or stopped)
                if _gave_up(failures := failures + 1, retries):
                    return
            time.sleep(_pause(failures))


class AsyncClient:
    """The same as Client, for asyncio code (notebooks, services): await its calls, and
    `async for` over `steps()` and `stream()`."""

    def __init__(
        self, url: str | None = None, api_key: str | None = None, timeout: float = 30
    ) -> None:
        url = url or os.environ.get("GRADSTREAM_URL", DEFAULT_URL)
        self.http = httpx.AsyncClient(base_url=url, headers=_auth(api_key), timeout=timeout)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.http.aclose()

    async def _json(self, request: Awaitable[httpx.Response]) -> Any:
        response = await request
        if response.is_error:
            raise _error(response)
        return response.json()

    async def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(await self._json(self.http.post("/v1/jobs", json=spec)))

    async def get(self, job_id: str) -> dict[str, Any]:
        return dict(await self._json(self.http.get(f"/v1/jobs/{job_id}")))

    async def jobs(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return list((await self._json(self.http.get("/v1/jobs", params=params)))["jobs"])

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(await self._json(self.http.post(f"/v1/jobs/{job_id}/cancel")))

    async def delete(self, job_id: str) -> None:
        """Delete an ended job and everything stored of it (409 while queued or running)."""
        response = await self.http.delete(f"/v1/jobs/{job_id}")
        if response.is_error:
            raise _error(response)

    async def delete_dataset(self, dataset_id: str) -> None:
        """Drop this tenant's dataset (409 while a queued or running job uses it)."""
        response = await self.http.delete(f"/v1/datasets/{dataset_id}")
        if response.is_error:
            raise _error(response)

    async def workers(self) -> list[dict[str, Any]]:
        return list((await self._json(self.http.get("/v1/workers")))["workers"])

    async def predict(self, job_id: str, x: list[list[float]]) -> list[float]:
        body = await self._json(self.http.post(f"/v1/jobs/{job_id}/predict", json={"x": x}))
        return list(body["y_hat"])

    async def upload_dataset(self, content: bytes, target: str = "y") -> dict[str, Any]:
        """Upload CSV, .npy or .npz bytes; the dataset's info (its id is the bytes' sha256)."""
        response = self.http.post("/v1/datasets", content=content, params={"target": target})
        return dict(await self._json(response))

    async def submit_sweep(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Submit a SweepSpec; its SweepView (queued), each member a job."""
        return dict(await self._json(self.http.post("/v1/sweeps", json=spec)))

    async def sweep_page(
        self, sweep_id: str, limit: int = MEMBERS_PAGE, cursor: str | None = None
    ) -> dict[str, Any]:
        """The SweepView with one page of its members (after `cursor`, a `members_next`)."""
        params = _members_params(limit, cursor)
        return dict(await self._json(self.http.get(f"/v1/sweeps/{sweep_id}", params=params)))

    async def sweep(self, sweep_id: str) -> dict[str, Any]:
        """The SweepView with every member: its pages followed (`members_next`) and joined
        (counts, best and groups are the first page's)."""
        view = await self.sweep_page(sweep_id, MAX_MEMBERS_PAGE)
        while view["members_next"] is not None:
            page = await self.sweep_page(sweep_id, MAX_MEMBERS_PAGE, view["members_next"])
            view = _joined(view, page)
        return view

    async def sweeps(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest sweeps as summaries: counts and best, no members (`sweep()` has them)."""
        body = await self._json(self.http.get("/v1/sweeps", params={"limit": limit}))
        return list(body["sweeps"])

    async def cancel_sweep(self, sweep_id: str) -> dict[str, Any]:
        return dict(await self._json(self.http.post(f"/v1/sweeps/{sweep_id}/cancel")))

    async def delete_sweep(self, sweep_id: str) -> None:
        response = await self.http.delete(f"/v1/sweeps/{sweep_id}")
        if response.is_error:
            raise _error(response)

    async def wait_sweep(
        self, sweep_id: str, timeout: float = 600, poll: float = 0.2
    ) -> dict[str, Any]:
        """Poll until the sweep ends; its final SweepView."""
        deadline = time.monotonic() + timeout
        while True:
            view = await self.sweep_page(sweep_id, 1)  # polls read one member, not all
            if view["status"] in SWEEP_ENDED:
                return await self.sweep(sweep_id)
            if time.monotonic() > deadline:
                raise TimeoutError(f"sweep {sweep_id} still {view['status']} after {timeout} s")
            await asyncio.sleep(poll)

    def sweep_events(
        self, sweep_id: str, last_event_id: int | None = None, retries: int = STREAM_RETRIES
    ) -> AsyncIterator[Event]:
        """The sweep's events until `done`; a dropped connection resumes after the last one."""
        return self._events(f"/v1/sweeps/{sweep_id}/events", last_event_id, retries)

    async def steps(
        self, job_id: str, after: int = -1, page: int = 5000
    ) -> AsyncIterator[dict[str, Any]]:
        """Every stored step after `after`, page by page."""
        while True:
            params = {"after": after, "limit": page}
            body = await self._json(self.http.get(f"/v1/jobs/{job_id}/steps", params=params))
            for record in body["steps"]:
                yield record
            if body["next"] is None or not body["steps"]:
                return
            after = body["next"]

    async def wait(self, job_id: str, timeout: float = 600, poll: float = 0.2) -> dict[str, Any]:
        """Poll until the job finishes; its final JobView."""
        deadline = time.monotonic() + timeout
        while True:
            view = await self.get(job_id)
            if view["status"] in TERMINAL:
                return view
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {view['status']} after {timeout} s")
            await asyncio.sleep(poll)

    def stream(
        self, job_id: str, last_event_id: int | None = None, retries: int = STREAM_RETRIES
    ) -> AsyncIterator[Event]:
        """Live events of a job until `done`; a dropped connection resumes after the last step."""
        return self._events(f"/v1/jobs/{job_id}/events", last_event_id, retries)

    async def _events(
        self, path: str, last_event_id: int | None, retries: int
    ) -> AsyncIterator[Event]:
        failures = 0
        while True:
            headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
            try:
                async with self.http.stream(
                    "GET", path, headers=headers, timeout=_STREAM_TIMEOUT
                ) as response:
                    if response.is_error:
                        await response.aread()
                        raise _error(response)
                    parser = SSEParser()
                    async for line in response.aiter_lines():
                        event = parser.feed(line)
                        if event is None:
                            continue
                        if event.event == "gone":
                            raise StreamError(event.data["status"], event.data["detail"])
                        if event.id is not None:
                            failures, last_event_id = 0, int(event.id)
                        yield event
                        if event.event == "done":
                            return
            except _RETRIED:  # RemoteProtocolError (peer closed mid-stream) included
                if _gave_up(failures := failures + 1, retries):
                    raise
            else:  # ended without `done` (the API dropped a watcher that lagged, or stopped)
                if _gave_up(failures := failures + 1, retries):
                    return
            await asyncio.sleep(_pause(failures))
