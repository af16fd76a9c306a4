"""SD 3.x and Flux.1 through lienzo's one loop: the same pictures as diffusers' own pipelines.

Tiny random models (tests/tiny_models.py) saved as diffusers folders and loaded back through
lienzo's loader; each picture is compared, before 8-bit rounding, with what ``StableDiffusion3Pipeline``
/ ``FluxPipeline`` (and their img2img pipelines) make from the same components, scheduler and seed.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
)
from PIL import Image

from lienzo.errors import InvalidRequestError
from lienzo.generation.engine import generate
from lienzo.generation.request import GenerationRequest
from lienzo.models.loading import load_components
from lienzo.models.speed import SpeedOptions, apply_speed
from tiny_models import build_tiny, save_diffusers_folder

SIZE = 64
TOLERANCE = 1e-4  # fp32; the bar for parity with diffusers


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each family saved as a diffusers folder and loaded back through lienzo's loader."""
    root = tmp_path_factory.mktemp("transformer-families")
    loaded = {}
    for name, options in {"sd3": {}, "flux": {}, "flux-schnell": {"guidance": False}}.items():
        folder = save_diffusers_folder(build_tiny(name.split("-")[0], **options), root / name)
        loaded[name] = load_components(folder)
    return loaded


def _pipeline(components, cls):
    """diffusers' own pipeline over the very modules lienzo loaded."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(components.scheduler_config)
    names = [n for slot in components.spec.text_encoders for n in (slot.component, slot.tokenizer)]
    parts = {n: getattr(components, n) for n in names}
    pipe = cls(transformer=components.transformer, vae=components.vae, scheduler=scheduler, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _init_image() -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _ours(components, **fields) -> np.ndarray:
    request = GenerationRequest(prompt="a red apple on a table", width=SIZE, height=SIZE, seed=42, sampler="Euler", schedule="Simple", **fields)
    return generate(components, request).images[0].pixels


@pytest.mark.parametrize(
    "name, ours, theirs",
    [
        ("sd3", {"steps": 4, "cfg_scale": 5.0}, {"num_inference_steps": 4, "guidance_scale": 5.0}),
        ("sd3", {"steps": 3, "cfg_scale": 1.0}, {"num_inference_steps": 3, "guidance_scale": 1.0}),
        ("flux", {"steps": 4, "cfg_scale": 1.0, "distilled_cfg_scale": 3.5}, {"num_inference_steps": 4, "guidance_scale": 3.5}),
        (
            "flux", {"steps": 3, "cfg_scale": 4.0, "distilled_cfg_scale": 2.0, "negative_prompt": "blurry"},
            {"num_inference_steps": 3, "guidance_scale": 2.0, "true_cfg_scale": 4.0, "negative_prompt": "blurry"},
        ),
        ("flux-schnell", {"steps": 4, "cfg_scale": 1.0}, {"num_inference_steps": 4, "guidance_scale": 0.0}),
    ],
)
def test_txt2img_matches_diffusers(models, name, ours, theirs):
    components = models[name]
    cls = StableDiffusion3Pipeline if name == "sd3" else FluxPipeline
    expected = _pipeline(components, cls)(
        "a red apple on a table", height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(42), output_type="np", **theirs
    ).images[0]
    got = _ours(components, **ours)
    assert got.shape == expected.shape == (SIZE, SIZE, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_img2img_matches_diffusers(models, name):
    components = models[name]
    cls = StableDiffusion3Img2ImgPipeline if name == "sd3" else FluxImg2ImgPipeline
    cfg = {"guidance_scale": 5.0} if name == "sd3" else {"guidance_scale": 3.5}
    image = _init_image()
    expected = _pipeline(components, cls)(
        "a red apple on a table", image=image, strength=0.5, num_inference_steps=4, height=SIZE, width=SIZE,
        generator=torch.Generator().manual_seed(42), output_type="np", **cfg,
    ).images[0]
    got = _ours(
        components, init_image=image, denoising_strength=0.5, steps=4,
        cfg_scale=5.0 if name == "sd3" else 1.0, **({} if name == "sd3" else {"distilled_cfg_scale": 3.5}),
    )
    assert np.abs(got - expected).max() <= TOLERANCE


def test_family_defaults_fill_what_the_request_leaves_open(models):
    """No steps, CFG or sampler: each family's own (schnell: 4 steps; Flux: CFG 1, distilled 3.5)."""
    request = GenerationRequest(prompt="a cat", width=SIZE, height=SIZE, seed=1)
    flux = generate(models["flux"], request)
    assert flux.request.steps == 20 and flux.request.cfg_scale == 1.0 and flux.request.sampler == "Euler"
    params = flux.images[0].parameters
    assert params["Distilled CFG Scale"] == "3.5" and params["Steps"] == "20" and "Shift" not in params
    schnell = generate(models["flux-schnell"], request.model_copy(update={"steps": None}))
    assert schnell.request.steps == 4 and "Distilled CFG Scale" not in schnell.images[0].parameters
    sd3 = generate(models["sd3"], request.model_copy(update={"steps": 2}))
    assert sd3.request.cfg_scale == 5.0 and sd3.images[0].parameters["Shift"] == "3"


def test_sd3_without_t5_runs_on_zeros(models):
    """SD 3.x's T5 is optional: without it the T5 part of the sequence is zeros, as in diffusers."""
    components = models["sd3"]
    encoder, tokenizer = components.text_encoder_3, components.tokenizer_3
    try:
        components.text_encoder_3 = components.tokenizer_3 = None
        expected = _pipeline(components, StableDiffusion3Pipeline)(
            "a red apple on a table", height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=5.0,
            generator=torch.Generator().manual_seed(42), output_type="np",
        ).images[0]
        got = _ours(components, steps=3, cfg_scale=5.0)
    finally:
        components.text_encoder_3, components.tokenizer_3 = encoder, tokenizer
    assert np.abs(got - expected).max() <= TOLERANCE


@pytest.mark.parametrize("field", ["fast", "tiling"])
def test_unet_only_modes_are_refused_by_name(models, field):
    with pytest.raises(InvalidRequestError) as err:
        _ours(models["flux"], steps=1, **{field: True})
    assert err.value.field == field


def test_shift_changes_the_schedule_and_is_recorded(models):
    base = _ours(models["sd3"], steps=3, cfg_scale=1.0)
    request = GenerationRequest(prompt="a red apple on a table", width=SIZE, height=SIZE, seed=42, steps=3, cfg_scale=1.0, shift=1.0)
    shifted = generate(models["sd3"], request).images[0]
    assert shifted.parameters["Shift"] == "1"
    assert np.abs(shifted.pixels - base).max() > 1e-3


def test_weighted_prompt_differs_and_plain_parentheses_do_not_crash(models):
    plain = _ours(models["flux"], steps=2)
    weighted = GenerationRequest(prompt="a (red:1.5) apple on a table", width=SIZE, height=SIZE, seed=42, steps=2)
    assert np.abs(generate(models["flux"], weighted).images[0].pixels - plain).max() > 0


def test_text_encoders_can_stay_on_the_cpu_while_the_network_moves():
    """--text-encoder-device cpu: the network and VAE go where they are sent, the text encoders stay."""
    components = build_tiny("flux")
    components.text_encoder_device = torch.device("cpu")
    components.to("meta")  # a stand-in for a GPU: any device other than the CPU
    assert components.transformer.device.type == components.vae.device.type == "meta"
    assert components.text_encoder.device.type == components.text_encoder_2.device.type == "cpu"


def test_fp8_storage_halves_the_weights_and_stays_close():
    """--fp8: the transformer's and T5's weights stored in float8 and cast up layer by layer; measured here:
    their bytes, and how far the picture moves (the tiny model's pixels, 0-1)."""
    components = build_tiny("flux")
    request = GenerationRequest(prompt="a cat", width=SIZE, height=SIZE, steps=2, seed=1)
    before = generate(components, request).images[0].pixels
    bytes_before = sum(p.numel() * p.element_size() for p in components.transformer.parameters())
    apply_speed(components, SpeedOptions(fp8=True, channels_last=False))
    after = generate(components, request).images[0]
    bytes_after = sum(p.numel() * p.element_size() for p in components.transformer.parameters())
    assert bytes_after < 0.5 * bytes_before  # fp32 -> fp8 for the linear weights (0.44 here: small layers are kept)
    assert components.text_encoder_2.shared.weight.dtype == torch.float32  # T5's embedding is kept
    assert any(p.dtype == torch.float8_e4m3fn for p in components.text_encoder_2.parameters())
    assert after.parameters["FP8 weights"] == "transformer, T5"
    assert 0 < np.abs(after.pixels - before).mean() < 0.01


@pytest.mark.parametrize("pipeline", ["FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "StableDiffusion3Img2ImgPipeline"])
def test_folders_saved_from_any_of_a_familys_pipelines_are_that_family(pipeline):
    from lienzo.models.transformer_loading import transformer_family

    assert transformer_family({"_class_name": pipeline}).name == ("sd3" if "Diffusion3" in pipeline else "flux")
    assert transformer_family({"_class_name": "StableDiffusionXLPipeline"}) is None
