"""``create_app(settings)``: the FastAPI app behind ``lienzo serve``.

One JobQueue, owned by the app, runs every request; one router per API family (native ``/api/v1``,
AUTOMATIC1111 ``/sdapi/v1``, OpenAI ``/v1/images``) only translates its vocabulary into a
GenerationRequest and back. Errors leave in the shape of the family the client speaks.
"""

import base64
import hmac
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from lienzo import __version__
from lienzo.errors import ImageFileError, InvalidRequestError, LienzoError, ModelFileError
from lienzo.gallery.store import Gallery, NotFoundError
from lienzo.models.components import Components
from lienzo.server.jobs import JobNotFoundError, JobQueue, QueueFullError
from lienzo.server.routes import a1111, gallery, native, openai
from lienzo.settings import Settings

STATIC = Path(__file__).parent / "static"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Auth:
    """HTTP Basic ``user``/``password`` and/or a Bearer ``api_key``; either one lets a client in."""

    user: str | None = None
    password: str | None = None
    api_key: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.user or self.api_key)

    def allows(self, header: str) -> bool:
        scheme, _, credentials = header.partition(" ")
        scheme, credentials = scheme.lower(), credentials.strip()
        if scheme == "bearer" and self.api_key:
            return hmac.compare_digest(credentials.encode(), self.api_key.encode())
        if scheme == "basic" and self.user:
            try:
                given = base64.b64decode(credentials, validate=True)
            except ValueError:
                return False
            return hmac.compare_digest(given, f"{self.user}:{self.password or ''}".encode())
        return False


class _AuthMiddleware:
    """Every HTTP request and websocket, docs and static files included, must carry valid credentials."""

    def __init__(self, app: ASGIApp, auth: Auth):
        self.app, self.auth = app, auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.auth.allows(headers.get(b"authorization", b"").decode("latin-1")):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        challenge = 'Basic realm="lienzo"' if self.auth.user else 'Bearer realm="lienzo"'
        response = _error(scope["path"], 401, "authentication required: send HTTP Basic credentials or a Bearer API key", None)
        response.headers["WWW-Authenticate"] = challenge
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class _BodyLimitMiddleware:
    """Refuse request bodies over ``max_body_mb`` with 413, by Content-Length or by counting the stream."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is larger than this server's limit of {self.limit / 2**20:g} MB (max_body_mb)"
        await _error(scope["path"], 413, message, None)(scope, receive, send)


# Which family's error shape a path gets; the native one otherwise.
_ERROR_SHAPES: list[tuple[str, Callable[[int, str, str | None], JSONResponse]]] = [
    (openai.PREFIX, openai.error_response),
    (a1111.PREFIX, a1111.error_response),
]


def _error(path: str, status: int, message: str, field: str | None) -> JSONResponse:
    for prefix, shape in _ERROR_SHAPES:
        if path.startswith(prefix):
            return shape(status, message, field)
    return native.error_response(status, message, field)


def _status(err: LienzoError) -> int:
    if isinstance(err, (JobNotFoundError, NotFoundError)):
        return 404
    if isinstance(err, QueueFullError):
        return 429
    return 422  # InvalidRequestError, ImageFileError, ModelFileError (unknown model name), ...


def _field(err: Exception) -> str | None:
    if isinstance(err, (InvalidRequestError, NotFoundError)):
        return err.field
    if isinstance(err, (ImageFileError, ModelFileError)):
        return str(err).partition(":")[0] or None
    return None


def create_app(
    settings: Settings | None = None,
    *,
    model: str | None = None,
    auth: Auth | None = None,
    loader: Callable[[str | None], Components] | None = None,
) -> FastAPI:
    """The server, not yet started: its queue's worker starts with the app (lifespan) and stops with it.
    ``model`` is the model jobs use when they name none; ``loader`` replaces ``lienzo.api.load_model``."""
    settings = settings or Settings()
    store = Gallery.for_settings(settings)
    queue = JobQueue(settings, model=model, loader=loader, gallery=store)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        # Before the first job: files a crash left without a row are added, rows without a file dropped.
        report = store.reconcile()
        log.info("gallery reconciled: %d images added, %d rows removed, %d temporary files removed", report.added, report.removed, report.temp_files)
        queue.start()
        try:
            yield
        finally:
            queue.stop()
            store.close()

    app = FastAPI(title="lienzo", version=__version__, lifespan=lifespan, description=__doc__)
    app.state.queue, app.state.settings, app.state.gallery = queue, settings, store

    @app.exception_handler(LienzoError)
    async def lienzo_error(request: Request, err: LienzoError) -> JSONResponse:
        return _error(request.url.path, _status(err), str(err), _field(err))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        loc = [str(p) for p in first["loc"] if p not in ("body", "query", "path", "form")]
        field = ".".join(loc) or None
        message = first["msg"].removeprefix("Value error, ")
        return _error(request.url.path, 422, f"{field}: {message}" if field else message, field)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(request.url.path, 500, f"internal error: {type(err).__name__}: {err}", None)

    app.include_router(native.router)
    app.include_router(a1111.router)
    app.include_router(openai.router)
    app.include_router(gallery.router)

    # The studio: static files, no build step and nothing from a CDN; a client of /api/v1 like any other.
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def studio() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.add_middleware(_BodyLimitMiddleware, limit=int(settings.max_body_mb * 2**20))
    if auth is not None and auth.enabled:
        app.add_middleware(_AuthMiddleware, auth=auth)
    return app

