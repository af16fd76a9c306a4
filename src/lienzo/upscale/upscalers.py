"""Upscalers by A1111's names: the built-ins, and super-resolution model files read by spandrel.

A1111 lists "None", "Lanczos" and "Nearest", then one upscaler per model file in its ESRGAN, RealESRGAN,
SwinIR, DAT, HAT and ScuNET folders (ComfyUI keeps them all in ``upscale_models``), named by the file's stem.
A model multiplies the size by its native scale, again while the image is smaller than asked (as A1111's
``Upscaler.upscale`` does), and a Lanczos resize then gives the exact size asked for.

Model files are read weights-only (safetensors, or ``torch.load(weights_only=True)``) and handed to spandrel,
which recognises the architecture from the tensors' names and shapes. spandrel is optional: it is installed
with ``--no-deps`` (README "Updating dependencies"), and without it the built-ins still work.
Nothing here imports torch until a model is used.
"""

import enum
import importlib
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from PIL import Image

from lienzo.errors import InvalidRequestError, ModelFileError

BUILTINS = ("None", "Lanczos", "Nearest")
# A1111's latent upscale modes for hires fix: name -> (torch interpolate mode, antialias)
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# A1111's folders for upscaler models in its models dir, and ComfyUI's one.
MODEL_FOLDERS = ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "HAT", "ScuNET", "upscale_models")
MODEL_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt")
MIN_SCALE, MAX_SCALE = 1, 8  # A1111's extras slider goes from 1 to 8
MIN_TILE = 32
SPANDREL_INSTALL = "pip install --no-deps -c constraints.txt spandrel"
# A scale in a file's name: "4x-UltraSharp", "4xNomos", "ESRGAN_4x", "RealESRGAN_x4plus", "DAT_x3".
_NAME_SCALE = re.compile(r"(?:^|[^a-z0-9])(\d)x|(?:^|[^a-z])x(\d)(?!\d)", re.IGNORECASE)
_RESAMPLE = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class Upscaler:
    name: str  # as A1111 lists it: "None", "Lanczos", "Nearest", or a model file's stem, e.g. "4x-UltraSharp"
    path: Path | None  # model file; None for built-ins
    scale: int | None  # the model's native scale when its file's name tells it (a loaded model knows its own), else None

    @property
    def folder(self) -> str | None:
        """The models dir's folder the file was found in (ESRGAN, RealESRGAN, ...); None for built-ins."""
        return None if self.path is None else next((p.name for p in self.path.parents if p.name.lower() in _FOLDERS), None)


_FOLDERS = {folder.lower() for folder in MODEL_FOLDERS}


def list_upscalers(models_dir: Path) -> list[Upscaler]:
    """The built-ins, then every model file in the models dir's upscaler folders (any case, sub-folders
    too), sorted by name."""
    models = []
    for folder in _model_folders(Path(models_dir)):
        for path in folder.rglob("*"):
            if path.suffix.lower() in MODEL_SUFFIXES and path.is_file():
                models.append(Upscaler(path.stem, path, _scale_in_name(path.stem)))
    models.sort(key=lambda u: (u.name.lower(), str(u.path)))
    return [Upscaler(name, None, None) for name in BUILTINS] + models


def _model_folders(models_dir: Path) -> list[Path]:
    try:
        return sorted(child for child in models_dir.iterdir() if child.name.lower() in _FOLDERS and child.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _scale_in_name(stem: str) -> int | None:
    match = _NAME_SCALE.search(stem)
    return int(match.group(1) or match.group(2)) if match else None


def find_upscaler(name: str, models_dir: Path, field: str = "upscaler") -> Upscaler:
    """The upscaler called ``name`` (any case); an unknown name is an InvalidRequestError listing them."""
    upscalers = list_upscalers(models_dir)
    for upscaler in upscalers:
        if upscaler.name.lower() == name.lower():
            return upscaler
    available = ", ".join(u.name for u in upscalers)
    raise InvalidRequestError(field, f"no upscaler named {name!r}; available: {available} (model files go in {models_dir}/ESRGAN)")


def check_scale(scale: float, field: str = "scale") -> float:
    if not MIN_SCALE <= scale <= MAX_SCALE:  # also refuses NaN
        raise InvalidRequestError(field, f"must be between {MIN_SCALE} and {MAX_SCALE}, got {scale}")
    return scale


def target_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """The size ``upscale`` makes of an image of ``size``: each side times ``scale``, rounded, at least 1."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def upscale(
    image: Image.Image,
    upscaler: Upscaler,
    scale: float,
    *,
    device: str = "cpu",
    tile: int = 192,
    cancel: Callable[[], bool] | None = None,
) -> Image.Image:
    """``image`` enlarged to exactly ``round(w*scale) x round(h*scale)`` (``scale`` 1 to 8). A model runs
    at its native scale, repeatedly while the image is smaller than asked (once at least: at scale 1 it
    still cleans the image, as in A1111), in windows of ``tile`` pixels on ``device``; Lanczos then gives
    the exact size. "None" resizes with Lanczos, as A1111's does where a size is asked for.
    ``cancel`` is asked between windows (GenerationCancelled)."""
    check_scale(scale)
    if tile < MIN_TILE:
        raise InvalidRequestError("tile", f"must be at least {MIN_TILE} pixels, got {tile}")
    size = target_size(image.size, scale)
    if upscaler.path is None:
        return image.resize(size, _RESAMPLE[upscaler.name]) if image.size != size else image.copy()
    model = load_model(upscaler, device)
    out = image
    while True:
        out = _run_model(model, out, device, tile, cancel)
        if out.width >= size[0] and out.height >= size[1]:
            break
    return out.resize(size, Image.Resampling.LANCZOS) if out.size != size else out


# -- models ---------------------------------------------------------------------------------------

_cache_lock = threading.Lock()
# The last model loaded: (file, its size and modification time, device) -> spandrel's descriptor.
_cache: tuple[tuple, object] | None = None


def load_model(upscaler: Upscaler, device: str = "cpu"):
    """The upscaler's model as spandrel's ImageModelDescriptor on ``device``, in eval mode; the last one
    loaded is kept (a file changed on disk is read again)."""
    global _cache
    path = upscaler.path
    try:
        stat = path.stat()
    except OSError as err:
        raise ModelFileError(f"upscaler: cannot read {path}: {err.strerror or err}") from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, device)
    with _cache_lock:
        if _cache is not None and _cache[0] == key:
            return _cache[1]
        _cache = None  # the old model goes before the new one loads
        model = _load(path, device)
        _cache = (key, model)
        return model


def _load(path: Path, device: str):
    import torch

    spandrel = import_spandrel()
    state_dict = _read_weights(path)
    try:
        model = spandrel.ModelLoader().load_from_state_dict(state_dict)
    except spandrel.UnsupportedModelError:
        raise ModelFileError(
            f"upscaler: {path.name} is not a model architecture spandrel knows (ESRGAN, RealESRGAN, SwinIR, DAT, HAT, "
            "SCUNet, Compact, OmniSR, ...)"
        ) from None
    except (KeyError, RuntimeError, ValueError, IndexError) as err:  # a known architecture with missing or odd tensors
        raise ModelFileError(f"upscaler: {path.name} looks like a model spandrel knows but its tensors do not fit it: {err}") from None
    if not isinstance(model, spandrel.ImageModelDescriptor) or model.purpose != "SR" or model.scale < 2:
        raise ModelFileError(
            f"upscaler: {path.name} is a model for {model.purpose} at {model.scale}x ({model.architecture.name}), not an image "
            "super-resolution model; only those upscale"
        )
    if model.input_channels not in (1, 3):
        raise ModelFileError(f"upscaler: {path.name} takes {model.input_channels} channels; lienzo upscales RGB or grayscale images")
    dtype = torch.float16 if torch.device(device).type == "cuda" and model.supports_half else torch.float32
    return model.to(device=torch.device(device), dtype=dtype).eval()


def _read_weights(path: Path) -> dict:
    """The tensors in a model file, judged by its content; pickles are read weights-only, never run.
    Upscaler files often nest them (``params_ema``, ``state_dict``); spandrel unwraps those."""
    from lienzo.models import formats

    kind = formats.sniff(path)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise ModelFileError(f"upscaler: cannot read {path.name}: {err}") from None
    if kind not in ("pickle", "torch-zip"):
        raise ModelFileError(f"upscaler: {path.name} is a {kind}, not an upscaler model file (.pth, .pt, .safetensors)")
    return formats.load_pickle_dict(path, "upscaler")


def _run_model(model, image: Image.Image, device: str, tile: int, cancel: Callable[[], bool] | None) -> Image.Image:
    """One pass of the model over ``image``, in windows (see ``tiles``)."""
    import numpy as np
    import torch

    from lienzo.upscale.tiles import run_tiled

    gray = model.input_channels == 1
    pixels = np.asarray(image.convert("L" if gray else "RGB"), dtype=np.float32) / 255
    tensor = torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1)).permute(2, 0, 1)[None]
    dtype = next(model.model.parameters()).dtype

    def forward(window: torch.Tensor) -> torch.Tensor:
        return model(window.to(device=device, dtype=dtype))

    out = run_tiled(forward, tensor, model.scale, max(tile, model.size_requirements.minimum), cancel)
    array = out.clamp_(0, 1).mul_(255).round_().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    del out  # the float32 result is the largest thing here (12 bytes a pixel): gone before Pillow copies the bytes
    return Image.fromarray(array[:, :, 0]).convert("RGB") if gray else Image.fromarray(array)


# -- spandrel without torchvision ---------------------------------------------------------------


def import_spandrel() -> ModuleType:
    """spandrel, imported; ModelFileError naming the install command when it is missing."""
    loaded = sys.modules.get("spandrel")
    if loaded is not None:
        return loaded
    try:
        importlib.import_module("torchvision.transforms.functional")
    except (ImportError, RuntimeError):
        # spandrel's package imports every architecture it knows, and two that no upscaler is (LaMa, an
        # inpainter, and RestoreFormer, a face restorer) import three names from torchvision at import time.
        # torchvision is deliberately not installed: PyPI's build is CUDA-only and, beside this CPU torch,
        # fails on import (RuntimeError "operator torchvision::nms does not exist"), breaking transformers
        # with it. So those names come from a stand-in while spandrel imports; it is removed afterwards so
        # that no other library takes it for torchvision.
        with _torchvision_stand_in():
            return _import_spandrel()
    return _import_spandrel()


def _import_spandrel() -> ModuleType:
    try:
        import spandrel
    except ImportError:
        raise ModelFileError(f"upscaler: model upscalers need spandrel, which is not installed: {SPANDREL_INSTALL}") from None
    return spandrel


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def _needs_torchvision(*_args, **_kwargs):
    raise ModelFileError("this spandrel architecture (LaMa or RestoreFormer) needs torchvision, which lienzo does not install")


@contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    modules = {name: ModuleType(name) for name in names}
    functional = modules["torchvision.transforms.functional"]
    functional.InterpolationMode, functional.rotate, functional.normalize = _InterpolationMode, _needs_torchvision, _needs_torchvision
    modules["torchvision"].transforms = modules["torchvision.transforms"]
    modules["torchvision.transforms"].functional = functional
    saved = {name: sys.modules[name] for name in names if name in sys.modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
