"""The whole way from a photo to a large print, and back from the PNG: a canny map, a ControlNet picture hires-fixed
to twice its size, a 2x ESRGAN upscale, and all of it remade from the files' parameters (on tiny models)."""

import numpy as np
from click.testing import CliRunner
from PIL import Image, ImageDraw
from tiny_upscalers import esrgan, save_pth

from lienzo.cli import app
from lienzo.images.metadata import parse_infotext, read_parameters


def test_photo_canny_hires_upscale_and_remake(tmp_path):
    from lienzo.models.single_file_save import save_single_file
    from tiny_models import build_tiny, tiny_controlnet

    models = tmp_path / "models"
    components = build_tiny("sd1")
    save_single_file(components, models / "tiny-sd15.safetensors")
    tiny_controlnet(components.unet, seed=4).save_pretrained(models / "ControlNet" / "control_tiny_canny")
    save_pth(esrgan(2), models / "ESRGAN" / "2x-tiny.pth")
    photo = Image.new("RGB", (128, 128), (30, 80, 40))
    ImageDraw.Draw(photo).polygon([(20, 100), (64, 20), (108, 100)], fill=(220, 220, 200))
    photo.save(tmp_path / "photo.png")
    base = ["--models-dir", str(models), "--data-dir", str(tmp_path / "data"), "--outputs-dir", str(tmp_path / "out")]

    def run(*args) -> str:
        result = CliRunner().invoke(app, [*base, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output + result.stderr
        return result.stdout.strip().splitlines()[-1]

    canny = run("detect", str(tmp_path / "photo.png"), "--module", "canny", "--resolution", "64")
    edges = np.asarray(Image.open(canny).convert("L"))
    assert set(np.unique(edges)) <= {0, 255} and edges.any()
    made = run("generate", "a snowy mountain", "--steps", "3", "-W", "64", "-H", "64", "--seed", "8",
               "--control", f"none:{canny}:model=control_tiny_canny", "--hires", "--hires-upscaler", "2x-tiny", "--hires-strength", "0.4")
    assert Image.open(made).size == (128, 128)
    params = parse_infotext(read_parameters(made)).params
    assert params["Hires upscaler"] == "2x-tiny" and params["ControlNet 0"].startswith("Module: none, Model: control_tiny_canny [")
    big = run("upscale", made, "--upscaler", "2x-tiny", "--scale", "2")
    assert Image.open(big).size == (256, 256)
    # Remade from the upscaled file's parameters (the generation's, kept by the upscale), then upscaled again.
    again = run("generate", "--from", big, "--control", f"none:{canny}")
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(made)))
    big_again = run("upscale", again, "--upscaler", "2x-tiny", "--scale", "2")
    assert np.array_equal(np.asarray(Image.open(big_again)), np.asarray(Image.open(big)))
