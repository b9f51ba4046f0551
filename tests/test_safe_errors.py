"""What a failing dependency tells a client: what is wrong, never where things live (Redis's
host and port, the archive's URL or path) nor what a driver said; and secrets stay secret."""

import json
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from cli.stack import Stack, stop_process
from services.archive import ArchivedFile
from services.config import Settings
from services.schemas import JobSpec
from services.store import Store, keys

SEED = {"data": {"x": [[1.0]], "y": [2.0]}, "steps": 3, "device": "cpu"}
# What a driver's message carries: an address, errno text, a Python exception's name.
LEAKS = re.compile(r"127\.0\.0\.1|localhost|:\d{2,5}\b|Errno|refused|Error \d+|Exception|/tmp/")


def _assert_says_what_not_where(body: str, *places: str) -> None:
    detail = json.loads(body)["detail"]
    assert detail, body
    assert not LEAKS.search(detail), detail
    for place in places:
        assert place not in body, body


@pytest.fixture
def api_stack(tmp_path: Path) -> Iterator[Stack]:
    """A private Redis and an API on it (no worker), its archive in a folder whose path must
    never reach a client."""
    local = Stack(tmp_path / "stack")
    try:
        local.start_redis()
        local.start_api(GRADSTREAM_ARCHIVE_URL=str(tmp_path / "secret-bucket-path"))
        yield local
    finally:
        local.stop()


def _api_log(stack: Stack) -> str:
    return "".join(path.read_text() for path in stack.run_dir.glob("api-*.log"))


def test_an_unreachable_redis_is_a_503_that_names_no_host_or_port(api_stack: Stack) -> None:
    port = urlsplit(api_stack.redis_url).port
    stop_process(api_stack.redis_process, 10)  # Redis is gone; the API stays up
    with httpx.Client(base_url=api_stack.api_url, headers=api_stack.auth(), timeout=30) as api:
        for method, path in [
            ("GET", "/readyz"),
            ("GET", "/v1/jobs"),
            ("GET", f"/v1/jobs/{'0' * 32}"),
            ("GET", f"/v1/jobs/{'0' * 32}/steps"),
            ("GET", f"/v1/jobs/{'0' * 32}/events"),
            ("POST", "/v1/jobs"),
        ]:
            response = api.request(method, path, json=SEED)
            assert response.status_code == 503, (path, response.text)
            assert response.headers["Retry-After"]
            _assert_says_what_not_where(response.text, str(port))
            assert "Redis is unavailable" in response.json()["detail"]
    # The operator still learns where: the log has what the driver said.
    assert f"127.0.0.1:{port}" in _api_log(api_stack)


def test_an_unreadable_archive_is_answered_without_its_path(
    api_stack: Stack, tmp_path: Path
) -> None:
    # A finished job whose steps are recorded as archived in a file that is not Parquet.
    broken = tmp_path / "secret-bucket-path" / "local" / "job.parquet"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not parquet at all")
    store = Store.from_url(api_stack.redis_url)
    try:
        spec = JobSpec.model_validate(SEED)
        job_id, _ = store.create_job(spec, "cpu", "nobody", "test", tenant="local")
        archived = ArchivedFile(url=str(broken), rows=3, sha256="0" * 64)
        store.redis.hset(
            keys.job_key(job_id),
            mapping={"status": "succeeded", "steps_done": 3, "archived": archived.to_json()},
        )
        store.redis.delete(keys.steps_key(job_id))
    finally:
        store.redis.close()
    url = f"{api_stack.api_url}/v1/jobs/{job_id}/steps"
    response = httpx.get(url, headers=api_stack.auth(), timeout=30)
    assert response.status_code >= 500, response.text
    _assert_says_what_not_where(response.text, "secret-bucket-path")
    assert "secret-bucket-path" in _api_log(api_stack)  # where it failed is in the log


def test_archive_credentials_are_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    options = {"key": "AKIA-NOT-IN-LOGS", "secret": "s3cr3t-not-in-logs"}
    monkeypatch.setenv("GRADSTREAM_ARCHIVE_OPTIONS", json.dumps(options))
    settings = Settings()
    assert settings.archive_options.get_secret_value() == options
    for shown in (repr(settings), str(settings), settings.model_dump_json()):
        assert "s3cr3t" not in shown and "AKIA" not in shown
