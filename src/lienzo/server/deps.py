"""What routes share, injected with ``Annotated[..., Depends()]``: the app's one JobQueue and its Settings."""

from typing import Annotated

from fastapi import Depends, Request

from lienzo.server.jobs import JobQueue
from lienzo.settings import Settings


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


Queue = Annotated[JobQueue, Depends(get_queue)]
AppSettings = Annotated[Settings, Depends(get_settings)]
