"""Datasets (`gs:dataset:<id>`). An upload is stored once per content (its id the sha256),
referred to by the tenants that uploaded it; the bytes go with the last reference. A sweep's
inline data is a dataset too, written by the sweep's submit (services/store/sweeps.py) with
the same fields plus its `tenant` and `sweep`: no tenant's reference, it goes with the sweep."""

import json
from datetime import datetime
from typing import Any

from services.datasets import ParsedDataset
from services.errors import DatasetInUse, DatasetNotFound, LimitExceeded
from services.schemas import DatasetInfo
from services.store import keys
from services.store.base import RedisPart, translate_redis_errors


def dataset_record(dataset_id: str, parsed: ParsedDataset, size: int) -> dict[str, Any]:
    """A dataset's hash: shape, provenance, counters and the float32 x and y bytes."""
    return {
        "id": dataset_id,
        "n": parsed.samples,
        "d": parsed.features,
        "format": parsed.format,
        "columns": json.dumps(parsed.columns),
        "target": json.dumps(parsed.target),
        "bytes": size,
        "stored": parsed.x.nbytes + parsed.y.nbytes,
        "created_at": keys.utc_now(),
        "loads": 0,
        "x": parsed.x.tobytes(),
        "y": parsed.y.tobytes(),
    }


class Datasets(RedisPart):
    """Datasets and the tenants' references to them."""

    @translate_redis_errors
    def put_dataset(
        self,
        tenant: str,
        dataset_id: str,
        parsed: ParsedDataset,
        size: int,
        max_per_tenant: int = 2**31,
        storage_limit: int = 2**62,
    ) -> tuple[DatasetInfo, bool]:
        """Store a parsed upload under its content hash, once (a second upload of the same
        bytes, by any tenant, writes no data again), and give `tenant` access to it. The flag
        says whether the dataset is new to the tenant. LimitExceeded when the tenant already
        has `max_per_tenant` datasets or its storage would pass `storage_limit` bytes;
        StorageFull when Redis is full (nothing written)."""
        record = dataset_record(dataset_id, parsed, size)
        args: list[Any] = [tenant, dataset_id, max_per_tenant, storage_limit, record["stored"]]
        for name, value in record.items():
            args += [name, value]
        # One script: the checks and the writes cannot interleave with another upload or a
        # delete, and a Redis over its maxmemory refuses it whole (nothing half-written).
        reply = self.lua.put_dataset(keys=self._keys(tenant, dataset_id), args=args)
        if reply[0] == b"quota":
            raise LimitExceeded(
                "max_datasets_per_tenant",
                f"tenant {tenant!r} has {int(reply[1])} datasets; "
                f"max_datasets_per_tenant is {max_per_tenant}",
            )
        if reply[0] == b"storage":
            raise LimitExceeded(
                "tenant_storage_bytes",
                f"tenant {tenant!r} keeps {int(reply[1])} bytes; this dataset needs "
                f"{record['stored']} more, and tenant_storage_bytes is {storage_limit}: "
                "delete finished jobs or datasets",
            )
        return self.dataset_info(tenant, dataset_id), reply[0] == b"added"

    @staticmethod
    def _keys(tenant: str, dataset_id: str) -> list[str]:
        """The KEYS of the dataset scripts (scripts.py)."""
        return [
            keys.dataset_key(dataset_id),
            keys.dataset_refs(dataset_id),
            keys.tenant_datasets(tenant),
            keys.tenant_storage(tenant),
            keys.dataset_users(tenant, dataset_id),
        ]

    @translate_redis_errors
    def dataset_info(self, tenant: str, dataset_id: str) -> DatasetInfo:
        """A dataset of `tenant`: one it uploaded, or one of its sweeps' inline data (`sweep`
        then names the sweep). DatasetNotFound for another tenant's, like a missing one."""
        referred = self.redis.sismember(keys.tenant_datasets(tenant), dataset_id)
        fields = self.redis.hmget(
            keys.dataset_key(dataset_id),
            "n",
            "d",
            "format",
            "columns",
            "target",
            "bytes",
            "created_at",
            "loads",
            "tenant",
            "sweep",
        )
        owner, sweep = fields[-2:]
        if fields[0] is None or not (referred or (sweep and owner == tenant.encode())):
            raise DatasetNotFound(dataset_id)
        n, d, fmt, columns, target, size, created, loads = (f.decode() for f in fields[:-2])
        return DatasetInfo(
            id=dataset_id,
            samples=int(n),
            features=int(d),
            format=fmt,
            columns=json.loads(columns),
            target=json.loads(target),
            bytes=int(size),
            created_at=datetime.fromisoformat(created),
            loads=int(loads),
            sweep=sweep.decode() if sweep else None,
        )

    @translate_redis_errors
    def load_dataset(self, dataset_id: str) -> tuple[bytes, bytes, int, int]:
        """A worker's copy of a dataset: float32 x and y bytes, samples, features. Counted in
        the dataset's `loads` (also on a full Redis)."""
        x, y, n, d = self.redis.hmget(keys.dataset_key(dataset_id), "x", "y", "n", "d")
        if x is None:
            raise DatasetNotFound(dataset_id)
        self.lua.count_load(keys=[keys.dataset_key(dataset_id)])
        return x, y, int(n), int(d)

    @translate_redis_errors
    def delete_dataset(self, tenant: str, dataset_id: str) -> None:
        """Drop `tenant`'s reference to a dataset (its bytes go with the last reference).
        DatasetInUse while a queued or running job or sweep of the tenant trains on it, and
        for a sweep's own dataset (it goes with the sweep)."""
        reply = self.lua.drop_dataset(
            keys=self._keys(tenant, dataset_id), args=[tenant, dataset_id]
        )
        if reply[0] == b"busy":
            raise DatasetInUse(dataset_id, reply[1].decode(), reply[2].decode())
        if reply[0] == b"owned":
            raise DatasetInUse(dataset_id, reply[1].decode(), "sweep", owned=True)
        if reply[0] == b"missing":
            raise DatasetNotFound(dataset_id)
