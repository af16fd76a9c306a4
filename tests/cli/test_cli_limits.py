"""The request limits apply on every front door, and CLI misuse is one line naming the option, never a traceback."""

import errno

import pytest
from click.testing import CliRunner
from PIL import Image

from lienzo import api, outputs, studio
from lienzo.cli import app
from lienzo.errors import InvalidRequestError
from lienzo.generation.limits import check_limits
from lienzo.generation.request import build_request
from lienzo.settings import Settings
from servers import bomb_png

FAST = ["--steps", "2", "--width", "64", "--height", "64", "--seed", "5"]


@pytest.fixture
def no_model(monkeypatch):
    """Refusals come before the model loads: loading one fails the test."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded for a request that should have been refused")

    monkeypatch.setattr(studio, "load_model", load_model)


def _refused(result, *words: str) -> str:
    """The one error line of a refused command, checked for ``words``."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _picture(path, size):
    Image.new("RGB", size, "teal").save(path)
    return str(path)


def test_img2img_without_a_size_is_held_to_max_pixels(lienzo, no_model, tmp_path, monkeypatch):
    """The input image's size is the output's: a big photo and no --width must not run unbounded."""
    monkeypatch.setenv("LIENZO_MAX_PIXELS", str(128 * 128))
    big = _picture(tmp_path / "big.png", (256, 192))
    line = _refused(lienzo("img2img", big, "a fox", code=2), "256x192", "input image", "LIENZO_MAX_PIXELS", "--width", "--height")
    assert line.startswith("error: --width:")
    _refused(lienzo("inpaint", big, big, "a fox", code=2), "256x192", "LIENZO_MAX_PIXELS")
    small = _picture(tmp_path / "small.png", (64, 64))
    _refused(lienzo("outpaint", small, "a fox", "--left", "256", code=2), "320x64", "outpainting", "LIENZO_MAX_PIXELS")
    _refused(lienzo("generate", "a fox", "--width", "256", "--height", "256", code=2), "256x256", "LIENZO_MAX_PIXELS")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_steps_and_images_are_held_to_their_settings(lienzo, no_model, monkeypatch):
    monkeypatch.setenv("LIENZO_MAX_STEPS", "10")
    monkeypatch.setenv("LIENZO_MAX_IMAGES", "3")
    _refused(lienzo("generate", "a fox", "--steps", "11", code=2), "--steps", "at most 10", "LIENZO_MAX_STEPS")
    _refused(lienzo("generate", "a fox", "--steps", "2", "--batch-size", "4", code=2), "--batch-size", "at most 3", "LIENZO_MAX_IMAGES")


def test_a_local_series_is_limited_per_batch_and_a_server_request_in_all():
    """Memory depends on one batch: the CLI may make a long series one batch at a time, a server request may not."""
    settings = Settings(max_images=3)
    series = build_request(prompt="a fox", batch_size=3, batch_count=40)
    check_limits(series, settings, count_batches=False)
    with pytest.raises(InvalidRequestError, match=r"got 120 \(batch_size 3 x batch_count 40\)"):
        check_limits(series, settings)
    with pytest.raises(InvalidRequestError, match="got 4"):
        check_limits(build_request(prompt="a fox", batch_size=4), settings, count_batches=False)


def test_input_images_over_max_input_pixels_are_refused_before_decoding(lienzo, no_model, tmp_path, monkeypatch):
    """A file of a few dozen bytes declaring 5000x5000: refused by its header, not decoded (which would
    fail as truncated)."""
    monkeypatch.setenv("LIENZO_MAX_INPUT_PIXELS", str(4096 * 4096))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(5000, 5000))
    _refused(lienzo("img2img", str(bomb), "a fox", code=2), "image:", "5000x5000", "LIENZO_MAX_INPUT_PIXELS")
    _refused(lienzo("outpaint", str(bomb), "a fox", "--left", "64", code=2), "5000x5000", "LIENZO_MAX_INPUT_PIXELS")
    small = _picture(tmp_path / "small.png", (64, 64))
    _refused(lienzo("inpaint", small, str(bomb), "a fox", code=2), "mask:", "5000x5000", "LIENZO_MAX_INPUT_PIXELS")


def test_unusable_folders_and_settings_are_one_line(home, no_model, tmp_path, monkeypatch):
    runner = CliRunner()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    models = ["--models-dir", str(home / "models")]

    def run(*args):
        return runner.invoke(app, [*models, *args], catch_exceptions=False)

    _refused(run("--outputs-dir", str(a_file), "generate", "a fox", *FAST), "--outputs-dir", "is a file")
    _refused(run("--outputs-dir", str(tmp_path / "o"), "generate", "a fox", "--out", str(a_file / "sub"), *FAST), "--out", "cannot create")
    _refused(run("--data-dir", str(a_file), "generate", "a fox", *FAST), "--data-dir", "is a file")
    monkeypatch.setenv("LIENZO_MAX_PIXELS", "lots")
    _refused(run("generate", "a fox", *FAST), "LIENZO_MAX_PIXELS", "'lots'")


def test_a_save_that_fails_is_one_line(lienzo, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "save_generated", disk_full)
    _refused(lienzo("generate", "a fox", *FAST, code=2), "--outputs-dir", "cannot save", "No space left on device")


def test_the_python_api_and_the_server_apply_the_same_limits(monkeypatch):
    monkeypatch.setenv("LIENZO_MAX_PIXELS", str(128 * 128))
    # Refused before the model is even looked for: no model by this name exists.
    with pytest.raises(InvalidRequestError, match=r"width: 256x256 is 65,536 pixels; at most 16,384 .*LIENZO_MAX_PIXELS"):
        api.generate(prompt="a fox", width=256, height=256, model="no-such-model")
    request = build_request(prompt="a fox", init_image=Image.new("RGB", (256, 256)))
    with pytest.raises(InvalidRequestError, match=r"max_pixels") as raised:
        check_limits(request, Settings())
    assert raised.value.field == "width"  # the server answers with its own field names


def test_train_misuse_is_one_line_and_creates_nothing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _picture(data / "a.png", (64, 64))
    train = ["train", "--preset", "tiny", "--device", "cpu", "--data", str(data), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, [*train, "--stage", "unet", "--vae", str(tmp_path / "no-vae")])
    _refused(result, "vae:", "no-vae", "not a diffusers VAE folder")
    for flag, value in (("--stop-after", "-1"), ("--time-limit", "0"), ("--num-processes", "0")):
        result = CliRunner().invoke(app, [*train, flag, value])
        assert result.exit_code == 2 and flag in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
