"""Tiny random-weight ESRGAN (RRDBNet) upscalers, saved as the real files are: the old ESRGAN key layout
(``model.0.weight``, ...) and the new one BasicSR and Real-ESRGAN write (``conv_first.weight``, ...)."""

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

NUM_FILTERS, NUM_BLOCKS = 8, 2


def esrgan(scale: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """An RRDBNet's weights in the old layout: ``scale`` 1 (a restoration model), 2 or 4."""
    from lienzo.upscale.upscalers import import_spandrel

    import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=NUM_FILTERS, num_blocks=NUM_BLOCKS, scale=scale)
    # At PyTorch's initial scale a random RRDBNet answers almost the same picture for any input; at 1.5x its
    # output follows the input, so tiled and untiled runs can be told apart.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5)
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


# Old 4x layout -> the new one (BasicSR's RRDBNet): the trunk, then two upsampling convs, HR conv and last conv.
_NEW_4X = {"model.0.": "conv_first.", f"model.1.sub.{NUM_BLOCKS}.": "conv_body.", "model.3.": "conv_up1.", "model.6.": "conv_up2.",
           "model.8.": "conv_hr.", "model.10.": "conv_last."}
_RDB = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)")


def new_layout(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A 4x model's weights under BasicSR's names (``conv_first``, ``body.0.rdb1.conv1``, ...)."""
    new = {}
    for key, value in old.items():
        if match := _RDB.fullmatch(key):
            block, rdb, conv, kind = match.groups()
            new[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = value
        else:
            prefix = next(p for p in _NEW_4X if key.startswith(p))
            new[_NEW_4X[prefix] + key[len(prefix):]] = value
    return new


def save_pth(state_dict: dict, path: Path, wrap: str | None = None) -> Path:
    """As a PyTorch file; ``wrap`` nests it under a key, as Real-ESRGAN's ``params_ema``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({wrap: state_dict} if wrap else state_dict, path)
    return path


def save_safetensors(state_dict: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(path))
    return path


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth shapes plus noise: something a model's output depends on everywhere."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 100 * np.sin(x / 5), 128 + 100 * np.cos(y / 7), (x * y) % 256], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
