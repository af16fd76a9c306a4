"""SD 3.x and Flux.1 through the server's doors: lienzo's own API (with each model's family and its
defaults, which the studio adapts to), AUTOMATIC1111's and OpenAI's, on tiny models as diffusers
folders in a models dir, generated in-process through TestClient."""

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lienzo.generation.samplers import flow_samplers
from lienzo.images.metadata import parse_infotext
from lienzo.server.app import create_app
from lienzo.server.routes.a1111.schemas import Txt2ImgRequest
from lienzo.server.routes.a1111.translate import txt2img_request
from lienzo.settings import Settings
from servers import b64_png, png_bytes
from tiny_models import save_transformer_models

FAST = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64, "seed": 7}
SQUARE = (16, 16, 48, 48)  # the masked area of the inpainting tests


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A models dir with a tiny Flux.1 dev, a Flux.1 schnell and an SD 3.x, as diffusers folders."""
    root = tmp_path_factory.mktemp("transformer-doors")
    save_transformer_models(root / "models")
    return root


@pytest.fixture(scope="module")
def client(home):
    settings = Settings(data_dir=home / "data", models_dir=home / "models", outputs_dir=home / "out")
    with TestClient(create_app(settings, model="tiny-flux")) as c:
        yield c


def source(size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (size, size, 3), dtype=np.uint8))


def square_mask(size: int = 64) -> Image.Image:
    """White (repaint) on SQUARE, black elsewhere: lienzo's and A1111's convention."""
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, SQUARE)
    return mask


def png_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def params_of(image: Image.Image) -> dict[str, str]:
    return parse_infotext(image.info["parameters"]).params


def assert_kept_outside(made: Image.Image, before: Image.Image) -> None:
    """Pixels far from SQUARE are the input's; those inside it were repainted."""
    made, before = np.asarray(made.convert("RGB")), np.asarray(before.convert("RGB"))
    assert np.array_equal(made[:8], before[:8])
    assert not np.array_equal(made[24:40, 24:40], before[24:40, 24:40])


# -- what the studio reads: models with their family and defaults, samplers, fields ---------------


def test_models_say_their_family_and_its_defaults(client):
    models = {m["name"]: m for m in client.get("/api/v1/models").json()}
    assert set(models) == {"tiny-flux", "tiny-schnell", "tiny-sd3"}
    flux, schnell, sd3 = (models[name]["family"] for name in ("tiny-flux", "tiny-schnell", "tiny-sd3"))
    picked = ("name", "flow", "steps", "cfg_scale", "sampler", "schedule", "distilled_cfg_scale", "negative_prompt")
    assert [flux[k] for k in picked] == ["flux", True, 20, 1.0, "Euler", "Simple", 3.5, False]
    assert [schnell[k] for k in picked] == ["flux", True, 4, 1.0, "Euler", "Simple", None, False]
    assert [sd3[k] for k in picked] == ["sd3", True, 28, 5.0, "Euler", "Simple", None, True]
    # Only the samplers that run on flow models, each with the schedules it runs there.
    for family in (flux, schnell, sd3):
        assert [s["name"] for s in family["samplers"]] == flow_samplers()
        assert all(s["automatic"] == "Simple" for s in family["samplers"])
        euler = next(s for s in family["samplers"] if s["name"] == "Euler")
        assert {"Simple", "Karras", "Beta"} <= set(euler["schedules"]) and "DDIM" not in euler["schedules"]
    assert models["tiny-flux"]["native_size"] == 1024 and models["tiny-flux"]["current"]
    # The switch answers with the same view.
    assert client.put("/api/v1/models/current", json={"name": "tiny-sd3"}).json()["family"] == sd3
    client.put("/api/v1/models/current", json={"name": "tiny-flux"})


def test_samplers_say_which_run_on_flow_models_and_fields_list_the_flow_ones(client):
    samplers = client.get("/api/v1/samplers").json()
    assert [s["name"] for s in samplers if s["flow"]] == flow_samplers()
    assert {"DDIM", "LMS"} <= {s["name"] for s in samplers if not s["flow"]}
    fields = {f["name"]: f for f in client.get("/api/v1/fields").json()}
    distilled = fields["distilled_cfg_scale"]
    assert distilled["default"] is None and distilled["widget"]["kind"] == "range"
    names = {"cli": "--distilled-cfg", "a1111": "distilled_cfg_scale", "openai": "distilled_cfg_scale", "infotext": "Distilled CFG Scale"}
    assert distilled["names"] == names
    assert fields["shift"]["names"]["infotext"] == "Shift" and fields["shift"]["widget"] is None
    assert all(fields[name]["default"] is None for name in ("steps", "cfg_scale", "sampler"))


# -- lienzo's own API --------------------------------------------------------------------------


def test_native_txt2img_leaves_the_defaults_to_the_family(client):
    r = client.post("/api/v1/txt2img?wait=true", json={"prompt": "a pear", "model": "tiny-schnell", "width": 64, "height": 64, "seed": 1})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "done" and job["model"] == "tiny-schnell"
    params = parse_infotext(job["images"][0]["infotext"]).params
    assert (params["Steps"], params["CFG scale"], params["Sampler"]) == ("4", "1", "Euler")
    assert "Distilled CFG Scale" not in params  # schnell has no guidance input
    assert job["parameters"]["steps"] is None  # the request as sent: the family decided


@pytest.mark.parametrize(
    ("model", "extra", "expected"),
    [
        ("tiny-flux", {"distilled_cfg_scale": 2.5}, {"Distilled CFG Scale": "2.5", "CFG scale": "1"}),
        ("tiny-sd3", {"shift": 2.0, "negative_prompt": "blurry"}, {"Shift": "2", "CFG scale": "5"}),
    ],
)
def test_native_image_modes(client, model, extra, expected):
    image = source()
    common = {**FAST, "model": model, "init_image": b64_png(image), **extra}
    del common["width"], common["height"]
    r = client.post("/api/v1/img2img?wait=true", json={**common, "denoising_strength": 0.6})
    assert r.status_code == 200, r.text
    params = parse_infotext(r.json()["images"][0]["infotext"]).params
    assert {k: params.get(k) for k in expected} == expected and params["Denoising strength"] == "0.6"

    r = client.post("/api/v1/inpaint?wait=true", json={**common, "mask": b64_png(square_mask()), "mask_blur": 0})
    assert r.status_code == 200, r.text
    made = Image.open(io.BytesIO(client.get(r.json()["images"][0]["url"]).content))
    assert_kept_outside(made, image)

    r = client.post("/api/v1/outpaint?wait=true", json={**common, "outpaint_down": 16})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(client.get(r.json()["images"][0]["url"]).content)).size == (64, 80)


def test_native_refuses_what_a_flow_model_cannot_do_naming_the_field(client):
    r = client.post("/api/v1/txt2img?wait=true", json={**FAST, "sampler": "DDIM"})
    job = r.json()
    assert job["status"] == "failed" and job["error_field"] == "sampler" and "flow" in job["error"]
    r = client.post("/api/v1/txt2img?wait=true", json={**FAST, "fast": True})
    assert r.json()["error_field"] == "fast"


# -- AUTOMATIC1111's API -------------------------------------------------------------------------


def test_a1111_body_without_steps_or_cfg_scale():
    """Absent from an A1111 body, steps is A1111's 50 (as width, height and the sampler are A1111's), but
    cfg_scale is left to the model's family: A1111's 7 suits U-Net models only (Flux.1 runs at 1)."""
    request = txt2img_request(Txt2ImgRequest(), {})
    assert (request.steps, request.cfg_scale, request.sampler) == (50, None, "Euler")
    assert request.distilled_cfg_scale is None and request.shift is None
    request = txt2img_request(Txt2ImgRequest(distilled_cfg_scale=2.0, shift=1.5, scheduler="simple"), {})
    assert (request.distilled_cfg_scale, request.shift, request.schedule) == (2.0, 1.5, "Simple")


def test_a1111_txt2img_picks_flux_by_override_and_round_trips_png_info(client):
    titles = {m["model_name"]: m["title"] for m in client.get("/sdapi/v1/sd-models").json()}
    body = {
        **FAST, "sampler_name": "Euler", "scheduler": "Simple", "distilled_cfg_scale": 2.5,
        "override_settings": {"sd_model_checkpoint": titles["tiny-flux"]},
    }
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["sd_model_name"] == "tiny-flux" and info["cfg_scale"] == 1.0 and info["steps"] == 2
    assert info["sampler_name"] == "Euler" and info["extra_generation_params"]["Schedule type"] == "Simple"
    params = parse_infotext(info["infotexts"][0]).params
    assert params["Distilled CFG Scale"] == "2.5" and params["CFG scale"] == "1"
    image = r.json()["images"][0]
    read = client.post("/sdapi/v1/png-info", json={"image": image}).json()
    assert read["info"] == info["infotexts"][0]
    assert read["parameters"]["Distilled CFG Scale"] == "2.5" and read["parameters"]["Model"] == "tiny-flux"
    # The default distilled CFG scale is written too: an image says what it was made with.
    r = client.post("/sdapi/v1/txt2img", json={**body, "distilled_cfg_scale": None})
    assert parse_infotext(json.loads(r.json()["info"])["infotexts"][0]).params["Distilled CFG Scale"] == "3.5"


def test_a1111_img2img_and_inpaint_on_sd3(client):
    image = source()
    body = {
        **FAST, "init_images": [b64_png(image)], "denoising_strength": 0.6, "cfg_scale": 3, "shift": 2.5,
        "override_settings": {"sd_model_checkpoint": "tiny-sd3"},
    }
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    params = params_of(png_of(r.json()["images"][0]))
    assert (params["Model"], params["CFG scale"], params["Shift"], params["Denoising strength"]) == ("tiny-sd3", "3", "2.5", "0.6")

    r = client.post("/sdapi/v1/img2img", json={**body, "mask": b64_png(square_mask()), "mask_blur": 0, "inpaint_full_res": False})
    assert r.status_code == 200, r.text
    assert_kept_outside(png_of(r.json()["images"][0]), image)


def test_a1111_names_the_field_a_flow_model_refuses(client):
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "sampler_name": "DDIM"})
    assert r.status_code == 422 and r.json()["field"] == "sampler_name"


# -- OpenAI's API ----------------------------------------------------------------------------------


def test_openai_generations_and_edits_with_flux(client):
    body = {"prompt": "a red apple", "model": "tiny-flux", "size": "64x64", "steps": 2, "seed": 4, "distilled_cfg_scale": 5, "shift": 1.2}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    made = png_of(r.json()["data"][0]["b64_json"])
    params = params_of(made)
    assert (params["Model"], params["Distilled CFG Scale"], params["Shift"], params["CFG scale"]) == ("tiny-flux", "5", "1.2", "1")

    # OpenAI's mask: its fully transparent pixels are the area to edit.
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), SQUARE)
    image = source()
    files = {"image": ("image.png", png_bytes(image), "image/png"), "mask": ("mask.png", png_bytes(mask), "image/png")}
    form = {"prompt": "a pear", "model": "tiny-flux", "steps": "2", "seed": "4"}
    r = client.post("/v1/images/edits", data=form, files=files)
    assert r.status_code == 200, r.text
    edited = png_of(r.json()["data"][0]["b64_json"])
    assert params_of(edited)["Model"] == "tiny-flux"
    assert np.array_equal(np.asarray(edited.convert("RGB"))[:4], np.asarray(image)[:4])


def test_openai_describes_the_flow_extensions():
    schema = create_app(Settings()).openapi()["components"]["schemas"]
    generation = next(v for k, v in schema.items() if k.startswith("GenerationBody"))["properties"]
    assert "Distilled CFG Scale" in generation["distilled_cfg_scale"]["description"]
    assert "(default none)" not in generation["steps"]["description"]
