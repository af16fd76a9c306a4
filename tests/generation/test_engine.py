"""The engine against diffusers' own pipelines, every sampler, seed rules and all four modes."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

from lienzo.errors import GenerationCancelled
from lienzo.generation import engine
from lienzo.generation.request import build_request
from lienzo.generation.samplers import SAMPLERS
from lienzo.images.metadata import parse_infotext
from tiny_models import build_tiny

PROMPT = "a watercolor fox in a (snowy:1.0) forest"


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1")


def _pipeline(cls, components, scheduler):
    return cls(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler.from_config(components.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _run(components, **fields):
    return engine.generate(components, build_request(**fields))


def _init_image(size=64) -> Image.Image:
    x = np.linspace(0, 255, size, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(x, (size, 1)), np.tile(x[:, None], (1, size)), np.full((size, size), 90, np.uint8)], -1))


@pytest.mark.parametrize(
    ("scheduler", "sampler"), [(EulerDiscreteScheduler, "Euler"), (DDIMScheduler, "DDIM"), (EulerAncestralDiscreteScheduler, "Euler a")]
)
def test_txt2img_matches_diffusers_pipeline(sd1, scheduler, sampler):
    # SD's scheduler config spaces timesteps "leading" with steps_offset 1: A1111's DDIM schedule.
    pipe = _pipeline(StableDiffusionPipeline, sd1, scheduler)
    ref = pipe(
        "a watercolor fox in a snowy forest", negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.0,
        height=64, width=64, generator=torch.Generator().manual_seed(42), output_type="np",
    ).images[0]
    ours = _run(sd1, prompt=PROMPT, negative_prompt="blurry", steps=4, cfg_scale=7.0, sampler=sampler, schedule="DDIM", seed=42, width=64, height=64)
    assert ours.images[0].pixels.shape == ref.shape == (64, 64, 3)
    assert np.abs(ours.images[0].pixels - ref).max() <= 1e-4


@pytest.mark.parametrize(("scheduler", "sampler"), [(EulerDiscreteScheduler, "Euler"), (DDIMScheduler, "DDIM")])
def test_img2img_matches_diffusers_pipeline(sd1, scheduler, sampler):
    pipe = _pipeline(StableDiffusionImg2ImgPipeline, sd1, scheduler)
    init = _init_image()
    ref = pipe(
        "a fox", image=init, strength=0.6, num_inference_steps=10, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(7), output_type="np",
    ).images[0]
    ours = _run(sd1, prompt="a fox", init_image=init, denoising_strength=0.6, steps=10, cfg_scale=5.0, sampler=sampler, schedule="DDIM", seed=7)
    assert np.abs(ours.images[0].pixels - ref).max() <= 1e-4


def test_batch_of_two_matches_diffusers_with_per_image_generators(sd1):
    pipe = _pipeline(StableDiffusionPipeline, sd1, EulerAncestralDiscreteScheduler)
    generators = [torch.Generator().manual_seed(100 + i) for i in range(2)]
    ref = pipe("a fox", num_images_per_prompt=2, num_inference_steps=3, guidance_scale=7.0, height=64, width=64, generator=generators, output_type="np").images
    ours = _run(sd1, prompt="a fox", batch_size=2, steps=3, sampler="Euler a", schedule="DDIM", seed=100, width=64, height=64)
    assert np.abs(np.stack([i.pixels for i in ours.images]) - ref).max() <= 1e-4


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_and_schedule_runs(sd1, sampler):
    for schedule in SAMPLERS[sampler].schedules:
        result = _run(sd1, prompt="a fox", steps=3, sampler=sampler, schedule=schedule, seed=1, width=64, height=64)
        pixels = result.images[0].pixels
        assert pixels.shape == (64, 64, 3) and np.isfinite(pixels).all()
        assert f"Sampler: {sampler}," in result.images[0].infotext


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M SDE", "DPM++ SDE", "DDIM"])
def test_image_i_of_a_batch_is_remade_alone_with_seed_plus_i(sd1, sampler):
    batch = _run(sd1, prompt="a fox", batch_size=3, steps=3, sampler=sampler, seed=50, width=64, height=64)
    assert [i.seed for i in batch.images] == [50, 51, 52]
    alone = _run(sd1, prompt="a fox", steps=3, sampler=sampler, seed=52, width=64, height=64)
    assert np.abs(batch.images[2].pixels - alone.images[0].pixels).max() <= 1e-4
    assert np.abs(batch.images[0].pixels - batch.images[1].pixels).max() > 1e-3


def test_batch_count_continues_seeds_and_same_seed_same_image(sd1):
    result = _run(sd1, prompt="a fox", batch_count=2, steps=2, seed=9, width=64, height=64)
    assert [i.seed for i in result.images] == [9, 10]
    again = _run(sd1, prompt="a fox", steps=2, seed=10, width=64, height=64)
    assert np.array_equal(np.asarray(result.images[1].image), np.asarray(again.images[0].image))


def test_random_seed_is_resolved_and_recorded(sd1):
    result = _run(sd1, prompt="a fox", steps=1, seed=-1, width=64, height=64)
    seed = result.images[0].seed
    assert 0 <= seed < 2**32 and result.request.seed == seed
    assert f"Seed: {seed}," in result.images[0].infotext


def test_infotext_fields(sd1):
    named = dataclasses.replace(sd1, name="tiny-sd1", short_hash="0123456789")  # the module's sd1 stays as built
    image = _run(named, prompt="a fox", negative_prompt="ugly", steps=2, cfg_scale=6.5, seed=3, clip_skip=2, width=64, height=64).images[0]
    lines = image.infotext.split("\n")
    assert lines[0] == "a fox" and lines[1] == "Negative prompt: ugly"
    assert lines[2].startswith("Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3, Size: 64x64, Model hash: 0123456789, Model: tiny-sd1")
    assert "Clip skip: 2" in lines[2] and "Version: lienzo" in lines[2]


def test_progress_preview_and_cancel(sd1):
    seen = []
    _run_with = engine.generate
    _run_with(sd1, build_request(prompt="a fox", steps=3, seed=1, width=64, height=64), progress=seen.append)
    assert [p.step for p in seen] == [1, 2, 3] and seen[-1].total_steps == 3
    assert seen[0].preview()[0].size == (32, 32)
    calls = iter([False, True])
    with pytest.raises(GenerationCancelled):
        engine.generate(sd1, build_request(prompt="a fox", steps=5, seed=1, width=64, height=64), cancel=lambda: next(calls))


def test_img2img_strength_zero_and_one(sd1):
    init = _init_image()
    kept = _run(sd1, prompt="a fox", init_image=init, denoising_strength=0.0, steps=4, seed=1)
    assert kept.images[0].image.size == (64, 64)
    assert "Denoising strength: 0" in kept.images[0].infotext
    full = _run(sd1, prompt="a fox", init_image=init, denoising_strength=1.0, steps=4, seed=1)
    assert not np.array_equal(np.asarray(kept.images[0].image), np.asarray(full.images[0].image))


def _mask(size=64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (16, 16, 48, 48))
    return mask


@pytest.mark.parametrize("fill", ["fill", "original", "latent noise", "latent nothing"])
def test_inpaint_keeps_pixels_outside_the_mask(sd1, fill):
    init = _init_image()
    result = _run(sd1, prompt="a fox", init_image=init, mask=_mask(), inpainting_fill=fill, mask_blur=0, steps=3, seed=2)
    out, src = np.asarray(result.images[0].image).astype(int), np.asarray(init).astype(int)
    assert np.array_equal(out[:8], src[:8]) and np.array_equal(out[:, :8], src[:, :8])
    assert np.abs(out[20:44, 20:44] - src[20:44, 20:44]).mean() > 1
    assert f"Masked content: {fill}" in result.images[0].infotext


def test_inpaint_only_masked_pastes_back_into_full_image(sd1):
    init = _init_image(128)
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (80, 80, 104, 104))
    result = _run(sd1, prompt="a fox", init_image=init, mask=mask, inpaint_only_masked=True, only_masked_padding=8, mask_blur=0, width=64, height=64, steps=2, seed=2)
    out, src = np.asarray(result.images[0].image).astype(int), np.asarray(init).astype(int)
    assert out.shape == (128, 128, 3)
    assert np.array_equal(out[:64], src[:64])
    assert np.abs(out[84:100, 84:100] - src[84:100, 84:100]).mean() > 1
    assert "Inpaint area: Only masked" in result.images[0].infotext


def test_inpainting_checkpoint_with_nine_channels():
    components = build_tiny("sd1", inpainting=True)
    assert components.is_inpainting
    result = _run(components, prompt="a fox", init_image=_init_image(), mask=_mask(), mask_blur=0, steps=2, seed=2, denoising_strength=1.0)
    out, src = np.asarray(result.images[0].image), np.asarray(_init_image())
    assert np.array_equal(out[:8], src[:8])


def test_outpaint_grows_the_canvas_and_keeps_the_old_image(sd1):
    init = _init_image()
    result = _run(sd1, prompt="a fox", init_image=init, outpaint_right=32, outpaint_down=16, steps=2, seed=4, mask_blur=0)
    out = np.asarray(result.images[0].image).astype(int)
    assert out.shape == (80, 96, 3)
    # The old image survives away from the seam (the mask reaches 8 px into it to blend).
    assert np.array_equal(out[:56, :56], np.asarray(init).astype(int)[:56, :56])
    assert parse_infotext(result.images[0].infotext).params["Outpaint"] == "left 0, right 32, up 0, down 16"


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_families_generate(family):
    components = build_tiny(family)
    result = _run(components, prompt="a fox", steps=2, seed=1, width=64, height=64, batch_size=2)
    assert len(result.images) == 2 and result.images[0].image.size == (64, 64)
    assert np.isfinite(result.images[0].pixels).all()


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_img2img_and_inpaint(sd1, sampler):
    init = _init_image()
    for extra in ({}, {"mask": _mask()}):
        result = _run(sd1, prompt="a fox", init_image=init, denoising_strength=0.5, steps=4, sampler=sampler, seed=1, **extra)
        assert np.isfinite(result.images[0].pixels).all()


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_families_inpaint_and_outpaint_at_odd_sizes(family):
    components = build_tiny(family)
    init = _init_image(100).crop((0, 0, 100, 72))
    mask = Image.new("L", init.size, 0)
    mask.paste(255, (20, 20, 60, 50))
    inpainted = _run(components, prompt="a fox", init_image=init, mask=mask, steps=2, seed=1)
    assert inpainted.images[0].image.size == (96, 72)  # rounded down to multiples of 8
    outpainted = _run(components, prompt="a fox", init_image=init, outpaint_left=16, steps=2, seed=1)
    assert outpainted.images[0].image.size == (112, 72)
