"""lienzo's own API for ControlNet, the hires fix, upscaling and embeddings: units in the submit bodies (their
pictures as base64, their errors named per unit, their pictures hashed in the job views), the ControlNet models
and preprocessors, a preprocessor run alone (detect), the upscalers and one picture upscaled, the embeddings."""

import base64
import io
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from lienzo.control.preprocessors import IP_ADAPTER_MODULES, PREPROCESSORS
from lienzo.generation.fields import image_hash
from lienzo.images.metadata import parse_infotext
from lienzo.server.app import create_app
from servers import b64_png, home_settings

FAST = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64, "seed": 7}


def control_home(root):
    """``root/models``: a tiny SD 1.x checkpoint (tiny-sd15) and a tiny ControlNet folder (ControlNet/tiny-canny)."""
    from lienzo.models.single_file_save import save_single_file
    from tiny_models import build_tiny, tiny_controlnet

    tiny = build_tiny("sd1")
    (root / "models" / "ControlNet").mkdir(parents=True)
    save_single_file(tiny, root / "models" / "tiny-sd15.safetensors")
    tiny_controlnet(tiny.unet).save_pretrained(root / "models" / "ControlNet" / "tiny-canny")
    return root


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return control_home(tmp_path_factory.mktemp("control-home"))


@pytest.fixture
def client(home, tmp_path):
    settings = home_settings(home, data=home / "data", out=tmp_path / "out", model="tiny-sd15", max_pixels=256 * 256)
    with TestClient(create_app(settings)) as c:
        yield c


def drawing(size: int = 64, colour=(255, 255, 255)) -> Image.Image:
    """A square outline on black: a canny map of it has edges, a flat picture's has none."""
    image = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), outline=colour, width=3)
    return image


def lit(image: Image.Image) -> int:
    return int((np.asarray(image.convert("L")) == 255).sum())


def png(response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def test_a_unit_round_trips_through_the_native_api(client):
    picture = drawing()
    unit = {"image": b64_png(picture), "module": "canny", "model": "tiny-canny", "weight": 0.8, "guidance_end": 0.9, "processor_res": 64}
    job = client.post("/api/v1/txt2img?wait=true", json={**FAST, "controlnets": [unit]}).json()
    assert job["status"] == "done", job
    sent = job["parameters"]["controlnets"]
    # The view describes the unit without its pixels: the picture by its hash, the model by its title.
    assert len(sent) == 1 and sent[0]["image"] == image_hash(picture)
    assert (sent[0]["module"], sent[0]["weight"], sent[0]["guidance_end"], sent[0]["processor_res"]) == ("canny", 0.8, 0.9, 64)
    assert sent[0]["model"].startswith("tiny-canny")
    info = parse_infotext(job["images"][0]["infotext"]).params
    assert info["ControlNet 0"].startswith("Module: canny, Model: tiny-canny [") and "Weight: 0.8" in info["ControlNet 0"]
    assert info["Control images"] == f"1: {image_hash(picture)}"
    # The unit steers: the same request without it gives another picture.
    plain = client.post("/api/v1/txt2img?wait=true", json=FAST).json()
    with_unit = client.get(job["images"][0]["url"]).content
    assert Image.open(io.BytesIO(with_unit)).tobytes() != Image.open(io.BytesIO(client.get(plain["images"][0]["url"]).content)).tobytes()
    assert plain["parameters"]["controlnets"] == []


@pytest.mark.parametrize(
    "unit,field,words",
    [
        ({"weight": 3}, "controlnets.0.weight", "less than or equal to 2"),
        ({"image": "not base64!"}, "controlnets.0.image", "base64"),
        ({"module": "no-such-module"}, "controlnets.0.module", "unknown preprocessor"),
        ({"guidance_start": 0.8, "guidance_end": 0.2}, "controlnets.0", "guidance_start"),
        ({"colour": "red"}, "controlnets.0.colour", "Extra inputs"),
    ],
)
def test_a_bad_unit_field_is_named(client, unit, field, words):
    body = {**FAST, "controlnets": [{"image": b64_png(drawing()), "model": "tiny-canny", **unit}]}
    answer = client.post("/api/v1/txt2img", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field and words in answer.json()["detail"], answer.json()


def test_an_unknown_model_fails_the_job_naming_the_unit(client):
    # The ControlNet folder is read when the job runs (as the checkpoint is): the job fails, naming the unit's model.
    body = {**FAST, "controlnets": [{"image": b64_png(drawing()), "model": "no-such-net"}]}
    job = client.post("/api/v1/txt2img?wait=true", json=body).json()
    assert job["status"] == "failed" and job["error_field"] == "controlnets.0.model", job
    assert "no ControlNet model named 'no-such-net'; available: tiny-canny [" in job["error"]


def test_a_unit_without_a_picture_reads_the_img2img_input(client):
    picture = drawing()
    body = {"prompt": "x", "steps": 2, "seed": 1, "init_image": b64_png(picture), "controlnets": [{"module": "canny", "model": "tiny-canny"}]}
    job = client.post("/api/v1/img2img?wait=true", json=body).json()
    assert job["status"] == "done", job
    assert job["parameters"]["controlnets"][0]["image"] is None
    refused = client.post("/api/v1/txt2img", json={**FAST, "controlnets": [{"module": "canny", "model": "tiny-canny"}]})
    assert refused.status_code == 422 and refused.json()["field"] == "controlnets.0.image"


def test_controlnet_models_preprocessors_and_unit_schema(client):
    models = client.get("/api/v1/controlnet/models").json()
    assert len(models) == 1 and models[0]["name"] == "tiny-canny" and models[0]["kind"] == "controlnet"
    assert models[0]["title"].startswith("tiny-canny [") and models[0]["family"] == "sd1"
    modules = {p["name"]: p for p in client.get("/api/v1/controlnet/preprocessors").json()}
    assert list(modules) == [*PREPROCESSORS, *IP_ADAPTER_MODULES]
    assert modules["ip-adapter_clip_sd15"]["image_prompt"] and not modules["canny"]["image_prompt"]
    canny = modules["canny"]
    assert canny["resolution"] and canny["model_free"] and [s["name"] for s in canny["sliders"]] == ["Resolution", "Low Threshold", "High Threshold"]
    assert (canny["sliders"][1]["value"], canny["sliders"][1]["max"]) == (100, 255)
    assert modules["hed"]["alias"] == "softedge_hed" and modules["hed"]["annotator"] == "ControlNetHED.pth" and not modules["hed"]["model_free"]
    schema = client.get("/api/v1/controlnet/unit").json()["properties"]
    assert schema["weight"]["maximum"] == 2 and "Balanced" in schema["control_mode"]["enum"] and schema["resize_mode"]["default"] == "Crop and Resize"


def test_detect_makes_the_map_of_a_drawn_shape(client):
    edges = png(client.post("/api/v1/controlnet/detect", json={"image": b64_png(drawing()), "module": "canny", "processor_res": 64}))
    assert edges.size == (64, 64) and lit(edges) > 100  # the square's outline
    flat = png(client.post("/api/v1/controlnet/detect", json={"image": b64_png(Image.new("RGB", (64, 64), "grey")), "processor_res": 64}))
    assert flat.convert("L").getextrema() == (0, 0)
    # A faint square: no edge at the default thresholds (100, 200), its outline at low ones; the resolution sets the size.
    faint = {"image": b64_png(drawing(colour=(30, 30, 30))), "module": "canny"}
    assert lit(png(client.post("/api/v1/controlnet/detect", json={**faint, "processor_res": 64}))) == 0
    low = png(client.post("/api/v1/controlnet/detect", json={**faint, "processor_res": 128, "threshold_a": 10, "threshold_b": 20}))
    assert low.size == (128, 128) and lit(low) > 100
    # By its alias too.
    grid = {"image": b64_png(drawing()), "module": "t2ia_color_grid", "processor_res": 64}
    assert png(client.post("/api/v1/controlnet/detect", json=grid)).size == (64, 64)


@pytest.mark.parametrize(
    "body,field",
    [
        ({"module": "canny", "threshold_a": 999}, "threshold_a"),
        ({"module": "nope"}, "module"),
        ({"module": "softedge_hed"}, None),  # no annotator file: a model-file error
        ({"module": "inpaint"}, "mask"),
        ({"module": "canny", "processor_res": 1024}, "processor_res"),  # 1024x1024 is over this server's max_pixels
        ({"module": "canny", "processor_res": 8}, "processor_res"),
    ],
)
def test_detect_refuses_bad_sliders_and_maps_over_the_limit(client, body, field):
    answer = client.post("/api/v1/controlnet/detect", json={"image": b64_png(drawing()), **body})
    assert answer.status_code == 422, answer.text
    if field is None:
        assert "ControlNetHED.pth" in answer.json()["detail"]
    else:
        assert answer.json()["field"] == field


def test_upscalers_and_upscale(client):
    names = [(u["name"], u["latent"]) for u in client.get("/api/v1/upscalers").json()]
    assert names[0] == ("Latent", True) and ("Lanczos", False) in names and ("None", False) in names
    picture = drawing(48)
    source = io.BytesIO()
    text = PngInfo()
    text.add_text("parameters", "a drawn square\nSteps: 2, Seed: 5, Size: 48x48")
    picture.save(source, format="PNG", pnginfo=text)
    body = {"image": base64.b64encode(source.getvalue()).decode(), "upscaler": "Lanczos", "scale": 2}
    result = png(client.post("/api/v1/upscale", json=body))
    assert result.size == (96, 96)
    assert result.tobytes() == picture.resize((96, 96), Image.Resampling.LANCZOS).tobytes()
    params = parse_infotext(result.info["parameters"]).params
    assert (params["Seed"], params["Postprocess upscale by"], params["Postprocess upscaler"]) == ("5", "2", "Lanczos")
    odd = png(client.post("/api/v1/upscale", json={**body, "upscaler": "nearest", "scale": 1.5}))
    assert odd.size == (72, 72)


@pytest.mark.parametrize(
    "body,field",
    [({"upscaler": "Latent"}, "upscaler"), ({"upscaler": "4x-nothing"}, "upscaler"), ({"scale": 9}, "scale"), ({"scale": 8}, "scale")],
)
def test_upscale_refuses_unknown_upscalers_and_sizes_over_the_limit(client, body, field):
    answer = client.post("/api/v1/upscale", json={"image": b64_png(drawing(64)), **body})  # 64 x 8 = 512: over max_pixels
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field


def test_hires_fix_through_the_native_api(client):
    job = client.post("/api/v1/txt2img?wait=true", json={**FAST, "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 1}).json()
    assert job["status"] == "done", job
    image = Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content))
    assert image.size == (128, 128)
    info = parse_infotext(job["images"][0]["infotext"]).params
    assert (info["Hires upscale"], info["Hires upscaler"], info["Size"]) == ("2", "Latent", "64x64")
    assert job["parameters"]["enable_hr"] is True and job["parameters"]["hr_scale"] == 2
    refused = client.post("/api/v1/img2img", json={"prompt": "x", "init_image": b64_png(drawing()), "enable_hr": True})
    assert refused.status_code == 422 and refused.json()["field"] == "enable_hr"


def test_embeddings_are_listed_with_whether_the_model_can_use_them(home, client):
    folder = home / "models" / "embeddings"
    folder.mkdir(exist_ok=True)
    torch.save({"string_to_param": {"*": torch.randn(2, 64)}, "name": "shiny"}, folder / "shiny.pt")
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}, "name": "narrow"}, folder / "narrow.pt")
    # A job reads the folder for its model: then the list knows which fit (the tiny model's text encoder is 64 wide).
    assert client.post("/api/v1/txt2img?wait=true", json={**FAST, "prompt": "a shiny apple"}).json()["status"] == "done"
    listed = {e["name"]: e for e in client.get("/api/v1/embeddings").json()}
    assert list(listed) == ["narrow", "shiny"]
    assert (listed["shiny"]["fits"], listed["narrow"]["fits"]) == (True, False)
    assert listed["shiny"]["size_bytes"] == (folder / "shiny.pt").stat().st_size and len(listed["shiny"]["short_hash"]) == 12


def test_a_plot_takes_controlnet_units(client):
    unit = {"image": b64_png(drawing()), "module": "canny", "model": "tiny-canny", "processor_res": 64}
    plot = client.post("/api/v1/plot", json={**FAST, "controlnets": [unit], "x": "weight=0.5,1"})
    assert plot.status_code == 422 and "weight" in plot.text  # weight is the unit's, not an axis of the request
    plot = client.post("/api/v1/plot", json={**FAST, "controlnets": [unit], "x": "steps=1,2"})
    assert plot.status_code == 202, plot.text
    for cell in plot.json()["cells"]:
        deadline = time.monotonic() + 300
        while (job := client.get(f"/api/v1/jobs/{cell['job']}").json())["status"] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job["status"] == "done", job
        assert parse_infotext(job["images"][0]["infotext"]).params["ControlNet 0"].startswith("Module: canny")
