"""The worker registry."""

from fastapi import APIRouter

from api.deps import StoreDep
from services.schemas import WorkerList

router = APIRouter(prefix="/v1/workers", tags=["workers"])


@router.get("")
def list_workers(store: StoreDep) -> WorkerList:
    """Live workers: device, queues, current job and last heartbeat."""
    return WorkerList(workers=store.list_workers())
