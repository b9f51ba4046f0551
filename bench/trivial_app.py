"""A Celery app with one trivial task and gradstream's broker and worker settings: the
baseline of bench/throughput.py (`celery -A bench.trivial_app worker`)."""

from functools import cache

import redis
from celery import Celery

from services.config import get_settings
from services.queue import celery_config

app = Celery("trivial", set_as_current=False)


@app.on_configure.connect
def _configure(sender: Celery, **_: object) -> None:
    sender.conf.update(celery_config(get_settings()))


@cache
def _redis() -> "redis.Redis":
    return redis.Redis.from_url(get_settings().redis_url)


@app.task(name="bench.trivial")
def trivial(counter: str) -> None:
    """Count one finished task in Redis; the bench waits for the count."""
    _redis().incr(counter)
