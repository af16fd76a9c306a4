"""A1111's hires fix over /sdapi/v1/txt2img: its field names and defaults, its infotext, what lienzo refuses,
and the bodies real clients (SillyTavern, Open WebUI) send."""

import base64
import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lienzo.images.metadata import parse_infotext
from lienzo.server.app import create_app
from servers import b64_png, home_settings, two_model_home

FAST = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 2, "width": 64, "height": 64, "seed": 11, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return two_model_home(tmp_path_factory.mktemp("hires-home"))


@pytest.fixture(scope="module")
def client(home):
    with TestClient(create_app(home_settings(home, data=home / "data", out=home / "out"))) as c:
        yield c


def size_of(response) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).size


def params_of(response) -> dict:
    return parse_infotext(json.loads(response.json()["info"])["infotexts"][0]).params


def assert_error(response, field: str, *words: str) -> None:
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field, response.json()
    for word in words:
        assert word in response.json()["detail"]


def test_enable_hr_with_a1111_defaults_doubles_the_picture(client):
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "enable_hr": True})
    assert r.status_code == 200, r.text
    assert size_of(r) == (128, 128)
    params = params_of(r)
    assert params["Size"] == "64x64"  # the first pass, as A1111 writes it
    assert params["Hires upscale"] == "2" and params["Hires upscaler"] == "Latent" and params["Denoising strength"] == "0.75"
    info = json.loads(r.json()["info"])
    assert info["ignored"] == [] and "X-Lienzo-Ignored" not in r.headers
    assert info["denoising_strength"] == 0.75 and info["width"] == 64  # A1111's info: the request's size, the second pass's strength
    # null is A1111's default too, not lienzo's (0.7)
    again = client.post("/sdapi/v1/txt2img", json={**FAST, "enable_hr": True, "denoising_strength": None, "hr_upscaler": None, "hr_scale": None})
    assert params_of(again)["Denoising strength"] == "0.75" and params_of(again)["Hires upscaler"] == "Latent"


def test_without_enable_hr_the_hires_fields_change_nothing(client):
    hires = {"hr_scale": 3, "hr_upscaler": "Lanczos", "denoising_strength": 0.4, "hr_second_pass_steps": 5, "hr_prompt": "x"}
    r = client.post("/sdapi/v1/txt2img", json={**FAST, **hires})
    assert r.status_code == 200, r.text
    assert size_of(r) == (64, 64)
    params = params_of(r)
    assert not any(key.startswith("Hires") for key in params) and "Denoising strength" not in params
    assert json.loads(r.json()["info"])["ignored"] == []


def test_the_second_pass_fields_reach_the_infotext(client):
    r = client.post("/sdapi/v1/txt2img", json={
        **FAST, "enable_hr": True, "hr_resize_x": 96, "hr_resize_y": 128, "hr_upscaler": "Lanczos", "denoising_strength": 0.5,
        "hr_second_pass_steps": 3, "hr_sampler_name": "DPM++ 2M", "hr_scheduler": "Use same scheduler", "hr_prompt": "a green apple",
        "hr_checkpoint_name": "Use same checkpoint",
    })
    assert r.status_code == 200, r.text
    assert size_of(r) == (96, 128)
    params = params_of(r)
    assert params["Hires resize"] == "96x128" and "Hires upscale" not in params
    assert params["Hires upscaler"] == "Lanczos" and params["Denoising strength"] == "0.5" and params["Hires steps"] == "3"
    assert params["Hires sampler"] == "DPM++ 2M" and params["Hires prompt"] == "a green apple"
    assert params["Hires schedule type"] == "Karras"  # the first pass's Automatic, which for DPM++ 2M is Karras
    same = client.post("/sdapi/v1/txt2img", json={**FAST, "enable_hr": True, "hr_sampler_name": "Use same sampler", "hr_scheduler": "Automatic"})
    assert same.status_code == 200 and "Hires sampler" not in params_of(same) and "Hires schedule type" not in params_of(same)
    folded = client.post("/sdapi/v1/txt2img", json={**FAST, "enable_hr": True, "hr_sampler_name": "DPM++ 2M Karras"})
    assert params_of(folded)["Hires sampler"] == "DPM++ 2M" and params_of(folded)["Hires schedule type"] == "Karras"
    own = client.post("/sdapi/v1/txt2img", json={**FAST, "enable_hr": True, "hr_scheduler": "karras"})
    assert "Hires sampler" not in params_of(own) and params_of(own)["Hires schedule type"] == "Karras"


def test_older_first_pass_size_is_the_first_pass(client):
    """A1111 1.x: firstphase_width/height make the first pass that size, and the hires fix enlarges it."""
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "width": 512, "height": 512, "enable_hr": True, "firstphase_width": 64, "firstphase_height": 72})
    assert r.status_code == 200, r.text
    assert params_of(r)["Size"] == "64x72" and size_of(r) == (128, 144)
    assert_error(client.post("/sdapi/v1/txt2img", json={**FAST, "enable_hr": True, "firstphase_width": 64}), "firstphase_height", "give both")


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"hr_scale": 5}, "hr_scale", ("between 1 and 4",)),
        ({"denoising_strength": 1.5}, "denoising_strength", ("between 0 and 1",)),
        ({"hr_resize_x": 100}, "hr_resize_x", ("multiple of 8",)),
        ({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler", ("R-ESRGAN 4x+",)),
        ({"hr_sampler_name": "Nope"}, "hr_sampler_name", ("Nope",)),
        ({"hr_scheduler": "Nope"}, "hr_scheduler", ("unknown schedule type 'Nope'", "Karras")),
        ({"hr_checkpoint_name": "tiny-b.safetensors"}, "hr_checkpoint_name", ("not the request's model", "override_settings.sd_model_checkpoint")),
        ({"hr_checkpoint_name": "no-such-model"}, "hr_checkpoint_name", ("no model named 'no-such-model'",)),
    ],
)
def test_what_lienzo_cannot_do_is_refused_naming_the_a1111_field(client, fields, field, words):
    assert_error(client.post("/sdapi/v1/txt2img", json={**FAST, "enable_hr": True, **fields}), field, *words)


def test_the_second_pass_may_name_the_requests_own_model(client):
    r = client.post("/sdapi/v1/txt2img", json={
        **FAST, "enable_hr": True, "hr_checkpoint_name": "tiny-b.safetensors", "override_settings": {"sd_model_checkpoint": "tiny-b"},
    })
    assert r.status_code == 200, r.text
    assert params_of(r)["Model"] == "tiny-b"


def test_img2img_has_no_hires_fix(client):
    r = client.post("/sdapi/v1/img2img", json={**FAST, "init_images": [b64_png(Image.new("RGB", (64, 64), "red"))], "enable_hr": True, "hr_scale": 2})
    assert r.status_code == 200, r.text
    assert size_of(r) == (64, 64)
    assert "enable_hr=True" in json.loads(r.json()["info"])["ignored"]  # the client is told, as for any field lienzo ignores
    assert "Hires upscale" not in params_of(r)


def test_sillytavern_payload(client):
    """SillyTavern's Stable Diffusion extension (generateSDImage with source 'auto'): its defaults, hires on."""
    body = {
        "prompt": "a red apple", "negative_prompt": "blurry", "sampler_name": "Euler", "scheduler": "Automatic", "steps": 2,
        "cfg_scale": 7, "width": 64, "height": 64, "restore_faces": False, "enable_hr": True, "hr_upscaler": "Latent", "hr_scale": 2.0,
        "hr_additional_modules": [], "denoising_strength": 0.7, "hr_second_pass_steps": 0, "seed": 3,
        "override_settings": {"CLIP_stop_at_last_layers": 1}, "override_settings_restore_afterwards": True, "clip_skip": 1,
        "save_images": True, "send_images": True, "do_not_save_grid": False, "do_not_save_samples": False,
    }
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert size_of(r) == (128, 128)
    params = params_of(r)
    assert params["Hires upscale"] == "2" and params["Hires upscaler"] == "Latent" and params["Denoising strength"] == "0.7"
    assert json.loads(r.json()["info"])["ignored"] == ["clip_skip=1"]  # SD.Next's key; override_settings carries it for A1111


def test_open_webui_payload(client):
    """Open WebUI's A1111 engine (routers/images.py): prompt, batch_size, size, steps, cfg_scale, sampler_name and scheduler
    as its settings give them; no hires fix."""
    body = {
        "prompt": "a red apple", "batch_size": 2, "width": 64, "height": 64, "negative_prompt": "blurry", "steps": 2,
        "cfg_scale": 7.0, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
    }
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 2 and size_of(r) == (64, 64)
    params = params_of(r)
    assert params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras"
