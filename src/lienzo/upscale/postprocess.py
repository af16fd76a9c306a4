"""A1111's "Upscale" postprocessing step (its extras tab and API, ``scripts/postprocessing_upscale.py``):
scale by a factor or to a size (cropped to fit), a second upscaler blended in, and what it writes down.

A1111 keeps the input's PNG text (``parameters`` included) and adds the step's own infotext,
"Postprocess upscale by: 2, Postprocess upscaler: 4x-UltraSharp", under ``postprocessing`` and ``extras``.
lienzo also appends it to ``parameters``, on its line of pairs, so that tools reading only ``parameters``
(lienzo's gallery, PNG-info readers) see the image was upscaled while the generation settings still read
back: a line of its own would become part of the prompt in A1111's reader, which takes only a last line
of three or more pairs for settings.
"""

import html
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lienzo.errors import InvalidRequestError
from lienzo.images.metadata import PARAMETERS_KEY, format_infotext, parameters_from, parse_infotext
from lienzo.upscale.upscalers import MAX_SCALE, MIN_SCALE, Upscaler, target_size, upscale

# Image.info entries that describe the file rather than the picture (A1111's IGNORED_INFO_KEYS less those
# that are never text); they are not copied to the output.
_FILE_KEYS = {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background", "timestamp", "duration",
              "progressive", "progression", "icc_profile", "chromaticity", "photoshop"}
SECTION_KEYS = ("postprocessing", "extras")


@dataclass(frozen=True)
class Resize:
    """By a factor (A1111's resize_mode 0), or to ``width`` x ``height`` (mode 1): the factor that covers
    both sides, then, with ``crop``, the middle of it. ``field`` names the request's field(s) in errors."""

    scale: float | None = None
    width: int | None = None
    height: int | None = None
    crop: bool = True
    field: str = "scale"

    def factor(self, size: tuple[int, int]) -> float:
        factor = self.scale if self.scale is not None else max(self.width / size[0], self.height / size[1])
        if not MIN_SCALE <= factor <= MAX_SCALE:
            what = f"{factor:g}" if self.scale is not None else f"{factor:.3g} for {self.width}x{self.height} from {size[0]}x{size[1]}"
            raise InvalidRequestError(self.field, f"the upscale factor must be between {MIN_SCALE} and {MAX_SCALE}, got {what}")
        return factor

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The result's size for an input of ``size``; the factor checked first."""
        factor = self.factor(size)
        return (self.width, self.height) if self.scale is None and self.crop else target_size(size, factor)


def run_upscale(
    image: Image.Image,
    resize: Resize,
    first: Upscaler,
    second: Upscaler | None = None,
    visibility: float = 0.0,
    *,
    device: str = "cpu",
    tile: int = 192,
    cancel: Callable[[], bool] | None = None,
) -> tuple[Image.Image, dict[str, object]]:
    """A1111's upscale step on an RGB ``image``: the result and the infotext pairs it adds, in its order.
    ``second`` is blended over ``first``'s result at ``visibility`` (0: not run)."""
    info: dict[str, object] = {}
    factor = resize.factor(image.size)
    if resize.scale is None:
        info["Postprocess upscale to"] = f"{resize.width}x{resize.height}"
    else:
        info["Postprocess upscale by"] = f"{resize.scale:g}"
    out = _crop(upscale(image, first, factor, device=device, tile=tile, cancel=cancel), resize, info)
    info["Postprocess upscaler"] = first.name
    if second is not None and visibility > 0:
        other = _crop(upscale(image, second, factor, device=device, tile=tile, cancel=cancel), resize, info)
        out = Image.blend(out, other, visibility)
        info["Postprocess upscaler 2"] = second.name
    return out, info


def _crop(image: Image.Image, resize: Resize, info: dict[str, object]) -> Image.Image:
    """The middle ``width`` x ``height`` of an image that covers it, as A1111's "Crop to fit"."""
    if resize.scale is not None or not resize.crop:
        return image
    cropped = Image.new("RGB", (resize.width, resize.height))
    cropped.paste(image, (resize.width // 2 - image.width // 2, resize.height // 2 - image.height // 2))
    info["Postprocess crop to"] = f"{cropped.width}x{cropped.height}"
    return cropped


def infotext(info: dict[str, object]) -> str:
    """The pairs as one infotext line: "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"."""
    return format_infotext("", "", info)


def html_info(text: str) -> str:
    """A1111's ``html_info``: the infotext as an HTML paragraph (``ui_common.plaintext_to_html``)."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def source_text(image: Image.Image) -> dict[str, str]:
    """The input's text that travels with the output: its PNG text chunks, and ``parameters`` (from a PNG
    chunk or a JPEG's or WebP's EXIF UserComment)."""
    text = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str) and k not in _FILE_KEYS}
    parameters = parameters_from(image)
    if parameters:
        text[PARAMETERS_KEY] = parameters
    return text


def output_text(source: dict[str, str], step: str) -> dict[str, str]:
    """``source`` with the step's infotext under A1111's keys and appended to ``parameters`` (see the module's doc)."""
    text = {**source, **dict.fromkeys(SECTION_KEYS, step)}
    parameters = source.get(PARAMETERS_KEY)
    if parameters:
        on_pairs_line = bool(parse_infotext(parameters).params)
        text[PARAMETERS_KEY] = f"{parameters.rstrip()}{', ' if on_pairs_line else chr(10)}{step}"
    return text


def png_info(text: dict[str, str]) -> PngInfo:
    """PNG text chunks; Pillow writes text that is not Latin-1 as iTXt."""
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    return info
