"""OpenAI's Images API (/v1/images): in-process through TestClient, and with the official openai
client against a real ``lienzo serve``, on a tiny random SD 1.x model."""

import base64
import io
import logging

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lienzo.images.metadata import parse_infotext
from lienzo.models.single_file_save import save_single_file
from lienzo.server.app import Auth, create_app
from lienzo.server.routes.openai import lienzo_model, parse_size
from lienzo.settings import Settings
from servers import bomb_png, lienzo_server, png_bytes
from tiny_models import build_tiny

MODEL = "tiny-sd15"
FAST = {"size": "64x64", "steps": 2, "seed": 5}
FAST_FORM = {"size": "64x64", "steps": "2", "seed": "5"}
KEY = "sk-lienzo-test"
SQUARE = (24, 24, 40, 40)  # left, top, right, bottom of the area to edit
MARGIN = 14  # beyond the mask blur's reach


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("lienzo-openai")
    (root / "models").mkdir()
    save_single_file(build_tiny("sd1"), root / "models" / f"{MODEL}.safetensors")
    return root


@pytest.fixture(scope="module")
def settings(home):
    return Settings(data_dir=home / "data", models_dir=home / "models", outputs_dir=home / "out", max_images=3)


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings, model=MODEL)) as client:
        yield client


# -- helpers ------------------------------------------------------------------------------------


def noise(seed: int = 0, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def openai_mask(size: int = 64, alpha: int = 0) -> Image.Image:
    """Opaque black with SQUARE at ``alpha`` (OpenAI: alpha 0 = edit here)."""
    mask = Image.new("RGBA", (size, size), (0, 0, 0, 255))
    mask.paste((0, 0, 0, alpha), SQUARE)
    return mask


def far_from_square(size: int = 64) -> np.ndarray:
    """True where a pixel is more than MARGIN away from SQUARE."""
    ys, xs = np.mgrid[0:size, 0:size]
    left, top, right, bottom = SQUARE
    return (xs < left - MARGIN) | (xs >= right + MARGIN) | (ys < top - MARGIN) | (ys >= bottom + MARGIN)


def decode_png(data: bytes) -> Image.Image:
    assert data.startswith(b"\x89PNG")
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def b64_images(response) -> list[Image.Image]:
    assert response.status_code == 200, response.text
    return [decode_png(base64.b64decode(item["b64_json"])) for item in response.json()["data"]]


def assert_openai_error(response, param: str | None, *words: str, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    for word in words:
        assert word in error["message"], error["message"]
    return error


def edit(client, image: bytes, mask: bytes | None = None, field: str = "image", **form):
    files = [(field, ("image.png", image, "image/png"))]
    if mask is not None:
        files.append(("mask", ("mask.png", mask, "image/png")))
    return client.post("/v1/images/edits", data={"prompt": "a red square", **FAST_FORM, **form}, files=files)


# -- generations --------------------------------------------------------------------------------


def test_generation_answers_b64_json_png_with_infotext(client):
    response = client.post("/v1/images/generations", json={"prompt": "a red apple", **FAST})
    body = response.json()
    assert isinstance(body["created"], int) and body["size"] == "64x64" and body["output_format"] == "png"
    assert body["data"][0]["revised_prompt"] is None and "url" not in body["data"][0]
    (image,) = b64_images(response)
    assert image.size == (64, 64)
    info = parse_infotext(image.info["parameters"])
    assert info.prompt == "a red apple" and info.params["Steps"] == "2" and info.params["Seed"] == "5" and info.model == MODEL


def test_generation_url_points_at_the_saved_png(client):
    response = client.post("/v1/images/generations", json={"prompt": "a lighthouse", "response_format": "url", **FAST})
    assert response.status_code == 200, response.text
    (item,) = response.json()["data"]
    assert "b64_json" not in item and item["url"].startswith("http://testserver/api/v1/jobs/")
    fetched = client.get(item["url"])
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert parse_infotext(decode_png(fetched.content).info["parameters"]).prompt == "a lighthouse"


def test_n_gives_that_many_distinct_images(client):
    images = b64_images(client.post("/v1/images/generations", json={"prompt": "a cat", "n": 2, **FAST}))
    assert len(images) == 2
    assert [parse_infotext(i.info["parameters"]).params["Seed"] for i in images] == ["5", "6"]
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_openai_model_names_mean_the_current_model_and_auto_size_its_native_size(client):
    body = {"prompt": "a dog", "model": "dall-e-3", "size": "auto", "steps": 2}
    response = client.post("/v1/images/generations", json=body)
    (image,) = b64_images(response)
    info = parse_infotext(image.info["parameters"])
    assert info.model == MODEL
    assert image.width == image.height and response.json()["size"] == info.params["Size"] == f"{image.width}x{image.height}"


@pytest.mark.parametrize(
    "size, expected",
    [(None, (None, None)), ("auto", (None, None)), ("512x768", (512, 768)), (" 64 X 72 ", (64, 72)), ("1024×1024", (1024, 1024))],
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("name, expected", [(None, None), ("", None), ("dall-e-2", None), ("gpt-image-1", None), (MODEL, MODEL)])
def test_lienzo_model(name, expected):
    assert lienzo_model(name) == expected


def test_openai_only_options_are_accepted_ignored_and_logged(client, caplog):
    extras = {"quality": "hd", "style": "vivid", "user": "someone", "output_format": "webp", "moderation": "low"}
    with caplog.at_level(logging.WARNING, logger="lienzo.server.routes.openai"):
        response = client.post("/v1/images/generations", json={"prompt": "a tree", **FAST, **extras})
    assert len(b64_images(response)) == 1
    (warning,) = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert all(name in warning for name in extras)


@pytest.mark.parametrize(
    "change, param, words",
    [
        ({"size": "64by64"}, "size", ["WIDTHxHEIGHT", "64by64"]),
        ({"size": "65x64"}, "size", ["multiple of 8", "WIDTHxHEIGHT"]),
        ({"size": "99999999x64"}, "size", ["WIDTHxHEIGHT"]),
        ({"n": 4}, "n", ["at most 3", "max_images"]),
        ({"n": 0}, "n", ["n must be between 1"]),
        ({"prompt": None}, "prompt", []),
        ({"response_format": "png"}, "response_format", []),
        ({"model": "no-such-model"}, "model", ["no model named", MODEL]),
        ({"stream": True}, "stream", ["not supported"]),
        ({"steps": 0}, "steps", ["between 1"]),
        ({"frobnicate": 1}, "frobnicate", []),
    ],
)
def test_invalid_generation_requests_get_openai_400s(client, change, param, words):
    body = {"prompt": "x", **FAST, **change}
    body = {k: v for k, v in body.items() if v is not None}
    assert_openai_error(client.post("/v1/images/generations", json=body), param, *words)


def test_unauthorized_looks_like_openais_auth_error(settings):
    with TestClient(create_app(settings, model=MODEL, auth=Auth(api_key=KEY))) as client:
        response = client.post("/v1/images/generations", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key" and error["param"] is None
        unauthenticated = client.post("/v1/images/generations", json={"prompt": "x"})
        assert unauthenticated.status_code == 401 and unauthenticated.json()["error"]["code"] == "invalid_api_key"


def test_schema_documents_the_routes_and_the_extension_fields(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/images/variations"} <= set(schema["paths"])
    fields = schema["components"]["schemas"]["GenerationBody"]["properties"]
    assert "lienzo extension" in fields["steps"]["description"] and "ignored" in fields["quality"]["description"]


# -- edits --------------------------------------------------------------------------------------


def test_edit_with_mask_repaints_only_its_transparent_area(client):
    original = noise()
    (result,) = b64_images(edit(client, png_bytes(original), png_bytes(openai_mask())))
    before, after = np.asarray(original), np.asarray(result)
    assert result.size == (64, 64) and parse_infotext(result.info["parameters"]).prompt == "a red square"
    assert np.array_equal(before[far_from_square()], after[far_from_square()])
    left, top, right, bottom = SQUARE
    assert np.abs(before[top:bottom, left:right].astype(int) - after[top:bottom, left:right]).mean() > 10


def test_edit_without_mask_repaints_the_images_transparent_area(client):
    original = noise().convert("RGBA")
    original.paste((0, 0, 0, 0), SQUARE)
    (result,) = b64_images(edit(client, png_bytes(original)))
    before, after = np.asarray(original.convert("RGB")), np.asarray(result)
    assert np.array_equal(before[far_from_square()], after[far_from_square()])
    left, top, right, bottom = SQUARE
    assert not np.array_equal(before[top:bottom, left:right], after[top:bottom, left:right])


def test_edit_of_an_opaque_image_without_mask_redraws_all_of_it(client):
    original = noise(1)
    # image[] is how the openai client names the field when it is given a list of images
    (result,) = b64_images(edit(client, png_bytes(original), field="image[]", n="1"))
    assert result.size == (64, 64)
    assert not np.array_equal(np.asarray(original)[far_from_square()], np.asarray(result)[far_from_square()])


def test_edit_url_response_and_size(client):
    response = edit(client, png_bytes(noise()), png_bytes(openai_mask()), response_format="url", size="64x96")
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "64x96"
    assert decode_png(client.get(response.json()["data"][0]["url"]).content).size == (64, 96)


@pytest.mark.parametrize(
    "image, mask, form, param, words",
    [
        (b"this is not an image", None, {}, "image", ["not an image"]),
        (bomb_png(20000, 20000), None, {}, "image", ["too large"]),  # Pillow's own bomb guard
        (bomb_png(5000, 5000), None, {}, "image", ["5000x5000", "limit"]),  # over max_input_pixels, under Pillow's
        ("noise", bomb_png(20000, 20000), {}, "mask", ["too large"]),
        ("noise", bomb_png(5000, 5000), {}, "mask", ["5000x5000", "limit"]),
        ("noise", png_bytes(openai_mask(32)), {}, "mask", ["32x32", "64x64", "must match"]),
        ("noise", png_bytes(openai_mask(alpha=128)), {}, "mask", ["transparent"]),
        ("noise", png_bytes(Image.new("L", (64, 64), 255)), {}, "mask", ["transparent"]),
        ("noise", b"GIF89a broken", {}, "mask", ["not an image"]),
        ("noise", None, {"size": "big"}, "size", ["WIDTHxHEIGHT"]),
        ("noise", None, {"n": "9"}, "n", ["max_images"]),
        ("noise", None, {"n": "two"}, "n", []),
        ("noise", None, {"prompt": None}, "prompt", []),
    ],
)
def test_invalid_edits_get_openai_400s(client, image, mask, form, param, words):
    image = png_bytes(noise()) if image == "noise" else image
    files = [("image", ("image.png", image, "image/png"))]
    if mask is not None:
        files.append(("mask", ("mask.png", mask, "image/png")))
    data = {k: v for k, v in {"prompt": "x", **FAST_FORM, **form}.items() if v is not None}
    assert_openai_error(client.post("/v1/images/edits", data=data, files=files), param, *words)


def test_edit_without_image_is_a_400(client):
    assert_openai_error(client.post("/v1/images/edits", data={"prompt": "x"}), "image", "image")


def test_variations_redraw_the_image_n_times(client):
    files = {"image": ("image.png", png_bytes(noise()), "image/png")}
    images = b64_images(client.post("/v1/images/variations", data={**FAST_FORM, "n": "2"}, files=files))
    assert len(images) == 2 and all(i.size == (64, 64) for i in images)
    assert parse_infotext(images[0].info["parameters"]).prompt == ""


def test_variation_of_a_non_image_is_a_400(client):
    files = {"image": ("image.png", b"nope", "image/png")}
    assert_openai_error(client.post("/v1/images/variations", data=FAST_FORM, files=files), "image", "not an image")


# -- the official openai client against lienzo serve --------------------------------------------


@pytest.fixture(scope="module")
def server(home):
    with lienzo_server(home, "--api-key", KEY, "--model", MODEL) as url:
        yield url


def openai_client(server, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_client_generates(server):
    result = openai_client(server).images.generate(
        model=MODEL, prompt="a red apple", size="64x64", response_format="b64_json", n=2, extra_body={"steps": 2, "seed": 7}
    )
    images = [decode_png(base64.b64decode(item.b64_json)) for item in result.data]
    assert result.created > 0 and [i.size for i in images] == [(64, 64)] * 2
    assert [parse_infotext(i.info["parameters"]).params["Seed"] for i in images] == ["7", "8"]


def test_openai_client_edits_with_a_mask(server, tmp_path):
    original = noise(2)
    (tmp_path / "image.png").write_bytes(png_bytes(original))
    (tmp_path / "mask.png").write_bytes(png_bytes(openai_mask()))
    with open(tmp_path / "image.png", "rb") as image, open(tmp_path / "mask.png", "rb") as mask:
        result = openai_client(server).images.edit(
            image=image, mask=mask, prompt="a blue square", model="dall-e-2", extra_body={"steps": 2}
        )
    edited = np.asarray(decode_png(base64.b64decode(result.data[0].b64_json)))
    assert edited.shape == (64, 64, 3)
    assert np.array_equal(np.asarray(original)[far_from_square()], edited[far_from_square()])


def test_openai_client_edits_a_list_of_images(server, tmp_path):
    (tmp_path / "image.png").write_bytes(png_bytes(noise(3)))
    with open(tmp_path / "image.png", "rb") as image:
        result = openai_client(server).images.edit(image=[image], prompt="a tree", response_format="url", extra_body={"steps": 2})
    assert result.data[0].url.startswith(f"{server}/api/v1/jobs/")


def test_openai_client_sees_errors_as_its_exceptions(server):
    with pytest.raises(openai.AuthenticationError):
        openai_client(server, key="wrong").images.generate(prompt="x", size="64x64")
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client(server).images.generate(prompt="x", size="huge", extra_body={"steps": 2})
    assert raised.value.param == "size" and raised.value.type == "invalid_request_error"
