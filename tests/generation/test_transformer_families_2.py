"""Chroma and Z-Image through lienzo's one loop: the same pictures as diffusers' own pipelines.

Tiny random models (tests/tiny_models.py) saved as diffusers folders and loaded back through
lienzo's loader; each picture is compared, before 8-bit rounding, with what the family's diffusers
pipeline (and its img2img pipeline) makes from the same components, scheduler and seed.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    ChromaImg2ImgPipeline,
    ChromaPipeline,
    FlowMatchEulerDiscreteScheduler,
    ZImageImg2ImgPipeline,
    ZImagePipeline,
)
from PIL import Image

from lienzo.generation.engine import generate
from lienzo.generation.request import GenerationRequest
from lienzo.models.loading import load_components
from tiny_models import build_tiny, save_diffusers_folder

SIZE = 64
TOLERANCE = 1e-4  # fp32; the bar for parity with diffusers
PROMPT = "a red apple on a table"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each family saved as a diffusers folder and loaded back through lienzo's loader."""
    root = tmp_path_factory.mktemp("transformer-families-2")
    return {name: load_components(save_diffusers_folder(build_tiny(name), root / name)) for name in ("chroma", "zimage")}


def _pipeline(components, cls):
    """diffusers' own pipeline over the very modules lienzo loaded."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(components.scheduler_config)
    names = [n for slot in components.spec.text_encoders for n in (slot.component, slot.tokenizer)]
    parts = {n: getattr(components, n) for n in names}
    pipe = cls(transformer=components.transformer, vae=components.vae, scheduler=scheduler, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _theirs(components, cls, **options) -> np.ndarray:
    generator = torch.Generator().manual_seed(42)
    return _pipeline(components, cls)(PROMPT, height=SIZE, width=SIZE, generator=generator, output_type="np", **options).images[0]


def _ours(components, **fields) -> np.ndarray:
    request = GenerationRequest(prompt=PROMPT, width=SIZE, height=SIZE, seed=42, sampler="Euler", schedule="Simple", **fields)
    return generate(components, request).images[0].pixels


def _init_image() -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ({"steps": 4, "cfg_scale": 5.0}, {"num_inference_steps": 4, "guidance_scale": 5.0}),
        (
            {"steps": 3, "cfg_scale": 4.0, "negative_prompt": "blurry, low quality"},
            {"num_inference_steps": 3, "guidance_scale": 4.0, "negative_prompt": "blurry, low quality"},
        ),
        ({"steps": 3, "cfg_scale": 1.0}, {"num_inference_steps": 3, "guidance_scale": 1.0}),
    ],
)
def test_chroma_txt2img_matches_diffusers(models, ours, theirs):
    """T5 read without its padding, the network's mask letting one padding token through, real CFG."""
    expected = _theirs(models["chroma"], ChromaPipeline, **theirs)
    got = _ours(models["chroma"], **ours)
    assert got.shape == expected.shape == (SIZE, SIZE, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_chroma_img2img_matches_diffusers(models):
    image = _init_image()
    expected = _theirs(
        models["chroma"], ChromaImg2ImgPipeline, image=image, strength=0.5, num_inference_steps=4, guidance_scale=5.0
    )
    got = _ours(models["chroma"], init_image=image, denoising_strength=0.5, steps=4, cfg_scale=5.0)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_chroma_defaults_and_weighted_prompts(models):
    """No steps, CFG or sampler: Chroma's own (35 steps, CFG 5, Euler, the size-shifted schedule); and an
    emphasised word changes T5's sequence, as for Flux."""
    request = GenerationRequest(prompt="a cat", width=SIZE, height=SIZE, seed=1, steps=2)
    result = generate(models["chroma"], request.model_copy(update={"steps": None}))
    assert result.request.steps == 35 and result.request.cfg_scale == 5.0 and result.request.sampler == "Euler"
    assert "Shift" not in result.images[0].parameters and "Distilled CFG Scale" not in result.images[0].parameters
    plain = generate(models["chroma"], request).images[0].pixels
    weighted = generate(models["chroma"], request.model_copy(update={"prompt": "a (cat:1.5)"})).images[0].pixels
    assert np.abs(weighted - plain).max() > 0


# lienzo's CFG scale s is A1111's, uncond + s * (cond - uncond); ZImagePipeline's guidance_scale g is
# cond + g * (cond - uncond): the same for g = s - 1, and no CFG (g = 0) is s = 1.
@pytest.mark.parametrize(
    "ours, theirs",
    [
        ({"steps": 4, "cfg_scale": 1.0}, {"num_inference_steps": 4, "guidance_scale": 0.0}),
        ({"steps": 3, "cfg_scale": 4.0}, {"num_inference_steps": 3, "guidance_scale": 3.0}),
        (
            {"steps": 3, "cfg_scale": 3.0, "negative_prompt": "blurry, low quality"},
            {"num_inference_steps": 3, "guidance_scale": 2.0, "negative_prompt": "blurry, low quality"},
        ),
    ],
)
def test_zimage_txt2img_matches_diffusers(models, ours, theirs):
    """Qwen3's chat-templated prompt without its padding, the reversed timestep and negated prediction;
    prompt and negative prompt of different lengths in one network call."""
    expected = _theirs(models["zimage"], ZImagePipeline, **theirs)
    got = _ours(models["zimage"], **ours)
    assert got.shape == expected.shape == (SIZE, SIZE, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_zimage_img2img_matches_diffusers(models):
    image = _init_image()
    expected = _theirs(
        models["zimage"], ZImageImg2ImgPipeline, image=image, strength=0.5, num_inference_steps=4, guidance_scale=2.0
    )
    got = _ours(models["zimage"], init_image=image, denoising_strength=0.5, steps=4, cfg_scale=3.0)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_zimage_defaults_and_weighted_prompts(models):
    """No steps, CFG or sampler: Turbo's (8 steps, no CFG, Euler, its fixed shift 3); an emphasised word
    changes Qwen3's sequence."""
    request = GenerationRequest(prompt="a cat", width=SIZE, height=SIZE, seed=1)
    result = generate(models["zimage"], request)
    assert result.request.steps == 8 and result.request.cfg_scale == 1.0 and result.request.sampler == "Euler"
    assert result.images[0].parameters["Shift"] == "3"
    request = request.model_copy(update={"steps": 2})
    plain = generate(models["zimage"], request).images[0].pixels
    weighted = generate(models["zimage"], request.model_copy(update={"prompt": "a (cat:1.5)"})).images[0].pixels
    assert np.abs(weighted - plain).max() > 0


def test_the_models_dir_lists_them_as_models_of_their_family(tmp_path):
    from lienzo.models.registry import Registry

    for name in ("chroma", "zimage"):
        save_diffusers_folder(build_tiny(name), tmp_path / "models" / f"tiny-{name}")
    entries = {e.name: e for e in Registry(tmp_path / "models", tmp_path / "cache").checkpoints()}
    assert {name: e.architecture for name, e in entries.items()} == {"tiny-chroma": "Chroma (diffusers)", "tiny-zimage": "Z-Image (diffusers)"}
