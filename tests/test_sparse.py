"""Sparse recording (record.every N, DESIGN §10): every step keeps its loss (and val_loss where
evaluated), gradients and parameters only steps divisible by N and the last step. What a
sparse job serves (`/steps` pages, SSE and its replays, both clients, the CLI's CSV) is the
same job's full records thinned by that rule; a sweep's members share the base's N; resumed
attempts keep every step once; the tenant's storage counts the bytes the stream keeps.

The full records a sparse job is compared with come from the same job run with N = 1 by the
same worker (or the same in-process attempt): both run the same steps, so the kept records
are equal bit for bit."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from api.client import AsyncClient, Client
from cli.stack import Stack
from services import archive as archive_module
from services.archive import Archive, ArchivedFile
from services.attempts import Outcome
from services.config import Settings
from services.records import Chunk, expand_chunk, kept_steps, row_width, sparse_rows
from services.runner import run_job
from services.schemas import JobSpec
from services.store import Store, keys
from tests.attempts import (
    members_steps,
    run_groups,
    run_once,
    run_with_hand_back,
    store_sweep,
    stored_steps,
)
from tests.conftest import SEED_EXAMPLE
from tests.faults import thinned

EVERY = 7
# Mini-batches (each record has its epoch and batch) and a validation set evaluated every 5
# steps: the records without gradients still carry val_loss where evaluated. 59, the last
# step, is not a multiple of 7: it keeps its gradients beside 0, 7, ..., 56.
HELD_OUT = {
    "data": {"synthetic": {"n": 40, "d": 3, "noise": 0.1, "seed": 4}},
    "bias": True,
    "batch_size": 16,
    "optimizer": {"name": "adam", "lr": 0.05},
    "eval": {"data": {"x": [[1.0, 0.0, 2.0], [0.5, 1.0, -1.0]], "y": [1.0, 2.0]}, "every": 5},
    "steps": 60,
    "device": "cpu",
}
KEPT = [*range(0, 60, EVERY), 59]


def _sparse(spec: dict[str, Any], every: int = EVERY) -> dict[str, Any]:
    return {**spec, "record": {**spec.get("record", {}), "every": every}}


def test_a_sparse_job_serves_its_full_records_thinned_everywhere(
    stack: Stack, client: Client
) -> None:
    dense = client.wait(client.submit(HELD_OUT)["id"], timeout=60)
    sparse = client.wait(client.submit(_sparse(HELD_OUT))["id"], timeout=60)
    assert dense["status"] == sparse["status"] == "succeeded"
    assert dense["result"]["stepper"] == sparse["result"]["stepper"]
    assert sparse["result"]["params"] == dense["result"]["params"]
    assert sparse["spec"]["record"] == {"explain": False, "every": EVERY}

    full = list(client.steps(dense["id"]))
    records = list(client.steps(sparse["id"]))
    assert records == thinned(full, EVERY, last=True)
    assert [r["step"] for r in records] == list(range(60))
    assert [r["step"] for r in records if "grads" in r] == KEPT
    assert all(("params" in r) == ("grads" in r) for r in records)
    # A record without gradients keeps its loss, epoch and batch, and val_loss if evaluated.
    assert records[5].keys() == {"step", "loss", "val_loss", "epoch", "batch"}
    assert records[6].keys() == {"step", "loss", "epoch", "batch"}

    # Small pages, and pages that start between kept steps, split the same records.
    with httpx.Client(base_url=stack.api_url, headers=stack.auth(), timeout=30) as http:
        paged: list[dict[str, Any]] = []
        after: int | None = -1
        while after is not None:
            page = http.get(f"/v1/jobs/{sparse['id']}/steps", params={"after": after, "limit": 4})
            paged += page.json()["steps"]
            after = page.json()["next"]
    assert paged == records

    # SSE from step 0 and resumed after a step that kept no gradients, sync and async.
    streamed = [e.data for e in client.stream(sparse["id"]) if e.event == "step"]
    assert streamed == records
    resumed = [e.data for e in client.stream(sparse["id"], last_event_id=9) if e.event == "step"]
    assert resumed == records[10:]

    async def read_async() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with AsyncClient(stack.api_url, stack.api_key) as api:
            pages = [r async for r in api.steps(sparse["id"], page=3)]
            events = [e.data async for e in api.stream(sparse["id"]) if e.event == "step"]
        return pages, events

    assert asyncio.run(read_async()) == (records, records)

    # The CLI's CSV: the same columns as the full job's, empty parameter and gradient cells
    # at the steps that kept none.
    env = {**os.environ, "GRADSTREAM_URL": stack.api_url, "GRADSTREAM_API_KEY": stack.api_key}

    def csv_lines(job_id: str) -> list[list[str]]:
        out = subprocess.run(
            [sys.executable, "-m", "cli.main", "steps", job_id, "--format", "csv"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        return [line.split(",") for line in out.splitlines()]

    full_csv, sparse_csv = csv_lines(dense["id"]), csv_lines(sparse["id"])
    assert sparse_csv[0] == full_csv[0]
    columns = ["w_0", "w_1", "w_2", "b", "grad_w_0", "grad_w_1", "grad_w_2", "grad_b", "loss"]
    assert sparse_csv[0][:9] == columns
    for step, (row, full_row) in enumerate(zip(sparse_csv[1:], full_csv[1:], strict=True)):
        if step in KEPT:
            assert row == full_row
        else:
            assert row[:8] == [""] * 8 and row[8:] == full_row[8:], step


@pytest.mark.parametrize("every", [0, -3, 2.5, "4", True, None])
def test_record_every_must_be_a_whole_number_of_at_least_one(stack: Stack, every: Any) -> None:
    with httpx.Client(base_url=stack.api_url, headers=stack.auth(), timeout=30) as http:
        answer = http.post("/v1/jobs", json={**SEED_EXAMPLE, "record": {"every": every}})
        assert answer.status_code == 422, answer.text
        assert ["body", "record", "every"] in [e["loc"][:3] for e in answer.json()["detail"]]
        sweep = {"base": _sparse(SEED_EXAMPLE, every), "grid": {"optimizer.lr": [0.1, 0.2]}}
        answer = http.post("/v1/sweeps", json=sweep)
        assert answer.status_code == 422, answer.text
        assert ["body", "base", "record", "every"] in [e["loc"] for e in answer.json()["detail"]]


def _stream_row_bytes(store: Store, job_id: str) -> int:
    """The float32 bytes a job's stream holds now."""
    entries = store.redis.xrange(keys.steps_key(job_id))
    return sum(len(Chunk.from_fields(fields).rows) for _, fields in entries)


# 1000 steps of 10 features: a full row is 21 float32 (84 bytes), a sparse step's 1 (4 bytes).
WIDE = {
    "data": {"synthetic": {"n": 50, "d": 10, "noise": 0.1, "seed": 2}},
    "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.5},
    "steps": 1000,
    "device": "cpu",
}
DIVERGES = {
    "data": {"x": [[10.0], [20.0]], "y": [1.0, 2.0]},
    "optimizer": {"name": "sgd", "lr": 10.0},
    "steps": 500,
    "device": "cpu",
}


@pytest.mark.parametrize(
    ("spec", "status"),
    [(WIDE, "succeeded"), (_sparse(WIDE, 100), "succeeded"), (_sparse(DIVERGES, 100), "diverged")],
    ids=["every step", "every 100", "every 100, diverged"],
)
def test_tenant_storage_counts_the_bytes_the_stream_keeps(
    store: Store, spec: dict[str, Any], status: str, request: pytest.FixtureRequest
) -> None:
    tenant = f"sparse-{request.node.callspec.id.replace(' ', '-').replace(',', '')}"
    job_spec = JobSpec.model_validate(spec)
    every = job_spec.record.every
    spec_bytes = len(job_spec.model_dump_json())
    store.redis.delete(keys.tenant_storage(tenant))
    job_id, _ = store.create_job(job_spec, "cpu", "test-nobody", "test", tenant=tenant)
    # Counted up front: every step's full row, or (sparse) every step's loss and a full row
    # at 0, every, 2 x every, ... and the last step.
    full_row, steps = 4 * row_width(job_spec.data.features, job_spec.bias), job_spec.steps
    if every == 1:
        reserved = spec_bytes + steps * full_row
    else:
        reserved = spec_bytes + steps * 4 + kept_steps(steps, every) * full_row
    assert store.tenant_bytes(tenant) == reserved

    result = run_job(store, job_id, "test-worker", torch.device("cpu"), Settings())
    view = store.get_job(job_id)
    assert view.status.value == status, result
    kept = [r["step"] for r in stored_steps(store, job_id) if "grads" in r]
    if status == "diverged":  # step 0 and the step that diverged, the last stored
        assert kept == [0, view.steps_done - 1] and view.steps_done < 100
    # Once finished, what the tenant keeps is what the stream holds (and the spec).
    assert store.tenant_bytes(tenant) == spec_bytes + _stream_row_bytes(store, job_id)
    if every > 1 and status == "succeeded":
        assert store.tenant_bytes(tenant) == spec_bytes + 1000 * 4 + 11 * 84  # 0..900, 999
    store.delete_job(job_id, tenant)
    assert store.tenant_bytes(tenant) == 0


def test_a_sparse_job_handed_back_mid_job_resumes_with_every_step_once(store: Store) -> None:
    cpu, settings = torch.device("cpu"), Settings(flush_max_steps=64)
    spec = {**HELD_OUT, "steps": 300}
    sparse = JobSpec.model_validate(_sparse(spec))
    attempts, records = run_with_hand_back(store, sparse, cpu, settings)
    assert attempts[-1].outcome is Outcome.SUCCEEDED
    _, full = run_once(store, JobSpec.model_validate(spec), cpu, settings)  # uninterrupted
    assert [r["step"] for r in records] == list(range(300))
    assert records == thinned(full, EVERY, last=True)
    assert [r["step"] for r in records if "grads" in r] == [*range(0, 300, EVERY), 299]


# Successive halving at 10 and 20 steps: the members pruned there end at step 9 or 19, which
# keep their gradients beside 0, 6, 12 and 18 (as a survivor's last step, 39, does).
SWEEP = {
    "base": {
        "data": {"synthetic": {"n": 64, "d": 4, "noise": 0.1, "seed": 8}},
        "bias": True,
        "steps": 40,
        "device": "cpu",
    },
    "grid": {"optimizer.lr": [0.1, 0.03, 0.01, 0.003, 0.001, 0.0003]},
    "early_stop": {"name": "successive_halving", "min_steps": 10, "eta": 2},
}


def test_a_sweeps_members_share_the_bases_record_every(store: Store) -> None:
    cpu = torch.device("cpu")
    every = 6
    full = store_sweep(store, SWEEP, tenant="sparse-sweep-full")
    run_groups(store, full.id, cpu, Settings())
    sparse_spec = {**SWEEP, "base": _sparse(SWEEP["base"], every)}
    sparse = store_sweep(store, sparse_spec, tenant="sparse-sweep")
    # Each group handed back at its first flush and resumed.
    run_groups(store, sparse.id, cpu, Settings(), drain=True)

    ends = []
    for (status, records), (full_status, full_records), member in zip(
        members_steps(store, sparse.id),
        members_steps(store, full.id),
        store.get_sweep(sparse.id).members,
        strict=True,
    ):
        assert status == full_status
        assert records == thinned(full_records, every, last=True)
        last = len(records) - 1
        ends.append(last)
        kept = [r["step"] for r in records if "grads" in r]
        assert kept == sorted({*range(0, last + 1, every), last})
        # Each member's bytes: its spec, its losses and its kept rows, as its stream holds.
        fields = store.job_fields(member.id)
        assert int(fields[b"bytes"]) == int(fields[b"spec_bytes"]) + _stream_row_bytes(
            store, member.id
        )
    assert sorted(ends) == [9, 9, 9, 19, 39, 39]  # pruned at 10 and 20, two ran all 40


def test_expanding_a_sparse_chunk_from_any_step() -> None:
    # Steps 5 .. 24 of one feature and a bias (rows of 5) with every 7: 7, 14 and 21 keep
    # their rows, and 24 as the job's last.
    rows = np.arange(20 * 5, dtype=np.float32).reshape(20, 5)
    chunk = Chunk(5, 20, 1, True, sparse_rows(rows, 5, 7, False, True), every=7)
    assert len(chunk.rows) == 4 * (20 + 4 * 5)
    assert chunk.kept_rows() == [2, 9, 16, 19]
    whole = expand_chunk(chunk)
    assert [r["step"] for r in whole if "grads" in r] == [7, 14, 21, 24]
    grads, params = {"w": [11.0], "b": 12.0}, {"w": [13.0], "b": 14.0}
    assert whole[2] == {"step": 7, "loss": 10.0, "grads": grads, "params": params}
    assert whole[3] == {"step": 8, "loss": 15.0}
    for after in range(4, 25):
        for limit in (1, 3, 50):
            assert expand_chunk(chunk, after, limit) == whole[after - 4 : after - 4 + limit]
    dense, kept = chunk.dense()
    assert kept.tolist() == [i in (2, 9, 16, 19) for i in range(20)]
    assert (dense[kept] == rows[kept]).all() and (dense[:, 0] == rows[:, 0]).all()
    assert np.isnan(dense[~kept, 1:]).all()
    # Without the last step's row (a chunk that does not end the job): the rule's alone.
    chunk = Chunk(5, 20, 1, True, sparse_rows(rows, 5, 7, False, False), every=7)
    assert chunk.kept_rows() == [2, 9, 16]
    # As Redis gives the fields back: bytes.
    stored = {k: v if isinstance(v, bytes) else b"%d" % v for k, v in chunk.fields().items()}
    assert Chunk.from_fields(stored) == chunk


def test_archived_sparse_rows_read_back_whatever_the_row_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Row groups of 9 rows across chunks of 13, 40 and 7 steps (the last ends the job): a row
    # group starts between kept steps and ends at the job's last, kept beside the rule.
    monkeypatch.setattr(archive_module, "ROW_GROUP_BYTES", 4 * 8 * 9)
    archive = Archive(str(tmp_path), cache_bytes=1 << 20)
    rng = np.random.default_rng(0)
    chunks, first = [], 0
    for count, last in [(13, False), (40, False), (7, True)]:
        rows = rng.standard_normal((count, 8)).astype(np.float32)  # 2 features, bias, val_loss
        rows[::3, -1] = np.nan  # steps not evaluated
        packed = sparse_rows(rows, first, 5, True, last)
        chunks.append(Chunk(first, count, 2, True, packed, evaluated=True, every=5))
        first += count
    records = [record for chunk in chunks for record in expand_chunk(chunk)]
    path = archive.job_path("tenant", "job")
    temporary, rows_written, sha256 = archive.write(path, chunks)
    archive.verify(temporary, rows_written, sha256)
    archive.publish(temporary, path)
    archived = ArchivedFile(archive.url(path), rows_written, sha256)
    back: list[dict[str, Any]] = []
    while (chunk := archive.chunk_after(archived, len(back) - 1)) is not None:
        assert chunk.every == 5
        back += expand_chunk(chunk, len(back) - 1)
    assert back == records
    assert [r["step"] for r in back if "grads" in r] == [*range(0, 60, 5), 59]
