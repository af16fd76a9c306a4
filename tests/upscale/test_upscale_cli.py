"""``lienzo upscale``: the list, numbered PNGs that keep the input's text and add the step, and its refusals."""

import pytest
from click.testing import CliRunner
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lienzo.cli import app
from lienzo.images.metadata import parse_infotext
from tiny_upscalers import picture

INFOTEXT = "a red apple\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 30x22"


@pytest.fixture
def run(models_dir, tmp_path):
    def run(*args, code=0):
        base = ["--models-dir", str(models_dir), "--data-dir", str(tmp_path / "data"), "--outputs-dir", str(tmp_path / "outputs")]
        result = CliRunner().invoke(app, [*base, "upscale", *args], catch_exceptions=False)
        assert result.exit_code == code, result.output + result.stderr
        return result

    return run


@pytest.fixture
def generated(tmp_path):
    info = PngInfo()
    info.add_text("parameters", INFOTEXT)
    info.add_text("my-tool", "kept as it was")
    path = tmp_path / "in.png"
    picture(30, 22).save(path, pnginfo=info)
    return path


def test_list_names_every_upscaler(run):
    out = run("--list").stdout
    for name in ("None", "Lanczos", "Nearest", "2x-tiny", "4x_tiny", "RealESRGAN_x4tiny"):
        assert name in out


def test_upscale_writes_a_numbered_png_with_the_inputs_text_and_the_step(run, generated, tmp_path):
    out_dir = tmp_path / "up"
    paths = run(str(generated), str(generated), "--upscaler", "2X-TINY", "--scale", "2", "-o", str(out_dir)).stdout.split()
    assert [p.rsplit("/", 1)[1] for p in paths] == ["00000-1234.png", "00001-1234.png"]  # named after the input's seed
    with Image.open(paths[0]) as image:
        assert image.size == (60, 44)
        step = "Postprocess upscale by: 2, Postprocess upscaler: 2x-tiny"
        assert image.info["postprocessing"] == image.info["extras"] == step
        assert image.info["my-tool"] == "kept as it was"
        assert image.info["parameters"] == f"{INFOTEXT}, {step}"
    read = parse_infotext(image.info["parameters"])
    assert read.prompt == "a red apple" and read.params["Seed"] == "1234" and read.params["Postprocess upscaler"] == "2x-tiny"
    assert not list(out_dir.glob(".*.tmp"))


def test_upscale_goes_to_the_outputs_extras_folder_by_default(run, tmp_path):
    path = tmp_path / "plain.png"
    picture(10, 10).save(path)
    saved = run(str(path), "--scale", "3").stdout.strip()
    assert saved == str(tmp_path / "outputs" / "extras-images" / "00000-0.png")
    with Image.open(saved) as image:
        assert image.size == (30, 30) and "parameters" not in image.info
        assert image.info["postprocessing"] == "Postprocess upscale by: 3, Postprocess upscaler: Lanczos"


def test_an_unknown_upscaler_or_scale_out_of_range_is_refused(run, generated):
    result = run(str(generated), "--upscaler", "4x-UltraSharp", code=2)
    assert "--upscaler: no upscaler named '4x-UltraSharp'; available: None, Lanczos, Nearest, 2x-tiny" in result.stderr
    result = run(str(generated), "--scale", "9", code=2)
    assert "--scale" in result.stderr and "1<=x<=8" in result.stderr
    assert "give one or more IMAGES" in run(code=2).stderr
