"""A1111's refiner: a second model takes over for the last steps, in the same loop, recorded and remade."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from lienzo.errors import InvalidRequestError, LienzoError
from lienzo.generation import engine
from lienzo.generation.plan import Resources
from lienzo.generation.request import build_request
from lienzo.images.metadata import parse_infotext, read_parameters
from tiny_models import build_tiny

BASE = {"prompt": "a harbour at dawn", "negative_prompt": "blurry", "steps": 4, "sampler": "Euler", "seed": 3, "width": 64, "height": 64,
        "cfg_scale": 5.0}


def _other(components, seed: int):
    """The same tiny model with other U-Net weights: a refiner that draws differently."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in components.unet.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return components


@pytest.fixture(scope="module")
def models():
    return build_tiny("sd1"), _other(build_tiny("sd1"), 5)


def _make(base, loaded=None, **fields):
    """A picture by ``base``, with ``loaded`` as the refiner the service would have loaded."""
    return engine.generate(base, build_request(**{**BASE, **fields}), resources=Resources(refiner=loaded)).images[0]


def test_the_refiner_takes_over_at_the_switch(models):
    base, refiner = models
    alone = _make(base).pixels
    same = _make(base, build_tiny("sd1"), refiner="twin", refiner_switch_at=0.5)
    assert np.array_equal(same.pixels, alone)  # an identical refiner changes nothing
    switched = _make(base, refiner, refiner="other", refiner_switch_at=0.5).pixels
    late = _make(base, refiner, refiner="other", refiner_switch_at=0.75).pixels
    never = _make(base, refiner, refiner="other", refiner_switch_at=1.0).pixels
    assert np.abs(switched - alone).max() > 1e-3 and np.abs(switched - late).max() > 1e-3
    assert np.array_equal(never, alone)  # at 1 the switch comes after the last step
    params = parse_infotext(same.infotext).params
    assert params["Refiner"] == "twin" and params["Refiner switch at"] == "0.5"


def test_with_the_hires_fix_the_second_pass_is_the_refiners(models):
    base, refiner = models
    image = _make(base, refiner, refiner="other", refiner_switch_at=0.5, enable_hr=True, hr_denoising_strength=0.5)
    assert image.image.size == (128, 128)
    without = _make(base, enable_hr=True, hr_denoising_strength=0.5)
    assert np.abs(image.pixels - without.pixels).max() > 1e-3


def test_a_refiner_of_another_kind_or_not_loaded_is_refused(models):
    base, _ = models
    with pytest.raises(InvalidRequestError, match="refiner.*latents differ|refiner.*VAEs"):
        _make(base, build_tiny("sdxl"), refiner="xl")
    with pytest.raises(LienzoError, match="prepare_resources"):
        _make(base, refiner="other")
    with pytest.raises(InvalidRequestError, match="refiner_switch_at"):
        build_request(**BASE, refiner="other", refiner_switch_at=0)


def test_cli_refiner_is_recorded_by_title_and_remade(tmp_path):
    from lienzo.cli import app
    from lienzo.models.single_file_save import save_single_file

    models = tmp_path / "models"
    save_single_file(build_tiny("sd1"), models / "tiny-sd15.safetensors")
    save_single_file(_other(build_tiny("sd1"), 5), models / "tiny-refiner.safetensors")
    base = ["--models-dir", str(models), "--data-dir", str(tmp_path / "data"), "--outputs-dir", str(tmp_path / "out")]

    def run(*args):
        result = CliRunner().invoke(app, [*base, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output + result.stderr
        return next(line for line in result.stdout.splitlines() if line.endswith(".png"))

    made = run("generate", "a harbour", "--model", "tiny-sd15", "--steps", "4", "--width", "64", "--height", "64", "--seed", "3",
               "--refiner", "tiny-refiner", "--refiner-switch", "0.5")
    params = parse_infotext(read_parameters(made)).params
    assert params["Refiner"].startswith("tiny-refiner.safetensors [") and params["Refiner switch at"] == "0.5"
    again = run("generate", "--from", made)
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(again)))
