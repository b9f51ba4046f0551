"""A sweep's members and groups (DESIGN §9), worked out from its SweepSpec alone.

Members: every grid point (the product of the grid's lists in the order written, the last
path varying fastest) times the random search's `count` draws. The draws are made once and
crossed with the grid, so every grid point is trained with the same random values and adding a
grid value leaves the draws as they were. Member `g * count + j` is grid point g with draw j.

Draws come from `random.Random(seed).random()` only, one call per draw per path, draws in order
and within a draw the paths in the order `space` lists them: Python guarantees that sequence
for a seed across versions (its other methods may change), so a sweep's members stay the same.

Groups: members that may share one batched step, split to at most `max_group` each and to at
most `max_elements` rows x members (the size of one of the group's (rows, members) tensors).

Inline data (training and validation) is stored once per sweep, as datasets the sweep owns;
each member's stored spec names them by id, so its size does not grow with the data.
"""

import hashlib
import itertools
import json
import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from services.config import Settings
from services.datasets import ParsedDataset
from services.errors import SpecRejected, StoreUnavailable, SweepPlace, SweepRejected
from services.jobs import check_limits, check_rate, resolve_dataset
from services.queue import enqueue_training, group_rows, route_job
from services.schemas import DataSpec, Distribution, JobSpec, JobStatus, SweepSpec, SweepView
from services.store import Store
from services.store.datasets import dataset_record
from services.store.jobs import dataset_ids, spec_summary, stored_bytes
from services.store.keys import new_job_id, sweep_dataset_id, utc_now
from services.store.sweeps import NewRecord, group_spec

log = logging.getLogger(__name__)

# Distinct problems one SweepRejected reports: past these, validating more members would only
# spend the API's time on a 422 nobody reads to the end.
MAX_SWEEP_ERRORS = 20
# A value quoted in an error message is cut to this many characters (init.w may be long).
QUOTE_CHARS = 80


@dataclass(frozen=True)
class Member:
    """One job of a sweep. Members of one sweep share one DataSpec object (the base's data,
    validated once): resolving an uploaded dataset's shape on one resolves it for all."""

    index: int  # position in the sweep (grid order, then random draws)
    values: dict[str, Any]  # the swept values by path, as validated: {"optimizer.lr": 0.01}
    spec: JobSpec  # base with the values applied, validated


@dataclass(frozen=True)
class Group:
    """Members trained together by one batched step on one worker."""

    index: int
    members: tuple[int, ...]  # member indexes, ascending


@dataclass(frozen=True)
class _Choice:
    """The values one member takes, and where in the SweepSpec each comes from."""

    values: dict[str, Any]
    places: dict[str, SweepPlace]


def expand(
    spec: SweepSpec,
    max_members: int,
    check: Callable[[JobSpec], None] | None = None,
) -> list[Member]:
    """Every member of the sweep, validated as a JobSpec; SweepRejected naming each place
    (a grid value, a random path, the base) whose value makes a member invalid.

    `check`, when given, is run on each member's spec and may raise SpecRejected (a
    configured limit, a dataset's shape): its field is then traced back to a place too.
    """
    _check_size(spec, max_members)
    _check_base(spec)
    data = _base_data(spec.base)
    validation = _base_validation(spec.base)
    errors = _Errors()
    members = []
    for index, choice in enumerate(_choices(spec)):
        job = _member_spec(spec.base, data, validation, choice, errors, check)
        if job is not None:
            values = {path: swept_value(job, path) for path in choice.values}
            members.append(Member(index, values, job))
        elif errors.full:
            break
    if errors.found:
        raise SweepRejected(errors.found)
    return members


def _check_size(spec: SweepSpec, max_members: int) -> None:
    """Refuse a sweep of more than `max_members` before building any member of it."""
    points = math.prod(len(values) for values in (spec.grid or {}).values())
    draws = spec.random.count if spec.random is not None else 1
    if points * draws <= max_members:
        return
    too_many_draws = spec.random is not None and spec.random.count > max_members
    place: SweepPlace = ("random", "count") if too_many_draws or not spec.grid else ("grid",)
    raise SweepRejected(
        [
            (
                place,
                f"the sweep has {points * draws} members ({points} grid points x {draws} "
                f"draws); at most {max_members} (GRADSTREAM_MAX_SWEEP_MEMBERS)",
            )
        ],
        error_type="limit",
    )


def _check_base(spec: SweepSpec) -> None:
    """Refuse a base where a swept path cannot be set: a value on the way is not an object."""
    errors: list[tuple[SweepPlace, str]] = []
    for path in _swept_paths(spec):
        parts = _path_loc(path)
        node: Any = spec.base
        for depth, part in enumerate(parts[:-1], start=1):
            node = node.get(part)
            if node is None:
                break
            if not isinstance(node, dict):
                place = ("base", *parts[:depth])
                errors.append((place, f"must be an object: the sweep sets {path} in it"))
                break
    if errors:
        raise SweepRejected(errors[:MAX_SWEEP_ERRORS])


def _swept_paths(spec: SweepSpec) -> list[str]:
    grid = list(spec.grid or {})
    return grid + (list(spec.random.space) if spec.random is not None else [])


def _base_data(base: dict[str, Any]) -> DataSpec | None:
    """The base's data, validated once for all members (inline data may be megabytes); None
    if the base has none (each member then reports it missing, at one place)."""
    if base.get("data") is None:
        return None
    try:
        return DataSpec.model_validate(base["data"])
    except ValidationError as exc:
        errors = [(("base", "data", *e["loc"]), e["msg"]) for e in exc.errors()]
        raise SweepRejected(errors[:MAX_SWEEP_ERRORS]) from exc


def _base_validation(base: dict[str, Any]) -> DataSpec | None:
    """The base's explicit validation set (`eval.data`), validated once for all members like
    its data; None if it has none."""
    evaluation = base.get("eval")
    if not isinstance(evaluation, dict) or evaluation.get("data") is None:
        return None
    try:
        return DataSpec.model_validate(evaluation["data"])
    except ValidationError as exc:
        errors = [(("base", "eval", "data", *e["loc"]), e["msg"]) for e in exc.errors()]
        raise SweepRejected(errors[:MAX_SWEEP_ERRORS]) from exc


def _choices(spec: SweepSpec) -> Iterator[_Choice]:
    """Each member's values in member order: grid points, each crossed with every draw."""
    grid = spec.grid or {}
    draws = _draws(spec) if spec.random is not None else [{}]
    for point in itertools.product(*(range(len(values)) for values in grid.values())):
        values = {path: grid[path][i] for path, i in zip(grid, point, strict=True)}
        places = {path: ("grid", path, i) for path, i in zip(grid, point, strict=True)}
        for draw in draws:
            random_places = {path: ("random", "space", path) for path in draw}
            yield _Choice({**values, **draw}, {**places, **random_places})


def _draws(spec: SweepSpec) -> list[dict[str, Any]]:
    """The random search's `count` draws, path by path in the order of `space`."""
    assert spec.random is not None
    generator = random.Random(spec.random.seed)
    space = spec.random.space
    return [
        {path: draw(distribution, generator.random()) for path, distribution in space.items()}
        for _ in range(spec.random.count)
    ]


def draw(distribution: Distribution, u: float) -> Any:
    """The value at `u` in [0, 1) of `distribution`: each value from one uniform number, so
    that a seed's draws depend only on `random.random`'s guaranteed sequence."""
    if distribution.uniform is not None:
        low, high = distribution.uniform
        # low + (high - low) * u would overflow for bounds near the float limits.
        return min(max(low * (1 - u) + high * u, low), high)
    if distribution.log_uniform is not None:
        low, high = distribution.log_uniform
        value = math.exp(math.log(low) + (math.log(high) - math.log(low)) * u)
        return min(max(value, low), high)  # exp(log(x)) may miss x by a rounding
    if distribution.int_uniform is not None:
        low, high = distribution.int_uniform
        return low + min(int(u * (high - low + 1)), high - low)
    assert distribution.choice is not None
    options = distribution.choice
    return options[min(int(u * len(options)), len(options) - 1)]


def _member_spec(
    base: dict[str, Any],
    data: DataSpec | None,
    validation: DataSpec | None,
    choice: _Choice,
    errors: "_Errors",
    check: Callable[[JobSpec], None] | None,
) -> JobSpec | None:
    """The member's JobSpec, or None with its problems added to `errors`."""
    fields = _with_values(base, choice.values)
    if data is not None:
        fields["data"] = data  # validated once: a model instance is not validated again
    if validation is not None:  # likewise (no swept path reaches into eval)
        fields["eval"] = {**fields["eval"], "data": validation}
    try:
        job = JobSpec.model_validate(fields)
        if check is not None:
            check(job)
    except ValidationError as exc:
        for error in exc.errors():
            errors.add(error["loc"], error["msg"], choice)
        return None
    except SpecRejected as exc:
        errors.add(exc.field, exc.message, choice)
        return None
    return job


def _with_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with each dotted path set; only the objects on the paths are copied
    (the data is shared, never copied)."""
    fields = dict(base)
    for path, value in values.items():
        *parents, leaf = _path_loc(path)
        node = fields
        for part in parents:
            node[part] = dict(node.get(part) or {})  # _check_base made sure it is an object
            node = node[part]
        node[leaf] = value
    return fields


class _Errors:
    """Problems found so far, one per place, at most MAX_SWEEP_ERRORS."""

    def __init__(self) -> None:
        self.found: list[tuple[SweepPlace, str]] = []
        self._places: set[SweepPlace] = set()

    @property
    def full(self) -> bool:
        return len(self.found) >= MAX_SWEEP_ERRORS

    def add(self, loc: tuple[str | int, ...], message: str, choice: _Choice) -> None:
        """Add the problem a member's JobSpec has at `loc`, at the place it comes from."""
        place, context = _place(loc, choice)
        if place in self._places or self.full:
            return
        self._places.add(place)
        self.found.append((place, f"with {context}: {message}" if context else message))


def _place(loc: tuple[str | int, ...], choice: _Choice) -> tuple[SweepPlace, str]:
    """Where in the SweepSpec a member's problem at `loc` (a JobSpec location) comes from, and
    the swept values to name beside it ('' where the place says enough).

    At or inside a swept value: that value's place. Around swept values (a check of several
    fields, such as momentum with adam): the first of them, naming them all. Elsewhere: the
    base, which every member shares.
    """
    for path, place in choice.places.items():
        if _within(loc, _path_loc(path)):
            drawn = place[0] == "random"
            return place, _quoted(choice.values, [path]) if drawn else ""
    around = [path for path in choice.places if loc and _within(_path_loc(path), loc)]
    if around:
        return choice.places[around[0]], _quoted(choice.values, around)
    return ("base", *loc), ""


def _path_loc(path: str) -> tuple[str, ...]:
    """A dotted path as a JobSpec location: "optimizer.lr" -> ("optimizer", "lr")."""
    return tuple(path.split("."))


def _within(loc: tuple[str | int, ...], outer: tuple[str | int, ...]) -> bool:
    """Whether the location `loc` is `outer` or inside it."""
    return loc[: len(outer)] == outer


def _quoted(values: dict[str, Any], paths: list[str]) -> str:
    """`path=value` for each path, each value cut to QUOTE_CHARS."""
    return ", ".join(f"{path}={repr(values[path])[:QUOTE_CHARS]}" for path in paths)


def group_key(spec: JobSpec) -> tuple[Any, ...]:
    """What members of one group must share (DESIGN §9): everything but the per-member
    numbers (lr, momentum, weight decay, betas, eps, init, the schedule's numbers), which the
    batched step holds as one tensor per hyperparameter."""
    return _group_key(spec, data_digest(spec.data))


def _group_key(spec: JobSpec, data: str) -> tuple[Any, ...]:
    optimizer = spec.optimizer
    return (
        data,
        spec.bias,
        spec.device,
        spec.steps,
        optimizer.name,
        optimizer.nesterov,
        optimizer.schedule.name,
        spec.batch_size,
        spec.shuffle_seed,
        spec.stop.model_dump_json() if spec.stop is not None else None,
        spec.record.model_dump_json(),
    )


def data_digest(data: DataSpec) -> str:
    """A digest of the data as given: equal data, equal digests (inline data compared by a
    hash, not value by value)."""
    source = data.model_dump_json(include={"x", "y", "synthetic", "dataset_id"})
    return hashlib.sha256(source.encode()).hexdigest()


def make_groups(
    members: list[Member], max_group: int, max_elements: int | None = None
) -> list[Group]:
    """Members with equal group_key form a group (groups in the order of their first member);
    a group of more than `max_group` members, or of more than `max_elements` rows x members
    (group_rows: what each (rows, members) tensor of its step holds), is split into
    consecutive chunks that fit. Members of one group share their data, so their rows are
    equal; a member past `max_elements` alone is refused before (check_group_rows)."""
    # Members of one sweep share one DataSpec: hash it once, not once per member.
    digests: dict[int, str] = {}
    by_key: dict[tuple[Any, ...], list[int]] = {}
    rows: dict[tuple[Any, ...], int] = {}
    for member in members:
        data = member.spec.data
        if id(data) not in digests:
            digests[id(data)] = data_digest(data)
        key = _group_key(member.spec, digests[id(data)])
        by_key.setdefault(key, []).append(member.index)
        rows.setdefault(key, group_rows(member.spec))
    chunks = []
    for key, indexes in by_key.items():
        size = max_group
        if max_elements is not None:
            size = max(1, min(size, max_elements // rows[key]))
        chunks += [tuple(indexes[start : start + size]) for start in range(0, len(indexes), size)]
    return [Group(index, chunk) for index, chunk in enumerate(chunks)]


def check_group_rows(spec: JobSpec, max_elements: int) -> None:
    """Refuse a member that alone passes the rows x members bound of a group."""
    rows = group_rows(spec)
    if rows > max_elements:
        validation = spec.eval.data if spec.eval is not None else None
        extra = f" + {validation.samples} validation rows" if validation is not None else ""
        raise SpecRejected(
            ("data",),
            f"a member trains on {spec.data.samples} samples{extra}: {rows} rows, more than "
            f"a group may hold for one member (max_group_elements is {max_elements}, rows x "
            "members; GRADSTREAM_MAX_GROUP_ELEMENTS)",
        )


@dataclass(frozen=True)
class _OwnedData:
    """A sweep's inline data as a dataset it owns: the record its submit writes, and the
    DataSpec its members' specs carry instead of the numbers."""

    record: "NewRecord"
    ref: DataSpec
    stored: int


def _owned_dataset(sweep_id: str, part: str, data: DataSpec, tenant: str) -> _OwnedData:
    """The inline `data` as the dataset `part` ('data' or 'eval') of the sweep: float32 x and
    y as an upload keeps them (the same numbers the job's own float32 tensors hold)."""
    assert data.x is not None and data.y is not None
    with np.errstate(over="ignore"):  # beyond float32: inf, as torch.tensor makes it
        x = np.ascontiguousarray(np.asarray(data.x, dtype=np.float32))
        y = np.ascontiguousarray(np.asarray(data.y, dtype=np.float32))
    parsed = ParsedDataset(x, y, "inline", None, None)
    dataset_id = sweep_dataset_id(sweep_id, part)
    stored = x.nbytes + y.nbytes
    fields = {**dataset_record(dataset_id, parsed, stored), "tenant": tenant, "sweep": sweep_id}
    ref = DataSpec(dataset_id=dataset_id)
    ref.resolve(parsed.samples, parsed.features)
    return _OwnedData(NewRecord(dataset_id, "dataset", fields), ref, stored)


def _share_inline_data(
    members: list[Member], sweep_id: str, tenant: str
) -> tuple[list[Member], list[_OwnedData]]:
    """The members with their inline data (training, validation) replaced by datasets the
    sweep owns, and those datasets. Members share their data (no swept path reaches it), so
    the first member's is everyone's."""
    first = members[0].spec
    training = (
        _owned_dataset(sweep_id, "data", first.data, tenant) if first.data.x is not None else None
    )
    validation = first.eval.data if first.eval is not None else None
    held = (
        _owned_dataset(sweep_id, "eval", validation, tenant)
        if validation is not None and validation.x is not None
        else None
    )
    owned = [d for d in (training, held) if d is not None]
    if not owned:
        return members, []
    shared = []
    for member in members:
        update: dict[str, Any] = {}
        if training is not None:
            update["data"] = training.ref
        if held is not None:
            assert member.spec.eval is not None
            update["eval"] = member.spec.eval.model_copy(update={"data": held.ref})
        shared.append(Member(member.index, member.values, member.spec.model_copy(update=update)))
    return shared, owned


def swept_value(spec: JobSpec, path: str) -> Any:
    """The value of a dotted path in `spec`, as JSON would carry it (betas as a list; None
    where init is not given)."""
    node: Any = spec
    for part in path.split("."):
        node = getattr(node, part, None) if node is not None else None
    return list(node) if isinstance(node, tuple) else node


def submit_sweep(
    store: Store,
    spec: SweepSpec,
    settings: Settings,
    tenant: str,
    enqueue: Callable[[str, str], None] = enqueue_training,
    idempotency: str | None = None,
) -> SweepView:
    """Store a new sweep of `tenant`: its members (jobs), its groups (one message each, on the
    queue the group routes to) and the sweep itself, all at once; then `enqueue` each group
    (a group's id and queue: a Celery message; tests that run groups themselves send none).
    A retried submit with the same idempotency key returns the sweep the first one made."""
    check_rate(store, tenant, settings)

    def check(job: JobSpec) -> None:
        unresolved_eval = job.eval is not None and job.eval.data is not None
        if not job.data.known or unresolved_eval:
            resolve_dataset(store, job, tenant)  # members share one DataSpec: resolved once
        check_limits(job, settings)
        check_group_rows(job, settings.max_group_elements)
        if job.stop is not None:
            raise SpecRejected(("stop",), "a sweep's members have no stop rules: use early_stop")
        if job.record.explain:
            raise SpecRejected(("record", "explain"), "a sweep's members cannot be explained")

    members = expand(spec, settings.max_sweep_members, check=check)
    groups = make_groups(members, settings.max_group_members, settings.max_group_elements)
    sweep_id = new_job_id()
    members, owned = _share_inline_data(members, sweep_id, tenant)
    member_ids = [new_job_id() for _ in members]
    live, live_memory = store.live_queues(), store.live_memory()
    created, reserved = utc_now(), sum(dataset.stored for dataset in owned)
    group_records, member_records = [], []
    early_stop = spec.early_stop.model_dump() if spec.early_stop else None
    for group in groups:
        group_id = new_job_id()
        ids = [member_ids[i] for i in group.members]
        route = route_job(members[group.members[0]].spec, live, settings, len(ids), live_memory)
        shared = {
            "status": JobStatus.QUEUED.value,
            "device": route.device,
            "queue": route.queue,
            "route_reason": route.reason,
            "attempt": 0,
            "lost": 0,
            "steps_done": 0,
            "created_at": created,
            "sweep": sweep_id,
        }
        fields = {
            "id": group_id,
            "spec": group_spec(group_id, sweep_id, ids, early_stop, spec.metric or "loss"),
            "members": " ".join(ids),
            **shared,
        }
        group_records.append(NewRecord(group_id, "group", fields))
        for index in group.members:
            member = members[index]
            spec_json = member.spec.model_dump_json()
            stored = stored_bytes(member.spec, spec_json)
            member_bytes = stored.reserved(member.spec.steps)
            reserved += member_bytes
            fields = {
                "id": member_ids[index],
                "tenant": tenant,
                "spec": spec_json,
                "summary": json.dumps(spec_summary(json.loads(spec_json))),
                "bytes": member_bytes,
                **stored.fields(),
                "group": group_id,
                "index": index,
                **shared,
            }
            member_records.append(NewRecord(member_ids[index], "member", fields))
    spec_json = spec.model_dump_json()
    reserved += len(spec_json)
    sweep = NewRecord(
        sweep_id,
        "sweep",
        {
            "id": sweep_id,
            "tenant": tenant,
            "name": spec.name or "",
            "spec": spec_json,
            "status": JobStatus.QUEUED.value,
            "created_at": created,
            "values": json.dumps([member.values for member in members]),
            "groups": " ".join(record.id for record in group_records),
            "remaining": len(members),
            # Its spec, and the datasets it owns (its inline data, once for all members).
            "bytes": len(spec_json) + sum(dataset.stored for dataset in owned),
            # The datasets its members train on, which cannot be deleted while it is active,
            # and those it owns, deleted with it.
            "datasets": " ".join(dataset_ids(members[0].spec)),
            "owned": " ".join(dataset.record.id for dataset in owned),
            # Its event stream keeps the latest this many events (services/sweep_events.py).
            "events_keep": settings.sweep_events_keep,
        },
    )
    existing = store.create_sweep(
        sweep,
        [dataset.record for dataset in owned] + group_records,
        member_records,
        tenant,
        reserved,
        settings.max_active_jobs_per_tenant,
        settings.tenant_storage_bytes,
        idempotency,
    )
    if existing is not None:
        log.info("sweep %s returned again for its idempotency key", existing)
        return store.get_sweep(existing)
    view = store.get_sweep(sweep_id)
    try:
        for record in group_records:
            enqueue(record.id, record.fields["queue"])
    except Exception as exc:
        log.warning("enqueue of sweep %s failed: %s", sweep_id, exc)
        store.discard_sweep(sweep_id)
        raise StoreUnavailable("could not enqueue the sweep: the broker is unavailable") from exc
    log.info("sweep %s queued: %d members in %d groups", sweep_id, len(members), len(groups))
    return view
