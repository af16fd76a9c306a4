"""What routes share, injected with ``Annotated[..., Depends()]``: the app's one JobQueue, its Settings and its
Gallery, and who sent the request (its Identity)."""

from typing import Annotated

from fastapi import Depends, Request

from lienzo.gallery.store import Gallery as GalleryStore
from lienzo.server.job import ANONYMOUS, Identity
from lienzo.server.jobs import JobQueue
from lienzo.settings import Settings


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_gallery(request: Request) -> GalleryStore:
    return request.app.state.gallery


def identity(request: Request) -> Identity:
    """Who sent the request, as the auth middleware found (lienzo.server.app); ANONYMOUS, an admin, on a
    server without credentials, where the middleware does not run."""
    return getattr(request.state, "identity", ANONYMOUS)


Queue = Annotated[JobQueue, Depends(get_queue)]
AppSettings = Annotated[Settings, Depends(get_settings)]
Gallery = Annotated[GalleryStore, Depends(get_gallery)]
Caller = Annotated[Identity, Depends(identity)]
