"""Attempts at a job (DESIGN §4 `gs:{J}:lease` and `gs:{J}:ckpt`, §5): claim, flush steps with
their checkpoint, renew the lease, hand the job back, fail. Each is one fenced script: an
attempt writes only while no newer attempt claimed the job and it has not handed it back."""

import json
import struct
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script
from redis.connection import Connection

from services.records import Chunk
from services.schemas import AttemptEnvironment, JobStatus
from services.store import keys
from services.store.base import RedisPart, translate_redis_errors


@dataclass(frozen=True)
class Checkpoint:
    """The state after the last stored step: resume runs step `step` next."""

    step: int
    theta: bytes  # float32 parameters [w..., b], raw
    optimizer: bytes  # the optimizer's and schedule's state, torch.save format ('' if none)
    loss: float | None = None  # the loss of step `step - 1` (stop rules compare with it)

    @property
    def loss_bytes(self) -> bytes:
        return b"" if self.loss is None else struct.pack("<f", self.loss)


@dataclass(frozen=True)
class Claim:
    """What claiming a job gave: `claimed` with the attempt, spec and checkpoint, or why not
    (`missing`, `finished`, `busy`: another attempt holds a live lease, `cancelled`, `failed`)."""

    outcome: str
    attempt: int = 0
    spec_json: str = ""
    checkpoint: Checkpoint | None = None
    status: str = ""
    stepper: str | None = None  # the step implementation an earlier attempt recorded


def _checkpoint(saved: dict[bytes, bytes]) -> Checkpoint | None:
    if not saved:
        return None
    raw_loss = saved.get(b"loss", b"")
    loss = struct.unpack("<f", raw_loss)[0] if len(raw_loss) == 4 else None
    return Checkpoint(int(saved[b"step"]), saved[b"theta"], saved[b"optimizer"], loss)


def _attempt_keys(job_id: str, worker: str | None) -> list[str]:
    """The KEYS of a script an attempt runs: the job's, and its worker's registry entry, whose
    current job the claim set and the script that ends the attempt clears."""
    script_keys = keys.job_keys(job_id)
    if worker is not None:
        script_keys.append(keys.worker_key(worker))
    return script_keys


def _flush_arguments(
    job_id: str,
    attempt: int,
    chunk: Chunk | None,
    checkpoint: Checkpoint | None,
    lease_s: float,
    finish: JobStatus | None,
    result: dict[str, Any] | None,
    error: str | None,
    worker: str | None,
    environment: AttemptEnvironment | None,
) -> tuple[list[str], list[Any]]:
    """The KEYS and ARGV of the FLUSH script (services/store/scripts.py)."""
    args: list[Any] = [
        job_id,
        attempt,
        chunk.first if chunk else -1,
        keys.step_entry_id(chunk.last) if chunk else "",
        keys.utc_now(),
        finish.value if finish else "",
        json.dumps(result) if result is not None else "",
        error or "",
        int(lease_s * 1000),
        checkpoint.theta if checkpoint else b"",
        checkpoint.optimizer if checkpoint else b"",
        checkpoint.loss_bytes if checkpoint else b"",
        environment.model_dump_json() if environment else "",
    ]
    if chunk is not None:
        for name, value in chunk.fields().items():
            args += [name, value]
    return _attempt_keys(job_id, worker), args


class SentFlush:
    """A flush script sent on a connection of its own whose reply is not read yet.

    `reply()` answers as `Store.flush_steps` would, errors included (StoreUnavailable,
    StorageFull). Where the reply cannot be read (the connection dropped, or the script was
    never sent), whether the script ran is unknown: `reply()` then runs it again, and again on
    each call after a StoreUnavailable (retry_through_outage's loop). That is safe because the
    script recognises a retry of a flush it applied. Redis without the script (restarted or
    failed over since it was loaded: NOSCRIPT, nothing ran) gets it run by the client, which
    loads it first."""

    def __init__(
        self, client: "redis.Redis", script: Script, script_keys: list[str], args: list[Any]
    ) -> None:
        self._pool = client.connection_pool
        self._script, self._keys, self._args = script, script_keys, args
        self._connection: Connection | None = None
        try:
            self._connection = self._pool.get_connection()
            self._connection.send_command(
                "EVALSHA", script.sha, len(script_keys), *script_keys, *args
            )
        except (redis.ConnectionError, redis.TimeoutError):
            # Not sent, or not all of it: redis-py closed the connection (or never had one),
            # and the first reply() runs the script again.
            self.close()

    @translate_redis_errors
    def reply(self) -> str:
        """What the script answered: `ok`, `finished`, `cancelled`, `fenced` or `gap`."""
        connection = self._connection
        if connection is None:
            answer = self._script(keys=self._keys, args=self._args)
        else:
            try:
                answer = connection.read_response()
            except redis.exceptions.NoScriptError:
                answer = self._script(keys=self._keys, args=self._args)
            finally:
                # An error that leaves the connection unusable has closed it already (redis-py
                # disconnects on a read that fails), so it goes back to the pool either way.
                self._pool.release(connection)
                self._connection = None
        return str(answer[0].decode())

    def close(self) -> None:
        """Give the connection back without reading the reply (the attempt ended before it
        read it: the script runs anyway, and the unread reply must not reach another user of
        the connection)."""
        if self._connection is not None:
            self._connection.disconnect()
            self._pool.release(self._connection)
            self._connection = None


class Attempts(RedisPart):
    """Claims, leases, flushes and checkpoints."""

    @translate_redis_errors
    def claim_job(self, job_id: str, worker: str, lease_s: float, max_attempts: int) -> Claim:
        """Take the job for a new attempt, with a lease of `lease_s` and the latest checkpoint;
        the job becomes `worker`'s current one in the registry."""
        args = [job_id, worker, keys.utc_now(), int(lease_s * 1000), max_attempts]
        script_keys = [*keys.job_keys(job_id), keys.worker_key(worker)]
        reply = self.lua.claim(keys=script_keys, args=args)
        outcome = reply[0].decode()
        if outcome != "claimed":
            return Claim(outcome, status=reply[1].decode())
        saved = dict(zip(reply[4::2], reply[5::2], strict=True))
        stepper = reply[3].decode() or None
        return Claim(outcome, int(reply[1]), reply[2].decode(), _checkpoint(saved), stepper=stepper)

    @translate_redis_errors
    def flush_steps(
        self,
        job_id: str,
        attempt: int,
        chunk: Chunk | None,
        checkpoint: Checkpoint | None,
        lease_s: float,
        *,
        finish: JobStatus | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        worker: str | None = None,
        environment: AttemptEnvironment | None = None,
    ) -> str:
        """Append a chunk of steps with the checkpoint after its last step, renew the lease,
        and with `finish` end the job: one atomic script, fenced by the attempt number. The
        attempt's first flush carries its `environment` (the first attempt's stepper becomes
        the job's).

        Returns `ok`, `finished`, `cancelled` (a cancel was asked for: stop), `fenced` (a newer
        attempt owns the job, or this one handed it back: stop without touching it) or `gap`
        (the chunk does not follow the stored steps: Redis lost recent writes, so resume from
        the stored checkpoint). StorageFull when Redis is full (nothing written).
        """
        script_keys, args = _flush_arguments(
            job_id, attempt, chunk, checkpoint, lease_s, finish, result, error, worker, environment
        )
        reply = self.lua.flush(keys=script_keys, args=args)
        return str(reply[0].decode())

    def send_flush_steps(
        self,
        job_id: str,
        attempt: int,
        chunk: Chunk | None,
        checkpoint: Checkpoint | None,
        lease_s: float,
        *,
        finish: JobStatus | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        worker: str | None = None,
        environment: AttemptEnvironment | None = None,
    ) -> "SentFlush":
        """`flush_steps`, sent without waiting for Redis's reply, which `SentFlush.reply()`
        reads later: the step loop sends a chunk and goes on (no round trip on its thread,
        and no second thread that takes the GIL to wait for Redis)."""
        script_keys, args = _flush_arguments(
            job_id, attempt, chunk, checkpoint, lease_s, finish, result, error, worker, environment
        )
        return SentFlush(self.redis, self.lua.flush, script_keys, args)

    @translate_redis_errors
    def renew_lease(self, job_id: str, attempt: int, lease_s: float) -> bool:
        """Extend the attempt's lease; False once it no longer owns the job."""
        args = [job_id, attempt, int(lease_s * 1000)]
        return bool(self.lua.renew(keys=keys.job_keys(job_id), args=args))

    @translate_redis_errors
    def release_job(
        self, job_id: str, attempt: int, reason: str, worker: str | None = None
    ) -> str | None:
        """Hand the job back (queued, to resume from its checkpoint); the attempt owns it no
        more. The queue to send it to, '' if it was being cancelled (now cancelled), None if
        the attempt no longer owned it."""
        args = [job_id, attempt, keys.utc_now(), reason]
        queue = self.lua.release(keys=_attempt_keys(job_id, worker), args=args)
        return None if queue is None else str(queue.decode())

    @translate_redis_errors
    def fail_job(self, job_id: str, attempt: int, error: str, worker: str | None = None) -> bool:
        """End the job `failed` with `error`, if `attempt` still owns it."""
        args = [job_id, attempt, error, keys.utc_now()]
        return bool(self.lua.fail(keys=_attempt_keys(job_id, worker), args=args))
