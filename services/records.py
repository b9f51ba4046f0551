"""The wire format of step chunks in Redis, and its expansion into StepRecords (no torch).

The worker packs a chunk of consecutive steps as one stream entry: the rows
[loss, grads..., params...] as native float32 bytes. Packing bytes keeps JSON encoding out of
the training process; the API expands a chunk into per-step records when it serves them.
"""

import math
from array import array
from dataclasses import dataclass
from typing import Any

FIELD_FIRST = b"first"
FIELD_COUNT = b"n"
FIELD_FEATURES = b"d"
FIELD_BIAS = b"b"
FIELD_ROWS = b"rows"
FIELD_BATCHES = b"e"  # batches per epoch, for mini-batch jobs only


@dataclass(frozen=True)
class Chunk:
    """Consecutive steps `first .. first + count - 1` of one job, packed as float32 rows."""

    first: int
    count: int
    features: int
    bias: bool
    rows: bytes
    batches: int = 0  # batches per epoch of a mini-batch job (0: full batch)

    @property
    def last(self) -> int:
        return self.first + self.count - 1

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
        )


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or Infinity: a non-finite value is written as null."""
    return value if math.isfinite(value) else None


def param_values(values: "array[float] | list[float]", features: int, bias: bool) -> dict[str, Any]:
    """{"w": [...], "b": ...} from a flat [w..., b] sequence."""
    out: dict[str, Any] = {"w": [finite_or_none(v) for v in values[:features]]}
    if bias:
        out["b"] = finite_or_none(values[features])
    return out


def expand_chunk(chunk: Chunk, after: int = -1) -> list[dict[str, Any]]:
    """The chunk's steps with `step > after` as StepRecord-shaped dicts (with the epoch and
    the batch in it for a mini-batch job)."""
    values = array("f")
    values.frombytes(chunk.rows)
    p = chunk.features + int(chunk.bias)
    width = 1 + 2 * p
    records = []
    for i in range(max(0, after + 1 - chunk.first), chunk.count):
        row = values[i * width : (i + 1) * width]
        record = {
            "step": chunk.first + i,
            "loss": finite_or_none(row[0]),
            "grads": param_values(row[1 : 1 + p], chunk.features, chunk.bias),
            "params": param_values(row[1 + p :], chunk.features, chunk.bias),
        }
        if chunk.batches:
            record["epoch"], record["batch"] = divmod(chunk.first + i, chunk.batches)
        records.append(record)
    return records
