"""A models dir with tiny random-weight upscalers in the places and formats A1111 and ComfyUI keep them."""

import pytest
from tiny_upscalers import esrgan, new_layout, save_pth, save_safetensors


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """``esrgan/2x-tiny.pth`` (old layout, a lower-case folder), ``RealESRGAN/more/RealESRGAN_x4tiny.pth`` (new
    layout under ``params_ema``, in a sub-folder), ``upscale_models/4x_tiny.safetensors`` (ComfyUI's folder)
    and a file that is no model."""
    models = tmp_path_factory.mktemp("upscale-home") / "models"
    save_pth(esrgan(2), models / "esrgan" / "2x-tiny.pth")
    save_pth(new_layout(esrgan(4, seed=1)), models / "RealESRGAN" / "more" / "RealESRGAN_x4tiny.pth", wrap="params_ema")
    save_safetensors(esrgan(4, seed=2), models / "upscale_models" / "4x_tiny.safetensors")
    (models / "ESRGAN").mkdir()
    (models / "ESRGAN" / "README.txt").write_text("not a model")
    return models
