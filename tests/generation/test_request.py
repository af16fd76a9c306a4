"""GenerationRequest: one place that knows the limits, one clear line per bad field."""

import pytest
from PIL import Image

from lienzo.errors import InvalidRequestError
from lienzo.generation.request import build_request
from lienzo.generation.samplers import build_scheduler, resolve_sampler, resolve_schedule
from lienzo.models.single_file_layout import scheduler_config_for


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"width": 100}, "width", "width must be a multiple of 8 between 64 and 4096, got 100"),
        ({"height": 4104}, "height", "height must be a multiple of 8 between 64 and 4096, got 4104"),
        ({"steps": 0}, "steps", "steps must be between 1 and 150, got 0"),
        ({"cfg_scale": float("inf")}, "cfg_scale", "cfg_scale must be between 0 and 30, got inf"),
        ({"denoising_strength": -0.1}, "denoising_strength", "denoising_strength must be between 0 and 1, got -0.1"),
        ({"batch_size": 17}, "batch_size", "batch_size must be between 1 and 16, got 17"),
        ({"batch_count": 0}, "batch_count", "batch_count must be between 1 and 100, got 0"),
        ({"clip_skip": 13}, "clip_skip", "clip_skip must be between 1 and 12, got 13"),
        ({"mask_blur": -1}, "mask_blur", "mask_blur must be between 0 and 256 pixels, got -1"),
        ({"seed": 2**32}, "seed", "seed must be -1 (random) or between 0 and 4294967295"),
        ({"sampler": "Eulr a"}, "sampler", "unknown sampler 'Eulr a'; choose one of: Euler a, Euler, LMS"),
        ({"schedule": "karas"}, "schedule", "unknown schedule type 'karas'; choose one of: Automatic"),
        ({"outpaint_left": 12}, "outpaint_left", "outpaint_left must be a multiple of 8 between 0 and 4096, got 12"),
        ({"inpainting_fill": "blur"}, "inpainting_fill", "'fill', 'original', 'latent noise' or 'latent nothing'"),
        ({"stepz": 3}, "stepz", "Extra inputs are not permitted"),
    ],
)
def test_bad_field_names_the_field_and_the_range(fields, field, message):
    with pytest.raises(InvalidRequestError) as info:
        build_request(prompt="x", **fields)
    assert info.value.field == field
    assert message in str(info.value) and str(info.value).startswith(f"{field}: ")


def test_image_rules_and_modes():
    image, mask = Image.new("RGB", (64, 64)), Image.new("L", (64, 64))
    assert build_request(prompt="x").mode == "txt2img"
    assert build_request(init_image=image).mode == "img2img"
    assert build_request(init_image=image, mask=mask).mode == "inpaint"
    assert build_request(init_image=image, outpaint_up=64).mode == "outpaint"
    with pytest.raises(InvalidRequestError, match="mask is 32x32 but the image is 64x64"):
        build_request(init_image=image, mask=Image.new("L", (32, 32)))
    with pytest.raises(InvalidRequestError, match="outpainting needs an init_image"):
        build_request(outpaint_left=64)
    with pytest.raises(InvalidRequestError, match="mask needs an init_image"):
        build_request(mask=mask)


def test_sampler_names_are_forgiving_but_canonical():
    assert build_request(sampler="euler_a").sampler == "Euler a"
    assert build_request(sampler="k_dpmpp_2m").sampler == "DPM++ 2M"
    assert build_request(sampler="dpm++ 2m sde").sampler == "DPM++ 2M SDE"
    assert build_request(schedule="karras").schedule == "Karras"


def test_schedules_resolve_and_configure_the_scheduler():
    dpm = resolve_sampler("DPM++ 2M")
    assert resolve_schedule(dpm, "Automatic") == "Karras"
    assert resolve_schedule(resolve_sampler("Euler"), "Automatic") == "Uniform"
    base = scheduler_config_for("v_prediction")
    assert build_scheduler(dpm, "Automatic", base).config.use_karras_sigmas is True
    assert build_scheduler(dpm, "Exponential", base).config.use_exponential_sigmas is True
    assert build_scheduler(dpm, "SGM Uniform", base).config.timestep_spacing == "trailing"
    assert build_scheduler(dpm, "Uniform", base).config.prediction_type == "v_prediction"
    # Euler a has no Karras sigmas in diffusers: it runs Uniform, the nearest, rather than refuse.
    assert build_scheduler(resolve_sampler("Euler a"), "Karras", base).config.timestep_spacing == "linspace"
    assert resolve_schedule(resolve_sampler("Euler a"), "karras") == "Karras"  # the infotext says what was asked
