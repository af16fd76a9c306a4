"""What routes share, injected with ``Annotated[..., Depends()]``: the app's one JobQueue, its Settings and its Gallery."""

from typing import Annotated

from fastapi import Depends, Request

from lienzo.gallery.store import Gallery as GalleryStore
from lienzo.server.jobs import JobQueue
from lienzo.settings import Settings


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_gallery(request: Request) -> GalleryStore:
    return request.app.state.gallery


Queue = Annotated[JobQueue, Depends(get_queue)]
AppSettings = Annotated[Settings, Depends(get_settings)]
Gallery = Annotated[GalleryStore, Depends(get_gallery)]
