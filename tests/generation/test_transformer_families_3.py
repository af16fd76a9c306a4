"""Flux.2 Klein through lienzo's one loop: the same pictures as diffusers' own pipeline.

A tiny random model (tests/tiny_models.py) saved as a diffusers folder and loaded back through lienzo's
loader; each picture is compared, before 8-bit rounding, with what ``Flux2KleinPipeline`` makes from the
same components, scheduler and seed. diffusers has no Flux.2 Klein img2img pipeline to compare with.
"""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from PIL import Image

from lienzo.generation.engine import generate
from lienzo.generation.request import GenerationRequest
from lienzo.models.loading import load_components
from tiny_models import build_tiny, save_diffusers_folder

SIZE = 64
TOLERANCE = 1e-4  # fp32; the bar for parity with diffusers
PROMPT = "a red apple on a table"


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """The tiny Klein saved as a diffusers folder and loaded back through lienzo's loader."""
    return load_components(save_diffusers_folder(build_tiny("flux2"), tmp_path_factory.mktemp("flux2") / "tiny-flux2"))


def _ours(components, **fields) -> np.ndarray:
    request = GenerationRequest(prompt=PROMPT, width=SIZE, height=SIZE, seed=42, sampler="Euler", schedule="Simple", **fields)
    return generate(components, request).images[0].pixels


def test_the_folder_loads_with_flux2s_own_vae(klein):
    """The VAE is read as its own class, batch-norm statistics included."""
    assert type(klein.vae).__name__ == "AutoencoderKLFlux2"
    assert not torch.equal(klein.vae.bn.running_var, torch.ones_like(klein.vae.bn.running_var))


# Flux2KleinPipeline's guidance_scale is A1111's CFG scale (its negative prompt is always empty, as
# lienzo's default); 1 is no CFG.
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_txt2img_matches_diffusers(klein, cfg):
    """Qwen3's chat turn read at three layers, padding included; the patched, batch-normalized latents as a
    sequence with 4-axis positions; the schedule shifted by the pipeline's empirical mu."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(klein.scheduler_config)
    parts = dict(text_encoder=klein.text_encoder, tokenizer=klein.tokenizer)
    pipe = Flux2KleinPipeline(transformer=klein.transformer, vae=klein.vae, scheduler=scheduler, **parts)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(42)
    expected = pipe(
        prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=cfg, generator=generator, output_type="np"
    ).images[0]
    got = _ours(klein, steps=3, cfg_scale=cfg)
    assert got.shape == expected.shape == (SIZE, SIZE, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_defaults_weighted_prompts_and_img2img(klein):
    """No steps, CFG or sampler: the distilled Klein's (4 steps, no CFG, Euler, shifted by size, so no fixed
    shift); an emphasised word changes Qwen3's sequence; img2img encodes into the same patched latents."""
    request = GenerationRequest(prompt="a cat", width=SIZE, height=SIZE, seed=1)
    result = generate(klein, request)
    assert result.request.steps == 4 and result.request.cfg_scale == 1.0 and result.request.sampler == "Euler"
    assert "Shift" not in result.images[0].parameters
    request = request.model_copy(update={"steps": 2})
    plain = generate(klein, request).images[0].pixels
    weighted = generate(klein, request.model_copy(update={"prompt": "a (cat:1.5)"})).images[0].pixels
    assert np.abs(weighted - plain).max() > 0
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    edited = generate(klein, request.model_copy(update={"init_image": image, "denoising_strength": 0.5})).images[0].pixels
    assert edited.shape == (SIZE, SIZE, 3) and np.abs(edited - plain).max() > 0


def test_the_models_dir_lists_it_as_flux2(tmp_path):
    from lienzo.models.registry import Registry

    save_diffusers_folder(build_tiny("flux2"), tmp_path / "models" / "tiny-flux2")
    entries = Registry(tmp_path / "models", tmp_path / "cache").checkpoints()
    assert [(e.name, e.architecture) for e in entries] == [("tiny-flux2", "Flux.2 Klein (diffusers)")]
