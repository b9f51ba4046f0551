"""A sweep's members and groups from its SweepSpec alone (DESIGN §9): no Redis, no worker."""

import itertools
import math
from typing import Any

import pytest
from pydantic import ValidationError

from services.errors import SpecRejected, SweepRejected
from services.schemas import JobSpec, SweepSpec
from services.sweeps import Member, expand, group_key, make_groups, swept_value
from tests.conftest import SEED_EXAMPLE

DESIGN_EXAMPLE: dict[str, Any] = {
    "name": "lr search",
    "base": {
        "data": {"synthetic": {"n": 1000, "d": 10}},
        "optimizer": {"name": "sgd", "lr": 0.01},
        "steps": 2000,
        "device": "cpu",
    },
    "grid": {"optimizer.lr": [0.001, 0.01, 0.1], "optimizer.momentum": [0.0, 0.9]},
    "random": {
        "count": 8,
        "seed": 0,
        "space": {
            "optimizer.weight_decay": {"uniform": [0.0, 0.1]},
            "optimizer.eps": {"log_uniform": [1e-10, 1e-6]},
        },
    },
    "early_stop": {"name": "successive_halving", "min_steps": 10, "eta": 3},
}
SEED_DATA = {"data": {"x": [[1.0]], "y": [2.0]}, "steps": 10, "device": "cpu"}


def _sweep(**fields: Any) -> SweepSpec:
    return SweepSpec.model_validate({"base": SEED_DATA, **fields})


def _rejected(spec: SweepSpec, max_members: int = 4096) -> list[tuple[Any, str]]:
    with pytest.raises(SweepRejected) as caught:
        expand(spec, max_members)
    return caught.value.errors


def _random_values(path: str, distribution: dict[str, Any], count: int = 200) -> list[Any]:
    spec = _sweep(random={"count": count, "seed": 3, "space": {path: distribution}})
    return [member.values[path] for member in expand(spec, 4096)]


def test_design_example_is_the_grid_crossed_with_eight_reproducible_draws() -> None:
    spec = SweepSpec.model_validate(DESIGN_EXAMPLE)
    members = expand(spec, 4096)
    assert len(members) == 3 * 2 * 8
    assert [member.index for member in members] == list(range(48))
    # Grid order as written, the last path fastest; each point crossed with every draw.
    points = list(itertools.product([0.001, 0.01, 0.1], [0.0, 0.9]))
    for member in members:
        lr, momentum = points[member.index // 8]
        assert member.values["optimizer.lr"] == lr and member.spec.optimizer.lr == lr
        assert member.spec.optimizer.momentum == momentum
        assert member.spec.steps == 2000 and member.spec.data.synthetic is not None
    draws = [(m.values["optimizer.weight_decay"], m.values["optimizer.eps"]) for m in members]
    assert len(set(draws[:8])) == 8, "eight different draws"
    assert all(draws[i] == draws[i % 8] for i in range(48)), "the same draws for every point"
    again = expand(SweepSpec.model_validate(DESIGN_EXAMPLE), 4096)
    assert [m.values for m in again] == [m.values for m in members]
    reseeded = {**DESIGN_EXAMPLE, "random": {**DESIGN_EXAMPLE["random"], "seed": 1}}
    assert expand(SweepSpec.model_validate(reseeded), 4096)[0].values != members[0].values


def test_grid_only_and_random_only() -> None:
    grid = expand(_sweep(grid={"optimizer.lr": [0.1, 0.2], "batch_size": [None, 1]}), 100)
    assert [m.values for m in grid] == [
        {"optimizer.lr": 0.1, "batch_size": None},
        {"optimizer.lr": 0.1, "batch_size": 1},
        {"optimizer.lr": 0.2, "batch_size": None},
        {"optimizer.lr": 0.2, "batch_size": 1},
    ]
    drawn = expand(_sweep(random={"count": 5, "space": {"steps": {"int_uniform": [1, 9]}}}), 100)
    assert [m.index for m in drawn] == list(range(5))
    assert [m.spec.steps for m in drawn] == [m.values["steps"] for m in drawn]


def test_uniform_draws_floats_in_range() -> None:
    values = _random_values("optimizer.weight_decay", {"uniform": [0.2, 0.3]})
    assert all(isinstance(v, float) and 0.2 <= v <= 0.3 for v in values)
    assert max(values) - min(values) > 0.08, "spread over the range"


def test_log_uniform_draws_in_range_spread_over_the_decades() -> None:
    values = _random_values("optimizer.lr", {"log_uniform": [1e-6, 1e-1]})
    assert all(1e-6 <= v <= 1e-1 for v in values)
    decades = {math.floor(math.log10(v)) for v in values}
    assert decades == {-6, -5, -4, -3, -2}


def test_int_uniform_draws_ints_both_ends_included() -> None:
    values = _random_values("shuffle_seed", {"int_uniform": [3, 5]})
    assert all(type(v) is int for v in values)
    assert set(values) == {3, 4, 5}


def test_choice_picks_from_the_list() -> None:
    values = _random_values("optimizer.name", {"choice": ["sgd", "adam", "adamw"]})
    assert set(values) == {"sgd", "adam", "adamw"}
    betas = _random_values("optimizer.betas", {"choice": [[0.9, 0.99], [0.5, 0.9]]}, count=20)
    assert {tuple(b) for b in betas} == {(0.9, 0.99), (0.5, 0.9)}


def _spec_errors(body: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    with pytest.raises(ValidationError) as caught:
        SweepSpec.model_validate(body)
    return [(error["loc"], error["msg"]) for error in caught.value.errors()]


def test_unknown_path_is_an_error_naming_it() -> None:
    errors = _spec_errors({"base": SEED_DATA, "grid": {"optimizer.lr": [0.1], "epochs": [1]}})
    assert [loc for loc, _ in errors] == [("grid", "epochs", "[key]")]
    assert "'epochs'" in errors[0][1]
    space = {"optimizer.beta": {"uniform": [0, 1]}}
    errors = _spec_errors({"base": SEED_DATA, "random": {"count": 1, "space": space}})
    assert [loc for loc, _ in errors] == [("random", "space", "optimizer.beta", "[key]")]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({}, ()),
        ({"grid": {"optimizer.lr": []}}, ("grid", "optimizer.lr")),
        ({"random": {"count": 0, "space": {"steps": {"choice": [1]}}}}, ("random", "count")),
        ({"random": {"count": 1, "space": {}}}, ("random", "space")),
        (
            {"random": {"count": 1, "space": {"optimizer.lr": {"log_uniform": [0, 1]}}}},
            ("random", "space", "optimizer.lr"),
        ),
        (
            {"random": {"count": 1, "space": {"optimizer.lr": {"uniform": [1, 0]}}}},
            ("random", "space", "optimizer.lr"),
        ),
        (
            {"random": {"count": 1, "space": {"steps": {"uniform": [1, 2], "choice": [1]}}}},
            ("random", "space", "steps"),
        ),
        ({"grid": {"steps": [1]}, "early_stop": {"name": "hyperband"}}, ("early_stop", "name")),
        (
            {"grid": {"steps": [1]}, "early_stop": {"name": "successive_halving", "eta": 1}},
            ("early_stop", "min_steps"),
        ),
        ({"grid": {"steps": [1]}, "name": "n" * 201}, ("name",)),
        (
            {"grid": {"steps": [1]}, "random": {"count": 1, "space": {"steps": {"choice": [2]}}}},
            ("random",),
        ),
    ],
)
def test_malformed_sweep_spec_names_the_field(body: dict[str, Any], loc: tuple[Any, ...]) -> None:
    assert loc in [error_loc for error_loc, _ in _spec_errors({"base": SEED_DATA, **body})]


def test_bad_grid_value_names_its_index() -> None:
    errors = _rejected(_sweep(grid={"optimizer.lr": [0.1, 0.01, -1, 0.5]}))
    assert [loc for loc, _ in errors] == [("grid", "optimizer.lr", 2)]
    assert "greater than 0" in errors[0][1]


def test_bad_drawn_value_names_the_random_path_and_the_value() -> None:
    space = {"optimizer.momentum": {"uniform": [0.5, 2.0]}}
    errors = _rejected(_sweep(random={"count": 50, "space": space}))
    assert [loc for loc, _ in errors] == [("random", "space", "optimizer.momentum")]
    assert "optimizer.momentum=" in errors[0][1]


def test_momentum_with_adam_names_the_momentum_value() -> None:
    base = {**SEED_DATA, "optimizer": {"name": "adam"}}
    spec = SweepSpec.model_validate({"base": base, "grid": {"optimizer.momentum": [0.0, 0.9]}})
    errors = _rejected(spec)
    assert [loc for loc, _ in errors] == [("grid", "optimizer.momentum", 1)]
    assert "sgd settings" in errors[0][1] and "optimizer.momentum=0.9" in errors[0][1]


def test_optimizer_name_and_momentum_together_name_the_first_and_both_values() -> None:
    grid = {"optimizer.name": ["sgd", "adam"], "optimizer.momentum": [0.0, 0.9]}
    errors = _rejected(_sweep(grid=grid))
    assert [loc for loc, _ in errors] == [("grid", "optimizer.name", 1)]
    assert "optimizer.name='adam', optimizer.momentum=0.9" in errors[0][1]


def _places(body: dict[str, Any]) -> list[Any]:
    return [loc for loc, _ in _rejected(SweepSpec.model_validate(body))]


def test_base_problem_every_member_shares_is_reported_once_at_the_base() -> None:
    errors = _rejected(
        SweepSpec.model_validate({"base": {"steps": 5}, "grid": {"optimizer.lr": [0.1, 0.2]}})
    )
    assert errors == [(("base", "data"), "Field required")]
    bad_data = {"data": {"x": [[1.0]], "y": [1.0, 2.0]}}
    assert _places({"base": bad_data, "grid": {"steps": [1, 2]}}) == [("base", "data", "y")]
    unknown = {**SEED_DATA, "epochs": 3}
    assert _places({"base": unknown, "grid": {"steps": [1, 2]}}) == [("base", "epochs")]
    not_an_object = {**SEED_DATA, "optimizer": "sgd"}
    assert _places({"base": not_an_object, "grid": {"optimizer.lr": [1]}}) == [
        ("base", "optimizer")
    ]


def test_errors_are_one_per_place_and_at_most_twenty() -> None:
    errors = _rejected(_sweep(grid={"optimizer.lr": [-1.0] * 30, "steps": [0, 1]}))
    places = [loc for loc, _ in errors]
    assert len(places) == 20 == len(set(places))
    assert places[:2] == [("grid", "optimizer.lr", 0), ("grid", "steps", 0)]


def test_too_many_members_names_the_setting() -> None:
    grid = {"optimizer.lr": [0.1, 0.2, 0.3], "steps": [1, 2, 3]}
    errors = _rejected(_sweep(grid=grid), max_members=8)
    assert [loc for loc, _ in errors] == [("grid",)]
    assert "9 members" in errors[0][1] and "GRADSTREAM_MAX_SWEEP_MEMBERS" in errors[0][1]
    space = {"steps": {"int_uniform": [1, 5]}}
    errors = _rejected(_sweep(random={"count": 9, "space": space}), max_members=8)
    assert [loc for loc, _ in errors] == [("random", "count")]
    both = _sweep(grid={"optimizer.lr": [0.1, 0.2]}, random={"count": 4, "space": space})
    assert len(expand(both, 8)) == 8


def test_check_rejections_are_traced_to_the_place() -> None:
    def at_most_five_steps(spec: JobSpec) -> None:
        if spec.steps > 5:
            raise SpecRejected(("steps",), "steps must be at most 5")

    spec = _sweep(grid={"steps": [1, 5, 6]})
    with pytest.raises(SweepRejected) as caught:
        expand(spec, 100, check=at_most_five_steps)
    assert caught.value.errors == [(("grid", "steps", 2), "steps must be at most 5")]


def _members(grid: dict[str, list[Any]], base: dict[str, Any] | None = None) -> list[Member]:
    return expand(SweepSpec.model_validate({"base": base or SEED_DATA, "grid": grid}), 4096)


def test_members_differing_only_in_numbers_form_one_group() -> None:
    members = _members(
        {
            "optimizer.lr": [0.1, 0.01],
            "optimizer.momentum": [0.0, 0.9],
            "optimizer.weight_decay": [0.0, 0.1],
            "init.w": [[0.0], [1.0]],
            "optimizer.schedule.gamma": [0.5, 0.1],
        }
    )
    assert make_groups(members, 1024) == [make_groups(members, 1024)[0]]
    assert make_groups(members, 1024)[0].members == tuple(range(32))


@pytest.mark.parametrize(
    ("path", "values"),
    [
        ("optimizer.name", ["sgd", "adam"]),
        ("batch_size", [None, 1]),
        ("steps", [5, 10]),
        ("shuffle_seed", [0, 1]),
        ("optimizer.schedule.name", ["constant", "cosine"]),
    ],
)
def test_what_the_batched_step_shares_splits_groups(path: str, values: list[Any]) -> None:
    members = _members({path: values, "optimizer.lr": [0.1, 0.2, 0.3]})
    groups = make_groups(members, 1024)
    assert [group.members for group in groups] == [(0, 1, 2), (3, 4, 5)]
    assert [group.index for group in groups] == [0, 1]


def test_groups_are_split_at_max_group_and_numbered_in_member_order() -> None:
    members = _members(
        {"optimizer.name": ["sgd", "adam"], "optimizer.lr": [0.1, 0.2, 0.3, 0.4, 0.5]}
    )
    groups = make_groups(members, 2)
    assert [group.members for group in groups] == [(0, 1), (2, 3), (4,), (5, 6), (7, 8), (9,)]
    assert [group.index for group in groups] == list(range(6))


def test_group_key_compares_data_by_content() -> None:
    one = JobSpec.model_validate(SEED_EXAMPLE)
    same = JobSpec.model_validate(SEED_EXAMPLE)
    other = JobSpec.model_validate({**SEED_EXAMPLE, "data": {"x": [[1.0]], "y": [3.0]}})
    assert group_key(one) == group_key(same) != group_key(other)


def test_seed_as_base_gives_the_seed_job_with_each_lr() -> None:
    members = _members({"optimizer.lr": [0.1, 0.5]}, base=SEED_EXAMPLE)
    assert len(make_groups(members, 1024)) == 1  # grouping leaves the specs as they were
    for member, lr in zip(members, [0.1, 0.5], strict=True):
        alone = JobSpec.model_validate(
            {**SEED_EXAMPLE, "optimizer": {**SEED_EXAMPLE["optimizer"], "lr": lr}}
        )
        assert member.spec == alone
        assert member.spec.model_dump() == alone.model_dump()
    assert members[0].spec == JobSpec.model_validate(SEED_EXAMPLE)


def test_swept_value_reads_a_path_back_as_json_would() -> None:
    spec = JobSpec.model_validate({**SEED_EXAMPLE, "optimizer": {"name": "adam", "lr": 0.2}})
    assert swept_value(spec, "optimizer.lr") == 0.2
    assert swept_value(spec, "optimizer.betas") == [0.9, 0.999]
    assert swept_value(spec, "optimizer.schedule.name") == "constant"
    assert swept_value(spec, "init.w") == [1.0]
    assert swept_value(spec, "init.b") is None
    assert swept_value(JobSpec.model_validate(SEED_DATA), "init.w") is None
