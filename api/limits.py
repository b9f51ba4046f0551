"""Request body size: enforced while the body streams in, before anything buffers it.

Starlette and uvicorn read a body whole; this ASGI middleware refuses one whose Content-Length
is over the limit before reading it, and stops a chunked body (no Content-Length) as soon as
the bytes received pass the limit, so the API never holds more than `max_bytes` of it.
"""

import contextlib
import json
from collections.abc import Iterator

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.errors import LimitExceeded


def too_large(limit: str, max_bytes: int) -> str:
    return f"request body is larger than {limit} ({max_bytes} bytes)"


class BodySizeLimit:
    """`max_bytes` for every request, or a limit of its own for a path in `paths`
    ({path: (setting name, bytes)})."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, paths: dict[str, tuple[str, int]] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.paths = paths or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, max_bytes = self.paths.get(scope["path"], ("max_body_bytes", self.max_bytes))
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            await self._refuse(send, too_large(limit, max_bytes))
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    # FastAPI lets an HTTPException from reading the body through to its
                    # handler: the client gets this 413, the rest of the body is never read.
                    raise HTTPException(413, too_large(limit, max_bytes))
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send: Send, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class UploadSlots:
    """Dataset uploads in progress in this API process: each holds its body and its parsed
    arrays in memory, so only `limit` run at once (a 429 beyond)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    @contextlib.contextmanager
    def taken(self) -> Iterator[None]:
        # Taken and given back on the event loop: nothing runs between the check and the count.
        if self.in_flight >= self.limit:
            raise LimitExceeded(
                "max_concurrent_uploads",
                f"uploads in progress in this API process: {self.in_flight}; "
                f"max_concurrent_uploads is {self.limit}",
                retry_after_s=1,
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
