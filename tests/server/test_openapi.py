"""/openapi.json says what the server answers (error bodies, statuses, limits), schemathesis finds no
5xx and no answer the description does not allow, and /docs and /redoc work with no network."""

import json
import re

import jsonschema_rs
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image
from playwright import sync_api as playwright
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python.asgi import shutdown_lifespans

from lienzo.generation.request import MAX_PROMPT_CHARS, MAX_SIDE, MAX_STEPS, MIN_SIDE, build_request, json_limits
from lienzo.server.app import Auth, create_app
from lienzo.settings import Settings
from servers import ARGS, CHROMIUM, lienzo_server
from test_ui import TIMEOUT

FAMILIES = {"/v1/images/": "OpenAIError", "/sdapi/v1/": "A1111Error", "/controlnet/": "A1111Error", "/api/v1/": "NativeError"}
# Small limits keep every job that gets through to a 64x64 picture in 2 steps of the tiny model.
LIMITS = dict(max_pixels=64 * 64, max_steps=2, max_images=1, max_queue=2, max_input_pixels=64 * 64)
SMALL = {"prompt": "a red apple", "steps": 2, "seed": 3}


def small_app(home, out, **options):
    settings = Settings(
        data_dir=out / "data", models_dir=home / "models", outputs_dir=out / "out", default_model="tiny-sd15", **LIMITS
    )
    return create_app(settings, **options)


@pytest.fixture(scope="module")
def client(home, tmp_path_factory):
    with TestClient(small_app(home, tmp_path_factory.mktemp("openapi"))) as client:
        yield client


@pytest.fixture(scope="module")
def spec(client) -> dict:
    return client.get("/openapi.json").json()


def operations(spec: dict):
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def family(path: str) -> str:
    return next(name for prefix, name in FAMILIES.items() if path.startswith(prefix))


def resolve(spec: dict, schema: dict) -> dict:
    return spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema


def conforms(spec: dict, schema: dict, body) -> bool:
    return jsonschema_rs.validator_for({**schema, "components": spec["components"]}).is_valid(body)


# -- the description --------------------------------------------------------------------------------


def test_errors_are_documented_in_each_familys_shape(spec):
    assert "HTTPValidationError" not in json.dumps(spec)
    for path, method, operation in operations(spec):
        errors = {status: r for status, r in operation["responses"].items() if int(status) >= 400}
        assert {"403", "500"} <= errors.keys(), (method, path)
        for status, response in errors.items():
            ref = response["content"]["application/json"]["schema"]["$ref"]
            assert ref == f"#/components/schemas/{family(path)}", (method, path, status)
    native = spec["components"]["schemas"]["NativeError"]
    assert native["required"] == ["detail", "field"] and native["properties"]["detail"]["type"] == "string"


def test_every_status_a_route_answers_is_documented(spec):
    def statuses(method, path):
        return set(spec["paths"][path][method]["responses"])

    for mode in ("txt2img", "img2img", "inpaint", "outpaint"):
        assert statuses("post", f"/api/v1/{mode}") == {"200", "202", "400", "403", "413", "415", "422", "429", "500"}
    assert statuses("post", "/sdapi/v1/txt2img") == {"200", "400", "403", "413", "415", "422", "429", "500"}
    assert statuses("post", "/v1/images/generations") == {"200", "400", "403", "413", "415", "429", "500", "503"}
    assert statuses("post", "/v1/images/edits") == {"200", "400", "403", "413", "429", "500", "503"}
    assert statuses("get", "/api/v1/jobs/{job_id}") == {"200", "403", "404", "422", "500"}
    assert statuses("delete", "/api/v1/gallery/{id}") == {"204", "403", "404", "422", "500"}
    assert statuses("put", "/api/v1/presets/{name}") == {"200", "400", "403", "413", "415", "422", "500"}
    assert statuses("get", "/sdapi/v1/samplers") == {"200", "403", "500"}
    for path in ["/sdapi/v1/img2img", "/v1/images/edits", "/v1/images/variations", "/api/v1/img2img"]:
        assert "429" in statuses("post", path), path
    media = {
        "/api/v1/jobs/{job_id}/images/{index}": ["image/png"],
        "/api/v1/jobs/{job_id}/preview": ["image/png"],
        "/api/v1/jobs/{job_id}/events": ["text/event-stream"],
        "/api/v1/gallery/{id}/image": ["image/png", "image/jpeg", "image/webp"],
        "/api/v1/gallery/{id}/thumb": ["image/webp"],
    }
    for path, kinds in media.items():
        assert list(spec["paths"][path]["get"]["responses"]["200"]["content"]) == kinds, path
    assert not any("401" in operation["responses"] for _, _, operation in operations(spec)) and "security" not in spec


def test_credentials_are_documented_when_the_server_asks_for_them(home, tmp_path):
    app = small_app(home, tmp_path, auth=Auth(api_key="k"))
    spec = app.openapi()
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert spec["security"] == [{"bearer": []}]
    assert all("401" in operation["responses"] for _, _, operation in operations(spec))
    with TestClient(app) as client:
        refused = client.get("/sdapi/v1/samplers")
    assert refused.status_code == 401 and conforms(spec, {"$ref": "#/components/schemas/A1111Error"}, refused.json())


def test_the_servers_limits_are_in_the_description(spec):
    assert "max_pixels: 4,096" in spec["info"]["description"] and "max_steps: 2" in spec["info"]["description"]


def body_schema(spec: dict, path: str) -> dict:
    return resolve(spec, spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"])


def value_branch(schema: dict) -> dict:
    """The branch of a field that is not its null."""
    return next(s for s in schema.get("anyOf", [schema]) if s.get("type") != "null")


def test_request_limits_are_in_every_familys_schema(spec):
    side = {"minimum": MIN_SIDE, "maximum": MAX_SIDE, "multipleOf": 8}
    native, a1111 = body_schema(spec, "/api/v1/outpaint")["properties"], body_schema(spec, "/sdapi/v1/img2img")["properties"]
    openai = body_schema(spec, "/v1/images/generations")["properties"]
    for fields in (native, a1111):
        assert side.items() <= value_branch(fields["width"]).items() and side.items() <= value_branch(fields["height"]).items()
        assert value_branch(fields["steps"])["maximum"] == MAX_STEPS
    assert {"minimum": 0, "maximum": MAX_SIDE, "multipleOf": 8}.items() <= value_branch(native["outpaint_left"]).items()
    assert value_branch(a1111["n_iter"])["maximum"] == json_limits("batch_count")["maximum"]
    assert value_branch(openai["n"])["maximum"] == json_limits("batch_size")["maximum"]
    assert a1111["inpainting_fill"]["enum"] == [0, 1, 2, 3] and a1111["resize_mode"]["enum"] == [0, 1, 2, 3]
    assert "max_pixels" in native["width"]["description"] and "max_steps" in openai["steps"]["description"]
    for fields in (native, a1111, openai):
        assert value_branch(fields["prompt"])["maxLength"] == value_branch(fields["negative_prompt"])["maxLength"] == MAX_PROMPT_CHARS
    lora = spec["components"]["schemas"]["LoraRef"]["properties"]
    assert (lora["weight"]["minimum"], lora["weight"]["maximum"]) == (-10, 10)


@pytest.mark.parametrize(
    "name",
    ["width", "height", "outpaint_up", "seed", "steps", "cfg_scale", "batch_size", "batch_count", "clip_skip", "denoising_strength",
     "mask_blur", "only_masked_padding"],
)
def test_the_documented_limits_are_what_the_request_accepts(name):
    limits = json_limits(name)
    low, high, step = limits["minimum"], limits["maximum"], limits.get("multipleOf")
    image = {"init_image": Image.new("RGB", (64, 64))} if name.startswith("outpaint") else {}
    build_request(**{name: low}, **image), build_request(**{name: high}, **image)
    outside = [low - (step or 1), high + (step or 1)] + ([low + step // 2] if step else [])
    for value in outside:
        with pytest.raises(ValueError, match=name):
            build_request(**{name: value}, **image)


@pytest.mark.parametrize("name", ["prompt", "negative_prompt"])
def test_the_documented_prompt_length_is_what_the_request_accepts(name):
    longest = json_limits(name)["maxLength"]
    build_request(**{name: "a" * longest})
    with pytest.raises(ValueError, match=name):
        build_request(**{name: "a" * (longest + 1)})


def response_schema(spec: dict, method: str, path: str, status: int, media: str = "application/json") -> dict:
    return spec["paths"][path][method]["responses"][str(status)]["content"][media]["schema"]


def test_error_bodies_conform_to_their_documented_schema(client, spec):
    not_utf8 = {"content": b"\xff{", "headers": {"content-type": "application/json"}}
    answers = [
        (client.post("/api/v1/txt2img", json={"steps": 0}), "post", "/api/v1/txt2img", 422),
        (client.get("/api/v1/jobs/nope"), "get", "/api/v1/jobs/{job_id}", 404),
        (client.post("/api/v1/txt2img", **not_utf8), "post", "/api/v1/txt2img", 400),
        (client.post("/sdapi/v1/txt2img", json={"steps": 0}), "post", "/sdapi/v1/txt2img", 422),
        (client.post("/sdapi/v1/options", **not_utf8), "post", "/sdapi/v1/options", 400),
        (client.post("/v1/images/generations", json={"prompt": "x", "n": 0}), "post", "/v1/images/generations", 400),
    ]
    for answer, method, path, status in answers:
        assert answer.status_code == status, (path, answer.text)
        assert conforms(spec, response_schema(spec, method, path, status), answer.json()), (path, answer.json())
    no_method = client.delete("/api/v1/models")
    assert no_method.status_code == 405 and no_method.json() == {"detail": "Method Not Allowed", "field": None}
    # Every method of the path, not only those of the first route that has it.
    assert set(client.options("/api/v1/gallery/1").headers["allow"].split(", ")) == {"GET", "PATCH", "DELETE"}


def test_successful_answers_conform_to_their_documented_schema(client, spec):
    def check(answer, method: str, path: str, status: int) -> dict:
        assert answer.status_code == status, (path, answer.text)
        assert conforms(spec, response_schema(spec, method, path, status), answer.json()), (path, answer.json())
        return answer.json()

    body = {**SMALL, "width": 64, "height": 64}
    queued = check(client.post("/api/v1/txt2img", json=body), "post", "/api/v1/txt2img", 202)
    done = check(client.post("/api/v1/txt2img?wait=true", json=body), "post", "/api/v1/txt2img", 200)
    assert done["status"] == "done" and queued["status"] in ("queued", "running", "done")
    check(client.get(f"/api/v1/jobs/{done['id']}"), "get", "/api/v1/jobs/{job_id}", 200)
    events = client.get(f"/api/v1/jobs/{done['id']}/events")
    event = dict(line.split(": ", 1) for line in events.text.strip().split("\n"))
    described = response_schema(spec, "get", "/api/v1/jobs/{job_id}/events", 200, "text/event-stream")
    assert conforms(spec, described, event)
    assert conforms(spec, described["properties"]["data"]["contentSchema"], json.loads(event["data"]))
    images = spec["paths"]["/api/v1/jobs/{job_id}/images/{index}"]["get"]["responses"]["200"]["content"]
    assert client.get(done["images"][0]["url"]).headers["content-type"] in images
    a1111 = check(client.post("/sdapi/v1/txt2img", json=body), "post", "/sdapi/v1/txt2img", 200)
    openai = check(client.post("/v1/images/generations", json={**SMALL, "size": "64x64"}), "post", "/v1/images/generations", 200)
    assert len(a1111["images"]) == len(openai["data"]) == 1


# -- the documentation pages ------------------------------------------------------------------------


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_load_nothing_from_elsewhere(client, page):
    html = client.get(page).text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and not re.search(r"https?://", html)
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 1000, asset


# -- schemathesis -----------------------------------------------------------------------------------


CHECKS = [
    not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance, response_schema_conformance,
]


def test_no_server_errors_and_answers_as_described(home, tmp_path):
    """Every operation, with requests the description allows and with ones it does not. A loop rather
    than schemathesis' pytest loaders: from_fixture fails on pytest 9 (it sets Node._nodeid), and the
    others build the app at collection. schemathesis runs the app's lifespan itself: the app is its own."""
    api = schemathesis.openapi.from_asgi("/openapi.json", small_app(home, tmp_path))
    failures = []
    try:
        for operation in (result.ok() for result in api.get_all_operations()):
            for mode in GenerationMode:

                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
                def fuzz(case):
                    case.call_and_validate(checks=CHECKS)

                try:
                    fuzz()
                # schemathesis raises a group (a BaseExceptionGroup) for several failures of one operation.
                except (Exception, BaseExceptionGroup) as err:  # noqa: BLE001 - every failure is reported, all together
                    # An operation that takes no input, or takes any value, has no negative data to send.
                    if not (isinstance(err, Unsatisfiable) and mode is GenerationMode.NEGATIVE):
                        failures.append(f"{operation.label} ({mode.value} data): {err}")
    finally:
        shutdown_lifespans()
    assert not failures, "\n\n".join(failures)


def test_docs_render_in_a_browser_with_no_network(home, spec):
    """Swagger UI and Redoc draw every operation with every request to another host refused."""
    operations_count = len(list(operations(spec)))
    with lienzo_server(home, env={"LIENZO_DEFAULT_MODEL": "tiny-sd15"}) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for page_path, drawn in [("/docs", ".opblock"), ("/redoc", "[data-section-id*='/operation/']")]:
            page = browser.new_page()
            elsewhere, errors = [], []

            def only_here(route):
                if route.request.url.startswith(url):
                    return route.continue_()
                elsewhere.append(route.request.url)
                return route.abort()

            page.route("**/*", only_here)
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url + page_path)
            page.locator(drawn).nth(operations_count - 1).wait_for(timeout=TIMEOUT)
            assert not elsewhere and not errors, (page_path, elsewhere, errors)
            page.close()
        browser.close()
