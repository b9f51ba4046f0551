"""The worker registry and the queues it serves."""

from fastapi import APIRouter

from api.deps import StoreDep, TenantDep, problems
from services.queue import CPU_QUEUE, GPU_QUEUE
from services.schemas import WorkerList

router = APIRouter(prefix="/v1/workers", tags=["workers"], responses=problems(401, 413, 503))


@router.get("")
def list_workers(tenant: TenantDep, store: StoreDep) -> WorkerList:
    """Live workers: device, queues, current job (if it is the caller's) and last heartbeat;
    and the jobs waiting in each queue (cpu, gpu and any other a live worker reads)."""
    workers = store.list_workers(tenant)
    queues = sorted({CPU_QUEUE, GPU_QUEUE}.union(*(worker.queues for worker in workers)))
    return WorkerList(workers=workers, queues=store.queue_depths(queues))
