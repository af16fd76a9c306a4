"""sd-webui-controlnet over the A1111 API: units in ``alwayson_scripts`` in the extension's spellings, its
``/controlnet/*`` paths, and the real ``webuiapi`` client's ControlNet calls against a real ``lienzo serve``."""

import base64
import io
import json

import numpy as np
import pytest
import webuiapi
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from lienzo.control.preprocessors import IP_ADAPTER_MODULES, PREPROCESSORS, preprocess
from lienzo.errors import InvalidRequestError
from lienzo.generation.control_unit import MAX_CONTROL_UNITS
from lienzo.images.metadata import parse_infotext
from lienzo.server.app import Auth, create_app
from lienzo.server.routes.a1111.controlnet import control_units
from servers import b64_png, home_settings, lienzo_server

FAST = {"prompt": "a sunflower", "negative_prompt": "blurry", "steps": 2, "width": 64, "height": 64, "seed": 11, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A tiny SD 1.x checkpoint and a ControlNet made from its U-Net (its zero convolutions made non-zero, so
    that it steers), saved as a diffusers folder in the models dir's ControlNet folder."""
    from lienzo.models.single_file_save import save_single_file
    from tiny_models import build_tiny, tiny_controlnet

    root = tmp_path_factory.mktemp("controlnet-home")
    components = build_tiny("sd1")
    save_single_file(components, root / "models" / "tiny-a.safetensors")
    tiny_controlnet(components.unet).save_pretrained(root / "models" / "ControlNet" / "control_tiny_canny")
    return root


def settings_for(home):
    return home_settings(home, data=home / "data", out=home / "out")


@pytest.fixture(scope="module")
def client(home):
    with TestClient(create_app(settings_for(home))) as c:
        yield c


@pytest.fixture(scope="module")
def title(client) -> str:
    return client.get("/controlnet/model_list").json()["model_list"][0]


def photo(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (40, 60, 90))
    ImageDraw.Draw(image).ellipse((size // 6, size // 6, size * 5 // 6, size * 5 // 6), fill=(230, 200, 60))
    return image


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def scripts(*units) -> dict:
    return {"alwayson_scripts": {"ControlNet": {"args": list(units)}}}


def infotext(response) -> dict:
    return parse_infotext(json.loads(response.json()["info"])["infotexts"][0]).params


def assert_error(response, field: str, *words: str) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) >= {"error", "detail", "body", "errors"} and body["field"] == field
    for word in words:
        assert word in body["detail"]


# -- units in alwayson_scripts ---------------------------------------------------------------------


def test_a_unit_reaches_the_engine_and_its_infotext(client, title):
    unit = {"input_image": b64_png(photo()), "module": "canny", "model": title, "weight": 0.9, "guidance_end": 0.8}
    steered = client.post("/sdapi/v1/txt2img", json={**FAST, **scripts(unit)})
    plain = client.post("/sdapi/v1/txt2img", json=FAST)
    assert steered.status_code == 200 and plain.status_code == 200, steered.text
    assert not np.array_equal(pixels(steered.json()["images"][0]), pixels(plain.json()["images"][0]))
    written = infotext(steered)["ControlNet 0"]
    assert written.startswith(f"Module: canny, Model: {title}, Weight: 0.9, Resize Mode: Crop and Resize, Processor Res: 512")
    assert "Guidance End: 0.8" in written and "Control Mode: Balanced" in written
    assert "ControlNet 0" not in infotext(plain)


def test_disabled_and_empty_units_are_skipped_as_the_extension_skips_them(client, title):
    unit = {"image": b64_png(photo()), "module": "canny", "model": title}
    alone = client.post("/sdapi/v1/txt2img", json={**FAST, **scripts(unit)})
    padded = client.post(
        "/sdapi/v1/txt2img",
        json={**FAST, **scripts({"enabled": False, "model": "not-there"}, {"image": "", "module": "canny"}, {**unit, "enabled": True})},
    )
    assert padded.status_code == 200, padded.text
    assert np.array_equal(pixels(alone.json()["images"][0]), pixels(padded.json()["images"][0]))
    assert "ControlNet 1" not in infotext(padded)
    # Nothing enabled: the picture is the plain one (webuiapi sends an empty args list when it thinks ControlNet is there).
    empty = client.post("/sdapi/v1/txt2img", json={**FAST, "alwayson_scripts": {"controlnet": {"args": []}}})
    assert empty.status_code == 200 and "ControlNet 0" not in infotext(empty)


@pytest.mark.parametrize(
    ("unit", "field", "words"),
    [
        ({"module": "no-such-module"}, "alwayson_scripts.controlnet.args[1].module", ("unknown preprocessor 'no-such-module'", "canny")),
        ({"model": "no-such-model"}, "alwayson_scripts.controlnet.args[1].model", ("no ControlNet model named 'no-such-model'", "control_tiny_canny [")),
        ({"model": "None"}, "alwayson_scripts.controlnet.args[1].model", ("names no model", "control_tiny_canny [")),
        ({"weight": 3}, "alwayson_scripts.controlnet.args[1].weight", ("less than or equal to 2",)),
        ({"guidance_start": 0.9, "guidance_end": 0.2}, "alwayson_scripts.controlnet.args[1]", ("guidance_start (0.9) must not be after guidance_end (0.2)",)),
        ({"resize_mode": 7}, "alwayson_scripts.controlnet.args[1].resize_mode", ("0 (Just Resize)", "got 7")),
        ({"control_mode": "Loud"}, "alwayson_scripts.controlnet.args[1].control_mode", ("2 (ControlNet is more important)",)),
        ({"image": None, "enabled": True}, "alwayson_scripts.controlnet.args[1].image", ("no image",)),
        ({"image": "not base64!"}, "alwayson_scripts.controlnet.args[1].image", ("base64",)),
        ({"input_image": "x"}, "alwayson_scripts.controlnet.args[1].input_image", ("either input_image or image",)),
        ({"module": "softedge_hed"}, "alwayson_scripts.controlnet.args[1].module", ("ControlNetHED.pth", "never downloads")),
    ],
)
def test_a_bad_unit_is_refused_naming_its_a1111_path(client, title, unit, field, words):
    good = {"image": b64_png(photo()), "module": "canny", "model": title}
    r = client.post("/sdapi/v1/txt2img", json={**FAST, **scripts({"enabled": False}, {**good, **unit})})
    assert_error(r, field, *words)


def test_an_unknown_always_on_script_is_refused_naming_it(client):
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "alwayson_scripts": {"ADetailer": {"args": [True]}, "controlnet": {"args": []}}})
    assert_error(r, "alwayson_scripts", "always on script ADetailer not found", "controlnet")


def test_an_img2img_unit_without_an_image_reads_the_init_image(client, title):
    body = {**FAST, "init_images": [b64_png(photo())], "denoising_strength": 0.6}
    r = client.post("/sdapi/v1/img2img", json={**body, **scripts({"enabled": True, "module": "canny", "model": title})})
    assert r.status_code == 200, r.text
    params = infotext(r)
    assert params["ControlNet 0"].startswith(f"Module: canny, Model: {title}") and params["Control images"] == "1: -"
    same = client.post("/sdapi/v1/img2img", json={**body, **scripts({"image": b64_png(photo()), "module": "canny", "model": title})})
    assert np.array_equal(pixels(r.json()["images"][0]), pixels(same.json()["images"][0]))


def test_an_error_met_while_the_job_runs_names_the_units_path(client, title):
    """The inpaint modules read the request's mask: a txt2img unit with one fails in the job, named where the client put it."""
    unit = {"image": b64_png(photo()), "module": "inpaint_only", "model": title}
    r = client.post("/sdapi/v1/txt2img", json={**FAST, **scripts({"enabled": False}, {"enabled": False}, unit)})
    assert_error(r, "alwayson_scripts.controlnet.args[2].mask", "needs a mask")


def test_the_extensions_spellings_are_read(home, title):
    """Numbers or names for the modes, the older labels and keys, and -1 or out-of-range sliders as their defaults."""
    unit = {
        "input_image": b64_png(photo()), "module": "Canny", "model": title.split(" [")[0], "resize_mode": "Envelope (Outer Fit)",
        "control_mode": 1, "lowvram": True, "guidance": 0.7, "processor_res": -1, "threshold_a": 300, "threshold_b": 150,
        "hr_option": "Both", "save_detected_map": False, "pixel_perfect": True, "unknown_future_key": 1,
    }
    found = control_units({"CONTROLNET": {"args": [unit, {**unit, "resize_mode": 0, "control_mode": "ControlNet is more important", "guessmode": False},
                                                   {**unit, "resize_mode": "Scale to Fit (Inner Fit)", "control_mode": 0, "guessmode": True}]}},
                          settings_for(home), has_init=False, hires=True)
    first, second, third = found.units
    assert first.module == "canny" and first.model == title and first.resize_mode == "Resize and Fill"
    assert first.control_mode == "My prompt is more important" and first.guidance_end == 0.7 and first.pixel_perfect
    assert first.processor_res == 512 and first.threshold_a == 100 and first.threshold_b == 150
    assert second.resize_mode == "Just Resize" and second.control_mode == "ControlNet is more important"
    assert third.resize_mode == "Crop and Resize" and third.control_mode == "ControlNet is more important"  # the old guess mode
    assert found.places == [0, 1, 2]
    assert len(found.warnings) == 3 and all("threshold_a=300" in w and "Low Threshold (1 to 255)" in w for w in found.warnings)


def test_a_units_own_mask_is_named_ignored_or_refused(home, title):
    """The extension's mask shapes; lienzo's units carry no mask of their own: a module that needs one reads the request's."""
    picture, mask = b64_png(photo()), b64_png(Image.new("L", (64, 64), 255))
    shapes = [{"image": {"image": picture, "mask": mask}}, {"image": [picture, mask]}, {"input_image": picture, "mask_image": mask}]
    found = control_units({"controlnet": {"args": [{**shape, "module": "canny", "model": title} for shape in shapes]}},
                          settings_for(home), has_init=False, hires=False)
    assert len(found.units) == 3 and found.units[0].image.size == (64, 64)
    assert found.ignored == [f"alwayson_scripts.controlnet.args[{i}].mask" for i in range(3)]
    with pytest.raises(InvalidRequestError, match="reads the request's own mask") as caught:
        control_units({"controlnet": {"args": [{**shapes[0], "module": "inpaint_only", "model": title}]}}, settings_for(home), has_init=True, hires=False)
    assert caught.value.field == "alwayson_scripts.controlnet.args[0].mask"


def test_a_unit_lienzo_cannot_do_is_refused_not_dropped(home, title):
    unit = {"image": b64_png(photo()), "module": "canny", "model": title}
    with pytest.raises(InvalidRequestError, match="steer both passes"):
        control_units({"controlnet": {"args": [{**unit, "hr_option": "Low res only"}]}}, settings_for(home), has_init=False, hires=True)
    # Without the hires fix the extension ignores hr_option, and so does lienzo.
    assert len(control_units({"controlnet": {"args": [{**unit, "hr_option": "Low res only"}]}}, settings_for(home), has_init=False, hires=False).units) == 1
    too_many = [unit] * (MAX_CONTROL_UNITS + 1)
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_CONTROL_UNITS}"):
        control_units({"controlnet": {"args": too_many}}, settings_for(home), has_init=False, hires=False)


def test_scripts_list_controlnet_as_a1111_lists_an_always_on_script(client):
    listed = client.get("/sdapi/v1/scripts").json()
    assert "controlnet" in listed["txt2img"] and "controlnet" in listed["img2img"]
    assert "x/y/z plot" in listed["txt2img"]


# -- /controlnet -----------------------------------------------------------------------------------


def test_version_models_modules_types_and_settings(client, title):
    assert client.get("/controlnet/version").json() == {"version": 2}
    assert client.get("/controlnet/model_list?update=true").json() == {"model_list": [title]}
    assert title.startswith("control_tiny_canny [") and len(title.split("[")[1]) == 9
    modules = client.get("/controlnet/module_list").json()
    assert modules["module_list"] == [*PREPROCESSORS, *IP_ADAPTER_MODULES]
    canny = modules["module_detail"]["canny"]
    assert canny["model_free"] is False
    assert [s["name"] for s in canny["sliders"]] == ["Resolution", "Low Threshold", "High Threshold"]
    assert canny["sliders"][1] == {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1}
    assert modules["module_detail"]["tile_resample"]["sliders"][0] is None  # the extension keeps the resolution's place
    assert modules["module_detail"]["none"]["sliders"] == []
    aliases = client.get("/controlnet/module_list?alias_names=true").json()
    assert "softedge_hed" in aliases["module_list"] and "hed" not in aliases["module_list"]
    assert set(aliases["module_detail"]) == set(aliases["module_list"])
    types = client.get("/controlnet/control_types").json()["control_types"]
    assert types["Canny"] == {"module_list": ["none", "canny", "invert (from white bg & black line)"], "model_list": ["None", title],
                              "default_option": "canny", "default_model": title}
    assert "Depth" not in types and types["All"]["model_list"] == ["None", title]  # only the kinds lienzo's modules make
    assert types["SoftEdge"]["default_model"] == "None"
    assert types["IP-Adapter"]["module_list"][:2] == ["none", "ip-adapter_clip_h"] and types["IP-Adapter"]["model_list"] == ["None"]
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": MAX_CONTROL_UNITS}


def test_detect_answers_the_modules_maps(client):
    pictures = [photo(64), photo(96)]
    r = client.post("/controlnet/detect", json={
        "controlnet_module": "canny", "controlnet_input_images": [b64_png(p) for p in pictures], "controlnet_processor_res": 64,
        "controlnet_threshold_a": 50, "controlnet_threshold_b": -1,
    })
    assert r.status_code == 200, r.text
    assert r.json()["info"] == "Success" and len(r.json()["images"]) == 2
    for b64, picture in zip(r.json()["images"], pictures):
        assert np.array_equal(pixels(b64), np.asarray(preprocess("canny", picture, 64, 50, 200)))


def test_detect_inpaint_takes_a_mask_per_image(client):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    r = client.post("/controlnet/detect", json={
        "controlnet_module": "inpaint_only", "controlnet_input_images": [b64_png(photo())], "controlnet_masks": [b64_png(mask)],
    })
    assert r.status_code == 200, r.text
    alpha = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))[..., 3]
    assert alpha[:, :32].max() == 0 and alpha[:, 32:].min() == 255
    missing = client.post("/controlnet/detect", json={"controlnet_module": "inpaint_only", "controlnet_input_images": [b64_png(photo())]})
    assert_error(missing, "controlnet_masks", "one mask per image")


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"controlnet_module": "depth_midas"}, "controlnet_module", ("unknown preprocessor 'depth_midas'",)),
        ({"controlnet_module": "canny", "controlnet_input_images": []}, "controlnet_input_images", ("No image selected",)),
        ({"controlnet_module": "canny", "controlnet_input_images": ["%%%"]}, "controlnet_input_images[0]", ("base64",)),
        ({"controlnet_module": "hed", "controlnet_input_images": ["iVBORw0KGgo="]}, "controlnet_module", ("ControlNetHED.pth",)),
    ],
)
def test_detect_errors_are_a1111_errors(client, body, field, words):
    if "controlnet_input_images" not in body:
        body = {**body, "controlnet_input_images": [b64_png(photo())]}
    assert_error(client.post("/controlnet/detect", json=body), field, *words)


def test_detect_holds_to_the_input_pixel_limit(home):
    with TestClient(create_app(settings_for(home).model_copy(update={"max_input_pixels": 64 * 64}))) as c:
        r = c.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [b64_png(photo(96))]})
    assert r.status_code == 422 and r.json()["field"] == "controlnet_input_images[0]"


def test_the_controlnet_paths_need_credentials_like_every_other(home):
    with TestClient(create_app(settings_for(home), auth=Auth(user="ana", password="s3cret"))) as c:
        assert c.get("/controlnet/model_list").status_code == 401
        body = {"controlnet_module": "canny", "controlnet_input_images": [b64_png(photo())]}
        assert c.post("/controlnet/detect", json=body).status_code == 401
        assert c.post("/controlnet/detect", json=body, auth=("ana", "s3cret")).status_code == 200
        evil = {"Origin": "http://evil.example"}
        assert c.post("/controlnet/detect", json=body, auth=("ana", "s3cret"), headers=evil).status_code == 403


# -- a real client -------------------------------------------------------------------------------


def test_webuiapi_controlnet_calls_against_a_real_server(home):
    """webuiapi's ControlNetUnit (its to_dict: image, mask None, thresholds 64, control_mode by name, hr_option,
    enabled) in txt2img with its hires fix, and its /controlnet calls."""
    with lienzo_server(home, env={"LIENZO_DEFAULT_MODEL": "tiny-a"}) as url:
        port = int(url.rsplit(":", 1)[1])
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=2)
        assert api.controlnet_version() == 2
        models = api.controlnet_model_list()
        assert len(models) == 1 and models[0].startswith("control_tiny_canny [")
        assert "canny" in api.controlnet_module_list()
        detected = api.controlnet_detect([photo()], module="canny", processor_res=64, threshold_a=64, threshold_b=64)
        assert detected.info == "Success"  # webuiapi sends controlnet_images; the extension's name is controlnet_input_images
        assert np.array_equal(np.asarray(detected.image.convert("RGB")), np.asarray(preprocess("canny", photo(), 64, 64, 64)))
        unit = webuiapi.ControlNetUnit(image=photo(), module="canny", model=models[0], weight=0.8, control_mode=2, pixel_perfect=True)
        result = api.txt2img(
            prompt="a sunflower", width=64, height=64, seed=5, cfg_scale=5, controlnet_units=[unit],
            enable_hr=True, hr_scale=2, hr_upscaler=webuiapi.HiResUpscaler.Latent, denoising_strength=0.6,
            alwayson_scripts={},  # webuiapi's default is one dict shared by every call: it would keep the unit for later tests
        )
        assert result.image.size == (128, 128)
        params = parse_infotext(result.info["infotexts"][0]).params
        assert params["ControlNet 0"].startswith(f"Module: canny, Model: {models[0]}, Weight: 0.8, Resize Mode: Resize and Fill")
        assert "Threshold A: 64" in params["ControlNet 0"] and "Control Mode: ControlNet is more important" in params["ControlNet 0"]
        assert params["Hires upscale"] == "2" and params["Hires upscaler"] == "Latent" and params["Denoising strength"] == "0.6"
        plain = api.txt2img(
            prompt="a sunflower", width=64, height=64, seed=5, cfg_scale=5, enable_hr=True, hr_scale=2, denoising_strength=0.6, alwayson_scripts={}
        )
        assert "ControlNet 0" not in plain.info["infotexts"][0]
        assert not np.array_equal(np.asarray(result.image), np.asarray(plain.image))
