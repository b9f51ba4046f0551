"""Sweeps (DESIGN §9): the sweep's record, its members (jobs with a `sweep` and a `group`
field) and its groups (job-like units of work that a worker claims, leases and checkpoints
like a job), and the one fenced script that flushes a whole group's step."""

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis

from services.errors import LimitExceeded, SweepActive, SweepFinished, SweepNotFound
from services.records import FIELD_COUNT, FIELD_ROWS, Chunk
from services.schemas import (
    SWEEP_MEMBERS_PAGE,
    AttemptEnvironment,
    HalvingCut,
    JobSpec,
    JobStatus,
    JobSummary,
    SweepBest,
    SweepGroup,
    SweepMember,
    SweepSpec,
    SweepStatus,
    SweepSummary,
    SweepView,
)
from services.store import keys
from services.store.base import RedisPart, translate_redis_errors
from services.store.jobs import IDEMPOTENCY_TTL_S, spec_summary
from services.sweeps_math import close, rank_by_loss

# A group's record holds this JSON as its `spec` ("group" first), so that a claim tells a
# group from a job (services/runner.py).
GROUP_SPEC_PREFIX = '{"group":'


def group_spec(
    group_id: str, sweep_id: str, members: list[str], early_stop: Any, metric: str = "loss"
) -> str:
    """The `spec` field of a group's record: its members, the sweep's early stop rule and the
    metric it ranks by."""
    return json.dumps(
        {
            "group": group_id,
            "sweep": sweep_id,
            "members": members,
            "early_stop": early_stop,
            "metric": metric,
        }
    )


# Members whose status one read of a filtered member listing checks (a batch: one
# ZRANGEBYSCORE and one pipeline of HGETs).
MEMBER_STATUS_BATCH = 256

# What a sweep's view reads of each member.
_MEMBER_FIELDS = ("status", "steps_done", "loss", "result", "val_loss")


@dataclass(frozen=True)
class NewRecord:
    """A record a sweep's submit writes: the sweep itself, a group or a member."""

    id: str
    kind: str  # 'sweep', 'group' or 'member'
    fields: dict[str, Any]


@dataclass(frozen=True)
class GroupWork:
    """What an attempt at a group trains: its members (in member order), their specs and
    their statuses when it was claimed."""

    sweep_id: str
    member_ids: list[str]
    specs: list[JobSpec]
    statuses: list[str]


@dataclass(frozen=True)
class MemberFlush:
    """One member's part of a group's flush."""

    member_id: str
    rows: bytes  # its chunk's rows (b'' for a flush without steps)
    loss: float | None  # the last step's loss (None: not finite, or no step)
    kept: int  # how many of the chunk's steps are its (fewer once it diverged)
    end: JobStatus | None = None  # the member ends now with this status
    result: dict[str, Any] | None = None
    error: str | None = None
    val_loss: float | None = None  # the chunk's last evaluated validation loss, if any


@dataclass(frozen=True)
class GroupFlushed:
    """What a group's flush answered: `ok`, `finished`, `fenced` or `gap` (`stored` the step
    to resume from), and the members no longer training, with their status."""

    reply: str
    gone: dict[str, str]
    stored: int = 0


def _float(raw: bytes | None) -> float | None:
    if not raw:
        return None
    value = float(raw)
    return value if math.isfinite(value) else None


def _time(raw: bytes | None) -> datetime | None:
    return datetime.fromisoformat(raw.decode()) if raw else None


def _fields(record: list[bytes | None]) -> tuple[list[bytes | None], bytes | None]:
    """A member record read as _MEMBER_FIELDS and then `group`: the former, and its group."""
    return record[:-1], record[-1]


def _member(
    member_id: str,
    index: int,
    values: dict[str, Any],
    record: list[bytes | None],
    group: bytes | None,
    position: dict[str, int],
) -> SweepMember:
    """A member as its sweep shows it, from its record's _MEMBER_FIELDS and its group's id
    (`position`: each group's place in the sweep's groups)."""
    status, steps, loss, result, val_loss = record
    assert status is not None and steps is not None
    outcome = json.loads(result) if result else {}
    return SweepMember(
        id=member_id,
        index=index,
        values=values,
        status=JobStatus(status.decode()),
        steps_done=int(steps),
        loss=_float(loss),
        final_loss=outcome.get("full_loss"),
        val_loss=_float(val_loss),
        final_val_loss=outcome.get("val_loss"),
        group=position.get(group.decode()) if group else None,
    )


class Sweeps(RedisPart):
    """Sweep records, their members and groups."""

    @translate_redis_errors
    def create_sweep(
        self,
        sweep: NewRecord,
        groups: Iterable[NewRecord],
        members: Iterable[NewRecord],
        tenant: str,
        reserved: int,
        max_active: int,
        storage_limit: int,
        idempotency: str | None = None,
    ) -> str | None:
        """Write the sweep, its groups and its members (all queued) in one script, or nothing:
        LimitExceeded when the tenant has `max_active` jobs and sweeps active, or when the
        sweep's bytes (every member's spec and steps, counted up front) do not fit. With an
        idempotency key the tenant already used for a sweep (within a day), writes nothing
        and returns that sweep's id; else None."""
        args: list[Any] = [sweep.id, tenant, max_active, storage_limit, reserved, IDEMPOTENCY_TTL_S]
        for record in (sweep, *groups, *members):
            args += [record.id, record.kind, len(record.fields)]
            for name, value in record.fields.items():
                args += [name, value]
        script_keys = [keys.sweep_key(sweep.id), keys.sweep_events_key(sweep.id)]
        if idempotency is not None:
            script_keys.append(keys.sweep_idempotency_key(tenant, idempotency))
        reply = self.lua.create_sweep(keys=script_keys, args=args)
        if reply[0] == b"existing":
            existing: str = reply[1].decode()
            return existing
        if reply[0] == b"limit":
            raise LimitExceeded(
                "max_active_jobs_per_tenant",
                f"tenant {tenant!r} has {int(reply[1])} jobs and sweeps queued or running; "
                f"max_active_jobs_per_tenant is {max_active} (a sweep counts as one)",
            )
        if reply[0] == b"storage":
            raise LimitExceeded(
                "tenant_storage_bytes",
                f"tenant {tenant!r} keeps {int(reply[1])} bytes; this sweep needs {reserved} "
                f"more (its spec and inline data, every member's spec and step records), and "
                f"tenant_storage_bytes is {storage_limit}: delete finished jobs, sweeps or "
                "datasets",
            )
        return None

    @translate_redis_errors
    def sweep_fields(self, sweep_id: str, tenant: str | None = None) -> dict[bytes, bytes]:
        """The sweep's record; SweepNotFound also for another tenant's sweep."""
        fields: dict[bytes, bytes] = self.redis.hgetall(keys.sweep_key(sweep_id))
        if not fields or (tenant is not None and fields.get(b"tenant") != tenant.encode()):
            raise SweepNotFound(sweep_id)
        return fields

    def member_ids(self, sweep_id: str) -> list[str]:
        ids = self.redis.zrange(keys.sweep_members_key(sweep_id), 0, -1)
        return [i.decode() for i in ids]

    @translate_redis_errors
    def get_sweep(
        self,
        sweep_id: str,
        tenant: str | None = None,
        members_limit: int = SWEEP_MEMBERS_PAGE,
        members_cursor: str | None = None,
    ) -> SweepView:
        """The sweep: counts, best and groups of all its members, and a page of members (after
        the member index `members_cursor`) with their status, steps, last and final loss."""
        return self._view(self.sweep_fields(sweep_id, tenant), members_limit, members_cursor)

    def _view(self, fields: dict[bytes, bytes], limit: int, cursor: str | None) -> SweepView:
        """The view from the sweep's record. Counts come from the record (`c:<status>`, kept
        by every member's status change), the best from the sorted set of succeeded members'
        final metric: reading a sweep reads its page of members (and its groups' records),
        whatever its size. `limit` 0: no members, no groups (a listing's summary)."""
        sweep_id = fields[b"id"].decode()
        values: list[dict[str, Any]] = json.loads(fields[b"values"])
        spec = SweepSpec.model_validate_json(fields[b"spec"])
        metric = spec.metric or "loss"
        group_ids = fields.get(b"groups", b"").decode().split()
        if b"member_count" not in fields:  # stored before sweeps kept their counts
            return self._view_reading_members(fields, values, spec, group_ids, limit, cursor)
        # In JobStatus order, as listings and the CLI print them (a hash's order is Redis's).
        counts = {
            status: n
            for status in JobStatus
            if (n := int(fields.get(f"c:{status.value}".encode(), 0))) > 0
        }
        members, members_next = self._member_page(sweep_id, values, group_ids, limit, cursor)
        return self._sweep_view(
            fields,
            spec,
            group_ids,
            limit,
            counts=counts,
            member_count=int(fields[b"member_count"]),
            members=members,
            members_next=members_next,
            best=self._best_of_finals(sweep_id, values, metric),
        )

    def _sweep_view(
        self,
        fields: dict[bytes, bytes],
        spec: SweepSpec,
        group_ids: list[str],
        limit: int,
        **members: Any,
    ) -> SweepView:
        """A SweepView of the sweep's record fields, with its `members` part (counts,
        member_count, members, members_next, best) read as the caller reads it."""
        return SweepView(
            id=fields[b"id"].decode(),
            name=fields[b"name"].decode() or None,
            status=SweepStatus(fields[b"status"].decode()),
            spec=spec,
            created_at=datetime.fromisoformat(fields[b"created_at"].decode()),
            started_at=_time(fields.get(b"started_at")),
            finished_at=_time(fields.get(b"finished_at")),
            groups=len(group_ids),
            group_details=self._groups(group_ids) if limit else [],
            **members,
        )

    def _member_page(
        self,
        sweep_id: str,
        values: list[dict[str, Any]],
        group_ids: list[str],
        limit: int,
        cursor: str | None,
    ) -> tuple[list[SweepMember], str | None]:
        """`limit` members after the member index `cursor`, and the next page's cursor."""
        if limit == 0:
            return [], None
        lower = "-inf" if cursor is None else f"({int(cursor)}"
        found = self.redis.zrangebyscore(
            keys.sweep_members_key(sweep_id), lower, "+inf", 0, limit + 1, withscores=True
        )
        page = [(member_id.decode(), int(index)) for member_id, index in found[:limit]]
        pipe = self.redis.pipeline(transaction=False)
        for member_id, _ in page:
            pipe.hmget(keys.job_key(member_id), (*_MEMBER_FIELDS, "group"))
        position = {group_id: i for i, group_id in enumerate(group_ids)}
        members = []
        for (member_id, index), record in zip(page, pipe.execute(), strict=True):
            if record[0] is None:
                continue  # deleted
            members.append(_member(member_id, index, values[index], *_fields(record), position))
        return members, (str(page[-1][1]) if len(found) > limit else None)

    def _groups(self, group_ids: list[str]) -> list[SweepGroup]:
        """Each group's status, size, steps and the cuts halving made in it."""
        pipe = self.redis.pipeline(transaction=False)
        for group_id in group_ids:
            pipe.hmget(keys.job_key(group_id), "status", "steps_done", "members", "halving")
        groups = []
        for group_id, (status, steps, members, halving) in zip(
            group_ids, pipe.execute(), strict=True
        ):
            if status is None:
                continue
            rungs = [
                HalvingCut(step=int(step), ranked=int(ranked), kept=int(kept))
                for step, ranked, kept in (cut.split(b":") for cut in (halving or b"").split())
            ]
            groups.append(
                SweepGroup(
                    id=group_id,
                    status=JobStatus(status.decode()),
                    members=len((members or b"").split()),
                    steps_done=int(steps or 0),
                    rungs=rungs,
                )
            )
        return groups

    def _best_of_finals(
        self, sweep_id: str, values: list[dict[str, Any]], metric: str
    ) -> SweepBest | None:
        """The succeeded member with the lowest final metric; equal within the rank tolerance,
        the first in member order (DESIGN §11): the lowest value, the values within the
        tolerance of it, their members' indexes, the winner's result."""
        finals = keys.sweep_finals_key(sweep_id, metric)
        lowest = self.redis.zrange(finals, 0, 0, withscores=True)
        if not lowest:
            return None
        floor = float(lowest[0][1])
        if floor >= 0 and self.rank_rtol < 1:  # losses are never negative
            ceiling: float | str = floor / (1 - self.rank_rtol) * (1 + 1e-12) + 1e-300
        else:
            ceiling = "+inf"
        near = self.redis.zrangebyscore(finals, floor, ceiling, withscores=True)
        tie = [member_id for member_id, value in near if close(floor, value, self.rank_rtol)]
        indexes = self.redis.zmscore(keys.sweep_members_key(sweep_id), tie)
        ranked = [(int(i), m) for m, i in zip(tie, indexes, strict=True) if i is not None]
        if not ranked:
            return None  # deleted meanwhile
        index, winner = min(ranked)
        result = json.loads(self.redis.hget(keys.job_key(winner.decode()), "result") or b"{}")
        return SweepBest(
            id=winner.decode(),
            values=values[index],
            final_loss=result["full_loss"],
            final_val_loss=result.get("val_loss"),
        )

    def _view_reading_members(
        self,
        fields: dict[bytes, bytes],
        values: list[dict[str, Any]],
        spec: SweepSpec,
        group_ids: list[str],
        limit: int,
        cursor: str | None,
    ) -> SweepView:
        """The view of a sweep stored before sweeps kept their counts and finals: counts and
        best from every member's record, then the page."""
        sweep_id = fields[b"id"].decode()
        ids = self.member_ids(sweep_id)
        pipe = self.redis.pipeline(transaction=False)
        for member_id in ids:
            pipe.hmget(keys.job_key(member_id), (*_MEMBER_FIELDS, "group"))
        position = {group_id: i for i, group_id in enumerate(group_ids)}
        members, counts = [], dict.fromkeys(JobStatus, 0)
        for index, (member_id, record) in enumerate(zip(ids, pipe.execute(), strict=True)):
            if record[0] is None:
                continue  # deleted
            member = _member(member_id, index, values[index], *_fields(record), position)
            counts[member.status] += 1
            members.append(member)
        after = [m for m in members if cursor is None or (m.index or 0) > int(cursor)]
        return self._sweep_view(
            fields,
            spec,
            group_ids,
            limit,
            counts={status: n for status, n in counts.items() if n},
            member_count=len(members),
            members=after[:limit],
            members_next=str(after[limit - 1].index) if limit and len(after) > limit else None,
            best=self._best(members, spec.metric or "loss"),
        )

    @translate_redis_errors
    def sweep_summary(self, sweep_id: str, tenant: str | None = None) -> SweepSummary:
        """The sweep as listings show it: counts and best, no members, no inline data."""
        return self._summary(self._view(self.sweep_fields(sweep_id, tenant), 0, None))

    @staticmethod
    def _summary(view: SweepView) -> SweepSummary:
        spec = view.spec.model_dump(mode="json")
        if spec["base"].get("data") is not None:
            spec["base"] = spec_summary(spec["base"])
        return SweepSummary(
            **view.model_dump(
                exclude={"spec", "members", "members_next", "group_details", "member_count"}
            ),
            spec=spec,
            member_count=view.member_count,
        )

    def _best(self, members: list[SweepMember], metric: str) -> SweepBest | None:
        """The succeeded member with the lowest final metric; equal within the rank tolerance,
        the first in member order (DESIGN §11)."""

        def final(member: SweepMember) -> float | None:
            return member.final_val_loss if metric == "val_loss" else member.final_loss

        succeeded = [
            m
            for m in members
            if m.status is JobStatus.SUCCEEDED and m.final_loss is not None and final(m) is not None
        ]
        if not succeeded:
            return None
        first = succeeded[rank_by_loss([final(m) for m in succeeded], self.rank_rtol)[0]]
        assert first.final_loss is not None
        return SweepBest(
            id=first.id,
            values=first.values,
            final_loss=first.final_loss,
            final_val_loss=first.final_val_loss,
        )

    @translate_redis_errors
    def list_sweeps(
        self, tenant: str, limit: int, cursor: str | None
    ) -> tuple[list[SweepSummary], str | None]:
        """The tenant's sweeps as summaries, newest first; `cursor` is the last id of the
        previous page."""
        upper = "+" if cursor is None else f"({cursor}"
        found = self.redis.zrevrangebylex(keys.tenant_sweeps(tenant), upper, "-", 0, limit + 1)
        ids = [i.decode() for i in found]
        views = []
        for sweep_id in ids[:limit]:
            fields = self.redis.hgetall(keys.sweep_key(sweep_id))
            if fields:
                views.append(self._summary(self._view(fields, 0, None)))
        return views, (ids[limit - 1] if len(ids) > limit else None)

    def _check_owner(self, sweep_id: str, tenant: str) -> None:
        """SweepNotFound unless the sweep is `tenant`'s: one field, not the whole record (its
        spec may hold inline data, its values one entry per member)."""
        if self.redis.hget(keys.sweep_key(sweep_id), "tenant") != tenant.encode():
            raise SweepNotFound(sweep_id)

    @translate_redis_errors
    def list_members(
        self, sweep_id: str, tenant: str, status: JobStatus | None, limit: int, cursor: str | None
    ) -> tuple[list[JobSummary], str | None]:
        """A sweep's members in member order (GET /v1/jobs?sweep=); `cursor` is the last
        member index of the previous page. Reads the page's records only; with a `status`,
        the members' statuses in batches after the cursor until the page is full."""
        self._check_owner(sweep_id, tenant)
        if cursor is not None and not cursor.isdigit():
            return [], None  # names no member: nothing comes after it
        lower = "-inf" if cursor is None else f"({int(cursor)}"
        matched: list[tuple[str, int]] = []  # (member id, index), one past the page at most
        batch = limit + 1 if status is None else max(limit + 1, MEMBER_STATUS_BATCH)
        while len(matched) <= limit:
            found = self.redis.zrangebyscore(
                keys.sweep_members_key(sweep_id), lower, "+inf", 0, batch, withscores=True
            )
            ids = [(member_id.decode(), int(score)) for member_id, score in found]
            if status is None:
                matched += ids
            else:
                pipe = self.redis.pipeline(transaction=False)
                for member_id, _ in ids:
                    pipe.hget(keys.job_key(member_id), "status")
                statuses = pipe.execute()
                wanted = status.value.encode()
                matched += [m for m, s in zip(ids, statuses, strict=True) if s == wanted]
            if len(found) < batch:
                break
            lower = f"({ids[-1][1]}"
        page = matched[:limit]
        rows = self.summaries([member_id for member_id, _ in page])
        if status is not None:  # a member may have moved on between the two reads
            rows = [row for row in rows if row.status is status]
        return rows, (str(page[-1][1]) if len(matched) > limit else None)

    @translate_redis_errors
    def cancel_sweep(self, sweep_id: str, tenant: str) -> None:
        """Cancel every unfinished member: queued ones at once, running ones at their group's
        next flush. SweepFinished once the sweep has ended."""
        self.sweep_fields(sweep_id, tenant)
        reply = self.lua.cancel_sweep(
            keys=[keys.sweep_key(sweep_id)], args=[sweep_id, keys.utc_now()]
        )
        if reply[0] == b"finished":
            raise SweepFinished(sweep_id, reply[1].decode())

    def _drop_sweep(self, sweep_id: str, force: bool) -> list[bytes]:
        reply: list[bytes] = self.lua.delete_sweep(
            keys=[keys.sweep_key(sweep_id)], args=[sweep_id, int(force)]
        )
        return reply

    @translate_redis_errors
    def delete_sweep(self, sweep_id: str, tenant: str) -> None:
        """Delete an ended sweep of `tenant`, its members and groups; SweepActive while it runs."""
        self.sweep_fields(sweep_id, tenant)
        reply = self._drop_sweep(sweep_id, force=False)
        if reply[0] == b"live":
            raise SweepActive(sweep_id, reply[1].decode())
        if reply[0] == b"missing":
            raise SweepNotFound(sweep_id)
        self.remove_archived_files(self.archive, [url.decode() for url in reply[1:]])
        if self.archive is not None:  # what else archiving left in the sweep's folder
            self.archive.remove_sweep(tenant, sweep_id)

    @translate_redis_errors
    def discard_sweep(self, sweep_id: str) -> None:
        """Remove every trace of a sweep whatever its status (one that could not be enqueued)."""
        self._drop_sweep(sweep_id, force=True)

    @translate_redis_errors
    def group_work(self, group_id: str, member_ids: list[str]) -> GroupWork:
        """The specs and statuses of a claimed group's members."""
        pipe = self.redis.pipeline(transaction=False)
        for member_id in member_ids:
            pipe.hmget(keys.job_key(member_id), "spec", "status", "sweep")
        rows = pipe.execute()
        sweep_ids = {row[2] for row in rows if row[2] is not None}
        specs, statuses, kept = [], [], []
        for member_id, (spec, status, _) in zip(member_ids, rows, strict=True):
            if spec is None:
                continue  # deleted
            kept.append(member_id)
            specs.append(JobSpec.model_validate_json(spec))
            statuses.append(status.decode())
        sweep_id = next(iter(sweep_ids)).decode() if sweep_ids else ""
        return GroupWork(sweep_id, kept, specs, statuses)

    @translate_redis_errors
    def flush_group(
        self,
        group_id: str,
        attempt: int,
        chunk: Chunk | None,
        members: list[MemberFlush],
        state: bytes,
        lease_s: float,
        *,
        finish: bool = False,
        environment: AttemptEnvironment | None = None,
        worker: str | None = None,
        rows_in_script: bool = False,
    ) -> GroupFlushed:
        """Append each member's chunk (steps `chunk.first ..`, the rows of `members`), end the
        members that end, write the group's checkpoint (`state`, after the chunk's last step)
        and renew its lease; with `finish` end the group. Fenced by the group's attempt and
        atomic (DESIGN §9, exactly once for every member): one MULTI block of the members'
        XADDs and the COMMIT_GROUP script under a WATCH of the records the fence reads
        (GroupFlushTry), tried again when another client changed one of them meanwhile; after
        WATCH_TRIES refusals, or with `rows_in_script`, one FLUSH_GROUP script that passes the
        rows through its arguments (three times slower in Redis: bench/group_flush.py). The
        attempt's first flush (and one after its stepper changed) carries its `environment`,
        recorded on the group and its members."""
        flush = GroupFlushTry(
            self, group_id, attempt, chunk, members, state, lease_s, finish, environment, worker
        )
        if not rows_in_script:
            for _ in range(WATCH_TRIES):
                flush.watch()
                flushed = flush.commit()
                if flushed is not None:
                    return flushed
        return flush.in_script()

    @translate_redis_errors
    def sweep_events(
        self, sweep_id: str, after: int, count: int = 100
    ) -> list[tuple[int, str, str]]:
        """The sweep's events after sequence number `after`: (seq, type, data)."""
        entries = self.redis.xrange(
            keys.sweep_events_key(sweep_id), f"({keys.step_entry_id(after)}", "+", count
        )
        return [
            (int(entry_id.split(b"-")[0]), f[b"type"].decode(), f[b"data"].decode())
            for entry_id, f in entries
        ]


# Tries of a group's flush under WATCH before it falls back to FLUSH_GROUP: a refusal means
# that another client changed the group's record or a member's meanwhile (a claim, a hand-back,
# a cancel), which is rare, and the script decides every case alone.
WATCH_TRIES = 3


def _number(value: float | None) -> str:
    """A loss as the scripts' lists carry it: '-' for none or not finite."""
    return "-" if value is None or not math.isfinite(value) else repr(value)


def _group_reply(reply: list[bytes]) -> GroupFlushed:
    """The reply of FLUSH_GROUP or COMMIT_GROUP."""
    outcome = reply[0].decode()
    if outcome == "gap":
        return GroupFlushed(outcome, {}, int(reply[1]))
    rest = reply[1:]
    gone = {rest[i].decode(): rest[i + 1].decode() for i in range(0, len(rest), 2)}
    return GroupFlushed(outcome, gone)


_MULTI = b"*1\r\n$5\r\nMULTI\r\n"
_EXEC = b"*1\r\n$4\r\nEXEC\r\n"


def _bulk(value: bytes) -> bytes:
    """`value` as a RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _resp(args: list[Any]) -> bytes:
    """A command as RESP (its arguments str, int or bytes)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = str(arg).encode()
        parts.append(_bulk(arg))
    return b"".join(parts)


def _transaction(connection: Any, block: bytes, queued: int) -> list[Any] | None:
    """Send `block` (MULTI, `queued` - 1 commands, EXEC) and read its replies, as redis-py's
    pipeline does: EXEC's replies, or None when a watched key changed (EXEC answers nil).

    Every reply is read even after an error, so that the connection stays in step; a command
    refused as it was queued (OOM, a wrong argument) makes Redis refuse the block at EXEC,
    and its error is raised, not EXECABORT's. A connection lost midway is dropped (redis-py
    raises ConnectionError, and disconnects it) with the block unapplied or applied whole:
    the retry decides which (DESIGN "Why a retry cannot duplicate")."""
    try:
        connection.send_packed_command([block])
        errors: list[redis.ResponseError] = []
        for _ in range(queued):
            try:
                connection.read_response()
            except redis.ResponseError as exc:
                errors.append(exc)
        try:
            replies = connection.read_response()
        except redis.exceptions.ExecAbortError as exc:
            if errors:
                raise errors[0] from exc
            # Redis refuses the whole block at EXEC when it went over its maxmemory after the
            # commands were queued: nothing was written, as for a script refused for memory.
            if "OOM" in str(exc):
                raise redis.exceptions.OutOfMemoryError(str(exc)) from exc
            raise
    except (redis.ConnectionError, redis.TimeoutError):
        connection.disconnect()
        raise
    if replies is None:
        return None
    for reply in replies:
        if isinstance(reply, redis.ResponseError):
            raise reply
    return list(replies)


class GroupFlushTry:
    """A group's flush with its rows outside the Lua (DESIGN "Exactly once per member").

    Passing 8 MB of rows through one script's arguments costs Redis about three times what
    the same XADDs cost sent as commands, so the rows go as commands: `watch()` WATCHes the
    group's record and its members' (everything the fence reads: the attempt, the hand-back,
    the statuses, the stored step) and asks CHECK_GROUP_FLUSH which members get a row;
    `commit()` sends those XADDs and then COMMIT_GROUP (the bookkeeping of FLUSH_GROUP, its
    same checks) in one MULTI block. Redis runs the block whole, or not at all when a watched
    record changed after the check (a newer attempt's claim, a hand-back, a member's cancel or
    delete): a stale attempt's rows are never written, whenever they are sent. Nothing is
    staged, so an attempt that dies before EXEC leaves nothing behind. `in_script()` is the
    same flush as one FLUSH_GROUP script."""

    def __init__(
        self,
        sweeps: Sweeps,
        group_id: str,
        attempt: int,
        chunk: Chunk | None,
        members: list[MemberFlush],
        state: bytes,
        lease_s: float,
        finish: bool,
        environment: AttemptEnvironment | None,
        worker: str | None,
    ) -> None:
        self.sweeps, self.group_id, self.attempt = sweeps, group_id, attempt
        self.chunk, self.members = chunk, members
        # What every member's entry carries besides its count and rows (the chunk's first
        # step, features, bias...), in the order the scripts append them.
        self.common: dict[bytes, bytes | int] = {}
        if chunk is not None:
            self.common = {
                name: value
                for name, value in chunk.fields().items()
                if name not in (FIELD_ROWS, FIELD_COUNT)  # each member's own
            }
        self.head: list[Any] = [
            group_id,
            attempt,
            chunk.first if chunk else -1,
            chunk.count if chunk else 0,
            keys.utc_now(),
            int(lease_s * 1000),
            state,
            "1" if finish else "",
            environment.model_dump_json() if environment else "",
            len(self.common),
        ]
        for name, value in self.common.items():
            self.head += [name, value]
        self.script_keys = [*keys.job_keys(group_id)]
        if worker is not None:
            self.script_keys.append(keys.worker_key(worker))
        self.pipe: Any = None
        self.live = ""

    def _args(self, rows: bool) -> list[Any]:
        """The scripts' ARGV (scripts.py, FLUSH_GROUP): the members' rows only with `rows`."""
        members = self.members
        ends = [(i, m) for i, m in enumerate(members, start=1) if m.end is not None]
        args = [
            *self.head,
            " ".join(m.member_id for m in members),
            " ".join(str(m.kept) for m in members),
            " ".join(_number(m.loss) for m in members),
            " ".join(_number(m.val_loss) for m in members),
            len(ends),
        ]
        for i, member in ends:
            assert member.end is not None
            args += [
                i,
                member.end.value,
                json.dumps(member.result) if member.result is not None else "",
                member.error or "",
            ]
        if rows:
            args += [m.rows for m in members]
        return args

    def watch(self) -> None:
        """WATCH the records the fence reads, then read which members get a row.

        The group's record holds what fences the attempt (its attempt number, the hand-back,
        its status and stored step), and every change of a running member's status outside
        this flush writes it too (a hand-back or a lapse requeues its members, a group's end
        ends them) but one: a cancel ends a *queued* member (one this attempt has not flushed
        yet) on the member's record alone. So the group's record is watched, and the records
        of the members the check finds queued, before the check is read again. Not every
        member's: WATCH compares each key with those the client watches already, so watching
        a thousand keys costs Redis milliseconds, which only an attempt's first flush (when
        its members are queued) pays."""
        self.reset()
        self.pipe = self.sweeps.redis.pipeline(transaction=True)
        ids = [member.member_id for member in self.members]
        try:
            self.pipe.watch(keys.job_key(self.group_id))
            live = self._check(ids)
            # '' when the block appends no row: nothing to watch but the group's record.
            queued = [i for i, flag in zip(ids, live or "0" * len(ids), strict=True) if flag == "2"]
            if queued:
                self.pipe.watch(*(keys.job_key(i) for i in queued))
                live = self._check(ids)
        except BaseException:
            self.reset()
            raise
        self.live = live

    def _check(self, ids: list[str]) -> str:
        first, count = (self.chunk.first, self.chunk.count) if self.chunk else (-1, 0)
        live: bytes = self.sweeps.lua.check_group_flush(
            keys=[keys.job_key(self.group_id)],
            args=[self.attempt, first, count, " ".join(ids)],
            client=self.pipe,
        )
        return live.decode()

    def commit(self) -> GroupFlushed | None:
        """The members' XADDs and COMMIT_GROUP in one MULTI block: the flush's reply, or None
        when a watched record changed since `watch()` (nothing was written; watch again).

        The block is written as RESP by hand (`_block`) and sent whole on the connection the
        WATCH holds, its replies read after: through redis-py's pipeline, queueing a thousand
        XADDs one `execute_command` at a time and running each reply's callback cost this
        process as much as Redis's own work on the block (bench/group_flush.py)."""
        pipe = self.pipe
        try:
            connection = pipe.connection
            commands = 1  # MULTI
            packed = [_MULTI]
            if self.live and self.chunk is not None:
                commands += self._xadds(packed)
            # By its text (EVAL), not its SHA: Redis hashes 20 kB and finds it compiled, and a
            # script cache emptied since the check (a restart, SCRIPT FLUSH) cannot leave the
            # block's XADDs applied without their commit (NOSCRIPT is an error at EXEC).
            script = self.sweeps.lua.commit_group
            packed.append(
                _resp(
                    [
                        "EVAL",
                        script.script,
                        len(self.script_keys),
                        *self.script_keys,
                        *self._args(False),
                    ]
                )
            )
            packed.append(_EXEC)
            replies = _transaction(connection, b"".join(packed), commands + 1)
            # EXEC (or its refusal) ended the WATCH: no UNWATCH to send.
            pipe.watching = False
        finally:
            self.reset()
        return None if replies is None else _group_reply(replies[-1])

    def _xadds(self, packed: list[bytes]) -> int:
        """Append to `packed` the XADDs of the members' entries (the entry FLUSH_GROUP would
        append: its count, its rows, the shared fields), as RESP; how many."""
        chunk = self.chunk
        assert chunk is not None
        common = b"".join(
            _bulk(v if isinstance(v, bytes) else str(v).encode())
            for pair in self.common.items()
            for v in pair
        )
        head = b"*%d\r\n$4\r\nXADD\r\n" % (7 + 2 * len(self.common))
        count = _bulk(FIELD_COUNT)
        rows = _bulk(FIELD_ROWS)
        added = 0
        for member, live in zip(self.members, self.live, strict=True):
            if live != "0" and member.kept > 0:
                packed += [
                    head,
                    _bulk(keys.steps_key(member.member_id).encode()),
                    _bulk(keys.step_entry_id(chunk.first + member.kept - 1).encode()),
                    count,
                    _bulk(str(member.kept).encode()),
                    rows,
                    b"$%d\r\n" % len(member.rows),
                    member.rows,
                    b"\r\n",
                    common,
                ]
                added += 1
        return added

    def reset(self) -> None:
        """UNWATCH and give the connection back (a try that stops before its EXEC)."""
        if self.pipe is not None:
            self.pipe.reset()
            self.pipe = None

    def in_script(self) -> GroupFlushed:
        """The same flush as one FLUSH_GROUP script, its rows in its arguments."""
        return _group_reply(
            self.sweeps.lua.flush_group(keys=self.script_keys, args=self._args(True))
        )
