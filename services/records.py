"""The wire format of step chunks in Redis, and its expansion into StepRecords (no torch).

The worker packs a chunk of consecutive steps as one stream entry: the rows
[loss, grads..., params...] (then an explained job's graph, then a job with eval's validation
loss) as native float32 bytes. Packing bytes keeps JSON encoding out of
the training process; the API expands a chunk into per-step records when it serves them.

A sparse chunk (a job with `record.every` N > 1, DESIGN §10) holds two blocks instead: every
step's [loss] (or [loss, validation loss]) in step order, then the full rows of the steps that
keep their gradients and parameters -- those divisible by N and, where the chunk ends the job
(its last step, a divergence, a pruning), its last step -- in step order. Which steps those
are follows from the chunk's first step, its count, N and the length of the rows (one full
row more than the rule gives: the last step's), so every member of a group's flush shares the
same fields and a chunk needs no list of its kept steps. A chunk with N = 1 is the dense
format, written and read as before.
"""

import math
from array import array
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

FIELD_FIRST = b"first"
FIELD_COUNT = b"n"
FIELD_FEATURES = b"d"
FIELD_BIAS = b"b"
FIELD_ROWS = b"rows"
FIELD_BATCHES = b"e"  # batches per epoch, for mini-batch jobs only
FIELD_EXPLAIN = b"x"  # samples of an explained job's graph, for explained jobs only
FIELD_EVALUATED = b"v"  # 1: each row ends with the validation loss (jobs with eval only)
FIELD_EVERY = b"k"  # record.every N > 1: a sparse chunk (the module's docstring)

# In a row's validation-loss column: NaN where the step was not evaluated. An evaluated step
# whose validation loss is not finite holds +inf (a mean of squares is never -inf or, at finite
# parameters, NaN), so the two never mix up; both are null in JSON.
NOT_EVALUATED = math.nan


@dataclass(frozen=True)
class Chunk:
    """Consecutive steps `first .. first + count - 1` of one job, packed as float32 rows."""

    first: int
    count: int
    features: int
    bias: bool
    rows: bytes
    batches: int = 0  # batches per epoch of a mini-batch job (0: full batch)
    explain: int = 0  # samples in each row's graph (0: not an explained job)
    evaluated: bool = False  # each row ends with the validation loss
    every: int = 1  # record.every: > 1 for a sparse chunk

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    @property
    def width(self) -> int:
        """float32 values in one full row."""
        return row_width(self.features, self.bias, self.explain, self.evaluated)

    def kept_rows(self) -> list[int]:
        """The rows (0 .. count - 1) that carry gradients and parameters."""
        if self.every <= 1:
            return list(range(self.count))
        full = (len(self.rows) // 4 - self.count * loss_width(self.evaluated)) // self.width
        return kept_rows(self.first, self.count, self.every, full > _rule_rows(self))

    def dense(self) -> tuple["np.ndarray[Any, Any]", "np.ndarray[Any, Any]"]:
        """The rows as (count, width) float32, NaN in the columns of a step that keeps only
        its loss, and which rows carry gradients and parameters (count,) bool."""
        if self.every <= 1:
            rows = np.frombuffer(self.rows, np.float32).reshape(self.count, self.width)
            return rows, np.ones(self.count, bool)
        t, width = loss_width(self.evaluated), self.width
        values = np.frombuffer(self.rows, np.float32)
        kept = self.kept_rows()
        dense = np.full((self.count, width), np.nan, np.float32)
        thin = values[: self.count * t].reshape(self.count, t)
        dense[:, 0] = thin[:, 0]
        if self.evaluated:
            dense[:, -1] = thin[:, 1]
        dense[kept] = values[self.count * t :].reshape(len(kept), width)
        mask = np.zeros(self.count, bool)
        mask[kept] = True
        return dense, mask

    def fields(self) -> dict[bytes, bytes | int]:
        fields: dict[bytes, bytes | int] = {
            FIELD_FIRST: self.first,
            FIELD_COUNT: self.count,
            FIELD_FEATURES: self.features,
            FIELD_BIAS: int(self.bias),
            FIELD_ROWS: self.rows,
        }
        if self.batches:
            fields[FIELD_BATCHES] = self.batches
        if self.explain:
            fields[FIELD_EXPLAIN] = self.explain
        if self.evaluated:
            fields[FIELD_EVALUATED] = 1
        if self.every > 1:
            fields[FIELD_EVERY] = self.every
        return fields

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> "Chunk":
        return cls(
            first=int(fields[FIELD_FIRST]),
            count=int(fields[FIELD_COUNT]),
            features=int(fields[FIELD_FEATURES]),
            bias=fields[FIELD_BIAS] == b"1",
            rows=fields[FIELD_ROWS],
            batches=int(fields.get(FIELD_BATCHES, 0)),
            explain=int(fields.get(FIELD_EXPLAIN, 0)),
            evaluated=fields.get(FIELD_EVALUATED) == b"1",
            every=int(fields.get(FIELD_EVERY, 1)),
        )


def row_width(features: int, bias: bool, explain_samples: int = 0, evaluated: bool = False) -> int:
    """float32 values in one step's row: [loss, grads (p), params (p)], then for an explained
    job of n samples its graph (6n + n x p values; training.Layout says which), then for a job
    with eval the validation loss."""
    p = features + int(bias)
    n = explain_samples
    return 1 + 2 * p + 6 * n + n * p + int(evaluated)


def loss_width(evaluated: bool) -> int:
    """float32 values every step of a sparse chunk keeps: the loss (and validation loss)."""
    return 1 + int(evaluated)


def kept_rows(first: int, count: int, every: int, last: bool) -> list[int]:
    """The rows of steps `first .. first + count - 1` that keep gradients and parameters
    under record.every `every`: steps divisible by it, and the chunk's last row if `last`
    (the chunk ends the job)."""
    rows = list(range((-first) % every, count, every))
    if last and count and (not rows or rows[-1] != count - 1):
        rows.append(count - 1)
    return rows


def _rule_rows(chunk: "Chunk") -> int:
    """How many of the chunk's steps are divisible by its `every`."""
    return len(range((-chunk.first) % chunk.every, chunk.count, chunk.every))


def kept_steps(steps: int, every: int, last: bool = True) -> int:
    """How many of a job's steps `0 .. steps - 1` keep gradients and parameters: those
    divisible by `every`, and the last one if `last` (the job ended there by itself)."""
    return len(kept_rows(0, steps, every, last)) if steps > 0 else 0


def sparse_rows(
    rows: "np.ndarray[Any, Any]", first: int, every: int, evaluated: bool, last: bool
) -> bytes:
    """Full float32 rows (count, width) of steps from `first` on, as a chunk keeps them under
    record.every `every`: as they are for 1; else every step's loss (and, `evaluated`, its
    validation loss: the rows' last column), then the kept steps' full rows. `last`: the rows
    end the job, and their last step keeps its gradients and parameters."""
    if every <= 1:
        return rows.tobytes()
    thin = rows[:, [0, -1]] if evaluated else rows[:, :1]
    kept = rows[kept_rows(first, len(rows), every, last)]
    return np.ascontiguousarray(thin).tobytes() + kept.tobytes()


# The most characters one float takes in a record's JSON, with its separator: a float32 as
# the nearest float64, e.g. "-1.1754943508222875e-38,".
_FLOAT_JSON_CHARS = 25


def record_json_bytes(
    features: int, bias: bool, explain_samples: int = 0, evaluated: bool = False
) -> int:
    """An upper bound on one StepRecord's size as JSON, to size pages in bytes before any
    record is rendered."""
    # Field names, brackets, the step and epoch numbers, and the explain view's words.
    fixed = 120 + (800 if explain_samples else 0) + (12 if evaluated else 0)
    return fixed + _FLOAT_JSON_CHARS * row_width(features, bias, explain_samples, evaluated)


def loss_record_json_bytes(evaluated: bool = False) -> int:
    """An upper bound on the JSON of a sparse job's record without gradients and parameters."""
    return 120 + (12 if evaluated else 0) + _FLOAT_JSON_CHARS * loss_width(evaluated)


def is_evaluated(step: int, every: int, last: int, rungs: "Collection[int]" = ()) -> bool:
    """Whether a job with eval (`every` > 0) computes the validation loss at `step`: steps
    divisible by `every`, the last step (`last`), and in a sweep the step before each rung
    (successive halving ranks by it)."""
    return every > 0 and (step % every == 0 or step == last or step + 1 in rungs)


def settle_validation(
    column: "np.ndarray[Any, Any]", first: int, every: int, last: int, rungs: "Collection[int]" = ()
) -> None:
    """Mark a chunk's validation-loss column (steps `first`, `first + 1`, ... along the last
    axis) in place: NOT_EVALUATED where the step was not evaluated (an eager step left whatever
    was there; a compiled block or a CUDA graph evaluates every step), +inf where an evaluated
    value is not finite."""
    steps = np.arange(first, first + column.shape[-1])
    # is_evaluated, for the whole chunk at once.
    evaluated = (steps % max(every, 1) == 0) | (steps == last) | np.isin(steps + 1, list(rungs))
    evaluated &= every > 0
    column[..., evaluated] = np.where(
        np.isnan(column[..., evaluated]), np.inf, column[..., evaluated]
    )
    column[..., ~evaluated] = NOT_EVALUATED


def finite_steps(rows: "np.ndarray[Any, Any]", params: int) -> "np.ndarray[Any, Any]":
    """Which rows (..., count, width) have a finite loss and finite gradients: (..., count).
    A job's chunk or every member's of a group's; the first row that is not ends its run
    (`diverged`)."""
    finite: np.ndarray[Any, Any] = np.isfinite(rows[..., : 1 + params]).all(axis=-1)
    return finite


def first_not_finite(finite: "np.ndarray[Any, Any]") -> int | None:
    """The index of the first False in `finite` (count,), None if there is none."""
    return None if finite.all() else int(np.argmin(finite))


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or Infinity: a non-finite value is written as null."""
    return value if math.isfinite(value) else None


def param_values(values: "array[float] | list[float]", features: int, bias: bool) -> dict[str, Any]:
    """{"w": [...], "b": ...} from a flat [w..., b] sequence."""
    out: dict[str, Any] = {"w": [finite_or_none(v) for v in values[:features]]}
    if bias:
        out["b"] = finite_or_none(values[features])
    return out


def explain_view(values: "array[float]", n: int, features: int, bias: bool) -> dict[str, Any]:
    """The tutorial's computational graph of one step, from its recorded values: the nodes
    y_hat = x @ w (+ b), s = y_hat - y, loss = mean(s^2), each with its value, the gradient
    of the loss flowing into it, and its local gradient; and the chain rule that multiplies
    them into dLoss/dw (and dLoss/db). Lists run over the samples."""
    p = features + int(bias)

    def part(k: int) -> list[float | None]:
        return [finite_or_none(v) for v in values[k * n : (k + 1) * n]]

    y_hat, s, local_loss_s, local_s_yhat, flowing_yhat, flowing_s = (part(k) for k in range(6))
    jacobian = [values[6 * n + i * p : 6 * n + (i + 1) * p] for i in range(n)]
    local_yhat: dict[str, Any] = {
        "w": [[finite_or_none(v) for v in row[:features]] for row in jacobian]
    }
    if bias:
        local_yhat["b"] = [finite_or_none(row[features]) for row in jacobian]
    loss = sum(v * v for v in values[n : 2 * n]) / n
    # dLoss/dtheta_j = sum_i dLoss/ds_i * ds_i/dy_hat_i * dy_hat_i/dtheta_j
    chain = [
        sum(values[2 * n + i] * values[3 * n + i] * values[6 * n + i * p + j] for i in range(n))
        for j in range(p)
    ]
    return {
        "nodes": [
            {
                "node": "y_hat",
                "op": "x @ w + b" if bias else "x @ w",
                "value": y_hat,
                "grad": flowing_yhat,
                "local": {"y_hat/" + name: grads for name, grads in local_yhat.items()},
            },
            {
                "node": "s",
                "op": "y_hat - y",
                "value": s,
                "grad": flowing_s,
                "local": {"s/y_hat": local_s_yhat},
            },
            {
                "node": "loss",
                "op": "mean(s ** 2)" if n > 1 else "s ** 2",
                "value": finite_or_none(loss),
                "grad": 1.0,
                "local": {"loss/s": local_loss_s},
            },
        ],
        "chain": {
            "rule": "dLoss/dtheta = sum over samples of dLoss/ds * ds/dy_hat * dy_hat/dtheta",
            **param_values(chain, features, bias),
        },
    }


def expand_chunk(chunk: Chunk, after: int = -1, limit: int | None = None) -> list[dict[str, Any]]:
    """The chunk's steps with `step > after` (at most `limit` of them) as StepRecord-shaped
    dicts (with the epoch and the batch in it for a mini-batch job). Only those rows become
    Python floats. A sparse chunk's steps that keep only their loss have no `grads` and
    `params` (nor `explain`)."""
    begin = max(0, after + 1 - chunk.first)
    end = chunk.count if limit is None else min(chunk.count, begin + limit)
    if chunk.every > 1:
        return _expand_sparse(chunk, begin, end)
    width = chunk.width
    values = array("f")
    values.frombytes(memoryview(chunk.rows)[4 * width * begin : 4 * width * end])
    return [
        _full_record(chunk, chunk.first + i, values[(i - begin) * width : (i - begin + 1) * width])
        for i in range(begin, end)
    ]


def _expand_sparse(chunk: Chunk, begin: int, end: int) -> list[dict[str, Any]]:
    """expand_chunk's rows `begin .. end - 1` of a sparse chunk."""
    t, width = loss_width(chunk.evaluated), chunk.width
    losses = array("f")
    losses.frombytes(memoryview(chunk.rows)[4 * t * begin : 4 * t * end])
    kept = chunk.kept_rows()
    full = {row: k for k, row in enumerate(kept) if begin <= row < end}
    rows = memoryview(chunk.rows)[4 * t * chunk.count :]
    records = []
    for i in range(begin, end):
        step = chunk.first + i
        if i in full:
            k = full[i]
            row = array("f")
            row.frombytes(rows[4 * width * k : 4 * width * (k + 1)])
            records.append(_full_record(chunk, step, row))
            continue
        record: dict[str, Any] = {"step": step, "loss": finite_or_none(losses[(i - begin) * t])}
        if chunk.evaluated and not math.isnan(losses[(i - begin) * t + 1]):
            record["val_loss"] = finite_or_none(losses[(i - begin) * t + 1])
        if chunk.batches:
            record["epoch"], record["batch"] = divmod(step, chunk.batches)
        records.append(record)
    return records


def _full_record(chunk: Chunk, step: int, row: "array[float]") -> dict[str, Any]:
    """The record of `step` from its full row."""
    p = chunk.features + int(chunk.bias)
    n = chunk.explain
    record = {
        "step": step,
        "loss": finite_or_none(row[0]),
        "grads": param_values(row[1 : 1 + p], chunk.features, chunk.bias),
        "params": param_values(row[1 + p : 1 + 2 * p], chunk.features, chunk.bias),
    }
    if chunk.evaluated and not math.isnan(row[-1]):
        record["val_loss"] = finite_or_none(row[-1])
    if chunk.batches:
        record["epoch"], record["batch"] = divmod(step, chunk.batches)
    if n:
        graph = row[1 + 2 * p : chunk.width - int(chunk.evaluated)]
        record["explain"] = explain_view(graph, n, chunk.features, chunk.bias)
    return record
