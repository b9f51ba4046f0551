"""API keys, tenant isolation and stream tokens, against the real API (tenants alice and bob)."""

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest

from api.client import Client
from api.main import create_app
from cli.stack import Stack, wait_until
from services.auth import KeyRing, StreamTokens, parse_api_keys
from services.config import Settings
from services.errors import Unauthorized
from tests.conftest import SEED_EXAMPLE
from tests.faults import endless_spec

ROUTES = [
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/{id}"),
    ("GET", "/v1/jobs/{id}/steps"),
    ("GET", "/v1/jobs/{id}/events"),
    ("POST", "/v1/jobs/{id}/cancel"),
    ("POST", "/v1/jobs/{id}/stream-token"),
    ("GET", "/v1/workers"),
]


@pytest.fixture(scope="module")
def alice_job(stack: Stack) -> str:
    with Client(stack.api_url, stack.keys["alice"]) as alice:
        job = alice.submit(SEED_EXAMPLE)
        alice.wait(job["id"])
        return str(job["id"])


@pytest.fixture
def bob(stack: Stack) -> Iterator[Client]:
    with Client(stack.api_url, stack.keys["bob"], timeout=10) as client:
        yield client


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize(
    "authorization", [None, "Bearer not-a-key-of-anyone", "Basic YWxpY2U6eA=="]
)
def test_requests_without_a_valid_key_are_401(
    stack: Stack, alice_job: str, method: str, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    url = stack.api_url + path.format(id=alice_job)
    response = httpx.request(method, url, headers=headers, json=SEED_EXAMPLE, timeout=10)
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "key" in response.json()["detail"]


def test_health_routes_stay_open(stack: Stack) -> None:
    assert httpx.get(stack.api_url + "/healthz").status_code == 200
    assert httpx.get(stack.api_url + "/readyz").status_code == 200


def test_another_tenants_job_is_indistinguishable_from_a_missing_one(
    stack: Stack, alice_job: str, bob: Client
) -> None:
    missing = "0" * 32
    for path in ["/v1/jobs/{id}", "/v1/jobs/{id}/steps", "/v1/jobs/{id}/events"]:
        theirs = bob.http.get(path.format(id=alice_job))
        none = bob.http.get(path.format(id=missing))
        assert theirs.status_code == none.status_code == 404
        assert theirs.json()["detail"].replace(alice_job, missing) == none.json()["detail"]
    for path in ["/v1/jobs/{id}/cancel", "/v1/jobs/{id}/stream-token"]:
        assert bob.http.post(path.format(id=alice_job)).status_code == 404
    assert alice_job not in [job["id"] for job in bob.jobs()]
    with Client(stack.api_url, stack.keys["alice"]) as alice:
        assert alice_job in [job["id"] for job in alice.jobs()]
        assert alice.get(alice_job)["status"] == "succeeded"  # bob's cancel did nothing


def test_a_running_job_of_another_tenant_is_not_cancelled_or_shown(
    stack: Stack, bob: Client
) -> None:
    with Client(stack.api_url, stack.keys["alice"]) as alice:
        # Endless: it runs until cancelled below, however fast the machine.
        job = alice.submit(endless_spec())
        wait_until(
            lambda: job["id"] in [w["current_job"] for w in alice.workers()], 30, "alice's job"
        )
        assert bob.http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
        assert job["id"] not in [w["current_job"] for w in bob.workers()]
        assert alice.get(job["id"])["status"] == "running"
        alice.cancel(job["id"])
        assert alice.wait(job["id"])["status"] == "cancelled"


def test_idempotency_keys_belong_to_their_tenant(stack: Stack, bob: Client) -> None:
    key = {"Idempotency-Key": f"same-key-{time.time_ns()}"}
    spec = {**SEED_EXAMPLE, "device": "cuda"}  # no gpu worker: stays queued
    with Client(stack.api_url, stack.keys["alice"]) as alice:
        first = alice.http.post("/v1/jobs", json=spec, headers=key).json()
        again = alice.http.post("/v1/jobs", json=spec, headers=key).json()
        theirs = bob.http.post("/v1/jobs", json=spec, headers=key).json()
        assert first["id"] == again["id"] != theirs["id"]
        assert bob.get(theirs["id"])["id"] == theirs["id"]
        alice.cancel(first["id"])
        bob.cancel(theirs["id"])


def _tokens(stack: Stack) -> StreamTokens:
    pairs = {key: tenant for tenant, key in stack.keys.items()}
    return StreamTokens.for_keys(pairs, ttl_s=300)


def test_a_stream_token_streams_its_job_only_and_expires(stack: Stack, alice_job: str) -> None:
    with Client(stack.api_url, stack.keys["alice"]) as alice:
        issued = alice.http.post(f"/v1/jobs/{alice_job}/stream-token").json()
        other = alice.submit({**SEED_EXAMPLE, "device": "cuda"})
    assert datetime.fromisoformat(issued["expires_at"]).timestamp() > time.time() + 200
    url = f"{stack.api_url}/v1/jobs/{alice_job}/events"
    with httpx.stream("GET", url, params={"token": issued["token"]}, timeout=10) as response:
        assert response.status_code == 200
        assert "event: done" in response.read().decode()
    wrong_job = httpx.get(
        f"{stack.api_url}/v1/jobs/{other['id']}/events", params={"token": issued["token"]}
    )
    expired, _ = _tokens(stack).issue(alice_job, "alice", now=time.time() - 301)
    forged = issued["token"].replace("~alice~", "~bob~")
    for response in [
        wrong_job,
        httpx.get(url, params={"token": expired}),
        httpx.get(url, params={"token": forged}),
        httpx.get(url, params={"token": "garbage"}),
    ]:
        assert response.status_code == 401, response.text
    # Accepted on the events route only.
    job_url = f"{stack.api_url}/v1/jobs/{alice_job}"
    assert httpx.get(job_url, params={"token": issued["token"]}).status_code == 401
    with Client(stack.api_url, stack.keys["alice"]) as alice:
        alice.cancel(other["id"])


def test_a_stream_token_with_non_ascii_characters_is_a_401(stack: Stack, alice_job: str) -> None:
    # hmac.compare_digest raises TypeError on non-ASCII strings: this was a 500.
    with Client(stack.api_url, stack.keys["alice"]) as alice:
        issued = alice.http.post(f"/v1/jobs/{alice_job}/stream-token").json()["token"]
    url = f"{stack.api_url}/v1/jobs/{alice_job}/events"
    payload = issued.rsplit("~", 1)[0]
    for token in [f"{payload}~é", f"{payload}é~{issued.rsplit('~', 1)[1]}", "é~é~é~é", "é"]:
        response = httpx.get(url, params={"token": token}, timeout=10)
        assert response.status_code == 401, (token, response.text)
        assert "stream token" in response.json()["detail"]


def test_stream_tokens_of_tenants_with_dots_in_their_names() -> None:
    tokens = StreamTokens(b"secret", ttl_s=60)
    token, _ = tokens.issue("a" * 32, "team.ml-1")
    assert tokens.tenant_for(token, "a" * 32) == "team.ml-1"
    with pytest.raises(Unauthorized, match="another job"):
        tokens.tenant_for(token, "b" * 32)


def test_api_keys_parse_from_pairs_or_a_file(tmp_path: pytest.TempPathFactory) -> None:
    pairs = parse_api_keys("alice:aaaaaaaaaaaaaaaa1, bob:bbbbbbbbbbbbbbbb2")
    assert pairs == {"aaaaaaaaaaaaaaaa1": "alice", "bbbbbbbbbbbbbbbb2": "bob"}
    path = tmp_path / "keys"  # type: ignore[operator]
    path.write_text("# mounted secret\nalice:aaaaaaaaaaaaaaaa1\n  # ops\nbob:bbbbbbbbbbbbbbbb2\n")
    assert parse_api_keys(str(path)) == pairs
    assert parse_api_keys("carol:with#hash-in-the-key") == {"with#hash-in-the-key": "carol"}
    for bad, why in [
        ("alice:short", "shorter"),
        ("no key here", "tenant:key"),
        ("a b:cccccccccccccccccc", "tenant:key"),
        ("a:cccccccccccccccccc,b:cccccccccccccccccc", "share a key"),
        # A tenant is a folder of the archive: these would write into its root or above it.
        (".:cccccccccccccccccc", "names no tenant"),
        ("..:cccccccccccccccccc", "names no tenant"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_api_keys(bad)
    ring = KeyRing.from_pairs(pairs)
    assert ring.tenant_for("bbbbbbbbbbbbbbbb2") == "bob"
    with pytest.raises(Unauthorized):
        ring.tenant_for("bbbbbbbbbbbbbbbb")


def test_the_api_refuses_to_start_without_keys_unless_told_it_is_development() -> None:
    with pytest.raises(ValueError, match="no API keys configured"):
        create_app(Settings(api_keys=""))
    assert create_app(Settings(auth_disabled=True)).state.keyring is None
    env = {"PATH": "/usr/bin:/bin", "GRADSTREAM_API_KEYS": ""}
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "api", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "GRADSTREAM_AUTH_DISABLED" in result.stderr
