"""Real parts for the tests: a private redis-server on a free port, uvicorn, Celery workers.

Session-wide: one redis-server, one API and one CPU worker (prefork, as deployed). Tests that
need other workers start their own through the same Stack and stop them afterwards.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from api.client import Client
from cli.main import SEED_EXAMPLE
from cli.stack import Stack
from services.store import Store
from services.training import inductor_cache_dir

__all__ = ["SEED_EXAMPLE"]

# One torch thread, as workers run: steps computed here (references, attempts run in this
# process) are the workers' numbers, compiled code included (Inductor's code depends on it).
torch.set_num_threads(1)
# Compiled code cached per CPU instruction set, as workers keep it: a run of the suite under
# ATEN_CPU_CAPABILITY=default must not find the code built for this machine's AVX2.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir()

# Short intervals so that tests see keep-alives, heartbeats and lapsed workers quickly.
TEST_ENV = {
    "GRADSTREAM_SSE_KEEPALIVE_S": "1",
    "GRADSTREAM_WORKER_HEARTBEAT_S": "0.5",
    "GRADSTREAM_WORKER_TTL_S": "3",
    "GRADSTREAM_LOG_LEVEL": "info",
    "GRADSTREAM_MAX_SSE_PER_TENANT": "1000",  # tests/test_fanout.py opens 150 streams at once
}


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    run_dir: Path = tmp_path_factory.mktemp("stack")
    local = Stack(run_dir, env=TEST_ENV, tenants=("alice", "bob"))
    try:
        local.start_redis()
        local.start_api()
        local.start_worker("cpu")
        local.wait_for_workers({"cpu"})
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
def redis_client(stack: Stack) -> Iterator["redis.Redis"]:
    client = redis.Redis.from_url(stack.redis_url)
    yield client
    client.close()


@pytest.fixture
def client(stack: Stack) -> Iterator[Client]:
    with Client(stack.api_url, stack.api_key, timeout=10) as api:
        yield api


@pytest.fixture
def store(stack: Stack) -> Iterator[Store]:
    store = Store.from_url(stack.redis_url)
    yield store
    store.redis.close()
