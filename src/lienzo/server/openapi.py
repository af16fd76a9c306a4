"""``/openapi.json`` as the server really answers, and ``/docs`` and ``/redoc`` served from the package.

FastAPI describes its own validation error (a list, ``HTTPValidationError``) and only the statuses a
route's signature shows. lienzo answers every error in the shape of the family a path belongs to
(native, AUTOMATIC1111, OpenAI), with statuses that come from its middleware, its exception handlers
and the job queue: this module writes those into the description, route by route. The request limits
are in the routes' models already, which take them from GenerationRequest's.

The documentation pages load Swagger UI and Redoc from the ``fastapi-offline`` package, never from a
CDN: they work offline, and no script from elsewhere runs on the API's origin.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic.json_schema import models_json_schema

from lienzo.server.routes import DIALECTS, a1111, dialect_for, native
from lienzo.settings import Settings

_ASSETS = "/docs/assets"
_ASSET_DIR = Path(fastapi_offline.__file__).parent / "static"
# The pages may load and call only this server (their setup scripts are inline); Redoc's footer would
# otherwise fetch Redocly's logo from its CDN, telling it who reads these docs.
_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "worker-src 'self' blob:; frame-ancestors 'none'"
)

_WHY = {
    400: "the body cannot be read (not UTF-8, a broken form); on OpenAI's routes also any invalid request, as OpenAI answers it",
    401: "no valid credentials: send HTTP Basic credentials or a Bearer API key",
    403: "refused: the Host is not a name this server answers to, or the request comes from a page served elsewhere",
    404: "nothing at this path: no such job, image or preset",
    413: "the request body is larger than the server's max_body_mb",
    415: "the body is not JSON: send it with Content-Type: application/json",
    422: "invalid request: the detail says what is wrong and what is allowed, the field names the field",
    429: "the queue is full (max_queue jobs are waiting): try again later",
    500: "internal error: the server's log has the traceback",
    503: "the job was cancelled before it finished",
}

# What a route answers beside its own success and the statuses every route of its kind has (see
# _statuses), read off the code: these submit a job, which a full queue refuses; an OpenAI job that is
# cancelled answers 503; a native job answers 200 once finished with ?wait=true.
_WAITS = {f"{native.PREFIX}/{mode}" for mode in native.BODIES}
_OPENAI_SUBMITS = {"/v1/images/generations", "/v1/images/edits", "/v1/images/variations"}
_SUBMITS = {*_WAITS, f"{a1111.PREFIX}/txt2img", f"{a1111.PREFIX}/img2img", *_OPENAI_SUBMITS}
# Successes that are not JSON.
_BINARY = {"schema": {"type": "string", "format": "binary"}}
# Before Open API 3.2, an event stream's schema describes one event: here the job, as GET /jobs/{id}
# answers it, after every change.
_JOB_EVENT = {
    "schema": {
        "type": "object",
        "required": ["event", "id", "data"],
        "properties": {
            "event": {"const": "job"},
            "id": {"type": "string", "description": "the job's version: it grows with every change"},
            "data": {
                "type": "string", "contentMediaType": "application/json", "contentSchema": {"$ref": "#/components/schemas/JobView"}
            },
        },
    }
}
_MEDIA = {
    ("get", f"{native.PREFIX}/jobs/{{job_id}}/images/{{index}}"): {"image/png": _BINARY},
    ("get", f"{native.PREFIX}/jobs/{{job_id}}/preview"): {"image/png": _BINARY},
    ("get", f"{native.PREFIX}/jobs/{{job_id}}/events"): {"text/event-stream": _JOB_EVENT},
    ("get", f"{native.PREFIX}/gallery/{{id}}/image"): {"image/png": _BINARY, "image/jpeg": _BINARY, "image/webp": _BINARY},
    ("get", f"{native.PREFIX}/gallery/{{id}}/thumb"): {"image/webp": _BINARY},
}


def install(app: FastAPI, *, basic: bool = False, bearer: bool = False) -> None:
    """Give ``app`` this module's description and documentation pages; ``basic`` / ``bearer``: the
    credentials the server asks for. Create the app with ``docs_url=None, redoc_url=None``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe(app, basic=basic, bearer=bearer)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.mount(_ASSETS, StaticFiles(directory=_ASSET_DIR), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        page = get_swagger_ui_html(
            openapi_url=root + str(app.openapi_url),
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{_ASSETS}/favicon.png",
            # Swagger UI would otherwise send the description to validator.swagger.io for a badge.
            swagger_ui_parameters={"validatorUrl": None},
        )
        page.headers["Content-Security-Policy"] = _CSP
        return page

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        page = get_redoc_html(
            openapi_url=root + str(app.openapi_url),
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = _CSP
        return page


def describe(app: FastAPI, *, basic: bool = False, bearer: bool = False) -> dict[str, Any]:
    """The OpenAPI description of ``app``: FastAPI's, with lienzo's error bodies and statuses."""
    schema = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        description=_with_limits(app.description, app.state.settings),
        routes=app.routes,
        tags=app.openapi_tags,
        servers=app.servers,
    )
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    # Each family's error body, and the status of an invalid request, as the app's exception handlers answer them.
    bodies = [(dialect.error_model, "serialization") for dialect in DIALECTS]
    schemas.update(models_json_schema(bodies, ref_template="#/components/schemas/{model}")[1]["$defs"])
    for path, method, operation in _operations(schema):
        dialect = dialect_for(path)
        body, invalid = dialect.error_model, dialect.invalid_status
        responses = operation["responses"]
        responses.pop("422", None)  # FastAPI's HTTPValidationError, a body lienzo never sends
        for status in _statuses(path, method, operation, invalid, auth=basic or bearer):
            responses[str(status)] = {
                "description": _WHY[status],
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body.__name__}"}}},
            }
        if path in _WAITS and method == "post":
            responses["200"] = {**responses["202"], "description": "the finished job (?wait=true)"}
        for status, response in responses.items():
            if status.startswith("2") and (method, path) in _MEDIA:
                response["content"] = _MEDIA[(method, path)]
        operation["responses"] = dict(sorted(responses.items()))
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemes = {name: {"type": "http", "scheme": name} for name, on in (("basic", basic), ("bearer", bearer)) if on}
    if schemes:
        components["securitySchemes"] = schemes
        schema["security"] = [{name: []} for name in schemes]
    return schema


def _operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            yield path, method, operation


def _statuses(path: str, method: str, operation: dict[str, Any], invalid: int, *, auth: bool) -> list[int]:
    """The error statuses a route can answer. Every route: 403 (Host and Origin checks), 500 (a bug),
    401 where the server asks for credentials. With parameters or a body: the family's invalid-request
    status; with a body: 400 (unreadable) and 413 (max_body_mb), and 415 when it is JSON. With a path
    parameter, unless it names what the request creates (PUT): 404. Submitting a job: 429 (queue
    full); OpenAI's: 503 (cancelled)."""
    statuses = {403, 500}
    if auth:
        statuses.add(401)
    if operation.get("parameters") or "requestBody" in operation:
        statuses.add(invalid)
    if "requestBody" in operation:
        statuses |= {400, 413}
        if "application/json" in operation["requestBody"].get("content", {}):
            statuses.add(415)
    if "{" in path and method != "put":
        statuses.add(404)
    if path in _SUBMITS and method == "post":
        statuses.add(429)
    if path in _OPENAI_SUBMITS and method == "post":
        statuses.add(503)
    return sorted(statuses)


def _with_limits(description: str, settings: Settings) -> str:
    """The app's description, and this server's limits, which no schema keyword can say."""
    limits = (
        f"- max_pixels: {settings.max_pixels:,} (width x height of one image)\n"
        f"- max_steps: {settings.max_steps}\n"
        f"- max_images: {settings.max_images} (images per request, batch size x batches)\n"
        f"- max_input_pixels: {settings.max_input_pixels:,} (an uploaded image)\n"
        f"- max_body_mb: {settings.max_body_mb:g}\n"
        f"- max_queue: {settings.max_queue} (jobs waiting)\n"
    )
    return f"{description}\nThis server's limits, besides those of each field:\n\n{limits}"
