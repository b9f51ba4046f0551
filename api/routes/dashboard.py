"""The dashboard: one page, its modules and stylesheet, and Apache ECharts, all served by the
API (no CDN: it works offline). ECharts comes from the npm registry: `make setup` runs `npm ci`
into node_modules/, and the Docker image copies the one file into api/static/vendor/."""

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent.parent / "static"
ROOT = STATIC.parent.parent
# Where echarts.min.js may be: installed with the package (the Docker image), or a checkout's
# node_modules after `make setup`.
ECHARTS = (
    STATIC / "vendor" / "echarts.min.js",
    ROOT / "node_modules" / "echarts" / "dist" / "echarts.min.js",
)
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css"}
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/")
def dashboard() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers=NO_CACHE)


def find_echarts() -> Path | None:
    return next((path for path in ECHARTS if path.is_file()), None)


@router.get("/static/vendor/echarts.min.js")
def echarts() -> FileResponse:
    path = find_echarts()
    if path is None:
        raise HTTPException(
            503, "the dashboard's chart library is missing: run `make setup` (npm ci) and reload"
        )
    return FileResponse(path, media_type="text/javascript")


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    """The dashboard's own modules and stylesheet (a flat folder: no path reaches outside)."""
    path = STATIC / name
    if "/" in name or name.startswith(".") or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise HTTPException(404, "no such file")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=NO_CACHE)
