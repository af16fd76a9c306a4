"""Qwen-Image through lienzo's one loop: the same pictures as diffusers' own pipelines.

A tiny random model (tests/tiny_models.py) saved as a diffusers folder and loaded back through lienzo's
loader; each picture is compared, before 8-bit rounding, with what ``QwenImagePipeline`` (txt2img) and
``QwenImageImg2ImgPipeline`` make from the same components, scheduler and seed.
"""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageImg2ImgPipeline, QwenImagePipeline
from PIL import Image

from lienzo.errors import InvalidRequestError
from lienzo.generation.engine import generate
from lienzo.generation.infotext import fields_from_infotext
from lienzo.generation.request import GenerationRequest, build_request
from lienzo.images.metadata import parse_infotext, pnginfo, read_parameters
from lienzo.models.loading import load_components
from tiny_models import build_tiny, save_diffusers_folder

SIZE = 64
TOLERANCE = 1e-4  # fp32; the bar for parity with diffusers
PROMPT = "a red apple on a table"
NEGATIVE = "blurry, dark"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """The tiny Qwen-Image saved as a diffusers folder and loaded back through lienzo's loader."""
    folder = tmp_path_factory.mktemp("qwen") / "tiny-qwenimage"
    return load_components(save_diffusers_folder(build_tiny("qwenimage"), folder))


def _pipe(components, cls=QwenImagePipeline):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(components.scheduler_config)
    pipe = cls(
        transformer=components.transformer, vae=components.vae, scheduler=scheduler,
        text_encoder=components.text_encoder, tokenizer=components.tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(components, **fields) -> np.ndarray:
    request = GenerationRequest(prompt=PROMPT, width=SIZE, height=SIZE, seed=42, sampler="Euler", schedule="Simple", **fields)
    return generate(components, request).images[0].pixels


def test_the_folder_loads_with_its_own_classes(qwen):
    """Qwen2.5-VL, the Wan-style VAE with its latent statistics, and the dual-stream transformer."""
    assert type(qwen.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(qwen.vae).__name__ == "AutoencoderKLQwenImage"
    assert type(qwen.transformer).__name__ == "QwenImageTransformer2DModel"
    assert qwen.vae_scale_factor == 4 and qwen.vae.config.latents_std != [1.0] * 4


# true_cfg_scale is lienzo's CFG scale: at 1 no negative pass; above it real CFG with the negative prompt,
# rescaled to the conditional prediction's norm. The negative prompt is longer than the prompt, so the two
# rows are padded and masked to share one network call where the pipeline makes two.
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_txt2img_matches_diffusers(qwen, cfg):
    generator = torch.Generator().manual_seed(42)
    expected = _pipe(qwen)(
        prompt=PROMPT, negative_prompt=NEGATIVE if cfg > 1 else None, true_cfg_scale=cfg, height=SIZE, width=SIZE,
        num_inference_steps=3, generator=generator, output_type="np",
    ).images[0]
    got = _ours(qwen, steps=3, cfg_scale=cfg, negative_prompt=NEGATIVE)
    assert got.shape == expected.shape == (SIZE, SIZE, 3)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_img2img_matches_diffusers(qwen):
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    generator = torch.Generator().manual_seed(42)
    expected = _pipe(qwen, QwenImageImg2ImgPipeline)(
        prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=3.0, image=image, strength=0.6, height=SIZE, width=SIZE,
        num_inference_steps=5, generator=generator, output_type="np",
    ).images[0]
    got = _ours(qwen, steps=5, cfg_scale=3.0, negative_prompt=NEGATIVE, init_image=image, denoising_strength=0.6)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_defaults_and_weighted_prompts(qwen):
    """No steps, CFG or sampler: QwenImagePipeline's (50 steps, true CFG 4, Euler, shifted by size, so no
    fixed shift); an emphasised word changes Qwen2.5-VL's sequence; one step is refused (the schedule's
    shift_terminal gives diffusers' scheduler NaN timesteps for it)."""
    request = GenerationRequest(prompt="a cat", width=SIZE, height=SIZE, seed=1)
    result = generate(qwen, request)
    assert result.request.steps == 50 and result.request.cfg_scale == 4.0 and result.request.sampler == "Euler"
    assert "Shift" not in result.images[0].parameters
    request = request.model_copy(update={"steps": 2})
    plain = generate(qwen, request).images[0].pixels
    weighted = generate(qwen, request.model_copy(update={"prompt": "a (cat:1.5)"})).images[0].pixels
    assert np.abs(weighted - plain).max() > 0
    with pytest.raises(InvalidRequestError, match="steps: must be 2 or more for Qwen-Image"):
        generate(qwen, request.model_copy(update={"steps": 1}))


def test_the_infotext_remakes_the_picture(qwen, tmp_path):
    request = GenerationRequest(prompt="a (red:1.2) apple", negative_prompt="dark", width=SIZE, height=SIZE, seed=9, steps=3)
    made = generate(qwen, request).images[0]
    path = tmp_path / "made.png"
    made.image.save(path, pnginfo=pnginfo(made.infotext))
    fields = fields_from_infotext(parse_infotext(read_parameters(path)))
    assert fields["cfg_scale"] == 4.0 and fields["steps"] == 3
    remade = generate(qwen, build_request(**{k: v for k, v in fields.items() if k != "model"})).images[0]
    assert np.array_equal(remade.pixels, made.pixels) and remade.infotext == made.infotext


def test_vae_tiles_decode_the_frame_axis(qwen, monkeypatch):
    """Tiling "on" decodes through the Wan-style VAE's own tiled decode, one frame, no crash."""
    calls = []
    tiled = type(qwen.vae).tiled_decode
    monkeypatch.setattr(qwen.vae, "tiled_decode", lambda z, **k: calls.append(z.shape) or tiled(qwen.vae, z, **k))
    monkeypatch.setattr(qwen, "vae_tiling", "on")
    for name, value in (("min", 64), ("stride", 48)):  # 2 x 2 tiles of 64 pixels, overlapping by 16
        monkeypatch.setattr(qwen.vae, f"tile_sample_{name}_height", value)
        monkeypatch.setattr(qwen.vae, f"tile_sample_{name}_width", value)
    request = GenerationRequest(prompt="a cat", width=2 * SIZE, height=2 * SIZE, seed=1, steps=2)
    pixels = generate(qwen, request).images[0].pixels
    assert calls == [(1, 4, 1, SIZE // 2, SIZE // 2)] and pixels.shape == (2 * SIZE, 2 * SIZE, 3)


def test_the_models_dir_lists_it_as_qwen_image(tmp_path):
    from lienzo.models.registry import Registry

    save_diffusers_folder(build_tiny("qwenimage"), tmp_path / "models" / "tiny-qwenimage")
    entries = Registry(tmp_path / "models", tmp_path / "cache").checkpoints()
    assert ("tiny-qwenimage", "Qwen-Image (diffusers)") in [(e.name, e.architecture) for e in entries]
