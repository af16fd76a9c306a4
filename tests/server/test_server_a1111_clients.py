"""What real clients probe and send at start-up: the routes they list, the options they read and write,
scripts they name, styles, and sizes far from the model's (A1111's 512², OpenAI's 1024²)."""

import base64
import io
import json

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lienzo.images.metadata import parse_infotext
from lienzo.server.app import create_app
from lienzo.server.routes.a1111.options import OPTIONS_FILE
from lienzo.generation.styles import merge_style
from lienzo.settings import Settings
from servers import home_settings, lienzo_server, two_model_home

FAST = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64, "seed": 11}
NATIVE = 128  # the tiny checkpoints' side: sample_size 64 latents, VAE scale factor 2


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return two_model_home(tmp_path_factory.mktemp("clients-home"))


def settings_for(home, data="data") -> Settings:
    return home_settings(home, data=home / data, out=home / "out")


@pytest.fixture(scope="module")
def client(home):
    with TestClient(create_app(settings_for(home))) as c:
        yield c


@pytest.mark.parametrize(
    ("route", "kind", "keys"),
    [
        ("latent-upscale-modes", list, {"name"}),
        ("embeddings", dict, {"loaded", "skipped"}),
        ("prompt-styles", list, {"name", "prompt", "negative_prompt"}),
        ("face-restorers", list, {"name", "cmd_dir"}),
        ("realesrgan-models", list, {"name", "path", "scale"}),
        ("hypernetworks", list, {"name", "path"}),
        ("cmd-flags", dict, {"api", "ckpt_dir", "lora_dir", "data_dir"}),
    ],
)
def test_routes_clients_probe_at_start_up(client, route, kind, keys):
    r = client.get(f"/sdapi/v1/{route}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, kind)
    if kind is dict:
        assert keys <= set(body)
    schema = client.get("/openapi.json").json()["paths"][f"/sdapi/v1/{route}"]["get"]["responses"]["200"]
    assert schema  # documented at /docs like every other route
    if kind is list and route == "prompt-styles":
        client.put("/api/v1/presets/Watercolor", json={"prompt": "{prompt}, watercolor", "negative_prompt": "blurry"})
        styles = client.get(f"/sdapi/v1/{route}").json()
        assert {"name": "Watercolor", "prompt": "{prompt}, watercolor", "negative_prompt": "blurry"} in styles
        assert all(keys <= set(item) for item in styles)


def test_options_have_the_documented_set_keep_unknown_writes_and_persist(home):
    with TestClient(create_app(settings_for(home, "options-data"))) as c:
        options = c.get("/sdapi/v1/options").json()
        assert len(options) > 200  # A1111's own test reads send_seed; Krita reads sd_model_checkpoint
        assert options["send_seed"] is True and options["samples_format"] == "png"
        assert options["sd_model_checkpoint"].startswith("tiny-a.safetensors [")
        assert options["sd_checkpoint_hash"] and options["randn_source"] == "CPU"
        assert c.post("/sdapi/v1/options", json={"my_extension_option": [1, 2], "jpeg_quality": 95}).status_code == 200
        assert c.get("/sdapi/v1/options").json()["my_extension_option"] == [1, 2]
    assert json.loads((home / "options-data" / OPTIONS_FILE).read_text())["jpeg_quality"] == 95
    with TestClient(create_app(settings_for(home, "options-data"))) as c:  # a restart keeps them
        options = c.get("/sdapi/v1/options").json()
        assert options["jpeg_quality"] == 95 and options["my_extension_option"] == [1, 2]


def test_a_damaged_options_file_does_not_stop_the_server(home):
    (home / "bad-options").mkdir()
    (home / "bad-options" / OPTIONS_FILE).write_text("{not json")
    with TestClient(create_app(settings_for(home, "bad-options"))) as c:
        assert c.get("/sdapi/v1/options").json()["send_seed"] is True
        assert c.post("/sdapi/v1/options", json={"send_seed": False}).status_code == 200
    assert json.loads((home / "bad-options" / OPTIONS_FILE).read_text()) == {"send_seed": False}


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"alwayson_scripts": {"ADetailer": {"args": [True]}}}, "alwayson_scripts", "always on script ADetailer not found"),
        ({"script_name": "Prompt matrix", "script_args": [1]}, "script_name", "script 'Prompt matrix' not found"),
        ({"script_name": "X/Y/Z plot", "script_args": [5, "1,2"]}, "script_args[0]", "cannot plot 'Hires steps' yet"),
        ({"script_name": "X/Y/Z plot", "script_args": [99, "1,2"]}, "script_args[0]", "X type must be 0 to"),
        ({"script_name": "X/Y/Z plot", "script_args": [4, "1,999"]}, "script_args[1]", "steps = 999"),
    ],
)
def test_a_script_lienzo_does_not_have_is_refused_as_a1111_does(client, fields, field, words):
    r = client.post("/sdapi/v1/txt2img", json={**FAST, **fields})
    assert r.status_code == 422 and r.json()["field"] == field and words in r.json()["detail"]


def test_empty_scripts_are_what_clients_send_by_default(client):
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "alwayson_scripts": {}, "script_name": None, "script_args": []})
    assert r.status_code == 200, r.text
    assert "X-Lienzo-Ignored" not in r.headers


def test_styles_are_the_saved_presets(client):
    client.put("/api/v1/presets/ink", json={"prompt": "ink drawing", "negative_prompt": "colour"})
    client.put("/api/v1/presets/frame", json={"prompt": "a framed picture of {prompt}", "negative_prompt": ""})
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "negative_prompt": "blurry", "styles": ["INK", "frame"]})
    assert r.status_code == 200, r.text
    parsed = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])
    assert parsed.prompt == "a framed picture of a red apple, ink drawing"
    assert parsed.negative_prompt == "blurry, colour"
    assert json.loads(r.json()["info"])["warnings"] == []


def test_merge_style_follows_a1111():
    assert merge_style("a cat", "oil painting") == "a cat, oil painting"
    assert merge_style("", "oil painting") == "oil painting"
    assert merge_style("a cat", "") == "a cat"
    assert merge_style("a cat", "{prompt} at night") == "a cat at night"


def test_a1111_default_size_on_a_small_model_is_a_warning_the_client_sees(client):
    """A1111 clients ask for 512x512; the model was trained at 128: the picture is made, and the answer says why it looks wrong."""
    # One step without guidance: the warning is the point, and a 512x512 picture of the tiny model is slow to make.
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "width": 512, "height": 512, "steps": 1, "cfg_scale": 1})
    assert r.status_code == 200, r.text
    warnings = json.loads(r.json()["info"])["warnings"]
    assert len(warnings) == 1 and "512x512" in warnings[0] and f"{NATIVE}x{NATIVE}" in warnings[0]
    assert "512x512" in r.headers["X-Lienzo-Warnings"]
    native = client.post("/api/v1/txt2img?wait=true", json={**FAST, "width": 256, "height": 256}).json()
    assert native["warnings"] == []  # 2x the model's side is still fine


def test_openai_fixed_sizes_are_made_at_the_model_size_and_resized(home):
    """OpenAI clients can only ask for 1024x1024 and the like."""
    with lienzo_server(home, env={"LIENZO_DEFAULT_MODEL": "tiny-a"}) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        result = client.images.generate(prompt="a red apple", size="1024x1024", extra_body={"steps": 2, "seed": 3})
        image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
        assert image.size == (1024, 1024)
        assert parse_infotext(image.text["parameters"]).params["Size"] == f"{NATIVE}x{NATIVE}"  # what the model made
        wide = client.images.generate(prompt="a red apple", size="1536x1024", response_format="url", extra_body={"steps": 2})
        served = Image.open(io.BytesIO(httpx.get(wide.data[0].url).content))
        assert served.size == (1536, 1024)
        assert parse_infotext(served.text["parameters"]).params["Size"] == "160x104"  # the model's area, same aspect
    saved = sorted((home / "outputs").rglob("*.png"))
    assert any(Image.open(p).size == (NATIVE, NATIVE) for p in saved)  # the file on disk is the model's own
