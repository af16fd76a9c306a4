"""The safety filter: Stable Diffusion's checker from a diffusers folder, plug-in filters, the policies
(off, blur, block) and how every front door says which images were filtered."""

import io
import json
import logging
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from transformers import CLIPConfig, CLIPImageProcessor

from lienzo.api import load_model
from lienzo.cli import app
from lienzo.errors import ModelFileError
from lienzo.generation import engine
from lienzo.generation.request import build_request
from lienzo.images.metadata import parse_infotext, read_parameters
from lienzo.models.single_file_save import save_single_file
from lienzo.safety import SafetyFilter, StableDiffusionSafetyFilter, Verdict, apply_policy, block, blur
from lienzo.server.app import create_app
from lienzo.settings import Settings
from tiny_models import build_tiny, save_diffusers_folder

FAST = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64, "seed": 7}


def tiny_checker(*, flags: bool) -> StableDiffusionSafetyChecker:
    """A random CLIP ViT with 32-pixel inputs (seed 0) whose concept thresholds flag every image
    (-2: a cosine similarity is never below -1) or none (2: never above 1)."""
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(**small, vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(**small, image_size=32, patch_size=4),
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0 if flags else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    return checker


def add_safety_checker(folder, checker: StableDiffusionSafetyChecker, *, pickle_only: bool = False) -> None:
    """The two sub-folders and model_index.json entries diffusers writes for a pipeline with a checker."""
    checker.save_pretrained(folder / "safety_checker")
    if pickle_only:
        (folder / "safety_checker" / "model.safetensors").unlink()
        torch.save(checker.state_dict(), folder / "safety_checker" / "pytorch_model.bin")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder / "feature_extractor")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
        feature_extractor=["transformers", "CLIPImageProcessor"],
        requires_safety_checker=True,
    )
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A models dir: the same tiny SD 1.x as diffusers folders with a flagging checker, a checker
    that never flags, pickle-only checkers (tensors; code), none, and as a single file."""
    root = tmp_path_factory.mktemp("safety-models")
    tiny = build_tiny("sd1")
    plain = save_diffusers_folder(tiny, root / "plain")
    save_single_file(tiny, root / "single.safetensors")
    for name, checker, pickle_only in [
        ("flagging", tiny_checker(flags=True), False),
        ("never", tiny_checker(flags=False), False),
        ("pickled", tiny_checker(flags=True), True),
        ("malicious", tiny_checker(flags=True), True),
    ]:
        shutil.copytree(plain, root / name)
        add_safety_checker(root / name, checker, pickle_only=pickle_only)
    marker = root / "pickle-code-ran"
    payload = _RunsCode()
    payload.marker = marker
    with (root / "malicious" / "safety_checker" / "pytorch_model.bin").open("wb") as f:
        pickle.dump({"concept_embeds_weights": payload}, f, protocol=2)
    return root


@pytest.fixture(scope="module")
def flagging(models):
    return load_model(models / "flagging", device="cpu", dtype="float32", settings=Settings(models_dir=models, data_dir=models / "data"))


@pytest.fixture(scope="module")
def made(models):
    """The batch of two as made, with no filter: every model here has the same weights, so the same pixels."""
    return _run(_load(models, "plain"), batch_size=2).images


def _load(models, name):
    return load_model(models / name, device="cpu", dtype="float32", settings=Settings(models_dir=models, data_dir=models / "data"))


def _run(components, **fields):
    return engine.generate(components, build_request(**{**FAST, **fields}))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255


# -- the policies on their own --------------------------------------------------------------------


def _picture() -> Image.Image:
    """Sharp shapes and text: what a blur must leave nothing of."""
    image = Image.new("RGB", (256, 192), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 20, 120, 170), fill=(200, 30, 30))
    draw.ellipse((140, 40, 230, 130), fill=(20, 40, 200))
    draw.text((30, 90), "SECRET", fill=(0, 0, 0))
    return image


def test_blur_leaves_only_soft_colour_and_block_leaves_black():
    picture = _picture()
    blurred = np.asarray(blur(picture), dtype=np.float32)
    assert blurred.shape == (192, 256, 3)
    # No edge survives: neighbouring pixels differ by a few levels at most, where the picture jumps by 200.
    assert np.abs(np.diff(blurred, axis=0)).max() < 6 and np.abs(np.diff(blurred, axis=1)).max() < 6
    assert np.abs(np.diff(np.asarray(picture, dtype=np.float32), axis=1)).max() > 200
    # The colours stay: the mean is the picture's.
    assert np.allclose(blurred.mean(axis=(0, 1)), np.asarray(picture, dtype=np.float32).mean(axis=(0, 1)), atol=8)
    blocked = block(picture)
    assert blocked.size == picture.size and not np.asarray(blocked).any()


def test_apply_policy_replaces_only_flagged_images():
    a, b = _picture(), _picture().transpose(Image.FLIP_LEFT_RIGHT)
    verdicts = [Verdict(False), Verdict(True, "weapons")]
    off = apply_policy([a, b], verdicts, "off")
    assert [s.image for s in off] == [a, b] and [s.filtered for s in off] == [None, None]
    screened = apply_policy([a, b], verdicts, "block")
    assert screened[0].image is a and screened[0].label is None
    assert screened[1].filtered == "blocked" and screened[1].label == "blocked (weapons)" and not np.asarray(screened[1].image).any()
    with pytest.raises(ValueError, match="1 verdicts for 2 images"):
        apply_policy([a, b], verdicts[:1], "blur")


# -- loading ----------------------------------------------------------------------------------------


def test_a_folder_with_a_checker_gets_a_filter_loaded_on_first_use(models, flagging):
    assert isinstance(flagging.safety_filter, StableDiffusionSafetyFilter)
    assert flagging.safety_filter._checker is None  # found with the model, not loaded with it
    verdicts = flagging.safety_filter.check([_picture(), Image.new("RGB", (64, 64))], "a prompt")
    assert verdicts == [Verdict(True, "nsfw"), Verdict(True, "nsfw")]
    assert _load(models, "never").safety_filter.check([_picture()]) == [Verdict(False)]
    assert _load(models, "plain").safety_filter is None
    assert _load(models, "single.safetensors").safety_filter is None


def test_pickle_only_checker_is_read_weights_only_and_code_is_refused(models):
    assert _load(models, "pickled").safety_filter.check([_picture()]) == [Verdict(True, "nsfw")]
    malicious = _load(models, "malicious")  # the model loads: its checker is read on first use only
    with pytest.raises(ModelFileError, match="refuses to load the safety checker of malicious.*never runs code"):
        _run(malicious, safety="blur")  # fails before denoising, not after
    assert not (models / "pickle-code-ran").exists()


# -- the engine -------------------------------------------------------------------------------------


def test_policy_off_gives_the_pixels_of_no_filter(models, made):
    components = _load(models, "flagging")
    result = _run(components, safety="off", batch_size=2)
    for got, want in zip(result.images, made, strict=True):
        assert np.array_equal(got.pixels, want.pixels) and got.image.tobytes() == want.image.tobytes()
        assert got.filtered is None and "Safety filter" not in got.infotext
    assert components.safety_filter._checker is None  # off: the checker is not even loaded


def test_blur_changes_flagged_images_beyond_recognition_and_says_so(flagging, made):
    result = _run(flagging, safety="blur", batch_size=2)
    for got, want in zip(result.images, made, strict=True):
        assert got.filtered == "blurred" and got.seed == want.seed
        assert parse_infotext(got.infotext).params["Safety filter"] == "blurred (nsfw)"
        assert got.parameters["Safety filter"] == "blurred (nsfw)"
        blurred, made = np.asarray(got.image, dtype=np.float32), np.asarray(want.image, dtype=np.float32)
        assert np.abs(np.diff(blurred, axis=1)).max() < 0.2 * np.abs(np.diff(made, axis=1)).max()
        assert blurred.std(axis=(0, 1)).max() < 0.5 * made.std(axis=(0, 1)).min()
        np.testing.assert_array_equal(got.pixels, _pixels(got.image))


def test_block_gives_flat_black_images(flagging):
    for image in _run(flagging, safety="block").images:
        assert image.filtered == "blocked" and "Safety filter: blocked (nsfw)" in image.infotext
        assert not np.asarray(image.image).any() and not image.pixels.any()


def test_a_checker_that_never_flags_changes_nothing(models, made):
    result = _run(_load(models, "never"), safety="block", batch_size=2)
    for got, want in zip(result.images, made, strict=True):
        assert got.image.tobytes() == want.image.tobytes()
        assert got.filtered is None and "Safety filter" not in got.infotext


def test_no_filter_lets_images_pass_and_says_unchecked(models, made, caplog, monkeypatch):
    monkeypatch.setattr(engine, "_WARNED_UNFILTERED", set())  # the log says it once per model and process
    with caplog.at_level(logging.WARNING, logger="lienzo.generation.engine"):
        result = _run(_load(models, "plain"), safety="blur", batch_size=2)
    # Same batch size as the reference: a batch of one may differ from a batch of two in the last bit.
    assert result.images[0].image.tobytes() == made[0].image.tobytes()
    assert result.images[0].filtered is None and parse_infotext(result.images[0].infotext).params["Safety filter"] == "unavailable"
    assert "has no safety filter" in caplog.text


class _FlagsSecond(SafetyFilter):
    """A plug-in: flags the second image of every batch, with a reason; remembers what it saw."""

    name = "test filter"

    def __init__(self):
        self.prompts, self.sizes, self.prepared = [], [], []

    def prepare(self, device):
        self.prepared.append(device)

    def check(self, images, prompt=""):
        self.prompts.append(prompt)
        self.sizes.append([image.size for image in images])
        return [Verdict(i == 1, "second image") for i in range(len(images))]


def test_a_plugged_in_filter_replaces_the_checker(models, made):
    components = _load(models, "flagging")
    plug = _FlagsSecond()
    components.safety_filter = plug
    result = _run(components, safety="block", batch_size=2)
    assert plug.prompts == ["a red apple"] and plug.sizes == [[(64, 64), (64, 64)]]
    assert plug.prepared == [torch.device("cpu")]
    assert [i.filtered for i in result.images] == [None, "blocked"]
    assert result.images[0].image.tobytes() == made[0].image.tobytes()
    assert "Safety filter: blocked (second image)" in result.images[1].infotext


# -- front doors ------------------------------------------------------------------------------------


def test_cli_filters_only_when_asked(models, tmp_path):
    runner = CliRunner()
    base = ["--models-dir", str(models), "--data-dir", str(models / "data"), "--outputs-dir", str(tmp_path / "out")]
    fast = ["--steps", "2", "--width", "64", "--height", "64", "--seed", "7", "--model", str(models / "flagging")]
    default = runner.invoke(app, [*base, "generate", "a red apple", *fast], catch_exceptions=False)
    assert default.exit_code == 0, default.output
    (path,) = [line for line in default.stdout.splitlines() if line.endswith(".png")]
    assert "Safety filter" not in read_parameters(path)
    blurred = runner.invoke(app, [*base, "generate", "a red apple", *fast, "--safety", "blur"], catch_exceptions=False)
    assert blurred.exit_code == 0, blurred.output
    (path,) = [line for line in blurred.stdout.splitlines() if line.endswith(".png")]
    assert parse_infotext(read_parameters(path)).params["Safety filter"] == "blurred (nsfw)"
    assert "blurred by the safety filter" in blurred.stderr


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    settings = Settings(
        data_dir=models / "data", models_dir=models, outputs_dir=tmp_path_factory.mktemp("safety-out"), default_model="flagging"
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_server_blurs_by_default_and_says_which_images(server):
    job = server.post("/api/v1/txt2img?wait=true", json={**FAST, "batch_size": 2}).json()
    assert job["status"] == "done" and job["parameters"]["safety"] == "blur"
    assert [image["filtered"] for image in job["images"]] == ["blurred", "blurred"]
    png = Image.open(io.BytesIO(server.get(job["images"][0]["url"]).content))
    assert parse_infotext(png.info["parameters"]).params["Safety filter"] == "blurred (nsfw)"
    off = server.post("/api/v1/txt2img?wait=true", json={**FAST, "safety": "off"}).json()
    assert off["parameters"]["safety"] == "off" and off["images"][0]["filtered"] is None
    assert "Safety filter" not in off["images"][0]["infotext"]


def test_a1111_and_openai_responses_say_which_images_were_filtered(server):
    a1111 = server.post("/sdapi/v1/txt2img", json={"prompt": "a red apple", "steps": 2, "width": 64, "height": 64})
    assert a1111.status_code == 200, a1111.text
    info = json.loads(a1111.json()["info"])
    assert info["filtered"] == ["blurred"] and "Safety filter: blurred (nsfw)" in info["infotexts"][0]
    assert info["all_seeds"] and info["sd_model_name"] == "flagging"  # A1111's own keys are still there
    openai = server.post("/v1/images/generations", json={"prompt": "a red apple", "size": "64x64", "steps": 2})
    assert openai.status_code == 200, openai.text
    (item,) = openai.json()["data"]
    assert item["filtered"] == "blurred" and set(item) == {"b64_json", "revised_prompt", "filtered"}
