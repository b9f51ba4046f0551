"""The dashboard: one page and its script, served by the API (no CDN: it works offline)."""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
def dashboard() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/static/dashboard.js")
def dashboard_script() -> FileResponse:
    return FileResponse(
        STATIC / "dashboard.js",
        media_type="text/javascript",
        headers={"Cache-Control": "no-cache"},
    )
