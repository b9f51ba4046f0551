"""Uploaded datasets (`gs:dataset:<sha256>`): stored once per content, referred to by the
tenants that uploaded it; the bytes go with the last reference."""

import json
from datetime import datetime

from services.datasets import ParsedDataset
from services.errors import DatasetInUse, DatasetNotFound, LimitExceeded
from services.schemas import DatasetInfo, JobStatus
from services.store import keys
from services.store.base import RedisPart, translate_redis_errors

_LIVE = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING)


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
        key = keys.dataset_key(dataset_id)
        mine = keys.tenant_datasets(tenant)
        if self.redis.sismember(mine, dataset_id):
            return self.dataset_info(tenant, dataset_id), False
        if self.redis.scard(mine) >= max_per_tenant:
            raise LimitExceeded(
                "max_datasets_per_tenant",
                f"tenant {tenant!r} has {max_per_tenant} datasets; "
                f"max_datasets_per_tenant is {max_per_tenant}",
            )
        stored = parsed.x.nbytes + parsed.y.nbytes
        used = int(self.redis.get(keys.tenant_storage(tenant)) or 0)
        if used + stored > storage_limit:
            raise LimitExceeded(
                "tenant_storage_bytes",
                f"tenant {tenant!r} keeps {used} bytes; this dataset needs {stored} more, and "
                f"tenant_storage_bytes is {storage_limit}: delete finished jobs or datasets",
            )
        # One transaction: a Redis over its maxmemory refuses all of it, nothing half-written.
        pipe = self.redis.pipeline(transaction=True)
        if not self.redis.exists(key):
            pipe.hset(
                key,
                mapping={
                    "id": dataset_id,
                    "n": parsed.samples,
                    "d": parsed.features,
                    "format": parsed.format,
                    "columns": json.dumps(parsed.columns),
                    "target": json.dumps(parsed.target),
                    "bytes": size,
                    "stored": stored,
                    "created_at": keys.utc_now(),
                    "loads": 0,
                    "x": parsed.x.tobytes(),
                    "y": parsed.y.tobytes(),
                },
            )
        pipe.sadd(mine, dataset_id)
        pipe.sadd(keys.dataset_refs(dataset_id), tenant)
        pipe.incrby(keys.tenant_storage(tenant), stored)
        pipe.execute()
        return self.dataset_info(tenant, dataset_id), True

    @translate_redis_errors
    def dataset_info(self, tenant: str, dataset_id: str) -> DatasetInfo:
        """A dataset of `tenant` (DatasetNotFound for another tenant's, like a missing one)."""
        if not self.redis.sismember(keys.tenant_datasets(tenant), dataset_id):
            raise DatasetNotFound(dataset_id)
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
        )
        if fields[0] is None:
            raise DatasetNotFound(dataset_id)
        n, d, fmt, columns, target, size, created, loads = (f.decode() for f in fields)
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
        )

    @translate_redis_errors
    def load_dataset(self, dataset_id: str) -> tuple[bytes, bytes, int, int]:
        """A worker's copy of a dataset: float32 x and y bytes, samples, features. Counted in
        the dataset's `loads`."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hmget(keys.dataset_key(dataset_id), "x", "y", "n", "d")
        pipe.hincrby(keys.dataset_key(dataset_id), "loads", 1)
        (x, y, n, d), _ = pipe.execute()
        if x is None:
            raise DatasetNotFound(dataset_id)
        return x, y, int(n), int(d)

    @translate_redis_errors
    def delete_dataset(self, tenant: str, dataset_id: str) -> None:
        """Drop `tenant`'s reference to a dataset (its bytes go with the last reference).
        DatasetInUse while a queued or running job of the tenant trains on it."""
        if not self.redis.sismember(keys.tenant_datasets(tenant), dataset_id):
            raise DatasetNotFound(dataset_id)
        live: list[str] = []
        for status in _LIVE:
            live += [
                i.decode() for i in self.redis.zrange(keys.tenant_index(tenant, status), 0, -1)
            ]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in live:
            pipe.hget(keys.job_key(job_id), "dataset")
        for job_id, used in zip(live, pipe.execute(), strict=True):
            if used == dataset_id.encode():
                raise DatasetInUse(dataset_id, job_id)
        script_keys = [
            keys.dataset_key(dataset_id),
            keys.dataset_refs(dataset_id),
            keys.tenant_datasets(tenant),
            keys.tenant_storage(tenant),
        ]
        if not self.lua.drop_dataset(keys=script_keys, args=[tenant, dataset_id]):
            raise DatasetNotFound(dataset_id)
