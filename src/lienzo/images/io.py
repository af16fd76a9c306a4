"""Reading input images and masks, and writing outputs so that a crash never leaves half a file."""

import io
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from lienzo.errors import ImageFileError, InvalidRequestError
from lienzo.files import finished_temp, write_atomic

# Modes that carry an alpha channel; palette and RGB images may also carry a tRNS chunk.
_ALPHA_MODES = ("RGBA", "LA", "PA")
# An input image's original file bytes, kept in ``image.info`` only when they hold Content Credentials (a
# C2PA manifest): a picture made from it names the file as it was, manifest and all, as its ingredient
# (lienzo.images.credentials). Others keep no bytes, so memory is not doubled for them.
SOURCE_KEY = "lienzo.source"


def _open(path: str | Path, field: str, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode ``path``, turned upright by its EXIF orientation; errors name ``field``;
    ``max_pixels`` as in :func:`_decode`."""
    path = Path(path)
    if path.is_dir():
        raise ImageFileError(f"{field}: {path} is a folder, not an image file")
    if not path.is_file():
        raise ImageFileError(f"{field}: no such file: {path}")
    if path.stat().st_size == 0:
        raise ImageFileError(f"{field}: {path} is empty (0 bytes)")
    try:
        return _decode(path, field, str(path), max_pixels)
    except PermissionError as err:
        raise ImageFileError(f"{field}: cannot read {path}: permission denied") from err


def _decode(source, field: str, what: str, max_pixels: int | None = None) -> Image.Image:
    """Decode every pixel of ``source`` (a path or file object), upright; ``max_pixels`` is checked
    against the declared size before any pixel is decoded, so a tiny file claiming 100000x100000
    costs nothing."""
    try:
        with Image.open(source) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                w, h = image.size
                raise ImageFileError(
                    f"{field}: {what} is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,} (max_input_pixels, LIENZO_MAX_INPUT_PIXELS)"
                )
            # Decode every pixel now: Image.open reads only the header, so a truncated
            # file would otherwise fail later, in the middle of a generation.
            image.load()
            return ImageOps.exif_transpose(image)
    except UnidentifiedImageError as err:
        raise ImageFileError(f"{field}: {what} is not an image file (PNG, JPEG, WebP, ...)") from err
    except Image.DecompressionBombError as err:
        raise ImageFileError(f"{field}: {what} is too large to open safely: {err}") from err
    except (ImageFileError, PermissionError):
        raise
    except (OSError, SyntaxError, ValueError) as err:
        # Pillow reports broken data as OSError ("image file is truncated"), SyntaxError
        # ("broken PNG file") or ValueError, depending on the format and where it breaks.
        raise ImageFileError(f"{field}: {what} is truncated or corrupt ({err})") from err


def decode_image(data: bytes, *, field: str = "image", max_pixels: int) -> Image.Image:
    """An uploaded image (bytes) as RGB with transparency on white, as :func:`load_image`;
    ``max_pixels`` guards against image bombs."""
    if not data:
        raise ImageFileError(f"{field}: the image is empty (0 bytes)")
    return _keep_source(flatten(_decode(io.BytesIO(data), field, "the uploaded image", max_pixels)), data)


def decode_mask(data: bytes, size: tuple[int, int], *, field: str = "mask", max_pixels: int) -> Image.Image:
    """An uploaded mask, read as :func:`load_mask` reads a file."""
    if not data:
        raise ImageFileError(f"{field}: the mask is empty (0 bytes)")
    return _mask(_decode(io.BytesIO(data), field, "the uploaded mask", max_pixels), size, field)


def _has_alpha(image: Image.Image) -> bool:
    """True when ``image`` carries transparency: an alpha channel or a tRNS colour key."""
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def load_image(path: str | Path, *, field: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Read an input image as RGB, upright, with any transparency composited onto white; one over
    ``max_pixels`` is refused before its pixels are decoded.

    White, because it is the background editors show behind transparency and the one
    AUTOMATIC1111 flattens img2img inputs onto by default.
    """
    image = flatten(_open(path, field, max_pixels))
    return _keep_source(image, Path(path).read_bytes())


def _keep_source(image: Image.Image, data: bytes) -> Image.Image:
    """``image`` with ``data`` kept as its :data:`SOURCE_KEY` when it holds C2PA data. The test is a
    cheap one: every C2PA manifest store is a JUMBF box (type ``jumb``) labelled ``c2pa``; a false
    positive only keeps bytes that were not needed."""
    if b"jumb" in data and b"c2pa" in data:
        image.info[SOURCE_KEY] = data
    return image


def flatten(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white."""
    if not _has_alpha(image):
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_mask(path: str | Path, size: tuple[int, int], *, field: str = "mask", max_pixels: int | None = None) -> Image.Image:
    """Read an inpainting mask as mode "L": white (255) = repaint, black (0) = keep, as AUTOMATIC1111.

    A mask with some transparency is read from its alpha channel (opaque strokes painted on a
    transparent layer are the area to repaint); a fully opaque one from its luminance.
    ``size`` is the (width, height) of the image the mask belongs to; they must match. One over
    ``max_pixels`` is refused before its pixels are decoded.
    """
    return _mask(_open(path, field, max_pixels), size, field)


def _mask(image: Image.Image, size: tuple[int, int], field: str) -> Image.Image:
    mask = image.convert("L")
    if _has_alpha(image):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            mask = alpha
    if mask.size != tuple(size):
        (mw, mh), (iw, ih) = mask.size, size
        raise InvalidRequestError(field, f"mask is {mw}x{mh} but the image is {iw}x{ih}; they must match")
    return mask


def save_png_atomic(image: Image.Image, path: str | Path, pnginfo: PngInfo | None = None) -> Path:
    """Write ``image`` as PNG to ``path`` so that readers see either no file or the whole file."""
    return write_atomic(path, lambda file: image.save(file, format="PNG", pnginfo=pnginfo))


def save_png_numbered(image: Image.Image, out_dir: str | Path, seed: int, pnginfo: PngInfo | None = None, prefix: str = "") -> Path:
    """Write ``image`` as the next numbered PNG in ``out_dir`` (see :func:`next_image_path`) and return its path.

    Several writers may save into one folder at once (two ``lienzo generate`` with the same seed want
    the same name), so the name is claimed atomically: the finished temporary file is hard-linked to
    it, which fails when the name is taken, and then the next number is tried. Readers see no file or
    the whole file. Where the file system has no hard links (FAT, exFAT, some network shares) the name
    is claimed by creating it exclusively and the temporary file is renamed over it: an empty file shows
    for that moment.
    """
    return save_numbered(lambda file: image.save(file, format="PNG", pnginfo=pnginfo), out_dir, seed, prefix)


def save_numbered(write: Callable[[BinaryIO], object], out_dir: str | Path, seed: int, prefix: str = "") -> Path:
    """What ``write(file)`` writes (a whole PNG: the signed bytes of one, say), saved as
    :func:`save_png_numbered` saves an image, and its path."""
    out_dir = Path(out_dir)
    with finished_temp(out_dir / f"{prefix}{seed}.png", write) as temp_name:
        while True:
            path = next_image_path(out_dir, seed, prefix)
            try:
                os.link(temp_name, path)
                return path
            except FileExistsError:
                continue  # another writer took this number after the scan: the next scan sees it
            except OSError:
                pass  # no hard links here; a real failure (disk full, read-only) recurs just below
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                continue
            os.replace(temp_name, path)
            return path


def next_image_path(out_dir: str | Path, seed: int, prefix: str = "") -> Path:
    """The next output path in ``out_dir``, numbered as AUTOMATIC1111 does: ``{prefix}00012-1234.png``.

    The 5-digit counter continues from the highest number already used by a file named
    ``{prefix}<digits>-...`` in the folder (0 for an empty or missing folder); the seed follows.
    Another writer may take it before it is written: :func:`save_png_numbered` claims it atomically.
    """
    out_dir = Path(out_dir)
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)-")
    used = [int(m.group(1)) for p in out_dir.glob("*") if (m := pattern.match(p.name))]
    counter = max(used, default=-1) + 1
    return out_dir / f"{prefix}{counter:05d}-{seed}.png"
