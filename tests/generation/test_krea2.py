"""Krea 2 through lienzo's one loop: the same pictures as diffusers' ``Krea2Pipeline``.

A tiny random model (tests/tiny_models.py) saved as a diffusers folder and loaded back through lienzo's
loader; each picture is compared, before 8-bit rounding, with what the pipeline makes from the same
components, scheduler and seed. Krea's guidance_scale g is lienzo's CFG scale 1 + g. diffusers has no
Krea 2 img2img pipeline to compare with, so img2img is only run.
"""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline
from PIL import Image

from lienzo.generation.engine import generate
from lienzo.generation.infotext import fields_from_infotext
from lienzo.generation.request import GenerationRequest, build_request
from lienzo.images.metadata import parse_infotext, pnginfo, read_parameters
from lienzo.models.loading import load_components
from tiny_models import KREA2_LAYERS, build_tiny, save_diffusers_folder

SIZE = 64
TOLERANCE = 1e-4  # fp32; the bar for parity with diffusers
PROMPT = "a red apple on a table"
NEGATIVE = "blurry, dark"


@pytest.fixture(scope="module")
def krea(tmp_path_factory):
    """The tiny Krea 2 base model saved as a diffusers folder and loaded back through lienzo's loader."""
    folder = tmp_path_factory.mktemp("krea") / "tiny-krea2"
    return load_components(save_diffusers_folder(build_tiny("krea2"), folder))


@pytest.fixture(scope="module")
def turbo(tmp_path_factory):
    """The same network saved as the distilled (TDM) model: model_index.json's is_distilled."""
    folder = tmp_path_factory.mktemp("krea") / "tiny-krea2-turbo"
    return load_components(save_diffusers_folder(dataclasses.replace(build_tiny("krea2"), is_distilled=True), folder))


def _pipe(components):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(components.scheduler_config)
    pipe = Krea2Pipeline(
        transformer=components.transformer, vae=components.vae, scheduler=scheduler, text_encoder=components.text_encoder,
        tokenizer=components.tokenizer, text_encoder_select_layers=components.text_encoder_layers,
        is_distilled=components.is_distilled,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(components, **fields) -> np.ndarray:
    request = GenerationRequest(prompt=PROMPT, width=SIZE, height=SIZE, seed=42, sampler="Euler", schedule="Simple", **fields)
    return generate(components, request).images[0].pixels


def test_the_folder_loads_with_its_own_classes_and_options(krea, turbo):
    """Qwen3-VL, Qwen-Image's VAE and the single-stream transformer; the layers and kind model_index.json states."""
    assert type(krea.text_encoder).__name__ == "Qwen3VLModel"
    assert type(krea.vae).__name__ == "AutoencoderKLQwenImage"
    assert type(krea.transformer).__name__ == "Krea2Transformer2DModel"
    assert krea.text_encoder_layers == KREA2_LAYERS
    assert krea.is_distilled is False and turbo.is_distilled is True


# guidance_scale 0: no negative pass (lienzo's CFG 1); 2: real CFG with the negative prompt at lienzo's CFG 3.
@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_txt2img_matches_diffusers(krea, guidance):
    generator = torch.Generator().manual_seed(42)
    expected = _pipe(krea)(
        prompt=PROMPT, negative_prompt=NEGATIVE if guidance > 0 else None, guidance_scale=guidance, height=SIZE,
        width=SIZE, num_inference_steps=3, generator=generator, output_type="np",
    ).images[0]
    got = _ours(krea, steps=3, cfg_scale=1.0 + guidance, negative_prompt=NEGATIVE)
    assert got.shape == expected.shape == (SIZE, SIZE, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_the_distilled_model_matches_diffusers_at_its_fixed_shift(krea, turbo):
    """The distilled model's schedule is shifted by mu 1.15 whatever the size: another picture than the base's."""
    generator = torch.Generator().manual_seed(42)
    expected = _pipe(turbo)(
        prompt=PROMPT, guidance_scale=0.0, height=SIZE, width=SIZE, num_inference_steps=3, generator=generator,
        output_type="np",
    ).images[0]
    got = _ours(turbo, steps=3, cfg_scale=1.0)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert np.abs(got - _ours(krea, steps=3, cfg_scale=1.0)).max() > 0.01


def test_img2img_runs_from_the_image(krea):
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    txt2img = _ours(krea, steps=4, cfg_scale=3.0, negative_prompt=NEGATIVE)
    got = _ours(krea, steps=4, cfg_scale=3.0, negative_prompt=NEGATIVE, init_image=image, denoising_strength=0.5)
    assert got.shape == (SIZE, SIZE, 3) and np.isfinite(got).all()
    assert np.abs(got - txt2img).max() > 0.01


def test_defaults_and_weighted_prompts(krea, turbo):
    """No steps, CFG or sampler: the base model's 28 steps at Krea's guidance 4.5 (CFG 5.5), the distilled one's 8
    steps without CFG, Euler, shifted by size (no fixed shift); an emphasised word changes Qwen3-VL's sequence."""
    request = GenerationRequest(prompt="a cat", width=SIZE, height=SIZE, seed=1)
    result = generate(krea, request)
    assert result.request.steps == 28 and result.request.cfg_scale == 5.5 and result.request.sampler == "Euler"
    assert "Shift" not in result.images[0].parameters
    distilled = generate(turbo, request).request
    assert distilled.steps == 8 and distilled.cfg_scale == 1.0
    request = request.model_copy(update={"steps": 2})
    plain = generate(krea, request).images[0].pixels
    weighted = generate(krea, request.model_copy(update={"prompt": "a (cat:1.5)"})).images[0].pixels
    assert np.abs(weighted - plain).max() > 0


def test_the_infotext_remakes_the_picture(krea, tmp_path):
    request = GenerationRequest(prompt="a (red:1.2) apple", negative_prompt="dark", width=SIZE, height=SIZE, seed=9, steps=3)
    made = generate(krea, request).images[0]
    path = tmp_path / "made.png"
    made.image.save(path, pnginfo=pnginfo(made.infotext))
    fields = fields_from_infotext(parse_infotext(read_parameters(path)))
    assert fields["cfg_scale"] == 5.5 and fields["steps"] == 3
    remade = generate(krea, build_request(**{k: v for k, v in fields.items() if k != "model"})).images[0]
    assert np.array_equal(remade.pixels, made.pixels) and remade.infotext == made.infotext


def test_the_models_dir_lists_it_as_krea_2(tmp_path):
    from lienzo.models.registry import Registry

    save_diffusers_folder(build_tiny("krea2"), tmp_path / "models" / "tiny-krea2")
    entries = Registry(tmp_path / "models", tmp_path / "cache").checkpoints()
    assert ("tiny-krea2", "Krea 2 base (diffusers)") in [(e.name, e.architecture) for e in entries]
