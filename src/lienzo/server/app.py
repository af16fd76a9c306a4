"""``create_app(settings)``: the FastAPI app behind ``lienzo serve``.

One JobQueue, owned by the app, runs every request; one router per API family (native ``/api/v1``,
AUTOMATIC1111 ``/sdapi/v1``, OpenAI ``/v1/images``) only translates its vocabulary into a
GenerationRequest and back. Errors leave in the shape of the family the client speaks.
"""

import base64
import hmac
import ipaddress
import logging
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from lienzo import __version__
from lienzo.errors import ImageFileError, InvalidRequestError, LienzoError, ModelFileError
from lienzo.gallery.records import NotFoundError
from lienzo.gallery.store import Gallery
from lienzo.server import metrics, openapi
from lienzo.server.codec import JSONResponse
from lienzo.server.job import ANONYMOUS, Identity, JobNotFoundError, QueueFullError
from lienzo.server.jobs import ForbiddenError, JobQueue, Loader
from lienzo.server.workers import WorkerPool
from lienzo.server.keys import ADMIN, KeyStore
from lienzo.server.routes import a1111, dialect_for, gallery, native, native_control, openai, plot
from lienzo.settings import Settings

STATIC = Path(__file__).parent / "static"

log = logging.getLogger(__name__)


ADMIN_IDENTITY = Identity(owner=ADMIN, admin=True)


@dataclass(frozen=True)
class Auth:
    """The admin's credentials: HTTP Basic ``user``/``password`` and/or a Bearer ``api_key``; either one
    lets a client in as the admin (named keys, lienzo.server.keys, let in everyone else)."""

    user: str | None = None
    password: str | None = None
    api_key: str | None = None
    # The Bearer token ``lienzo serve`` writes into server.json for ``lienzo generate`` (lienzo.cli.remote): the
    # admin's too, for this process only. It alone does not make the server ask for credentials (``enabled``).
    local_token: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.user or self.api_key)

    def allows(self, header: str) -> bool:
        scheme, _, credentials = header.partition(" ")
        scheme, credentials = scheme.lower(), credentials.strip()
        if scheme == "bearer" and self.local_token and hmac.compare_digest(credentials.encode(), self.local_token.encode()):
            return True
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
    """Once the server has credentials, the admin's (``auth``) or named keys (``keys``, which the CLI may
    add while it runs), every HTTP request and websocket, docs and static files included, must carry
    valid ones. Who sent it goes into the scope's state, where routes read it (lienzo.server.deps.identity):
    the admin, a key's owner, or ANONYMOUS on a server without credentials."""

    def __init__(self, app: ASGIApp, auth: Auth, keys: KeyStore | None):
        self.app, self.auth, self.keys = app, auth, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        identity = self._identify(headers.get(b"authorization", b"").decode("latin-1"))
        if identity is not None:
            scope.setdefault("state", {})["identity"] = identity
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        challenge = 'Basic realm="lienzo"' if self.auth.user else 'Bearer realm="lienzo"'
        response = _error(scope["path"], 401, "authentication required: send HTTP Basic credentials or a Bearer API key", None)
        response.headers["WWW-Authenticate"] = challenge
        await response(scope, receive, send)

    def _identify(self, header: str) -> Identity | None:
        """Who ``header`` (Authorization) says sent the request; None: nobody the server lets in. The key
        store is asked here, on the event loop: it answers from memory, after one stat of its file."""
        if self.auth.allows(header):
            return ADMIN_IDENTITY
        named = self.keys is not None and self.keys.has_keys()
        if not named and not self.auth.enabled:
            return ANONYMOUS  # nothing to check against: open, as a server without credentials is
        scheme, _, secret = header.partition(" ")
        if named and scheme.lower() == "bearer":
            return self.keys.identify(secret.strip())
        return None


def _too_large(limit_mb: float) -> str:
    return f"the request body is larger than this server's limit of {limit_mb:g} MB (max_body_mb)"


class _BodyLimitMiddleware:
    """Refuse request bodies over ``max_body_mb`` with 413, by Content-Length or by counting the stream."""

    def __init__(self, app: ASGIApp, limit_mb: float):
        self.app, self.limit_mb, self.limit = app, limit_mb, int(limit_mb * 2**20)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _error(scope["path"], 413, _too_large(self.limit_mb), None)(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # An HTTPException: FastAPI's body parsers (JSON and multipart) let it through, where
                    # any other error becomes 400 "error parsing the body"; create_app's handler shapes it.
                    raise HTTPException(413, _too_large(self.limit_mb))
            return message

        await self.app(scope, counting_receive, send)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _name_and_port(netloc: str, scheme: str) -> tuple[str, int] | None:
    """``host[:port]`` (an IPv6 address in brackets) as a lower-case name and a port; None if malformed."""
    url = urlsplit(f"//{netloc}")
    try:
        port = url.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        return None
    return (url.hostname, port) if url.hostname else None


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class _BrowserGuard:
    """Only this server's own pages and clients that are no browser get in (README "Serve it"):

    - **Host** must be a name this server answers to: localhost, any IP address, the address the
      connection arrived at, this machine's name, public_url's host, or one of allowed_hosts ("*": any).
      A page whose own name an attacker rebinds to this machine (DNS rebinding) is same-origin with
      lienzo and could read and change everything; the Host it sends is the attacker's name. An IP
      address cannot be rebound, and ports are not compared: the name is what gives a page away.
    - A browser's request must come from lienzo's own page: an **Origin** other than the request's
      own (or public_url's), "null" included, and a **Sec-Fetch-Site** other than same-origin or none
      (same-site is another port on localhost: another app) are refused, for every method and
      websockets, so that a page elsewhere can neither act nor read. A link followed from elsewhere
      (a top-level navigation) still opens the studio. Other clients send neither header.

    Refusals are 403, in the family's error shape; websockets are closed with 1008. They apply with
    authentication too: browsers send saved credentials with any page's requests.
    """

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        names = {"localhost", *settings.allowed_hosts}
        machine = socket.gethostname().lower()
        if machine:  # as the network and mDNS know it
            names |= {machine, f"{machine.partition('.')[0]}.local"}
        public = urlsplit(settings.public_url or "")
        self.public = _name_and_port(public.netloc, public.scheme) if settings.public_url else None
        if self.public is not None:
            names.add(self.public[0])
        self.any_host = "*" in names
        self.names = {n for n in names if not n.startswith(".")}
        self.domains = tuple(n for n in names if n.startswith("."))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self._foreign_host(scope, headers) or self._cross_site(scope, headers)
        if refusal is None:
            return await self.app(scope, receive, send)
        log.warning("refused %s %s: %s", scope.get("method", "websocket"), scope["path"], refusal)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await _error(scope["path"], 403, refusal, None)(scope, receive, send)

    def _answers_to(self, name: str, scope: Scope) -> bool:
        arrived_at = (scope.get("server") or ("",))[0]  # the socket's address; a test client's made-up name
        return (
            self.any_host
            or name in self.names
            or name.endswith(self.domains)
            or f".{name}" in self.domains
            or _is_address(name)
            or name == str(arrived_at).lower()
        )

    def _foreign_host(self, scope: Scope, headers: Headers) -> str | None:
        host = headers.get("host")
        if host is None:  # HTTP/1.0 without one: no browser sends that
            return None
        parsed = _name_and_port(host, scope["scheme"])
        if parsed is not None and self._answers_to(parsed[0], scope):
            return None
        return (
            f"Host {host!r} is not a name this server answers to (DNS rebinding protection): if it is this server's, "
            "add it to allowed_hosts (LIENZO_ALLOWED_HOSTS or lienzo serve --allowed-host)"
        )

    def _cross_site(self, scope: Scope, headers: Headers) -> str | None:
        origin = headers.get("origin")
        if origin is not None:
            url = urlsplit(origin)
            given = _name_and_port(url.netloc, url.scheme)
            own = _name_and_port(headers.get("host", ""), url.scheme)
            if given is None or given not in (own, self.public):
                return (
                    f"cross-site request refused: Origin {origin} is not this server's; behind a proxy that rewrites Host, "
                    "set public_url (LIENZO_PUBLIC_URL or lienzo serve --public-url) to the address browsers open"
                )
        site = headers.get("sec-fetch-site")
        if site in (None, "same-origin", "none"):
            return None
        navigation = headers.get("sec-fetch-mode") == "navigate" and headers.get("sec-fetch-dest") == "document"
        if navigation and scope.get("method") in ("GET", "HEAD"):
            return None
        return f"cross-site request refused: Sec-Fetch-Site is {site}; only lienzo's own pages may use it from a browser"


async def _json_only(request: Request) -> None:
    """A route that takes JSON refuses any other body with 415, so that no form or text/plain POST, which
    browsers send from any page without asking first, reaches one. (Runs after FastAPI read the body.)"""
    body = getattr(request.scope.get("route"), "body_field", None)
    if body is None or isinstance(body.field_info, params.Form):
        return
    given = request.headers.get("content-type")
    media = (given or "").partition(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json") or (given is None and not await request.body()):
        return
    given = given or "none"
    raise HTTPException(415, f"{request.method} {request.url.path} takes a JSON body: send Content-Type: application/json (got {given})")


def _error(path: str, status: int, message: str, field: str | None) -> JSONResponse:
    """The error in the shape of the family ``path`` belongs to."""
    return dialect_for(path).error_response(status, message, field)


def _status(err: LienzoError) -> int:
    if isinstance(err, (JobNotFoundError, NotFoundError)):
        return 404
    if isinstance(err, QueueFullError):
        return 429
    if isinstance(err, ForbiddenError):
        return 403
    return 422  # InvalidRequestError, ImageFileError, ModelFileError (unknown model name), ...


def _field(err: Exception) -> str | None:
    if isinstance(err, (InvalidRequestError, NotFoundError)):
        return err.field
    if isinstance(err, (ImageFileError, ModelFileError)):
        return str(err).partition(":")[0] or None
    return None


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(routes: list[BaseRoute], scope: Scope) -> str:
    """Every method some route takes at this path: Starlette's 405 names only the first such route's.
    Mounts (static files) take any method here and answer their own 405s."""
    routes = [route for route in routes if not isinstance(route, Mount)]
    return ", ".join(m for m in _METHODS if any(route.matches({**scope, "method": m})[0] == Match.FULL for route in routes))


def create_app(
    settings: Settings | None = None,
    *,
    model: str | None = None,
    auth: Auth | None = None,
    loader: Loader | None = None,
    keys: KeyStore | None = None,
    devices: list[str] | None = None,
    pool: WorkerPool | None = None,
) -> FastAPI:
    """The server, not yet started: its queue's workers start with the app (lifespan) and stop with it.
    ``model`` is the model jobs use when they name none; ``loader(path, cancel)`` replaces ``lienzo.studio.load_model``.
    ``devices``: one worker each (default: every GPU, else the CPU); ``pool``: the workers instead (a Ray cluster's).
    ``auth``: the admin's credentials; ``keys``: the named keys (default: the settings' keys.db, if there is one)."""
    settings = settings or Settings()
    if keys is None and settings.keys_db.exists():
        keys = KeyStore(settings.keys_db)
    store = Gallery.for_settings(settings)
    queue = JobQueue(settings, model=model, loader=loader, gallery=store, devices=devices, pool=pool)
    app_metrics = metrics.Metrics(queue)
    queue.on_finished = app_metrics.record_job  # each finished job's state and speed, for /metrics

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
            if keys is not None:
                keys.close()

    # /docs and /redoc are openapi.install's: FastAPI's own would load their scripts from a CDN.
    app = FastAPI(
        title="lienzo", version=__version__, lifespan=lifespan, description=__doc__, docs_url=None, redoc_url=None,
        dependencies=[Depends(_json_only)], default_response_class=JSONResponse,
    )
    app.state.queue, app.state.settings, app.state.gallery = queue, settings, store
    app.state.metrics, app.state.metrics_registry = app_metrics, app_metrics.registry

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

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        # Starlette's and FastAPI's own refusals (400 for a body that is not UTF-8, 404 for no such path,
        # 405 with its Allow header) in the family's shape, as /openapi.json documents every error.
        response = _error(request.url.path, err.status_code, str(err.detail), None)
        response.headers.update(err.headers or {})
        allowed = _allowed_methods(app.routes, request.scope) if err.status_code == 405 else None
        if allowed:
            response.headers["Allow"] = allowed
        return response

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(request.url.path, 500, f"internal error: {type(err).__name__}: {err}", None)

    app.include_router(native.router)
    app.include_router(native_control.router)
    app.include_router(plot.router)
    app.include_router(a1111.router)
    app.include_router(a1111.controlnet.router)  # sd-webui-controlnet's paths, beside A1111's as the extension mounts them
    app.include_router(openai.router)
    app.include_router(gallery.router)
    app.include_router(metrics.router)  # /metrics, for Prometheus
    openapi.install(app, basic=bool(auth and auth.user), bearer=bool(auth and auth.api_key) or bool(keys and keys.has_keys()))

    # The studio: static files, no build step and nothing from a CDN; a client of /api/v1 like any other.
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def studio() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.add_middleware(_BodyLimitMiddleware, limit_mb=settings.max_body_mb)
    if (auth is not None and auth.enabled) or keys is not None:
        app.add_middleware(_AuthMiddleware, auth=auth or Auth(), keys=keys)
    # Outermost: a request from a page elsewhere is refused before anything reads it.
    app.add_middleware(_BrowserGuard, settings=settings)
    return app

