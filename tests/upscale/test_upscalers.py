"""Upscalers: listing and finding them, model files loaded weights-only through spandrel, exact sizes,
tiles that blend without seams, and what is refused."""

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_upscalers import esrgan, picture, save_pth, save_safetensors

from lienzo.errors import GenerationCancelled, InvalidRequestError, ModelFileError
from lienzo.upscale import upscalers as module
from lienzo.upscale.tiles import axis_weights, windows
from lienzo.upscale.upscalers import BUILTINS, LATENT_MODES, Upscaler, find_upscaler, list_upscalers, load_model, upscale


def test_list_upscalers_gives_the_builtins_then_model_files_by_name(models_dir):
    listed = list_upscalers(models_dir)
    assert [u.name for u in listed] == [*BUILTINS, "2x-tiny", "4x_tiny", "RealESRGAN_x4tiny"]
    assert all(u.path is None and u.scale is None for u in listed[:3])
    by_name = {u.name: u for u in listed}
    assert by_name["2x-tiny"].scale == 2 and by_name["RealESRGAN_x4tiny"].scale == 4
    assert by_name["RealESRGAN_x4tiny"].path == models_dir / "RealESRGAN" / "more" / "RealESRGAN_x4tiny.pth"
    assert by_name["2x-tiny"].folder == "esrgan" and by_name["4x_tiny"].folder == "upscale_models"
    assert [u.name for u in list_upscalers(models_dir / "missing")] == list(BUILTINS)


def test_find_upscaler_takes_any_case_and_lists_the_others_when_unknown(models_dir):
    assert find_upscaler("LANCZOS", models_dir) == Upscaler("Lanczos", None, None)
    assert find_upscaler("2X-TINY", models_dir).path == models_dir / "esrgan" / "2x-tiny.pth"
    with pytest.raises(InvalidRequestError) as err:
        find_upscaler("4x-UltraSharp", models_dir, field="upscaler_1")
    assert err.value.field == "upscaler_1"
    assert "4x-UltraSharp" in str(err.value) and "2x-tiny, 4x_tiny, RealESRGAN_x4tiny" in str(err.value)


def test_latent_modes_are_a1111s():
    assert list(LATENT_MODES) == [
        "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
        "Latent (nearest-exact)",
    ]
    assert LATENT_MODES["Latent (bicubic antialiased)"] == ("bicubic", True)


@pytest.mark.parametrize(
    ("name", "native", "scale", "size"),
    [
        ("2x-tiny", 2, 2, (60, 44)),  # the model's own scale: no resize after it
        ("4x_tiny", 4, 2, (60, 44)),  # safetensors; 4x, then Lanczos down to 2x
        ("RealESRGAN_x4tiny", 4, 4, (120, 88)),  # new key layout, nested under params_ema
        ("2x-tiny", 2, 3, (90, 66)),  # twice 2x (as A1111 repeats a model), then down to 3x
        ("2x-tiny", 2, 1.5, (45, 33)),
    ],
)
def test_models_load_and_upscale_to_the_exact_size(models_dir, name, native, scale, size):
    upscaler = find_upscaler(name, models_dir)
    model = load_model(upscaler)
    assert model.scale == native and model.purpose == "SR" and model.architecture.name == "ESRGAN"
    out = upscale(picture(30, 22), upscaler, scale, tile=32)
    assert out.size == size and out.mode == "RGB"


def test_the_last_model_is_kept(models_dir):
    upscaler = find_upscaler("2x-tiny", models_dir)
    assert load_model(upscaler) is load_model(upscaler)
    other = load_model(find_upscaler("4x_tiny", models_dir))
    assert load_model(upscaler) is not other


def test_tiles_blend_to_what_one_window_gives(models_dir):
    """Tiled 2x of an image four windows wide matches the untiled run within a few levels, where cutting the
    image into tiles without overlap leaves seams many times larger (the model sees across its windows)."""
    upscaler = find_upscaler("2x-tiny", models_dir)
    image = picture(88, 72, seed=3)
    whole = np.asarray(upscale(image, upscaler, 2, tile=512), dtype=np.int16)
    tiled = np.asarray(upscale(image, upscaler, 2, tile=32), dtype=np.int16)
    assert len(windows(88, 32)[0]) * len(windows(72, 32)[0]) >= 12
    tiled_error = np.abs(tiled - whole)
    halves = [upscale(image.crop(box), upscaler, 2, tile=512) for box in ((0, 0, 44, 72), (44, 0, 88, 72))]
    cut = np.concatenate([np.asarray(h, dtype=np.int16) for h in halves], axis=1)
    seam_error = np.abs(cut - whole)
    assert whole.std() > 20  # the picture is not flat: a difference could show
    assert tiled_error.max() <= 6 and tiled_error.mean() < 0.1  # measured: 4 and 0.04 levels of 255
    assert seam_error.max() > 4 * tiled_error.max()


@pytest.mark.parametrize("tile", [32, 48, 192])
def test_window_weights_add_up_to_one_everywhere(tile):
    for length in range(tile // 2, 9 * tile, 5):
        check_windows(length, tile)


def check_windows(length: int, tile: int) -> None:
    starts, size = windows(length, tile)
    assert starts[0] == 0 and starts[-1] + size == length and size <= tile, (length, tile)
    assert all(b - a <= size - tile // 4 for a, b in zip(starts, starts[1:])), (length, tile)  # a quarter tile of overlap
    scale = 4
    total = torch.zeros(length * scale)
    for start, weight in zip(starts, axis_weights(starts, size, scale)):
        total[start * scale : (start + size) * scale] += weight
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6), (length, tile)


def test_cancel_is_asked_between_tiles(models_dir):
    asked = []

    def cancel() -> bool:
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(GenerationCancelled):
        upscale(picture(80, 80), find_upscaler("2x-tiny", models_dir), 2, tile=32, cancel=cancel)
    assert len(asked) == 3


@pytest.mark.parametrize("scale", [0.5, 8.5, math.nan])
def test_the_scale_must_be_1_to_8(scale):
    with pytest.raises(InvalidRequestError, match="between 1 and 8") as err:
        upscale(picture(8, 8), Upscaler("Lanczos", None, None), scale)
    assert err.value.field == "scale"


def test_builtins_resize_to_the_exact_size():
    image = picture(20, 15)
    assert upscale(image, Upscaler("Lanczos", None, None), 2.5).size == (50, 38)
    assert np.array_equal(np.asarray(upscale(image, Upscaler("None", None, None), 2)), np.asarray(image.resize((40, 30), Image.LANCZOS)))
    nearest = np.asarray(upscale(image, Upscaler("Nearest", None, None), 2))
    assert np.array_equal(nearest[::2, ::2], np.asarray(image)) and np.array_equal(nearest[1::2, 1::2], np.asarray(image))


class Payload:
    """Not a tensor: unpickling it would need this class, i.e. code from the file."""


def test_a_pickle_that_needs_code_is_refused(tmp_path):
    path = save_pth({"model.0.weight": torch.zeros(1), "extra": Payload()}, tmp_path / "ESRGAN" / "4x-evil.pth")
    upscaler = list_upscalers(tmp_path)[-1]
    with pytest.raises(ModelFileError, match="refuses to load 4x-evil.pth"):
        upscale(picture(8, 8), upscaler, 2)
    assert path.exists()


def test_a_model_that_is_not_super_resolution_is_refused(tmp_path):
    save_safetensors(esrgan(1), tmp_path / "ESRGAN" / "1x-denoise.safetensors")  # a 1x ESRGAN is a restoration model
    with pytest.raises(ModelFileError, match=r"1x-denoise.safetensors is a model for Restoration at 1x \(ESRGAN\), not an image super-resolution"):
        upscale(picture(8, 8), find_upscaler("1x-denoise", tmp_path), 2)


def test_an_unknown_architecture_is_refused_naming_the_file(tmp_path):
    save_safetensors({"encoder.weight": torch.zeros(4, 4)}, tmp_path / "DAT" / "mystery.safetensors")
    with pytest.raises(ModelFileError, match="mystery.safetensors is not a model architecture spandrel knows"):
        upscale(picture(8, 8), find_upscaler("mystery", tmp_path), 2)


def test_without_spandrel_models_say_how_to_install_it_and_builtins_still_work(models_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "spandrel", None)  # import spandrel now raises ImportError
    monkeypatch.setattr(module, "_cache", None)
    with pytest.raises(ModelFileError, match="pip install --no-deps -c constraints.txt spandrel"):
        upscale(picture(8, 8), find_upscaler("2x-tiny", models_dir), 2)
    assert upscale(picture(8, 8), Upscaler("Lanczos", None, None), 2).size == (16, 16)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_spandrel_imports_without_torchvision_and_the_stand_in_does_not_stay():
    """The two architectures that want torchvision get a stand-in that says so; nothing else ever sees it."""
    module.import_spandrel()
    assert "torchvision" not in sys.modules
    from spandrel.architectures.LaMa.__arch import LaMa

    with pytest.raises(ModelFileError, match="needs torchvision"):
        LaMa.rotate(torch.zeros(1, 1, 2, 2), 0.0)
