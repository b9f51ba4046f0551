"""Who is calling: API keys per tenant, and short-lived stream tokens bound to one job.

Keys come from GRADSTREAM_API_KEYS as `tenant:key` pairs separated by commas, or from a file of
such pairs (one per line or comma-separated; lines starting with `#` are comments), for
secrets mounted in compose. Keys are compared in constant time: every configured key is
compared, through SHA-256 digests of equal length, whatever the given key is.

A browser's EventSource cannot send headers, so the events route also accepts a token from
`POST /v1/jobs/{id}/stream-token`: `<job id>~<tenant>~<expiry>~<HMAC-SHA256>` signed with a
secret that every API process of the deployment shares (derived from the keys unless set).
"""

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from services.errors import Unauthorized

TENANT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# A tenant is a folder of the archive (<archive>/<tenant>/<job>.parquet): these name others.
NOT_TENANTS = {".", ".."}
MIN_KEY_LENGTH = 16
# The tenant of every request when auth is turned off for development.
DEV_TENANT = "dev"


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def parse_api_keys(value: str) -> dict[str, str]:
    """`tenant:key` pairs (or a file of them) as {key: tenant}; ValueError saying what is wrong."""
    text = value
    if value and ":" not in value and Path(value).is_file():
        text = Path(value).read_text()
    pairs: dict[str, str] = {}
    for line in text.splitlines():
        if line.lstrip().startswith("#"):  # a comment line (a key itself may hold '#')
            continue
        for item in line.split(","):
            item = item.strip()
            if not item:
                continue
            tenant, sep, key = item.partition(":")
            if not sep or not TENANT.fullmatch(tenant):
                raise ValueError(
                    f"API key entry {tenant!r}... is not `tenant:key` with a tenant of letters, "
                    "digits, '_', '.' or '-'"
                )
            if tenant in NOT_TENANTS:
                raise ValueError(
                    f"API key entry {tenant!r}... names no tenant: a tenant is a folder of the "
                    "archive, and '.' and '..' are this folder and the one above"
                )
            if len(key) < MIN_KEY_LENGTH:
                raise ValueError(f"the key of tenant {tenant!r} is shorter than {MIN_KEY_LENGTH}")
            if key in pairs:
                raise ValueError(f"tenants {pairs[key]!r} and {tenant!r} share a key")
            pairs[key] = tenant
    return pairs


def new_api_key() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class KeyRing:
    """The configured keys; `tenant_for` answers who holds a key."""

    _entries: tuple[tuple[bytes, str], ...]

    @classmethod
    def from_pairs(cls, pairs: dict[str, str]) -> "KeyRing":
        return cls(tuple((_digest(key), tenant) for key, tenant in pairs.items()))

    def tenant_for(self, key: str) -> str:
        given = _digest(key)
        found = None
        for digest, tenant in self._entries:  # no early exit: the time does not tell which
            if hmac.compare_digest(given, digest):
                found = tenant
        if found is None:
            raise Unauthorized("invalid API key")
        return found


class StreamTokens:
    """Signed, expiring tokens that let their holder stream one job's events."""

    def __init__(self, secret: bytes, ttl_s: float) -> None:
        self._secret = secret
        self.ttl_s = ttl_s

    @classmethod
    def for_keys(cls, pairs: dict[str, str], ttl_s: float, secret: str = "") -> "StreamTokens":
        """With no explicit secret, one derived from the keys: the same in every API process
        that has the same keys, and changed when they change."""
        if secret:
            return cls(secret.encode(), ttl_s)
        material = "\n".join(sorted(f"{tenant}:{key}" for key, tenant in pairs.items()))
        return cls(_digest("gradstream stream tokens\n" + material), ttl_s)

    def _sign(self, payload: str) -> str:
        mac = hmac.new(self._secret, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def issue(self, job_id: str, tenant: str, now: float | None = None) -> tuple[str, int]:
        """A token for `job_id` and the epoch second it expires at."""
        expires = int((time.time() if now is None else now) + self.ttl_s)
        payload = f"{job_id}~{tenant}~{expires}"  # no tenant name or base64url holds "~"
        return f"{payload}~{self._sign(payload)}", expires

    def tenant_for(self, token: str, job_id: str, now: float | None = None) -> str:
        """The tenant a valid, unexpired token for `job_id` was issued to."""
        parts = token.split("~")
        # Tokens are ASCII (hmac.compare_digest refuses to compare other strings).
        if len(parts) != 4 or not token.isascii():
            raise Unauthorized("malformed stream token")
        token_job, tenant, expires, signature = parts
        payload = f"{token_job}~{tenant}~{expires}"
        if not hmac.compare_digest(self._sign(payload), signature):
            raise Unauthorized("invalid stream token")
        if token_job != job_id:
            raise Unauthorized("the stream token is for another job")
        if not expires.isdigit() or int(expires) < (time.time() if now is None else now):
            raise Unauthorized("the stream token has expired")
        return tenant
