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

# The seed's kind of problem, y = 2x on x = 1, 2, held out against a validation set that says
# y = 0: the better a member fits the training rows, the worse its validation loss. After 10
# steps from w = 0: lr 0.1 has w ≈ 2 (loss ≈ 0, val_loss ≈ 4), lr 0.01 w ≈ 0.8 (3.6, 0.64),
# lr 0.001 w ≈ 0.1 (9, 0.01): ranked by val_loss (the metric of a sweep whose base has eval)
# the order is the reverse of the loss's, every gap orders of magnitude wider than rounding.
HELD_OUT_SWEEP = {
    "name": "held out",
    "base": {
        "data": {"x": [[1.0], [2.0]], "y": [2.0, 4.0]},
        "init": {"w": [0.0]},
        "steps": 10,
        "device": "cpu",
        "eval": {"data": {"x": [[1.0]], "y": [0.0]}, "every": 5},
    },
    "grid": {"optimizer.lr": [0.1, 0.001, 0.01]},
}

# One torch thread, as workers run: steps computed here (references, attempts run in this
# process) are the workers' numbers, compiled code included (Inductor's code depends on it).
torch.set_num_threads(1)
# Compiled code cached per CPU instruction set, as workers keep it: a run of the suite under
# ATEN_CPU_CAPABILITY=default must not find the code built for this machine's AVX2.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir()
# Neither kept nor warmed: the tests' shapes stay out of this machine's list of recent shapes
# (which its real workers compile when they start), and no test worker compiles that list.
# Tests of the list give a folder of their own.
os.environ["GRADSTREAM_COMPILE_RECENT_SHAPES"] = "0"

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
