"""Tiled inference: a super-resolution model run over overlapping windows, blended back without seams.

Written here because spandrel runs a model on a whole image only, and a whole image does not fit: a 4x
ESRGAN on 2048² holds 64-channel activations at the input's full size in every one of its 350 convolutions,
tens of GB. Windows of ``tile`` input pixels (at most) overlap by a quarter of a tile. In each overlap the
outer quarter on either side is context only (weight 0: a convolution near a window's edge sees zero
padding where the neighbour has pixels) and the middle half is a linear cross-fade, so the two windows'
weights add up to exactly 1 at every pixel. The windows form a grid and a pixel's weight is the product
of its row and column weights, so all windows' weights add up to 1 everywhere: the output is accumulated
once, in one buffer, with no normalisation pass.
"""

import math
from collections.abc import Callable

import torch

from lienzo.models.formats import stop_if_cancelled

def windows(length: int, tile: int) -> tuple[list[int], int]:
    """The windows along one axis: where they start, and their common size. As few as cover ``length`` with
    windows of at most ``tile`` overlapping by a quarter of one, then shrunk to share ``length`` evenly
    (two windows over 256 pixels are 152 each, not 192: less work for the same overlap). The first starts
    at 0, the last ends at ``length``; the steps differ by a pixel at most and stay over a third of a
    window, which keeps every cross-fade clear of the next."""
    if length <= tile:
        return [0], length
    overlap = tile // 4
    count = math.ceil((length - overlap) / (tile - overlap))
    size = min(tile, math.ceil((length + (count - 1) * overlap) / count))
    return [round(i * (length - size) / (count - 1)) for i in range(count)], size


def axis_weights(starts: list[int], size: int, scale: int) -> list[torch.Tensor]:
    """Each window's weight along one axis, per output pixel (``size * scale`` of them): 1 where it alone
    counts, 0 in the context quarter of an overlap, a linear ramp between, complementing its neighbour's."""
    centres = torch.arange(size * scale, dtype=torch.float64).add_(0.5).div_(scale)  # in input pixels, from the window's start
    weights = []
    for i, start in enumerate(starts):
        weight = torch.ones(size * scale, dtype=torch.float64)
        if i > 0:
            weight *= _rise(centres + start, starts[i], starts[i - 1] + size)
        if i + 1 < len(starts):
            weight *= 1 - _rise(centres + start, starts[i + 1], start + size)
        weights.append(weight.float())
    return weights


def _rise(x: torch.Tensor, begin: int, end: int) -> torch.Tensor:
    """0 up to a quarter into the overlap [begin, end), 1 from three quarters on, linear between."""
    quarter = (end - begin) / 4
    return ((x - begin - quarter) / (2 * quarter)).clamp_(0, 1)


def run_tiled(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    scale: int,
    tile: int,
    cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """``model`` (1, C, h, w) -> (1, C', h*scale, w*scale) over ``image`` (1, C, H, W) in windows of at most
    ``tile`` pixels; the blended result as float32 (C', H*scale, W*scale) on the CPU. ``cancel`` is asked
    before every window (GenerationCancelled)."""
    _, _, height, width = image.shape
    (rows, tile_h), (columns, tile_w) = windows(height, tile), windows(width, tile)
    row_weights, column_weights = axis_weights(rows, tile_h, scale), axis_weights(columns, tile_w, scale)
    out: torch.Tensor | None = None
    for top, row_weight in zip(rows, row_weights):
        for left, column_weight in zip(columns, column_weights):
            stop_if_cancelled(cancel)
            piece = model(image[:, :, top : top + tile_h, left : left + tile_w])[0].float().cpu()
            if out is None:
                out = torch.zeros((piece.shape[0], height * scale, width * scale), dtype=torch.float32)
            y, x = top * scale, left * scale
            out[:, y : y + tile_h * scale, x : x + tile_w * scale].addcmul_(piece, row_weight[:, None] * column_weight[None, :])
    return out
