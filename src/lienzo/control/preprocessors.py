"""ControlNet preprocessors ("modules" in sd-webui-controlnet): a picture in, the control map a ControlNet
model was trained on out.

Names, aliases, sliders and defaults are the extension's, so that an A1111 client's ``module``,
``processor_res``, ``threshold_a`` and ``threshold_b`` mean the same here, and so is the arithmetic of
each map (the tests pin the results). Three differences, each where the extension leans on its UI: a
slider value out of range is an error here (the extension quietly uses the default), ``shuffle`` draws
its noise from a seed rather than numpy's global state, and the inpaint modules take their mask as an
argument (the extension stitches it into the picture's alpha channel).

Neural annotators are never downloaded: their files come from lllyasviel/Annotators on Hugging Face,
placed by the user in ``<models dir>/annotators/`` under the names the extension fetches. Only the
networks written here are offered (HED soft edges and the informative-drawings line art). torch is
imported when one of them runs, never by importing this module, so that listing modules stays cheap.
"""

import logging
from collections.abc import Callable
from numbers import Real
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from lienzo.errors import InvalidRequestError, ModelFileError
from lienzo.images.io import flatten

log = logging.getLogger(__name__)

ANNOTATORS_FOLDER = "annotators"
# The largest map a resolution may ask for: the short side at the slider's 2048 with a 4:1 picture. A long
# thin picture would otherwise ask for gigabytes (10x5000 pixels at 2048 is 2048x1024000).
MAX_MAP_PIXELS = 2048 * 8192
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
# Older labels of the last two, which the extension's API still accepts.
_RESIZE_MODE_ALIASES = {
    "inner fit (scale to fit)": "Crop and Resize", "scale to fit (inner fit)": "Crop and Resize",
    "outer fit (shrink to fit)": "Resize and Fill", "envelope (outer fit)": "Resize and Fill",
}


@dataclass(frozen=True)
class Slider:
    """One of the extension's sliders, as ``/controlnet/module_list?alias_names=true`` reports it in ``module_detail``."""

    name: str
    value: float
    min: float
    max: float
    step: float = 1

    def check(self, value: float | None, field: str) -> float:
        """``value`` if it is in range; None or -1 (the extension API's "unset") is the default."""
        if value is None or value == -1:
            return self.value
        if isinstance(value, bool) or not isinstance(value, Real) or not self.min <= value <= self.max:
            raise InvalidRequestError(field, f"{self.name} must be between {self.min:g} and {self.max:g}, got {value!r}")
        return value


RESOLUTION = Slider("Resolution", 512, 64, 2048, 8)


@dataclass(frozen=True)
class Preprocessor:
    """One module: its extension name and UI alias, its sliders (resolution first when it has one, then
    threshold_a and threshold_b) and what it needs besides the picture."""

    name: str
    alias: str
    sliders: tuple[Slider, ...]
    model_free: bool  # needs no annotator file
    annotator: str | None = None  # the lllyasviel/Annotators file it needs, looked for in <models dir>/annotators
    takes_mask: bool = False  # the inpaint modules: the unit's mask is part of the map
    seeded: bool = False  # random: the same seed gives the same map
    # The ip-adapter modules: the picture becomes CLIP vision embeddings for an IP-Adapter (lienzo.control.ip_adapter),
    # not a map, so they have no ``run``.
    embeds: bool = False
    run: Callable[..., np.ndarray] = dataclass_field(default=None, repr=False, compare=False)

    @property
    def has_resolution(self) -> bool:
        return bool(self.sliders) and self.sliders[0] == RESOLUTION

    def slider_values(
        self, resolution: int | None, threshold_a: float | None, threshold_b: float | None, field: str = "module"
    ) -> tuple[int | None, float | None, float | None]:
        """The values this module runs with: each given one checked against its slider, each unset one
        (None or -1) the slider's default; None for a slider the module does not have (as the extension,
        which ignores those). Errors name ``processor_res``, ``threshold_a`` or ``threshold_b`` beside ``field``."""
        res = None
        if self.has_resolution:
            res = int(round(RESOLUTION.check(resolution, _sibling(field, "processor_res"))))
        thresholds = [*(self.sliders[1:] if self.has_resolution else self.sliders), None, None]
        a, b = (
            slider.check(value, _sibling(field, name)) if slider is not None else None
            for slider, value, name in zip(thresholds, (threshold_a, threshold_b), ("threshold_a", "threshold_b"))
        )
        return res, a, b

    def annotator_path(self, models_dir: Path | None) -> Path | None:
        """The annotator file this module needs (None when it needs none); a missing one is a ModelFileError
        that says where to put it."""
        if self.annotator is None:
            return None
        folder = Path(models_dir) / ANNOTATORS_FOLDER if models_dir is not None else None
        if folder is None or not (folder / self.annotator).is_file():
            where = folder if folder is not None else f"the models dir's {ANNOTATORS_FOLDER} folder"
            raise ModelFileError(
                f"{self.alias} needs {self.annotator} (from lllyasviel/Annotators on Hugging Face) in {where}; "
                "lienzo never downloads it: place the file there"
            )
        return folder / self.annotator


def find_preprocessor(name: str, field: str = "module") -> Preprocessor:
    """The module called ``name`` or aliased so, in any case; an unknown one is an error listing them all."""
    key = str(name).strip().lower()
    modules = {**PREPROCESSORS, **IP_ADAPTER_MODULES}
    for preprocessor in modules.values():
        if key in (preprocessor.name.lower(), preprocessor.alias.lower()):
            return preprocessor
    aliases = [f"{p.alias} = {p.name}" for p in modules.values() if p.alias != p.name]
    raise InvalidRequestError(
        field, f"unknown preprocessor {name!r}; available: {', '.join(modules)} (aliases: {'; '.join(aliases)})"
    )


def preprocess(
    name: str,
    image: Image.Image,
    resolution: int | None = 512,
    threshold_a: float | None = None,
    threshold_b: float | None = None,
    *,
    mask: Image.Image | None = None,
    seed: int | None = None,
    models_dir: Path | None = None,
    device: str = "auto",
    field: str = "module",
) -> Image.Image:
    """The control map of ``image`` made by module ``name`` (a name or alias, see :func:`find_preprocessor`).

    RGB, except for ``inpaint`` / ``inpaint_only``: RGBA, the picture with the ``mask``'s repaint area
    (white, as A1111 masks) transparent; the inpaint ControlNet's hint is that picture with -1 where
    alpha is 0. ``resolution`` (the short side the picture is scaled to first) and the thresholds are
    checked against the module's sliders; None or -1 is a slider's default. ``seed`` makes a ``seeded``
    module (``shuffle``) repeatable (None or -1: fresh noise). ``models_dir`` holds the ``annotators``
    folder of the neural modules, which run on ``device`` (auto, cpu, cuda or mps)."""
    preprocessor = find_preprocessor(name, field)
    if preprocessor.embeds:
        raise InvalidRequestError(
            field, f"{preprocessor.alias} encodes the picture for an IP-Adapter (CLIP vision embeddings); it makes no control map to show"
        )
    res, a, b = preprocessor.slider_values(resolution, threshold_a, threshold_b, field)
    if res is not None:
        _check_map_size(image.size, res, _sibling(field, "processor_res"))
    weights = preprocessor.annotator_path(models_dir)
    if preprocessor.takes_mask:
        mask = _binary_mask(mask, image.size, preprocessor, _sibling(field, "mask"))
    elif mask is not None:
        log.warning("%s takes no mask; the mask is ignored", preprocessor.alias)
    if seed is not None and seed != -1 and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise InvalidRequestError(_sibling(field, "seed"), f"must be a whole number from 0 up, or -1 for a random one, got {seed!r}")
    rgb = np.asarray(flatten(image))
    result = preprocessor.run(rgb, res, a, b, mask=mask, seed=None if seed == -1 else seed, weights=weights, device=device)
    if result.ndim == 2:
        result = np.dstack([result] * 3)
    return Image.fromarray(np.ascontiguousarray(result))


def pixel_perfect_resolution(image_size: tuple[int, int], target_width: int, target_height: int, resize_mode: str) -> int:
    """The preprocessor resolution at which the control map's pixels land one to one on the generated
    picture's, as the extension's pixel-perfect mode: the scale that fills the target ("Just Resize",
    "Crop and Resize") or fits inside it ("Resize and Fill"), times the picture's short side, rounded
    half to even. ``image_size`` is the picture's (width, height). The result may lie outside the
    resolution slider's range (a small picture for a large target); the caller decides what to do."""
    mode = _resize_mode(resize_mode)
    raw_width, raw_height = image_size
    if min(raw_width, raw_height) < 1:
        raise InvalidRequestError("image", f"the picture is {raw_width}x{raw_height}; it needs at least one pixel each way")
    for name, value in (("width", target_width), ("height", target_height)):
        if value < 1:
            raise InvalidRequestError(name, f"must be at least 1, got {value}")
    scale_h, scale_w = target_height / raw_height, target_width / raw_width
    scale = min(scale_h, scale_w) if mode == "Resize and Fill" else max(scale_h, scale_w)
    return round(scale * min(raw_width, raw_height))


def _check_map_size(size: tuple[int, int], resolution: int, field: str) -> None:
    width, height = _scaled_size(size, resolution)
    if width * height > MAX_MAP_PIXELS:
        raise InvalidRequestError(
            field, f"at {resolution} the {size[0]}x{size[1]} picture's map would be {width}x{height} pixels; "
            f"the most is {MAX_MAP_PIXELS:,}: lower the resolution or crop the picture",
        )


def _resize_mode(value: str) -> str:
    for mode in RESIZE_MODES:
        if str(value).strip().lower() == mode.lower():
            return mode
    alias = _RESIZE_MODE_ALIASES.get(str(value).strip().lower())
    if alias is None:
        raise InvalidRequestError("resize_mode", f"must be one of {', '.join(RESIZE_MODES)}, got {value!r}")
    return alias


def _sibling(field: str, name: str) -> str:
    """The name of another field beside ``field``: ``units[0].module`` -> ``units[0].threshold_a``."""
    head, dot, _ = field.rpartition(".")
    return f"{head}{dot}{name}"


def _binary_mask(mask: Image.Image | None, size: tuple[int, int], preprocessor: Preprocessor, field: str) -> np.ndarray:
    """The repaint area as booleans: above half grey, as the extension binarises the unit's mask."""
    if mask is None:
        raise InvalidRequestError(field, f"{preprocessor.alias} needs a mask (white: repaint, black: keep)")
    if mask.size != tuple(size):
        (mw, mh), (iw, ih) = mask.size, size
        raise InvalidRequestError(field, f"mask is {mw}x{mh} but the image is {iw}x{ih}; they must match")
    return np.asarray(mask.convert("L")) > 127


# --- Resizing, as the extension's HWC3 + resize_image_with_pad ---------------------------------------


def _scaled_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) scaled so that the short side is ``resolution``, each rounded half to even."""
    k = resolution / min(size)
    return int(np.round(size[0] * k)), int(np.round(size[1] * k))


def _resized(img: np.ndarray, resolution: int) -> np.ndarray:
    """``img`` scaled so that its short side is ``resolution``: bicubic when enlarging, area-averaged when shrinking."""
    height, width = img.shape[:2]
    enlarging = resolution > min(height, width)
    return cv2.resize(img, _scaled_size((width, height), resolution), interpolation=cv2.INTER_CUBIC if enlarging else cv2.INTER_AREA)


def _resized_padded(img: np.ndarray, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`_resized`, then its edge pixels repeated to the next multiples of 64, and its (height, width)
    to crop the map back to. The networks need sides their down-sampling divides; the plain filters run
    on the same padded picture because that is what makes their bottom and right borders the extension's."""
    img = _resized(img, resolution)
    height, width = img.shape[:2]
    return np.pad(img, [[0, -height % 64], [0, -width % 64], [0, 0]], mode="edge"), (height, width)


def _crop(result: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.ascontiguousarray(result[: size[0], : size[1]])


# --- The model-free modules --------------------------------------------------------------------------


def _identity(img, res, a, b, **_):
    return img


def _invert(img, res, a, b, **_):
    return 255 - img


def _canny(img, res, low, high, **_):
    padded, size = _resized_padded(img, res)
    return _crop(cv2.Canny(padded, int(low), int(high)), size)


def _threshold(img, res, level, b, **_):
    """White where every channel is above ``level``."""
    padded, size = _resized_padded(img, res)
    return _crop(np.where(padded.min(axis=2) > level, 255, 0).astype(np.uint8), size)


def _scribble_xdog(img, res, level, b, **_):
    """Lines where a difference of Gaussians (sigma 0.5 and 5) darkens past ``level``."""
    padded, size = _resized_padded(img, res)
    x = padded.astype(np.float32)
    dog = (255 - np.min(cv2.GaussianBlur(x, (0, 0), 5.0) - cv2.GaussianBlur(x, (0, 0), 0.5), axis=2)).clip(0, 255).astype(np.uint8)
    # uint8 arithmetic, as the extension's: doubling wraps past 255, so the very darkest strokes come out
    # hollow. Kept, so that maps match the ones the extension makes.
    strength = np.uint8(2) * (np.uint8(255) - dog)
    return _crop(np.where(strength > level, 255, 0).astype(np.uint8), size)


def _lineart_standard(img, res, a, b, **_):
    """How much darker each pixel is than its blurred surroundings, scaled by the median of the clearly
    dark ones (at least 16) so that a typical line is mid grey: white lines on black."""
    padded, size = _resized_padded(img, res)
    x = padded.astype(np.float32)
    darkness = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    dark = darkness[darkness > 8]
    scale = max(16, np.median(dark)) if dark.size else 16
    return _crop((darkness / scale * 127).clip(0, 255).astype(np.uint8), size)


def _tile_resample(img, res, rate, b, **_):
    """The picture shrunk by ``rate`` (area-averaged); below 1.1 it is left as it is."""
    if rate < 1.1:
        return img
    height, width = img.shape[:2]
    return cv2.resize(img, (int(width / rate), int(height / rate)), interpolation=cv2.INTER_AREA)


def _blur_gaussian(img, res, sigma, b, **_):
    return cv2.GaussianBlur(_resized(img, res), (0, 0), float(sigma))


def _inpaint(img, res, a, b, *, mask, **_):
    return np.dstack([img, np.where(mask, 0, 255).astype(np.uint8)])


def _color_grid(img, res, a, b, **_):
    """One colour per 64x64 cell. Scaled first by area averaging even when enlarging (the extension's
    colour module has its own short-side resize)."""
    height, width = img.shape[:2]
    size = (res, int(round(height / width * res))) if width <= height else (int(round(width / height * res)), res)
    img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    cells = cv2.resize(img, (size[0] // 64, size[1] // 64), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(cells, size, interpolation=cv2.INTER_NEAREST)


def _shuffle(img, res, a, b, *, seed, **_):
    """The picture's content moved around by a smooth random flow, at 512 on the short side whatever
    the resolution (the extension fixes it so)."""
    img = _resized(img, 512)
    height, width = img.shape[:2]
    rng = np.random.default_rng(seed)
    x = _noise_disk(rng, height, width) * float(width - 1)
    y = _noise_disk(rng, height, width) * float(height - 1)
    return cv2.remap(img, np.dstack([x, y]).astype(np.float32), None, cv2.INTER_LINEAR)


def _noise_disk(rng: np.random.Generator, height: int, width: int, cell: int = 256) -> np.ndarray:
    """Smooth noise in [0, 1]: one uniform value per ``cell`` pixels (and a cell of margin each side),
    enlarged bicubically, the margin cut off, stretched to span 0..1."""
    coarse = rng.uniform(0, 1, (height // cell + 2, width // cell + 2))
    noise = cv2.resize(coarse, (width + 2 * cell, height + 2 * cell), interpolation=cv2.INTER_CUBIC)
    noise = noise[cell : cell + height, cell : cell + width]
    noise = noise - noise.min()
    return noise / noise.max()


# --- The neural modules ------------------------------------------------------------------------------
# Each network is laid out in torch containers whose parameter names are its checkpoint's keys, and run
# by a function beside it: no nn.Module subclasses, so that torch is imported only when one runs. Layer
# widths and counts are read from the file's tensors (the released files give the published networks),
# so a file of another width is loaded as it is rather than refused.


def _conv(weight, **options):
    """A convolution shaped as ``weight`` (out, in, kh, kw); a transposed one's weight is (in, out, kh, kw)."""
    from torch import nn

    out_channels, in_channels, kh, kw = weight.shape
    return nn.Conv2d(in_channels, out_channels, (kh, kw), **options)


def _count(state: dict, pattern: str, start: int = 0) -> int:
    """How many of ``pattern.format(start)``, ``pattern.format(start + 1)``, ... ``state`` holds, in a row."""
    n = 0
    while pattern.format(start + n) in state:
        n += 1
    return n


def _hed_network(state: dict):
    """ControlNetHED_Apache2 (lllyasviel's HED, RGB input): blocks of 3x3 convolutions, each block's last
    output projected to one channel (five blocks of 2, 2, 3, 3 and 3 convolutions in ControlNetHED.pth)."""
    import torch
    from torch import nn

    net = nn.Module()
    net.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
    for i in range(1, _count(state, "block{}.projection.weight", start=1) + 1):
        block = nn.Module()
        convs = _count(state, f"block{i}.convs.{{}}.weight")
        block.convs = nn.Sequential(*(_conv(state[f"block{i}.convs.{j}.weight"], padding=1) for j in range(convs)))
        block.projection = _conv(state[f"block{i}.projection.weight"])
        net.add_module(f"block{i}", block)
    return net


def _hed_sides(net, x):
    """The side outputs: each block halves the size (but the first), then runs its ReLU convolutions."""
    import torch.nn.functional as F

    h, sides = x - net.norm, []
    for i, block in enumerate(module for name, module in net.named_children() if name.startswith("block")):
        if i > 0:
            h = F.max_pool2d(h, 2)
        for conv in block.convs:
            h = F.relu(conv(h))
        sides.append(block.projection(h))
    return sides


def _hed(img, res, a, b, *, weights, device, **_):
    """Soft edges: the mean of HED's side outputs, each enlarged back to the picture, through a sigmoid."""
    import torch

    padded, size = _resized_padded(img, res)
    net, device = _load_network(weights, _hed_network, _hed_sides, device)
    with torch.inference_mode():
        x = torch.from_numpy(padded).to(device, torch.float32).permute(2, 0, 1)[None]
        sides = [side[0, 0].cpu().numpy() for side in _hed_sides(net, x)]
    height, width = padded.shape[:2]
    mean = np.stack([cv2.resize(s, (width, height), interpolation=cv2.INTER_LINEAR) for s in sides], axis=2).mean(axis=2)
    edge = 1 / (1 + np.exp(-mean.astype(np.float64)))
    return _crop((edge * 255.0).clip(0, 255).astype(np.uint8), size)


def _lineart_network(state: dict):
    """The informative-drawings Generator that sk_model.pth and sk_model2.pth hold (64 channels, 3 residual
    blocks): reflection-padded convolutions with instance norms, down twice, residual blocks, up twice, sigmoid."""
    from torch import nn

    def stage(conv):
        return [conv, nn.InstanceNorm2d(conv.out_channels), nn.ReLU()]

    def up(weight):
        in_channels, out_channels, kh, kw = weight.shape
        return nn.ConvTranspose2d(in_channels, out_channels, (kh, kw), 2, 1, output_padding=1)

    def residual(i):
        block = nn.Module()
        first, second = (state[f"model2.{i}.conv_block.{j}.weight"] for j in (1, 5))
        block.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), *stage(_conv(first)), nn.ReflectionPad2d(1), _conv(second), nn.InstanceNorm2d(second.shape[0])
        )
        return block

    net = nn.Module()
    net.model0 = nn.Sequential(nn.ReflectionPad2d(3), *stage(_conv(state["model0.1.weight"])))
    down = (_conv(state[f"model1.{i}.weight"], stride=2, padding=1) for i in (0, 3))
    net.model1 = nn.Sequential(*(layer for conv in down for layer in stage(conv)))
    net.model2 = nn.Sequential(*(residual(i) for i in range(_count(state, "model2.{}.conv_block.1.weight"))))
    net.model3 = nn.Sequential(*stage(up(state["model3.0.weight"])), *stage(up(state["model3.3.weight"])))
    net.model4 = nn.Sequential(nn.ReflectionPad2d(3), _conv(state["model4.1.weight"]), nn.Sigmoid())
    return net


def _lineart_forward(net, x):
    h = net.model1(net.model0(x))
    for block in net.model2:
        h = h + block.conv_block(h)
    return net.model4(net.model3(h))


def _lineart(img, res, a, b, *, weights, device, **_):
    """White lines on black: the network draws dark lines on white, inverted as the extension does."""
    import torch

    padded, size = _resized_padded(img, res)
    net, device = _load_network(weights, _lineart_network, _lineart_forward, device)
    with torch.inference_mode():
        x = torch.from_numpy(padded).to(device, torch.float32).permute(2, 0, 1)[None] / 255.0
        line = _lineart_forward(net, x)[0, 0].cpu().numpy()
    return _crop(255 - (line * 255.0).clip(0, 255).astype(np.uint8), size)


def _load_network(path: Path, build: Callable, forward: Callable, device: str):
    """``build(tensors)`` loaded with the tensors of ``path`` (read weights-only), in float32 on ``device``.
    Its layout is read from the tensors, so it is tried on a 16x16 picture: widths that do not chain
    fail here, as a file error, rather than in the middle of a map."""
    import torch

    from lienzo.devices import pick_device
    from lienzo.models.formats import load_state_dict

    try:
        state = load_state_dict(path)
    except ModelFileError as err:
        raise ModelFileError(f"{path}: {err}") from None
    try:
        net = build(state)
        net.load_state_dict(state)
        with torch.inference_mode():
            forward(net.float().eval(), torch.zeros(1, 3, 16, 16))
    except KeyError as err:
        raise ModelFileError(f"{path} does not hold the network its name says: it has no tensor {err.args[0]}") from None
    except (ValueError, RuntimeError) as err:
        # ValueError: a tensor the layout is read from is of another rank; RuntimeError: torch's report of
        # missing, unexpected or misshapen tensors (its second line says which), or of widths that do not chain.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s)") else lines[0]
        raise ModelFileError(f"{path} does not hold the network its name says: {detail[:300]}") from None
    torch_device = pick_device(device)
    return net.to(torch_device), torch_device


# --- The table ---------------------------------------------------------------------------------------


def _module(name: str, run: Callable | None, *sliders: Slider, alias: str | None = None, annotator: str | None = None, **needs):
    return Preprocessor(name, alias or name, tuple(sliders), annotator is None, annotator, run=run, **needs)


PREPROCESSORS: dict[str, Preprocessor] = {
    p.name: p
    for p in (
        _module("none", _identity),
        _module("invert", _invert, alias="invert (from white bg & black line)"),
        _module("canny", _canny, RESOLUTION, Slider("Low Threshold", 100, 1, 255), Slider("High Threshold", 200, 1, 255)),
        _module("threshold", _threshold, RESOLUTION, Slider("Binarization Threshold", 127, 0, 255)),
        _module("scribble_xdog", _scribble_xdog, RESOLUTION, Slider("XDoG Threshold", 32, 1, 64)),
        _module("lineart_standard", _lineart_standard, RESOLUTION, alias="lineart_standard (from white bg & black line)"),
        _module("hed", _hed, RESOLUTION, alias="softedge_hed", annotator="ControlNetHED.pth"),
        _module("lineart", _lineart, RESOLUTION, alias="lineart_realistic", annotator="sk_model.pth"),
        _module("lineart_coarse", _lineart, RESOLUTION, annotator="sk_model2.pth"),
        _module("tile_resample", _tile_resample, Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01)),
        _module("blur_gaussian", _blur_gaussian, RESOLUTION, Slider("Sigma", 9.0, 0.01, 64.0, 0.01)),
        _module("inpaint", _inpaint, alias="inpaint_global_harmonious", takes_mask=True),
        _module("inpaint_only", _inpaint, takes_mask=True),
        _module("shuffle", _shuffle, seeded=True),
        _module("color", _color_grid, RESOLUTION, alias="t2ia_color_grid"),
    )
}
# The extension's IP-Adapter modules (its newer releases call the first two ip-adapter_clip_h and _g). Units and
# find_preprocessor take them; they are kept apart from PREPROCESSORS, the modules that make a map (and so what
# the detect command and the module lists offer), because they make none.
IP_ADAPTER_MODULES: dict[str, Preprocessor] = {
    p.name: p
    for p in (
        _module("ip-adapter_clip_sd15", None, alias="ip-adapter_clip_h", embeds=True),
        _module("ip-adapter_clip_sdxl", None, alias="ip-adapter_clip_g", embeds=True),
        _module("ip-adapter_clip_sdxl_plus_vith", None, embeds=True),
        _module("ip-adapter-auto", None, embeds=True),
    )
}
