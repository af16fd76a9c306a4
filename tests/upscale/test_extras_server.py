"""A1111's /upscalers, /latent-upscale-modes and extras through the app, and through the webuiapi client
against a real ``lienzo serve``."""

import base64
import io

import pytest
import webuiapi
from fastapi.testclient import TestClient
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from servers import b64_png, lienzo_server
from tiny_upscalers import picture

from lienzo.server.app import create_app
from lienzo.settings import Settings

API = "/sdapi/v1"


@pytest.fixture(scope="module")
def client(models_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("extras-data")
    settings = Settings(data_dir=data, models_dir=models_dir, outputs_dir=data / "out", max_pixels=200 * 200)
    with TestClient(create_app(settings)) as c:
        yield c


def decoded(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def with_parameters(image: Image.Image) -> str:
    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 4, Sampler: Euler, Seed: 7, Size: 30x22")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def test_upscalers_and_latent_modes_are_listed_as_a1111_does(client, models_dir):
    listed = client.get(f"{API}/upscalers").json()
    assert [u["name"] for u in listed] == ["None", "Lanczos", "Nearest", "2x-tiny", "4x_tiny", "RealESRGAN_x4tiny"]
    assert listed[1] == {"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None, "scale": None}
    assert listed[3] == {
        "name": "2x-tiny", "model_name": "esrgan", "model_path": str(models_dir / "esrgan" / "2x-tiny.pth"), "model_url": None, "scale": 2,
    }
    modes = client.get(f"{API}/latent-upscale-modes").json()
    assert modes[0] == {"name": "Latent"} and {"name": "Latent (nearest-exact)"} in modes and len(modes) == 6


def test_extra_single_image_upscales_by_a_model_and_keeps_the_parameters(client):
    r = client.post(f"{API}/extra-single-image", json={"image": with_parameters(picture(30, 22)), "upscaler_1": "2x-tiny", "upscaling_resize": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["html_info"] == "<p>Postprocess upscale by: 2, Postprocess upscaler: 2x-tiny</p>"
    image = decoded(body["image"])
    assert image.size == (60, 44)
    assert image.info["parameters"].endswith("Seed: 7, Size: 30x22, Postprocess upscale by: 2, Postprocess upscaler: 2x-tiny")
    assert image.info["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: 2x-tiny"


def test_upscale_to_a_size_crops_to_fit_and_a_second_upscaler_blends_in(client):
    source = picture(30, 20)
    body = {"image": b64_png(source), "resize_mode": 1, "upscaling_resize_w": 60, "upscaling_resize_h": 60, "upscaler_1": "Lanczos"}
    cropped = client.post(f"{API}/extra-single-image", json=body).json()
    assert decoded(cropped["image"]).size == (60, 60)
    assert cropped["html_info"] == "<p>Postprocess upscale to: 60x60, Postprocess crop to: 60x60, Postprocess upscaler: Lanczos</p>"
    uncropped = client.post(f"{API}/extra-single-image", json={**body, "upscaling_crop": False}).json()
    assert decoded(uncropped["image"]).size == (90, 60)  # covers 60x60 at the input's shape

    blend = {"image": b64_png(source), "upscaler_1": "Lanczos", "upscaler_2": "Nearest", "extras_upscaler_2_visibility": 0.25}
    blended = client.post(f"{API}/extra-single-image", json=blend).json()
    expected = Image.blend(source.resize((60, 40), Image.LANCZOS), source.resize((60, 40), Image.NEAREST), 0.25)
    assert decoded(blended["image"]).convert("RGB").tobytes() == expected.tobytes()
    assert blended["html_info"].endswith("Postprocess upscaler: Lanczos, Postprocess upscaler 2: Nearest</p>")


def test_upscaler_1_none_answers_the_image_unchanged(client):
    source = picture(12, 9)
    body = client.post(f"{API}/extra-single-image", json={"image": b64_png(source)}).json()
    assert body["html_info"] == "<p></p>" and decoded(body["image"]).convert("RGB").tobytes() == source.tobytes()


def test_extra_batch_images_upscales_each(client):
    images = [{"data": b64_png(picture(10, 8, seed=i)), "name": f"{i}.png"} for i in range(2)]
    r = client.post(f"{API}/extra-batch-images", json={"imageList": images, "upscaler_1": "4x_tiny", "upscaling_resize": 3})
    assert r.status_code == 200, r.text
    assert [decoded(i).size for i in r.json()["images"]] == [(30, 24), (30, 24)]
    assert "Postprocess upscaler: 4x_tiny" in r.json()["html_info"]


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"gfpgan_visibility": 0.5}, "gfpgan_visibility", "no face restorers"),
        ({"codeformer_visibility": 1}, "codeformer_visibility", "no face restorers"),
        ({"upscaler_1": "4x-UltraSharp"}, "upscaler_1", "available: None, Lanczos"),
        ({"upscaler_2": "nope", "extras_upscaler_2_visibility": 0.5}, "upscaler_2", "no upscaler named 'nope'"),
        ({"upscaling_resize": 9}, "upscaling_resize", "less than or equal to 8"),
        ({"upscaling_resize": 8}, "upscaling_resize", "240x176 = 42,240 pixels; the limit is 40,000 (max_pixels"),
        ({"resize_mode": 1, "upscaling_resize_w": 10, "upscaling_resize_h": 10}, "upscaling_resize_w", "between 1 and 8"),
        ({"image": "not base64!"}, "image", "not valid base64"),
    ],
)
def test_refusals_name_the_a1111_field(client, change, field, words):
    r = client.post(f"{API}/extra-single-image", json={"image": b64_png(picture(30, 22)), "upscaler_1": "Lanczos", **change})
    assert r.status_code == 422, r.text
    error = r.json()
    assert error["field"] == field and words in error["detail"], error


def test_a_batch_over_max_images_is_refused(client):
    images = [{"data": b64_png(picture(4, 4)), "name": "x.png"}] * 17
    r = client.post(f"{API}/extra-batch-images", json={"imageList": images, "upscaler_1": "Lanczos"})
    assert r.status_code == 422 and r.json()["field"] == "imageList"


def test_webuiapi_upscales_through_a_real_server(models_dir, tmp_path):
    (tmp_path / "models").symlink_to(models_dir)
    with lienzo_server(tmp_path) as url:
        api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1")
        assert "RealESRGAN_x4tiny" in [u["name"] for u in api.get_upscalers()]
        single = api.extra_single_image(picture(16, 12), upscaler_1="RealESRGAN_x4tiny", upscaling_resize=4)
        assert single.image.size == (64, 48)
        batch = api.extra_batch_images([picture(8, 8), picture(6, 4)], upscaler_1="Nearest", upscaling_resize=2)
        assert [i.size for i in batch.images] == [(16, 16), (12, 8)]
        assert "Postprocess upscaler: Nearest" in batch.info  # webuiapi puts html_info there
