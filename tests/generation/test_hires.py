"""The hires fix: one job, the first pass enlarged and repainted by the same loop, recorded as A1111 records it."""

import numpy as np
import pytest

from lienzo.errors import InvalidRequestError
from lienzo.generation import engine
from lienzo.generation.infotext import fields_from_infotext
from lienzo.generation.request import build_request
from lienzo.images.metadata import parse_infotext
from tiny_models import build_tiny

BASE = {"prompt": "a lighthouse", "steps": 4, "sampler": "Euler", "seed": 9, "width": 80, "height": 64, "cfg_scale": 5.0}


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1")


def _make(sd1, **fields):
    return engine.generate(sd1, build_request(**BASE, **fields))


def test_latent_hires_doubles_the_size_and_writes_a1111s_keys(sd1):
    steps = []
    result = engine.generate(sd1, build_request(**BASE, enable_hr=True, hr_denoising_strength=0.5), progress=lambda p: steps.append((p.step, p.total_steps)))
    image = result.images[0]
    assert image.image.size == (160, 128) and image.pixels.shape == (128, 160, 3)
    params = parse_infotext(image.infotext).params
    assert params["Size"] == "80x64"
    assert params["Hires upscale"] == "2" and params["Hires upscaler"] == "Latent" and params["Denoising strength"] == "0.5"
    assert "Hires steps" not in params and "Hires resize" not in params
    # Both passes report, counted on: 4 steps, then the second pass's 2 (half of 4).
    assert [s for s, _ in steps] == [1, 2, 3, 4, 5, 6] and steps[-1][1] == 6
    plain = _make(sd1).images[0]
    assert plain.image.size == (80, 64)


def test_the_infotext_remakes_the_same_picture(sd1):
    made = _make(sd1, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=6, hr_denoising_strength=0.6, hr_sampler="DDIM",
                 hr_prompt="a lighthouse at night").images[0]
    params = parse_infotext(made.infotext).params
    assert params["Hires steps"] == "6" and params["Hires sampler"] == "DDIM" and params["Hires prompt"] == "a lighthouse at night"
    fields = fields_from_infotext(parse_infotext(made.infotext))
    fields.pop("model")
    assert fields["enable_hr"] is True and fields["hr_scale"] == 1.5
    again = engine.generate(sd1, build_request(**fields)).images[0]
    assert again.image.size == made.image.size == (120, 96)
    assert np.array_equal(np.asarray(again.image), np.asarray(made.image))


def test_resize_to_a_size_and_to_one_side(sd1):
    both = _make(sd1, enable_hr=True, hr_resize_x=96, hr_resize_y=96).images[0]
    assert both.image.size == (96, 96) and parse_infotext(both.infotext).params["Hires resize"] == "96x96"
    fields = fields_from_infotext(parse_infotext(both.infotext))
    assert (fields["enable_hr"], fields["hr_resize_x"], fields["hr_resize_y"]) == (True, 96, 96)
    width_only = _make(sd1, enable_hr=True, hr_resize_x=128).images[0]
    assert width_only.image.size == (128, 96)  # the height keeps the 5:4 shape, cut to a multiple of 8


@pytest.mark.parametrize("upscaler", ["Lanczos", "Nearest", "None", "Latent (bicubic antialiased)", "Latent (nearest-exact)"])
def test_every_built_in_upscaler(sd1, upscaler):
    image = _make(sd1, enable_hr=True, hr_upscaler=upscaler, hr_denoising_strength=0.4).images[0]
    assert image.image.size == (160, 128)
    assert parse_infotext(image.infotext).params["Hires upscaler"] == upscaler


def test_picture_upscalers_and_latent_ones_differ_and_strength_matters(sd1):
    latent = _make(sd1, enable_hr=True, hr_denoising_strength=0.5).images[0].pixels
    lanczos = _make(sd1, enable_hr=True, hr_upscaler="Lanczos", hr_denoising_strength=0.5).images[0].pixels
    stronger = _make(sd1, enable_hr=True, hr_denoising_strength=0.9).images[0].pixels
    assert np.abs(latent - lanczos).max() > 1e-3 and np.abs(latent - stronger).max() > 1e-3


def test_hires_fields_are_checked_by_name():
    with pytest.raises(InvalidRequestError, match="hr_scale"):
        build_request(**BASE, enable_hr=True, hr_scale=5)
    with pytest.raises(InvalidRequestError, match="hr_resize_x"):
        build_request(**BASE, enable_hr=True, hr_resize_x=100)
    with pytest.raises(InvalidRequestError, match="hr_sampler"):
        build_request(**BASE, enable_hr=True, hr_sampler="Eulerish")


def test_a_model_upscaler_must_be_prepared(sd1):
    from lienzo.errors import LienzoError

    with pytest.raises(LienzoError, match="prepare_resources"):
        _make(sd1, enable_hr=True, hr_upscaler="4x-UltraSharp")


def test_img2img_has_no_hires_fix():
    from lienzo.generation.request import table

    hires = [row.name for row in table() if row.name.startswith("hr_") or row.name == "enable_hr"]
    assert hires and all(row.spec.modes == {"txt2img"} for row in table() if row.name in hires)
