"""The sentinels' timing and the clients' patience agree: every Sentinel configuration the
project ships fails over within what a worker's flushes and a client's streams ride out."""

import re
import time
from pathlib import Path

import pytest

from api.client import STREAM_OUTAGE_S, STREAM_RETRIES, _backoff
from cli.stack import Stack
from services.attempts import retry_through_outage
from services.config import Settings
from services.errors import StoreUnavailable
from services.redis_clients import failover_bound_s, failover_outlasts_outage
from tests.sentinels import ReplicatedRedis

ROOT = Path(__file__).parent.parent
# Where a sentinel's configuration is written: compose's, the one docs/deploy.md gives, the
# one tests/sentinels.py starts.
SHIPPED = ["docker-compose.yml", "docs/deploy.md", "tests/sentinels.py"]
SENTINEL_DEFAULT_DOWN_AFTER_MS = 30_000


def _timing(path: str) -> tuple[int, int]:
    text = (ROOT / path).read_text()
    down_after = re.findall(r"down-after-milliseconds \S+ (\d+)", text)
    failover_timeout = re.findall(r"failover-timeout \S+ (\d+)", text)
    assert len(down_after) == 1 and len(failover_timeout) == 1, path
    return int(down_after[0]), int(failover_timeout[0])


def _stream_window_s() -> float:
    """What a client's stream waits in all before it gives up, by default."""
    return sum(_backoff(failure) for failure in range(1, STREAM_RETRIES + 1))


@pytest.mark.parametrize("path", SHIPPED)
def test_a_shipped_sentinel_fails_over_within_the_clients_patience(path: str) -> None:
    bound = failover_bound_s(*_timing(path))
    assert bound <= Settings().redis_outage_s, f"{path}: a failover may take {bound} s"
    assert bound <= _stream_window_s(), f"{path}: a failover may take {bound} s"


def test_the_client_rides_out_what_the_workers_do() -> None:
    assert _stream_window_s() >= STREAM_OUTAGE_S >= Settings().redis_outage_s


def test_sentinels_default_down_after_fits_with_the_documented_failover_timeout() -> None:
    # docs/deploy.md says Sentinel's default down-after works with its failover-timeout.
    _, failover_timeout = _timing("docs/deploy.md")
    bound = failover_bound_s(SENTINEL_DEFAULT_DOWN_AFTER_MS, failover_timeout)
    assert bound <= Settings().redis_outage_s


def test_a_flush_rides_out_the_configured_outage_and_no_longer() -> None:
    calls: list[float] = []

    def unreachable() -> None:
        calls.append(time.monotonic())
        raise StoreUnavailable("Redis is unavailable")

    with pytest.raises(StoreUnavailable):
        retry_through_outage(unreachable, "test flush", outage_s=0.5)
    assert calls[-1] - calls[0] >= 0.5
    assert len(calls) > 1

    answers = iter([StoreUnavailable("down"), StoreUnavailable("down"), "ok"])

    def recovers() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert retry_through_outage(recovers, "test flush", outage_s=60) == "ok"


def test_a_worker_is_warned_of_sentinels_whose_failover_outlasts_its_patience(
    tmp_path: Path,
) -> None:
    stack = Stack(tmp_path)
    replicated = ReplicatedRedis(stack)
    try:
        replicated.start()
        settings = Settings(redis_url=replicated.url, **_settings_of(replicated.env()))
        assert failover_outlasts_outage(settings) is None  # tests/sentinels.py's: 12 s
        impatient = settings.model_copy(update={"redis_outage_s": 5.0})
        warning = failover_outlasts_outage(impatient)
        assert warning is not None and "GRADSTREAM_REDIS_OUTAGE_S" in warning
    finally:
        stack.stop()
    assert failover_outlasts_outage(settings) is None  # no sentinel answers: nothing known


def _settings_of(env: dict[str, str]) -> dict[str, str]:
    return {name.removeprefix("GRADSTREAM_").lower(): value for name, value in env.items()}
