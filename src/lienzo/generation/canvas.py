"""Masks and canvases for inpainting and outpainting, shaped after AUTOMATIC1111's ``masking.py``.

Masks are PIL images of mode "L": white (255) = repaint, black (0) = keep. Regions are
``(x1, y1, x2, y2)`` pixel boxes with exclusive ends, as PIL's ``getbbox`` and ``crop`` use.
"""

import math
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
from PIL import Image, ImageFilter

from lienzo.errors import InvalidRequestError

Region = tuple[int, int, int, int]

# Largest outpainted canvas side: the same 4096 px ceiling as generation width and height.
MAX_CANVAS_SIDE = 4096

# AUTOMATIC1111's "fill" schedule: (blur radius, times composited), widest first, so pixels deep
# in a hole get the average colour of a wide area and pixels near its edge their neighbours'.
_FILL_SCHEDULE = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """Feather ``mask`` with a Gaussian blur of ``radius`` px (A1111 "Mask blur"); 0 returns a copy."""
    if radius < 0:
        raise InvalidRequestError("mask_blur", f"must be 0 or more pixels, got {radius}")
    mask = mask.convert("L")
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius else mask.copy()


def _box_blur(planes: np.ndarray, half: int, axis: int) -> np.ndarray:
    """Mean over a window of ``2 * half + 1`` pixels along ``axis``, edges extended; O(1) per pixel."""
    pad = [(0, 0)] * planes.ndim
    pad[axis] = (half + 1, half)
    sums = np.moveaxis(np.cumsum(np.pad(planes, pad, mode="edge"), axis=axis), axis, 0)
    n, width = planes.shape[axis], 2 * half + 1
    return np.moveaxis((sums[width : width + n] - sums[:n]) / width, 0, axis)


def _resize_planes(planes: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resize each float plane of a (height, width, planes) array to ``size`` = (width, height)."""
    planes = [np.ascontiguousarray(planes[..., i]) for i in range(planes.shape[-1])]
    return np.stack([np.asarray(Image.fromarray(plane).resize(size, resample)) for plane in planes], axis=-1)


def _gaussian_blur(planes: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a (height, width, planes) float array, as three box blurs per axis.

    Three boxes of half-width r have variance r(r + 1), so r is chosen to make that sigma^2
    (the central limit theorem does the rest). Pillow cannot blur float images, and an exact
    kernel at sigma 256 would be 1,500 taps wide. Wide blurs run at 1/(sigma // 8) scale: they
    keep nothing finer than that, and at sigma 256 a 1024 px canvas shrinks to 32 px.
    """
    if sigma == 0:
        return planes
    step = max(1, int(sigma) // 8)
    height, width = planes.shape[:2]
    if step > 1:
        small = (math.ceil(width / step), math.ceil(height / step))
        planes = _resize_planes(planes, small, Image.Resampling.BOX)
    scaled = sigma / step
    half = max(1, round(math.sqrt(scaled * scaled + 0.25) - 0.5))
    for axis in (0, 1):
        for _ in range(3):
            planes = _box_blur(planes, half, axis)
    if step > 1:
        planes = _resize_planes(planes, (width, height), Image.Resampling.BILINEAR)
    return planes


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content: the masked area painted with colours spread from around it.

    The unmasked pixels are blurred at decreasing radii and each blur is divided by the blurred
    coverage, so a hole's colour is the average of the pixels that reach it, never darkened by
    the missing ones; the layers are composited widest first, as A1111 does. Unmasked pixels
    (mask 0) come back unchanged. Where no unmasked pixel reaches (over 768 px away), the
    average unmasked colour is used, or mid-grey when everything is masked.
    """
    colour = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    keep = 1 - np.asarray(mask.convert("L"), dtype=np.float32) / 255
    # Premultiplied colour and coverage of the "over" composite of the blurred layers.
    painted = np.zeros_like(colour)
    coverage = np.zeros_like(keep)
    for radius, repeats in _FILL_SCHEDULE:
        premultiplied = np.concatenate([colour * keep[..., None], keep[..., None]], axis=-1)
        blurred = _gaussian_blur(premultiplied, radius)
        layer, layer_alpha = blurred[..., :3], blurred[..., 3]
        for _ in range(repeats):
            painted = layer + painted * (1 - layer_alpha[..., None])
            coverage = layer_alpha + coverage * (1 - layer_alpha)
    fallback = (colour * keep[..., None]).sum((0, 1)) / keep.sum() if keep.sum() > 0 else np.full(3, 0.5)
    reached = coverage[..., None] > 1e-6
    result = np.where(reached, painted / np.maximum(coverage, 1e-6)[..., None], fallback)
    return Image.fromarray(np.clip(result * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")


def crop_region(mask: Image.Image, padding: int) -> Region:
    """Bounding box of the mask's nonzero pixels grown by ``padding`` px, clamped to the image."""
    if padding < 0:
        raise InvalidRequestError("padding", f"must be 0 or more pixels, got {padding}")
    mask = mask.convert("L")
    box = mask.getbbox()
    if box is None:
        raise InvalidRequestError("mask", "mask is empty: paint the area to repaint in white")
    x1, y1, x2, y2 = box
    width, height = mask.size
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, width), min(y2 + padding, height)


def _grow_span(start: int, end: int, length: int, limit: int) -> tuple[int, int]:
    """Grow ``[start, end)`` to ``length`` around its centre, shifted back inside ``[0, limit)``."""
    extra = length - (end - start)
    start, end = start - extra // 2, end + extra - extra // 2
    if end > limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


def expand_to_aspect(region: Region, target_w: int, target_h: int, image_w: int, image_h: int) -> Region:
    """Grow ``region`` until its aspect ratio is ``target_w:target_h`` (A1111 ``expand_crop_region``).

    Only the short side grows, equally both ways; a side that would leave the image is shifted
    back in, and when the image itself is too small the region stops at its edges.
    """
    x1, y1, x2, y2 = region
    width, height = x2 - x1, y2 - y1
    if width * target_h > height * target_w:
        y1, y2 = _grow_span(y1, y2, round(width * target_h / target_w), image_h)
    else:
        x1, x2 = _grow_span(x1, x2, round(height * target_w / target_h), image_w)
    return x1, y1, x2, y2


@dataclass
class OnlyMaskedCrop:
    """The part of an image that "inpaint only masked" generates at full resolution.

    ``region`` is where it sits in the full image; ``image`` and ``mask`` are that region
    resized to the generation width and height.
    """

    region: Region
    image: Image.Image
    mask: Image.Image


def crop_to_mask(image: Image.Image, mask: Image.Image, padding: int, width: int, height: int) -> OnlyMaskedCrop:
    """Cut out the masked area plus ``padding``, widened to the ``width:height`` aspect, resized to it.

    Pass the blurred mask, as A1111 does, so the crop also holds the feathered edge.
    """
    region = expand_to_aspect(crop_region(mask, padding), width, height, image.width, image.height)
    size = (width, height)
    return OnlyMaskedCrop(
        region=region,
        image=image.convert("RGB").crop(region).resize(size, Image.Resampling.LANCZOS),
        mask=mask.convert("L").crop(region).resize(size, Image.Resampling.LANCZOS),
    )


def paste_back(
    original: Image.Image, generated_crop: Image.Image, crop: OnlyMaskedCrop, blurred_mask: Image.Image
) -> Image.Image:
    """Put a generated "only masked" crop back into ``original``, only where the full-size mask is set."""
    x1, y1, x2, y2 = crop.region
    original = original.convert("RGB")
    canvas = original.copy()
    canvas.paste(generated_crop.convert("RGB").resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
    return Image.composite(canvas, original, blurred_mask.convert("L"))


def composite_unmasked(original: Image.Image, generated: Image.Image, blurred_mask: Image.Image) -> Image.Image:
    """Keep ``original`` outside the mask and blend in ``generated`` by it (A1111 "apply overlay").

    The VAE round trip shifts every pixel a little; this keeps the unmasked ones exact.
    """
    if generated.size != original.size or blurred_mask.size != original.size:
        raise ValueError(
            f"sizes differ: original {original.size}, generated {generated.size}, mask {blurred_mask.size}"
        )
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), blurred_mask.convert("L"))


class ResizeMode(IntEnum):
    """How an input image is fitted to another size; the numbers are A1111's ``resize_mode``."""

    JUST_RESIZE = 0  # stretch
    CROP_AND_RESIZE = 1  # scale to cover, crop the middle
    RESIZE_AND_FILL = 2  # scale to fit, fill the bands by stretching the picture's edge rows or columns
    LATENT_UPSCALE = 3  # A1111 stretches the latents; lienzo stretches the image, as JUST_RESIZE


def resize_image(image: Image.Image, width: int, height: int, mode: ResizeMode) -> Image.Image:
    """``image`` at ``width`` x ``height`` by A1111's resize ``mode`` (LANCZOS throughout)."""
    if image.size == (width, height):
        return image
    lanczos = Image.Resampling.LANCZOS
    if mode in (ResizeMode.JUST_RESIZE, ResizeMode.LATENT_UPSCALE):
        return image.resize((width, height), lanczos)
    scale = (max if mode == ResizeMode.CROP_AND_RESIZE else min)(width / image.width, height / image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    resized = image.resize((w, h), lanczos)
    if mode == ResizeMode.CROP_AND_RESIZE:
        left, top = (w - width) // 2, (h - height) // 2
        return resized.crop((left, top, left + width, top + height))
    return _fill_bands(resized, width, height)


def _fill_bands(resized: Image.Image, width: int, height: int) -> Image.Image:
    """``resized`` centred on a ``width`` x ``height`` canvas, the bands around it filled by stretching
    its outermost row or column (A1111's "resize and fill")."""
    lanczos = Image.Resampling.LANCZOS
    w, h = resized.size
    out = Image.new(resized.mode, (width, height))
    left, top = (width - w) // 2, (height - h) // 2
    out.paste(resized, (left, top))
    if top > 0:
        out.paste(resized.crop((0, 0, w, 1)).resize((w, top), lanczos), (left, 0))
    if height - top - h > 0:
        out.paste(resized.crop((0, h - 1, w, h)).resize((w, height - top - h), lanczos), (left, top + h))
    if left > 0:
        out.paste(resized.crop((0, 0, 1, h)).resize((left, h), lanczos), (0, top))
    if width - left - w > 0:
        out.paste(resized.crop((w - 1, 0, w, h)).resize((width - left - w, h), lanczos), (left + w, top))
    return out


def _check_outpaint(image: Image.Image, amounts: dict[str, int], overlap: int) -> None:
    """Raise InvalidRequestError naming the first outpainting amount that is out of range."""
    for field, amount in amounts.items():
        if amount < 0 or amount % 8:
            raise InvalidRequestError(field, f"must be a multiple of 8 and 0 or more pixels, got {amount}")
    if not any(amounts.values()):
        raise InvalidRequestError("outpaint", "left, right, up and down are all 0; grow at least one side")
    if overlap < 0:
        raise InvalidRequestError("overlap", f"must be 0 or more pixels, got {overlap}")
    for (a, b), side, axis in ((("left", "right"), image.width, "wide"), (("up", "down"), image.height, "tall")):
        total = side + amounts[a] + amounts[b]
        if total > MAX_CANVAS_SIDE:
            field = b if amounts[b] >= amounts[a] else a
            raise InvalidRequestError(
                field,
                f"the canvas would be {total} px {axis} ({side} + {a} {amounts[a]} + {b} {amounts[b]}); "
                f"the most is {MAX_CANVAS_SIDE}",
            )


def grow_canvas(
    image: Image.Image, left: int, right: int, up: int, down: int, *, overlap: int = 8
) -> tuple[Image.Image, Image.Image]:
    """Outpainting: a larger canvas with ``image`` inside, and the mask of what to paint.

    The new area is pre-filled with ``fill_masked`` so denoising starts from colours that
    continue the old edges. The mask is white over the new area and reaches ``overlap`` px
    into the old image on each grown side, so the seam is repainted too; use an overlap at
    least as wide as the mask blur, or the feather fades out over untouched pixels.
    """
    # 1. Validate
    _check_outpaint(image, {"left": left, "right": right, "up": up, "down": down}, overlap)
    # 2. Place the old image and pre-fill around it
    width, height = image.width + left + right, image.height + up + down
    canvas = Image.new("RGB", (width, height))
    canvas.paste(image.convert("RGB"), (left, up))
    new_area = Image.new("L", (width, height), 255)
    new_area.paste(0, (left, up, left + image.width, up + image.height))
    filled = fill_masked(canvas, new_area)
    # 3. The mask: the new area plus the overlap on the grown sides
    keep = (
        left + (overlap if left else 0),
        up + (overlap if up else 0),
        left + image.width - (overlap if right else 0),
        up + image.height - (overlap if down else 0),
    )
    mask = Image.new("L", (width, height), 255)
    if keep[0] < keep[2] and keep[1] < keep[3]:
        mask.paste(0, keep)
    return filled, mask


def mask_to_latent(mask: Image.Image, latent_h: int, latent_w: int) -> torch.Tensor:
    """The mask at latent resolution, shape (1, 1, latent_h, latent_w), values 0. or 1. (1 = repaint).

    Each latent pixel takes the fraction of its pixel block that is masked (box downscale) and
    is binarised at 0.5, as diffusers' inpainting mask processor (``mask >= 0.5``) and A1111's
    rounded latent mask do: a latent pixel is repainted when at least half its block is masked.
    Binary, so the 4-channel blend ``init * (1 - m) + latents * m`` never mixes noise levels;
    the blurred pixel-space mask restores the soft edge afterwards (``composite_unmasked``).
    """
    small = mask.convert("L").resize((latent_w, latent_h), Image.Resampling.BOX)
    fraction = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255)
    return (fraction >= 0.5).float()[None, None]
