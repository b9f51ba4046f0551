"""The worker registry."""

from fastapi import APIRouter

from api.deps import StoreDep, TenantDep, problems
from services.schemas import WorkerList

router = APIRouter(prefix="/v1/workers", tags=["workers"], responses=problems(401, 413, 503))


@router.get("")
def list_workers(tenant: TenantDep, store: StoreDep) -> WorkerList:
    """Live workers: device, queues, current job (if it is the caller's) and last heartbeat."""
    return WorkerList(workers=store.list_workers(tenant))
