"""Fast mode (DeepCache): a full step is the U-Net itself, deep blocks run one step in three, the
image stays close to the normal one and can be remade, and every front door takes the switch."""

import base64
import io
import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from lienzo.errors import LienzoError
from lienzo.generation import engine
from lienzo.generation.deepcache import INTERVAL, DeepCacheUNet, fast_label
from lienzo.generation.infotext import fields_from_infotext
from lienzo.generation.request import GenerationRequest, build_request
from lienzo.images.metadata import parse_infotext, read_parameters
from lienzo.server.app import create_app
from lienzo.settings import Settings
from tiny_models import build_tiny

SMALL = {"prompt": "a watercolor fox", "negative_prompt": "blurry", "width": 64, "height": 64}
# Measured on the tiny SD 1.x model, 6 DPM++ 2M steps, CFG 7, seeds 0-3: fast vs normal 48.2-48.8 dB;
# two seeds in the normal mode, 12.8 dB. 40 dB keeps the fast image far nearer its normal twin than any other.
MIN_PSNR = 40.0


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1")


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny("sdxl")


def _psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def _unet_inputs(components, batch: int, height: int = 8, width: int = 8):
    """Random U-Net inputs shaped as the engine's (a CFG batch is just a batch of 2n)."""
    unet = components.unet
    gen = torch.Generator().manual_seed(3)
    sample = torch.randn(batch, unet.config.in_channels, height, width, generator=gen)
    embeds = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen)
    added = None
    if components.family == "sdxl":
        pooled = torch.randn(batch, components.text_encoder_2.config.projection_dim, generator=gen)
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}
    return sample, embeds, added


def _call(unet, sample, t, embeds, added):
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]


# -- the wrapper ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "inpainting", "size"),
    [("sd1", False, (8, 8)), ("sd1", True, (8, 8)), ("sdxl", False, (8, 8)), ("sd1", False, (6, 10))],
    ids=["sd1", "sd1-inpainting", "sdxl", "sd1-odd-size"],
)
def test_a_full_step_is_the_unet_itself(family, inpainting, size):
    components = build_tiny(family, inpainting=inpainting)
    sample, embeds, added = _unet_inputs(components, batch=4, height=size[0], width=size[1])  # CFG over 2 images
    t = torch.tensor(601)
    expected = _call(components.unet, sample, t, embeds, added)
    deep = DeepCacheUNet(components.unet)
    assert torch.equal(_call(deep, sample, t, embeds, added), expected)
    # A shallow step on the same inputs rebuilds the same output from the cached deep features:
    # the skips it feeds the last up block are the ones the full pass fed it.
    assert torch.equal(_call(deep, sample, t, embeds, added), expected)
    assert (deep.full_steps, deep.shallow_steps) == (1, 1)
    # On another step it is an approximation: close, not equal.
    later = _call(deep, sample * 0.9, torch.tensor(561), embeds, added)
    exact = _call(components.unet, sample * 0.9, torch.tensor(561), embeds, added)
    assert not torch.equal(later, exact) and torch.allclose(later, exact, atol=0.5)


def test_every_third_call_is_full_and_reset_starts_over(sd1):
    sample, embeds, _ = _unet_inputs(sd1, batch=2)
    deep = DeepCacheUNet(sd1.unet)
    for t in range(7):
        _call(deep, sample, torch.tensor(900 - 100 * t), embeds, None)
    assert INTERVAL == 3 and (deep.full_steps, deep.shallow_steps) == (3, 4)  # calls 0, 3 and 6
    # A different batch cannot use the cached features: that call is full whatever its number.
    _call(deep, sample[:1], torch.tensor(100), embeds[:1], None)
    assert deep.full_steps == 4
    deep.reset()
    assert (deep.full_steps, deep.shallow_steps) == (0, 0)
    _call(deep, sample, torch.tensor(900), embeds, None)
    assert deep.full_steps == 1


def test_bad_interval_is_refused(sd1):
    with pytest.raises(ValueError, match="interval must be 1 or more"):
        DeepCacheUNet(sd1.unet, interval=0)


# -- the engine -----------------------------------------------------------------------------------


def _count_calls(modules) -> tuple[dict, list]:
    counts = {name: 0 for name in modules}
    handles = []
    for name, module in modules.items():

        def hook(_module, _args, _output, name=name):
            counts[name] += 1

        handles.append(module.register_forward_hook(hook))
    return counts, handles


@pytest.mark.parametrize("steps", [6, 7])
def test_deep_blocks_run_on_one_step_in_three(sd1, steps):
    unet = sd1.unet
    deep = {"mid": unet.mid_block, **{f"down{i}": b for i, b in enumerate(unet.down_blocks[1:], 1)}, "up0": unet.up_blocks[0]}
    shallow = {"down0": unet.down_blocks[0], "up_last": unet.up_blocks[-1]}
    counts, handles = _count_calls({**deep, **shallow})
    try:
        engine.generate(sd1, build_request(**SMALL, steps=steps, seed=1, fast=True))
        fast = dict(counts)
        counts.update(dict.fromkeys(counts, 0))
        engine.generate(sd1, build_request(**SMALL, steps=steps, seed=1))
        normal = dict(counts)
    finally:
        for handle in handles:
            handle.remove()
    full = math.ceil(steps / INTERVAL)
    assert all(fast[name] == full for name in deep), fast
    assert all(fast[name] == steps for name in shallow), fast
    assert all(count == steps for count in normal.values()), normal


def test_fast_differs_from_normal_but_stays_close(sd1):
    for seed in (0, 1):
        normal = engine.generate(sd1, build_request(**SMALL, steps=6, seed=seed)).images[0]
        fast = engine.generate(sd1, build_request(**SMALL, steps=6, seed=seed, fast=True)).images[0]
        assert MIN_PSNR < _psnr(normal.image, fast.image) < math.inf
    other_seed = engine.generate(sd1, build_request(**SMALL, steps=6, seed=2)).images[0]
    assert _psnr(normal.image, other_seed.image) < MIN_PSNR / 2


def test_same_seed_same_fast_image_and_each_image_alone(sd1):
    request = build_request(**SMALL, steps=5, seed=40, fast=True, batch_size=2, batch_count=2)
    first, again = engine.generate(sd1, request), engine.generate(sd1, request)
    assert [i.seed for i in first.images] == [40, 41, 42, 43]
    for a, b in zip(first.images, again.images, strict=True):
        assert np.array_equal(a.pixels, b.pixels)
    # Every batch starts with a full step, so image 3 (second batch) alone is the same picture.
    alone = engine.generate(sd1, build_request(**SMALL, steps=5, seed=43, fast=True)).images[0]
    assert np.abs(first.images[3].pixels - alone.pixels).max() <= 1e-4


def test_sdxl_and_inpainting_models_run_fast(sdxl):
    normal = engine.generate(sdxl, build_request(**SMALL, steps=4, seed=3)).images[0]
    fast = engine.generate(sdxl, build_request(**SMALL, steps=4, seed=3, fast=True)).images[0]
    assert 35 < _psnr(normal.image, fast.image) < math.inf  # measured: 44 dB
    inpainting = build_tiny("sd1", inpainting=True)
    init = Image.new("RGB", (64, 64), (200, 60, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = engine.generate(inpainting, build_request(**SMALL, steps=4, seed=3, init_image=init, mask=mask, fast=True))
    assert result.images[0].image.size == (64, 64) and result.images[0].parameters["Fast"] == fast_label()


# -- infotext and remaking ------------------------------------------------------------------------


def test_infotext_records_fast_and_remake_restores_it(sd1):
    fast = engine.generate(sd1, build_request(**SMALL, steps=2, seed=5, fast=True)).images[0]
    normal = engine.generate(sd1, build_request(**SMALL, steps=2, seed=5)).images[0]
    assert fast.parameters["Fast"] == "DeepCache 3" and "Fast: DeepCache 3" in fast.infotext
    assert "Fast" not in normal.parameters and "Fast" not in normal.infotext

    fields = fields_from_infotext(parse_infotext(fast.infotext))
    assert fields["fast"] is True
    assert "fast" not in fields_from_infotext(parse_infotext(normal.infotext))
    remade = engine.generate(sd1, build_request(**{k: v for k, v in fields.items() if k != "model"})).images[0]
    assert np.array_equal(remade.pixels, fast.pixels) and remade.infotext == fast.infotext

    with pytest.raises(LienzoError, match="'Fast' must be 'DeepCache 3'"):
        fields_from_infotext(parse_infotext(fast.infotext.replace("DeepCache 3", "DeepCache 5")))


def _png(lines: str) -> list[str]:
    return [line for line in lines.splitlines() if line.endswith(".png")]


def test_cli_fast_flag_and_from(lienzo):
    args = ["--steps", "4", "--width", "64", "--height", "64", "--seed", "5"]
    fast = _png(lienzo("generate", "a red apple", "--fast", *args).stdout)[0]
    normal = _png(lienzo("generate", "a red apple", *args).stdout)[0]
    assert parse_infotext(read_parameters(fast)).params["Fast"] == "DeepCache 3"
    assert "Fast" not in parse_infotext(read_parameters(normal)).params

    again = _png(lienzo("generate", "--from", fast).stdout)[0]
    assert np.array_equal(np.asarray(Image.open(fast)), np.asarray(Image.open(again)))
    assert read_parameters(fast) == read_parameters(again)
    # An explicit flag wins over the image's parameters, as for every other flag.
    slow = _png(lienzo("generate", "--from", fast, "--no-fast").stdout)[0]
    assert np.array_equal(np.asarray(Image.open(normal)), np.asarray(Image.open(slow)))


def test_cli_help_offers_fast_on_every_generating_command():
    from click.testing import CliRunner

    from lienzo.cli import app

    for command in ("generate", "img2img", "inpaint", "outpaint"):
        assert "--fast" in CliRunner().invoke(app, [command, "--help"]).stdout


# -- the servers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(home, tmp_path_factory):
    out = tmp_path_factory.mktemp("fast-out")
    settings = Settings(data_dir=home / "data", models_dir=home / "models", outputs_dir=out)
    with TestClient(create_app(settings, model="tiny-sd15")) as client:
        yield client


def _params(b64: str) -> dict[str, str]:
    return parse_infotext(Image.open(io.BytesIO(base64.b64decode(b64))).info["parameters"]).params


def test_native_api_takes_fast(client):
    body = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64, "seed": 7}
    for fast in (True, False, None):
        sent = body if fast is None else {**body, "fast": fast}
        job = client.post("/api/v1/txt2img?wait=true", json=sent).json()
        assert job["status"] == "done", job
        assert job["parameters"]["fast"] is bool(fast)
        png = Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content))
        assert ("Fast: DeepCache 3" in png.info["parameters"]) is bool(fast)
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    for mode in ("Txt2Img", "Img2Img", "Inpaint", "Outpaint"):
        assert schema[f"{mode}Body"]["properties"]["fast"]["default"] is False


def test_a1111_api_takes_fast_as_an_extension(client, caplog):
    body = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64, "seed": 11}
    with caplog.at_level("WARNING", logger="lienzo.server.routes.a1111"):
        fast = client.post("/sdapi/v1/txt2img", json={**body, "fast": True}).json()
    assert not [r for r in caplog.records if "fast" in r.getMessage()]  # used, not reported as ignored
    assert _params(fast["images"][0])["Fast"] == "DeepCache 3"
    assert '"Fast": "DeepCache 3"' in fast["info"]
    normal = client.post("/sdapi/v1/txt2img", json=body).json()
    assert "Fast" not in _params(normal["images"][0]) and normal["parameters"]["fast"] is False

    init = base64.b64encode(_png_bytes(Image.new("RGB", (64, 64), (200, 60, 40)))).decode()
    img2img = client.post("/sdapi/v1/img2img", json={**body, "init_images": [init], "fast": True}).json()
    assert _params(img2img["images"][0])["Fast"] == "DeepCache 3"


def test_openai_api_takes_fast_as_an_extension(client):
    body = {"prompt": "a red apple", "size": "64x64", "steps": 2, "seed": 5}
    fast = client.post("/v1/images/generations", json={**body, "fast": True})
    assert fast.status_code == 200, fast.text
    assert _params(fast.json()["data"][0]["b64_json"])["Fast"] == "DeepCache 3"
    normal = client.post("/v1/images/generations", json=body).json()
    assert "Fast" not in _params(normal["data"][0]["b64_json"])

    files = {"image": ("in.png", _png_bytes(Image.new("RGB", (64, 64), (200, 60, 40))), "image/png")}
    edit = client.post("/v1/images/edits", data={"prompt": "a red apple", "size": "64x64", "steps": "2", "fast": "true"}, files=files)
    assert edit.status_code == 200, edit.text
    assert _params(edit.json()["data"][0]["b64_json"])["Fast"] == "DeepCache 3"


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- defaults and the web studio ------------------------------------------------------------------


def test_off_by_default_everywhere():
    from lienzo.server.routes.a1111.schemas import Txt2ImgRequest
    from lienzo.server.routes.a1111.translate import txt2img_request
    from lienzo.server.routes.openai import GenerationBody, generation_request

    assert GenerationRequest().fast is False
    assert txt2img_request(Txt2ImgRequest(prompt="x"), {}).fast is False
    assert generation_request(GenerationBody(prompt="x")).fast is False
