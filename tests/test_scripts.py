"""The store's Lua scripts: every one compiles on a real Redis at start, and key names are
spelled once (services/store/keys.py), never again inside the Lua."""

import re
from collections.abc import Iterator

import pytest
import redis

from cli.stack import Stack
from services.store import Store, keys, scripts
from services.store.base import LuaScripts, ScriptError


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    local = Stack(tmp_path_factory.mktemp("scripts"))
    try:
        local.start_redis()
        yield local
    finally:
        local.stop()


def _all_scripts() -> dict[str, str]:
    """Every script scripts.py defines (a module-level string starting with `#!lua`)."""
    return {
        name: value
        for name, value in vars(scripts).items()
        if isinstance(value, str) and value.startswith("#!lua")
    }


def test_every_script_is_registered_and_loads_on_a_real_redis(private_redis: Stack) -> None:
    store = Store.from_url(private_redis.redis_url)
    try:
        store.redis.script_flush()
        registered = {
            script.script: name
            for name, script in vars(store.lua).items()
            if isinstance(script, redis.commands.core.Script)
        }
        # A script written but not registered would never be loaded at start.
        assert set(_all_scripts().values()) <= set(registered)
        store.load_scripts()
        shas = [script.sha for script in vars(store.lua).values()]
        assert len(shas) >= len(_all_scripts())
        assert all(store.redis.script_exists(*shas))
    finally:
        store.redis.close()


def test_a_script_redis_cannot_compile_fails_the_load(private_redis: Stack) -> None:
    client = redis.Redis.from_url(private_redis.redis_url)
    try:
        lua = LuaScripts(client)
        # A rare script's typo, as Redis would meet it the first time a job needed it.
        broken = scripts.DEFER_ARCHIVE.replace("return", "retrun", 1)
        lua.defer_archive = client.register_script(broken)
        with pytest.raises(ScriptError, match="DEFER_ARCHIVE"):
            lua.load_all()
    finally:
        client.close()


def test_loading_with_redis_unreachable_leaves_it_to_the_first_call() -> None:
    # A process may start before Redis does: it starts, and redis-py loads on first use.
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    try:
        LuaScripts(client).load_all()
    finally:
        client.close()


def _key_parts() -> set[str]:
    """The fixed parts of every key name (and entry id) keys.py spells: what is left of each
    once its ids are taken out (`gs:{`, `}:steps`, `:members:active`, `-1`...)."""
    marker = "\0"
    names = [
        keys.job_key(marker),
        keys.steps_key(marker),
        keys.events_key(marker),
        keys.lease_key(marker),
        keys.ckpt_key(marker),
        keys.archiving_key(marker),
        keys.sweep_key(marker),
        keys.sweep_events_key(marker),
        keys.sweep_members_key(marker),
        keys.sweep_finals_key(marker, marker),
        keys.tenant_sweeps(marker),
        keys.tenant_active_sweeps(marker),
        keys.tenant_index(marker, marker),
        keys.tenant_datasets(marker),
        keys.tenant_storage(marker),
        keys.tenant_active_members(marker),
        keys.dataset_users(marker, marker),
        keys.dataset_key(marker),
        keys.dataset_refs(marker),
        keys.status_index(marker),
        keys.group_status_index(marker),
        keys.member_status_index(marker),
        keys.sweep_status_index(marker),
        keys.step_entry_id(marker),  # type: ignore[arg-type]
        keys.JOBS_INDEX,
        keys.STATS_KEY,
        keys.ARCHIVE_DUE,
    ]
    parts = {part for name in names for part in name.split(marker)}
    # A lone separator is no name of its own (`':'` joins a value's parts too).
    return {part for part in parts if len(part) > 1}


def test_the_lua_spells_no_key_name_of_its_own() -> None:
    parts = _key_parts()
    assert ":members:active" in parts and ":bytes" in parts and "-1" in parts
    for name, script in _all_scripts().items():
        hand_written = re.sub(r"--[^\n]*", "", script.replace(scripts.GENERATED, ""))
        literals = re.findall(r"'((?:[^'\\]|\\.)*)'", hand_written)
        for literal in literals:
            assert "gs:" not in literal, f"{name} spells a key: {literal!r}"
            assert not any(part in literal for part in parts if ":" in part or "-" in part), (
                f"{name} spells part of a key name: {literal!r} (take it from keys.py)"
            )
