"""Dataset uploads: CSV, .npy or .npz, stored once per content hash."""

import hashlib
import re
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from api.deps import SettingsDep, StoreDep, TenantDep, problems
from api.limits import UploadSlots, too_large
from services.config import Settings
from services.datasets import DatasetInvalid, parse_dataset
from services.errors import DatasetNotFound
from services.schemas import DatasetInfo
from services.store import Store

router = APIRouter(
    prefix="/v1/datasets", tags=["datasets"], responses=problems(401, 404, 409, 413, 429, 503, 507)
)

_DATASET_ID = re.compile(r"[0-9a-f]{64}")
_UPLOAD = {
    "requestBody": {
        "required": True,
        "content": {
            "text/csv": {
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "description": "a header row naming the columns (one of them the target) "
                    "and at least one row of numbers",
                }
            },
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "minLength": 1,
                    "description": ".npy (the last column is y) or .npz (arrays x and y)",
                }
            },
        },
    }
}


@router.post("", status_code=201, openapi_extra=_UPLOAD)
async def upload_dataset(
    tenant: TenantDep,
    request: Request,
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    target: Annotated[
        str, Query(min_length=1, max_length=200, description="CSV: the target column")
    ] = "y",
) -> DatasetInfo:
    """Upload a dataset: CSV with a header (the `target` column is y, the others features),
    .npz with arrays x and y, or .npy (last column y). Its id is the sha256 of the bytes (and,
    for CSV, of the target's name); the same upload again is stored once (200, not 201)."""
    slots: UploadSlots = request.app.state.upload_slots
    with slots.taken():
        info, new = await _receive_and_store(request, tenant, target, store, settings)
    response.status_code = 201 if new else 200
    response.headers["Location"] = f"/v1/datasets/{info.id}"
    return info


async def _receive_and_store(
    request: Request, tenant: str, target: str, store: Store, settings: Settings
) -> tuple[DatasetInfo, bool]:
    """Read the body (never past max_dataset_bytes), parse and store it: (info, is it new)."""
    digest, parts, size = hashlib.sha256(), [], 0
    async for part in request.stream():
        size += len(part)
        if size > settings.max_dataset_bytes:  # the middleware stops it too; never buffer more
            raise HTTPException(413, too_large("max_dataset_bytes", settings.max_dataset_bytes))
        digest.update(part)
        parts.append(part)
    limit = settings.max_elements
    parsed = await run_in_threadpool(
        parse_dataset, b"".join(parts), target, limit, settings.max_dataset_array_bytes
    )
    elements = parsed.samples * parsed.features
    if elements > limit:
        raise DatasetInvalid(
            f"the dataset has {elements} samples x features; max_elements is {limit}"
        )
    if parsed.format == "csv":
        # The same CSV with another target column is another dataset.
        digest.update(b"\0target=" + target.encode())
    quota, storage = settings.max_datasets_per_tenant, settings.tenant_storage_bytes
    return await run_in_threadpool(
        store.put_dataset, tenant, digest.hexdigest(), parsed, size, quota, storage
    )


@router.get("/{dataset_id}")
def get_dataset(tenant: TenantDep, dataset_id: str, store: StoreDep) -> DatasetInfo:
    """A dataset's shape, columns and how often workers loaded it."""
    if not _DATASET_ID.fullmatch(dataset_id):  # names no dataset: 404, like an unknown id
        raise DatasetNotFound(dataset_id)
    return store.dataset_info(tenant, dataset_id)


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(tenant: TenantDep, dataset_id: str, store: StoreDep) -> Response:
    """Drop the caller's dataset; its bytes go once no tenant refers to them (409 while a
    queued or running job of the caller trains on it)."""
    if not _DATASET_ID.fullmatch(dataset_id):
        raise DatasetNotFound(dataset_id)
    store.delete_dataset(tenant, dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
