"""Liveness and readiness probes."""

from fastapi import APIRouter

from api.deps import StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The API process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(store: StoreDep) -> dict[str, str]:
    """The API can reach Redis (503 otherwise)."""
    store.ping()
    return {"status": "ready"}
