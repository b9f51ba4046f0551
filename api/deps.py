"""Annotated dependencies shared by the routes."""

import re
from typing import Annotated

from fastapi import Depends, Path, Request

from services.config import Settings
from services.errors import JobNotFound
from services.events import JobStreams
from services.store import Store

_JOB_ID = re.compile(r"[0-9a-f]{32}")


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def get_job_streams(request: Request) -> JobStreams:
    streams: JobStreams = request.app.state.job_streams
    return streams


def job_id_path(job_id: Annotated[str, Path(description="the job's id")]) -> str:
    # A malformed id names no job: 404 like any other unknown id, never a 422.
    if not _JOB_ID.fullmatch(job_id):
        raise JobNotFound(job_id)
    return job_id


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
JobStreamsDep = Annotated[JobStreams, Depends(get_job_streams)]
JobIdDep = Annotated[str, Depends(job_id_path)]
