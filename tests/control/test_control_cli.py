"""ControlNet and the hires fix from the command line: a canny map at 64, hires-fixed to 128, remade from the PNG."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lienzo.images.metadata import parse_infotext, read_parameters

FAST = ["--steps", "3", "--width", "64", "--height", "64", "--seed", "11", "--sampler", "Euler"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A tiny SD 1.x checkpoint and a ControlNet made from its U-Net, in the folders people keep them in."""
    from lienzo.models.single_file_save import save_single_file
    from tiny_models import build_tiny, tiny_controlnet

    root = tmp_path_factory.mktemp("control-home")  # conftest's ``lienzo`` runs the CLI on it
    components = build_tiny("sd1")
    save_single_file(components, root / "models" / "tiny-sd15.safetensors")
    tiny_controlnet(components.unet).save_pretrained(root / "models" / "ControlNet" / "control_tiny_canny")
    photo = Image.new("RGB", (96, 96), (40, 60, 90))
    ImageDraw.Draw(photo).ellipse((20, 15, 80, 75), fill=(230, 200, 60))
    photo.save(root / "photo.png")
    Image.new("RGB", (96, 96), "white").save(root / "other.png")
    return root


def _path(result) -> str:
    return next(line for line in result.stdout.splitlines() if line.endswith(".png"))


def test_canny_control_and_hires_fix_are_made_recorded_and_remade(lienzo, home):
    photo = str(home / "photo.png")
    made = _path(lienzo("generate", "a sunflower", *FAST, "--control", f"canny:{photo}:0.9:end=0.8", "--hires", "--hires-strength", "0.5"))
    image = Image.open(made)
    assert image.size == (128, 128)
    params = parse_infotext(read_parameters(made)).params
    assert params["Size"] == "64x64" and params["Hires upscale"] == "2" and params["Hires upscaler"] == "Latent"
    assert params["Denoising strength"] == "0.5"
    unit = params["ControlNet 0"]
    assert unit.startswith("Module: canny, Model: control_tiny_canny [") and "Weight: 0.9" in unit and "Guidance End: 0.8" in unit
    again = _path(lienzo("generate", "--from", made, "--control", f"canny:{photo}"))
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(again)))
    assert read_parameters(again) == read_parameters(made)
    # Without the unit the picture is another.
    plain = _path(lienzo("generate", "a sunflower", *FAST, "--hires", "--hires-strength", "0.5"))
    assert not np.array_equal(np.asarray(image), np.asarray(Image.open(plain)))


def test_a_remake_needs_the_same_control_images(lienzo, home):
    made = _path(lienzo("generate", "a sunflower", *FAST, "--control", f"canny:{home / 'photo.png'}"))
    missing = lienzo("generate", "--from", made, code=2)
    assert "--control" in missing.stderr and "1 control image" in missing.stderr
    other = lienzo("generate", "--from", made, "--control", f"canny:{home / 'other.png'}", code=2)
    assert "not the one the picture was made with" in other.stderr


def test_bad_control_specs_are_refused_naming_the_flag(lienzo, home):
    photo = str(home / "photo.png")
    assert "--control" in lienzo("generate", "x", *FAST, "--control", "canny", code=2).stderr
    assert "unknown key 'strength'" in lienzo("generate", "x", *FAST, "--control", f"canny:{photo}:strength=2", code=2).stderr
    no_model = lienzo("generate", "x", *FAST, "--control", f"lineart_standard:{photo}", code=2)
    assert "no ControlNet has 'lineart'" in no_model.stderr and "control_tiny_canny" in no_model.stderr
    weight = lienzo("generate", "x", *FAST, "--control", f"canny:{photo}:3", code=2)
    assert "controlnets" in weight.stderr and "2" in weight.stderr
