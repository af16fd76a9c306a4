"""AUTOMATIC1111's API (/sdapi/v1): its field names, defaults and answers, its errors, and the real
``webuiapi`` client against a real ``lienzo serve``."""

import base64
import io
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import webuiapi
from fastapi.testclient import TestClient
from PIL import Image

from lienzo.generation.canvas import resize_image
from lienzo.images.metadata import parse_infotext
from lienzo.server.app import create_app
from lienzo.server.routes.a1111.schemas import Img2ImgRequest, Txt2ImgRequest
from lienzo.server.routes.a1111.translate import img2img_request, txt2img_request
from lienzo.settings import Settings
from lienzo.studio import load_model
from servers import b64_png, bomb_png, home_settings, lienzo_server, two_model_home

FAST = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 2, "width": 64, "height": 64, "seed": 11}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return two_model_home(tmp_path_factory.mktemp("a1111-home"))


def settings_for(home, **limits) -> Settings:
    return home_settings(home, data=home / "data", out=home / "out", **limits)


@pytest.fixture(scope="module")
def client(home):
    with TestClient(create_app(settings_for(home))) as c:
        yield c


def png_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def halves(width=64, height=64) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (220, 30, 30)
    pixels[:, width // 2 :] = (30, 30, 220)
    return Image.fromarray(pixels)


def assert_a1111_error(response, status: int, field: str, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "detail", "body", "errors"}
    assert body["field"] == field and body["detail"] == body["errors"]
    for word in words:
        assert word in body["detail"], body["detail"]


# -- translation, without generating --------------------------------------------------------------


def test_a1111_defaults_not_lienzos():
    request = txt2img_request(Txt2ImgRequest(), {})
    assert (request.width, request.height, request.steps, request.sampler) == (512, 512, 50, "Euler")
    # A1111's 7 is a U-Net model's: left out, the CFG scale is the model family's (7 for SD, 1 for Flux.1).
    assert request.cfg_scale is None
    assert request.schedule == "Automatic" and request.batch_count == 1 and request.seed == -1


@pytest.mark.parametrize(
    ("fields", "sampler", "schedule"),
    [
        ({"sampler_name": "DPM++ 2M Karras"}, "DPM++ 2M", "Karras"),
        ({"sampler_name": "DPM++ 2M SDE Exponential"}, "DPM++ 2M SDE", "Exponential"),
        ({"sampler_name": "DPM++ 2M Karras", "scheduler": "uniform"}, "DPM++ 2M", "Uniform"),
        ({"sampler_name": "Euler a", "scheduler": "sgm_uniform"}, "Euler a", "SGM Uniform"),
        ({"sampler_name": None, "sampler_index": "Euler a"}, "Euler a", "Automatic"),
        ({"sampler_name": "UniPC", "scheduler": "automatic", "CLIP": 1}, "UniPC", "Automatic"),
    ],
)
def test_sampler_names_old_and_new(fields, sampler, schedule):
    request = txt2img_request(Txt2ImgRequest(**fields), {})
    assert (request.sampler, request.schedule) == (sampler, schedule)


def test_resize_modes_crop_and_fill():
    wide = Image.new("RGB", (128, 64), (255, 0, 0))
    wide.paste((0, 0, 255), (32, 0, 96, 64))  # blue middle, red ends
    cropped = resize_image(wide, 64, 64, 1)
    assert cropped.size == (64, 64)
    assert np.asarray(cropped)[:, [0, 32, 63]].reshape(-1, 3).tolist() == [[0, 0, 255]] * 192  # only the middle is left
    stretched = np.asarray(resize_image(wide, 64, 64, 0))
    assert tuple(stretched[32, 0]) == (255, 0, 0)

    tall = Image.new("RGB", (32, 64), (0, 255, 0))
    filled = np.asarray(resize_image(tall, 64, 64, 2))
    assert filled.shape == (64, 64, 3) and (filled == (0, 255, 0)).all()  # bands filled from the edges, no black

    mask = Image.new("L", (32, 64), 255)
    assert resize_image(mask, 64, 64, 2).mode == "L"


def test_img2img_translation_invert_and_fill(home):
    image = b64_png(halves())
    left = Image.new("L", (64, 64), 0)
    left.paste(255, (0, 0, 32, 64))
    body = Img2ImgRequest(
        init_images=[image], mask=b64_png(left), inpainting_mask_invert=1, inpainting_fill=2, inpaint_full_res=False,
        inpaint_full_res_padding=12, width=64, height=64,
    )
    request = img2img_request(body, {}, settings_for(home))
    mask = np.asarray(request.mask)
    assert mask[:, :32].max() == 0 and mask[:, 32:].min() == 255  # inverted: the right half is repainted
    assert request.inpainting_fill == "latent noise" and request.inpaint_only_masked is False
    assert request.only_masked_padding == 12 and request.mode == "inpaint"


# -- generation -----------------------------------------------------------------------------------


def test_txt2img_images_info_parameters_and_one_warning(client, caplog):
    ignored = {"restore_faces": True, "s_min_uncond": 0.5, "s_churn": 0, "styles": ["cinematic"], "tiling": False, "eta": 1.0}
    with caplog.at_level(logging.WARNING, logger="lienzo.server.routes.a1111"):
        body = {**FAST, "batch_size": 2, "sampler_name": "Euler a", **ignored, "my_extension": 5}
        r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    warnings = [rec.getMessage() for rec in caplog.records if rec.name == "lienzo.server.routes.a1111"]
    assert len(warnings) == 1
    for word in ("restore_faces=True", "s_min_uncond=0.5", "my_extension=5"):
        assert word in warnings[0]
        assert word in r.headers["X-Lienzo-Ignored"]  # the client is told too, not only the server log
    assert "tiling" not in warnings[0] and "s_churn" not in warnings[0] and "eta" not in warnings[0]
    assert json.loads(r.json()["info"])["ignored"] == ["restore_faces=True", "s_min_uncond=0.5", "my_extension=5"]
    # styles are lienzo's presets; one that does not exist is a warning to the client
    assert any("'cinematic'" in w for w in json.loads(r.json()["info"])["warnings"])
    assert "cinematic" in r.headers["X-Lienzo-Warnings"]

    body = r.json()
    assert body["parameters"]["prompt"] == "a red apple" and body["parameters"]["restore_faces"] is True
    # The request as received (no cfg_scale: the model family's); info says what the images were made with.
    assert body["parameters"]["my_extension"] == 5 and body["parameters"]["cfg_scale"] is None
    info = json.loads(body["info"])
    assert info["seed"] == 11 and info["all_seeds"] == [11, 12]
    assert info["prompt"] == "a red apple" and info["negative_prompt"] == "blurry" and info["all_prompts"] == ["a red apple"] * 2
    assert (info["width"], info["height"], info["steps"], info["batch_size"], info["cfg_scale"]) == (64, 64, 2, 2, 7.0)
    assert info["sampler_name"] == "Euler a" and info["sd_model_name"] == "tiny-a" and len(info["sd_model_hash"]) == 10
    assert len(info["job_timestamp"]) == 14 and info["job_timestamp"].isdigit() and info["restore_faces"] is False
    assert len(body["images"]) == 2 and len(info["infotexts"]) == 2
    for seed, b64, infotext in zip((11, 12), body["images"], info["infotexts"], strict=True):
        image = png_of(b64)
        assert image.size == (64, 64)
        assert image.info["parameters"] == infotext
        parsed = parse_infotext(image.info["parameters"])
        assert parsed.params["Seed"] == str(seed) and parsed.prompt == "a red apple" and parsed.negative_prompt == "blurry"
        assert parsed.params["Sampler"] == "Euler a" and parsed.params["Steps"] == "2" and parsed.model == "tiny-a"


def test_old_sampler_name_send_images_false_and_clip_skip_override(client):
    r = client.post(
        "/sdapi/v1/txt2img",
        json={
            **FAST, "sampler_name": "DPM++ 2M Karras", "send_images": False,
            "override_settings": {"CLIP_stop_at_last_layers": 2},
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["images"] == []
    info = json.loads(r.json()["info"])
    assert info["sampler_name"] == "DPM++ 2M" and info["extra_generation_params"]["Schedule type"] == "Karras"
    assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]


def test_img2img_mask_inverted_keeps_the_other_half(client):
    source = halves()
    left = Image.new("L", (64, 64), 0)
    left.paste(255, (0, 0, 32, 64))
    r = client.post(
        "/sdapi/v1/img2img",
        json={
            **FAST, "init_images": [b64_png(source)], "mask": b64_png(left), "inpainting_mask_invert": 1,
            "inpaint_full_res": False, "mask_blur": 0, "inpainting_fill": 1, "denoising_strength": 0.9,
        },
    )
    assert r.status_code == 200, r.text
    out = np.asarray(png_of(r.json()["images"][0]).convert("RGB")).astype(int)
    src = np.asarray(source).astype(int)
    assert np.array_equal(out[:, :32], src[:, :32])  # the white part of the mask, inverted: kept exactly
    assert np.abs(out[:, 32:] - src[:, 32:]).mean() > 1  # the black part, inverted: repainted
    body = r.json()
    assert body["parameters"]["init_images"] is None and body["parameters"]["mask"] is None  # include_init_images false
    info = json.loads(body["info"])
    assert info["denoising_strength"] == 0.9
    params = parse_infotext(info["infotexts"][0]).params
    assert params["Mask blur"] == "0" and params["Masked content"] == "original" and "Inpaint area" not in params


def test_img2img_resize_and_fill_then_only_masked_keeps_the_full_size(client):
    r = client.post(
        "/sdapi/v1/img2img",
        json={
            **FAST, "init_images": [b64_png(halves(32, 64))], "resize_mode": 2, "denoising_strength": 0.5,
            "include_init_images": True,
        },
    )
    assert r.status_code == 200, r.text
    assert png_of(r.json()["images"][0]).size == (64, 64)
    assert r.json()["parameters"]["init_images"]  # echoed on request
    assert parse_infotext(json.loads(r.json()["info"])["infotexts"][0]).params["Denoising strength"] == "0.5"

    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (40, 16, 56, 48))
    r = client.post(
        "/sdapi/v1/img2img",
        json={**FAST, "init_images": [b64_png(halves(96, 64))], "mask": b64_png(mask), "inpaint_full_res_padding": 8},
    )
    assert r.status_code == 200, r.text
    assert png_of(r.json()["images"][0]).size == (96, 64)  # A1111's default inpaint_full_res pastes the crop back
    assert parse_infotext(json.loads(r.json()["info"])["infotexts"][0]).params["Inpaint area"] == "Only masked"


def test_a_job_that_fails_answers_422_naming_the_a1111_field(client):
    # Clip skip 5 passes the request's 1-12 and is refused when it runs: the tiny text encoder has 2 layers.
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "override_settings": {"CLIP_stop_at_last_layers": 5}})
    assert_a1111_error(r, 422, "CLIP_stop_at_last_layers", "between 1 and 2 for this model, got 5")
    assert client.post("/sdapi/v1/txt2img", json={**FAST, "send_images": False}).status_code == 200  # the worker goes on


def test_override_model_for_one_request(client):
    title_b = next(m["title"] for m in client.get("/sdapi/v1/sd-models").json() if m["model_name"] == "tiny-b")
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "override_settings": {"sd_model_checkpoint": title_b}})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["sd_model_name"] == "tiny-b"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny-a.safetensors [")
    bad = client.post("/sdapi/v1/txt2img", json={**FAST, "override_settings": {"sd_model_checkpoint": "nope"}})
    assert_a1111_error(bad, 422, "override_settings.sd_model_checkpoint", "'nope'", "tiny-b.safetensors [")


def test_png_info_reads_a_generated_image(client):
    r = client.post("/sdapi/v1/txt2img", json={**FAST, "seed": 42})
    image = r.json()["images"][0]
    info = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + image}).json()
    assert parse_infotext(info["info"]).params["Seed"] == "42"
    assert info["parameters"]["Seed"] == "42" and info["parameters"]["Prompt"] == "a red apple"
    assert info["parameters"]["Size-1"] == 64 and info["parameters"]["Size-2"] == 64
    plain = client.post("/sdapi/v1/png-info", json={"image": b64_png(halves())}).json()
    assert plain == {"info": "", "items": {}, "parameters": {}}


class Hold:
    """One stop of a :class:`StepGate`: ``reached`` once the worker stands there, ``released`` to go on."""

    def __init__(self, batch: int, step: int):
        self.batch, self.step = batch, step
        self.reached, self.released = threading.Event(), threading.Event()

    def wait(self, timeout: float = 60) -> None:
        assert self.reached.wait(timeout), f"the job never reached step {self.step} of batch {self.batch}"

    def release(self) -> None:
        self.released.set()


class StepGate:
    """The queue's real model, with a gate before every U-Net call: once the running job has reported
    ``step`` of ``batch`` (the state /progress reads), the worker waits there, before the next step's
    model call, until the test releases it. The job then stands still while the test reads its
    progress and presses Skip or Interrupt; the engine's check before the step after sees the press."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.queue = None  # the app's JobQueue, whose running job the gate watches
        self._next: Hold | None = None
        self._holds: list[Hold] = []

    def load(self, name, cancel):
        """The queue's default loader, plus the gate."""
        s = self.settings
        components = load_model(name, device=s.device, dtype=s.dtype, settings=s, cancel=cancel)
        components.unet.register_forward_pre_hook(self._before_model_call)
        return components

    def hold(self, batch: int, step: int) -> Hold:
        """Stop the worker after ``step`` of ``batch`` (replacing a stop not yet reached)."""
        self._next = Hold(batch, step)
        self._holds.append(self._next)
        return self._next

    def release_all(self) -> None:
        self._next = None
        for hold in self._holds:
            hold.release()

    def __enter__(self) -> "StepGate":
        return self

    def __exit__(self, *_exc) -> None:
        """Let the worker go, so a failed assertion never leaves a request waiting on a held job."""
        self.release_all()

    def _before_model_call(self, _module, _args) -> None:
        hold, job = self._next, self.queue.running
        if hold is None or job is None or (job.batch, job.step) != (hold.batch, hold.step):
            return
        self._next = None
        hold.reached.set()
        if not hold.released.wait(120):
            raise RuntimeError(f"the test never released step {hold.step} of batch {hold.batch}")


@pytest.fixture(scope="module")
def gated(home, tmp_path_factory):
    """A server of its own (its own data and outputs) whose worker a :class:`StepGate` can stop; each
    test holds the gate with ``with gate:``, which lets the worker go however the test ends."""
    where = tmp_path_factory.mktemp("gated")
    settings = home_settings(home, data=where / "data", out=where / "out")
    gate = StepGate(settings)
    app = create_app(settings, loader=gate.load)
    gate.queue = app.state.queue
    with TestClient(app) as c, gate:
        yield c, gate


def test_progress_skip_and_interrupt(gated):
    """A 3-batch job: progress with a preview during batch 0, /skip drops batch 1, /interrupt stops
    batch 2 mid-way; the request answers 200 with batch 0's image and batch 2's as it stood."""
    client, gate = gated
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0  # idle
    slow = {**FAST, "steps": 20, "n_iter": 3, "cfg_scale": 1, "seed": 100}

    with ThreadPoolExecutor(1) as pool, gate:
        at_2 = gate.hold(batch=0, step=2)  # a preview every 2 steps (preview_every): step 2 has one
        answer = pool.submit(client.post, "/sdapi/v1/txt2img", json=slow)
        at_2.wait()
        p = client.get("/sdapi/v1/progress").json()
        assert p["state"]["job_no"] == 0 and p["state"]["sampling_step"] == 2 and p["current_image"]
        assert 0 < p["progress"] < 1 and p["eta_relative"] >= 0
        assert p["state"]["job_count"] == 3 and p["state"]["sampling_steps"] == 20 and p["state"]["job"] == "txt2img"
        assert png_of(p["current_image"]).format == "PNG"
        assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None

        in_batch_1 = gate.hold(batch=1, step=2)
        at_2.release()
        in_batch_1.wait()
        assert client.get("/sdapi/v1/progress").json()["state"]["job_no"] == 1
        assert client.post("/sdapi/v1/skip").status_code == 200
        assert client.get("/sdapi/v1/progress").json()["state"]["skipped"] is True

        in_batch_2 = gate.hold(batch=2, step=2)
        in_batch_1.release()  # step 3 of batch 1 runs, then the check before step 4 drops the batch
        in_batch_2.wait()
        state = client.get("/sdapi/v1/progress").json()["state"]
        assert state["job_no"] == 2 and state["sampling_step"] == 2 and state["skipped"] is False
        assert client.post("/sdapi/v1/interrupt").json() == {}
        in_batch_2.release()  # step 3 runs, then the check before step 4 ends the job
        r = answer.result(timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 2
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [100, 102]  # seed 101 skipped, 102 interrupted
    assert "Interrupted" not in parse_infotext(info["infotexts"][0]).params
    assert parse_infotext(info["infotexts"][1]).params["Interrupted"] == "at step 3 of 20"
    assert client.get("/sdapi/v1/progress").json()["progress"] == 0


def test_interrupt_returns_the_image_in_progress(gated):
    """webuiapi reads result.image (images[0]): an interrupted one-image job must still have it, decoded
    from the clean image its last step predicted, and the native API says the job was interrupted."""
    client, gate = gated
    slow = {**FAST, "steps": 40, "seed": 5}
    with ThreadPoolExecutor(1) as pool, gate:
        at_3 = gate.hold(batch=0, step=3)
        answer = pool.submit(client.post, "/sdapi/v1/txt2img", json=slow)
        at_3.wait()
        assert client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] == 3
        client.post("/sdapi/v1/interrupt")
        at_3.release()  # step 4 runs, then the check before step 5 ends the job
        r = answer.result(timeout=120)
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert len(images) == 1 and png_of(images[0]).size == (64, 64)
    params = parse_infotext(json.loads(r.json()["info"])["infotexts"][0]).params
    assert params["Interrupted"] == "at step 4 of 40"
    native = client.get("/api/v1/jobs", params={"status": "interrupted"}).json()
    assert native and native[0]["images"] and native[0]["status"] == "interrupted"


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"steps": 500}, "steps", ["between 1 and 150"]),
        ({"n_iter": 0}, "n_iter", ["n_iter must be between 1 and 100"]),
        ({"cfg_scale": 99}, "cfg_scale", ["between 0 and 30"]),
        ({"sampler_name": "DPM fast"}, "sampler_name", ["'DPM fast'", "Euler a"]),
        ({"scheduler": "karas"}, "scheduler", ["'karas'", "Karras", "Align Your Steps"]),
        ({"width": 100}, "width", ["multiple of 8"]),
        ({"steps": "many"}, "steps", ["integer"]),
        ({"override_settings": {"CLIP_stop_at_last_layers": 40}}, "CLIP_stop_at_last_layers", ["between 1 and 12"]),
    ],
)
def test_bad_txt2img_fields_are_422_naming_the_a1111_field(client, body, field, words):
    assert_a1111_error(client.post("/sdapi/v1/txt2img", json={**FAST, **body}), 422, field, *words)


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"init_images": None}, "init_images", ["one base64 image"]),
        ({"init_images": []}, "init_images", ["one base64 image"]),
        ({"init_images": ["a", "b"]}, "init_images", ["one init image", "got 2"]),
        ({"init_images": ["not base64!!"]}, "init_images[0]", ["base64"]),
        ({"init_images": [base64.b64encode(b"just some text").decode()]}, "init_images[0]", ["not an image"]),
        ({"init_images": [base64.b64encode(bomb_png(20000, 20000)).decode()]}, "init_images[0]", ["too large"]),
        ({"mask": "@@"}, "mask", ["base64"]),
        ({"mask": b64_png(Image.new("L", (32, 32)))}, "mask", ["32x32", "64x64"]),
        ({"inpainting_fill": 7}, "inpainting_fill", ["0 (fill)", "3 (latent nothing)", "got 7"]),
        ({"resize_mode": 9}, "resize_mode", ["crop and resize", "got 9"]),
        ({"denoising_strength": 2}, "denoising_strength", ["between 0 and 1"]),
        ({"mask": b64_png(Image.new("L", (64, 64), 255)), "inpaint_full_res_padding": 999}, "inpaint_full_res_padding", ["256"]),
    ],
)
def test_bad_img2img_inputs_are_4xx_never_500(client, body, field, words):
    fields = {**FAST, "init_images": [b64_png(halves())], **body}
    assert_a1111_error(client.post("/sdapi/v1/img2img", json=fields), 422, field, *words)


def test_server_limits_and_bad_png_info(home):
    with TestClient(create_app(settings_for(home, max_steps=10, max_input_pixels=64 * 64))) as c:
        assert_a1111_error(c.post("/sdapi/v1/txt2img", json={**FAST, "steps": 11}), 422, "steps", "max_steps")
        big = b64_png(Image.new("RGB", (128, 128)))
        too_big = c.post("/sdapi/v1/img2img", json={**FAST, "init_images": [big]})
        assert_a1111_error(too_big, 422, "init_images[0]", "16,384", "4,096")
        assert_a1111_error(c.post("/sdapi/v1/png-info", json={"image": big}), 422, "image", "limit")
        bomb = base64.b64encode(bomb_png(20000, 20000)).decode()
        assert_a1111_error(c.post("/sdapi/v1/png-info", json={"image": bomb}), 422, "image", "too large")
        assert_a1111_error(c.post("/sdapi/v1/png-info", json={"image": "%%%"}), 422, "image", "base64")
        assert c.post("/sdapi/v1/png-info", json={}).status_code == 422


# -- options and lists ----------------------------------------------------------------------------


def test_options_switch_models_by_title_name_and_hash(client):
    models = {m["model_name"]: m for m in client.get("/sdapi/v1/sd-models").json()}
    a, b = models["tiny-a"], models["tiny-b"]
    assert a["title"] == f"tiny-a.safetensors [{a['hash']}]" and a["filename"].endswith("tiny-a.safetensors")
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == a["title"]
    try:
        for choice in (b["title"], "tiny-b", b["hash"], "tiny-b.safetensors"):
            assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": a["title"]}).status_code == 200
            assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": choice}).status_code == 200
            assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == b["title"], choice

        relative = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tests"})  # a folder here, not a model
        assert_a1111_error(relative, 422, "sd_model_checkpoint", "'tests'")
        bad = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "missing.safetensors [0123456789]", "x_option": 1})
        assert_a1111_error(bad, 422, "sd_model_checkpoint", "'missing.safetensors [0123456789]'", a["title"])
        bad = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 0})
        assert_a1111_error(bad, 422, "CLIP_stop_at_last_layers", "between 1 and 12")
        options = client.get("/sdapi/v1/options").json()
        assert options["sd_model_checkpoint"] == b["title"] and "x_option" not in options  # a refused POST changes nothing

        assert client.post("/sdapi/v1/options", json={"samples_format": "webp", "my_setting": [1, 2]}).status_code == 200
        options = client.get("/sdapi/v1/options").json()
        assert options["samples_format"] == "webp" and options["my_setting"] == [1, 2]
    finally:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-a", "samples_format": "png"})
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == a["title"]


def test_lists(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM"} <= {s["name"] for s in samplers}
    assert set(samplers[0]) == {"name", "aliases", "options"}
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert {"automatic", "karras", "sgm_uniform"} <= {s["name"] for s in schedulers}
    assert {"Automatic", "Karras", "SGM Uniform"} <= {s["label"] for s in schedulers}
    assert [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()] == ["tiny-a", "tiny-b"]
    assert client.get("/sdapi/v1/sd-vae").json() == []
    assert client.get("/sdapi/v1/loras").json() == []
    assert [u["name"] for u in client.get("/sdapi/v1/upscalers").json()] == ["None", "Lanczos", "Nearest"]  # the built-ins; no model files
    assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    memory = client.get("/sdapi/v1/memory").json()
    assert memory["ram"]["total"] > 0 and "cuda" in memory
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": ["x/y/z plot", "controlnet"], "img2img": ["x/y/z plot", "controlnet"]}
    assert client.post("/sdapi/v1/interrupt").json() == {}  # nothing running: nothing to do
    assert client.post("/sdapi/v1/skip").status_code == 200
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options"} <= set(client.get("/openapi.json").json()["paths"])


# -- the real client ------------------------------------------------------------------------------


def test_webuiapi_against_a_real_server_with_auth(home):
    with lienzo_server(home, "--model", "tiny-a", "--auth", "user:pass") as url:
        anonymous = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1")
        with pytest.raises(RuntimeError) as refused:
            anonymous.txt2img(prompt="x", steps=2, width=64, height=64)
        assert refused.value.args[0] == 401
        assert httpx.get(f"{url}/sdapi/v1/options").status_code == 401
        assert httpx.get(f"{url}/sdapi/v1/options", auth=("user", "wrong")).status_code == 401

        api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", username="user", password="pass", sampler="Euler a", steps=2)
        result = api.txt2img(prompt="a red apple", seed=5, width=64, height=64, batch_size=2)
        assert [im.size for im in result.images] == [(64, 64)] * 2
        assert result.info["all_seeds"] == [5, 6] and result.info["sd_model_name"] == "tiny-a"
        assert parse_infotext(result.images[1].info["parameters"]).params["Seed"] == "6"

        edited = api.img2img(images=[result.image], prompt="a green apple", seed=9, width=64, height=64, denoising_strength=0.5)
        assert edited.image.size == (64, 64) and edited.info["seed"] == 9
        assert parse_infotext(api.png_info(edited.image).info).params["Seed"] == "9"

        assert api.util_get_current_model().startswith("tiny-a.safetensors [")
        api.util_set_model("tiny-b")
        assert api.util_get_current_model().startswith("tiny-b.safetensors [")
        assert api.txt2img(prompt="x", seed=1, width=64, height=64).info["sd_model_name"] == "tiny-b"
        answer = api.set_options({"sd_model_checkpoint": "nope"})  # webuiapi returns the body, whatever the status
        assert "'nope'" in answer["detail"] and answer["error"] == "UnprocessableEntity"
        assert api.util_get_current_model().startswith("tiny-b.safetensors [")

        progress = api.get_progress()
        assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
        assert "DPM++ 2M" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
        api.util_wait_for_ready(check_interval=0.1)
