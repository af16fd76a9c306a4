"""Masks and canvases for inpainting and outpainting, on small synthetic images."""

import numpy as np
import pytest
import torch
from PIL import Image

from lienzo.errors import InvalidRequestError
from lienzo.generation.canvas import (
    OnlyMaskedCrop,
    blur_mask,
    composite_unmasked,
    crop_region,
    crop_to_mask,
    expand_to_aspect,
    fill_masked,
    grow_canvas,
    mask_to_latent,
    paste_back,
)

W, H = 64, 48


def box_mask(box, size=(W, H)) -> Image.Image:
    """A black mask with a white box."""
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def red_blue() -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", (W, H), (255, 0, 0))
    image.paste((0, 0, 255), (W // 2, 0, W, H))
    return image


def noise(seed: int, size=(W, H)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


# blur_mask


def test_blur_mask_zero_is_a_copy():
    mask = box_mask((10, 10, 20, 20))
    blurred = blur_mask(mask, 0)
    assert blurred is not mask
    assert blurred.tobytes() == mask.tobytes()


def test_blur_mask_feathers_edges():
    blurred = np.asarray(blur_mask(box_mask((20, 10, 40, 30)), 4))
    assert blurred[20, 30] > 240  # centre stays masked
    assert 0 < blurred[20, 18] < 128  # just outside the edge picks up some mask
    assert blurred[0, 0] == 0


def test_blur_mask_negative_radius():
    with pytest.raises(InvalidRequestError, match="mask_blur: must be 0 or more"):
        blur_mask(box_mask((0, 0, 4, 4)), -1)


# fill_masked


def test_fill_keeps_unmasked_pixels_exactly():
    image = noise(0)
    mask = box_mask((20, 10, 40, 30))
    filled = np.asarray(fill_masked(image, mask))
    keep = np.asarray(mask) == 0
    assert np.array_equal(filled[keep], np.asarray(image)[keep])


def test_fill_spreads_colours_from_each_side():
    mask = box_mask((24, 0, 40, H))  # a 16 px column across the red/blue border
    filled = np.asarray(fill_masked(red_blue(), mask)).astype(int)
    left_edge, right_edge = filled[H // 2, 24], filled[H // 2, 39]
    assert left_edge[0] > left_edge[2] + 50  # reddish
    assert right_edge[2] > right_edge[0] + 50  # bluish
    assert filled[:, 24:40, 1].max() < 10  # no green, and nothing darkened to black
    assert (filled[:, 24:40, 0] + filled[:, 24:40, 2]).min() > 200


def test_fill_uniform_surroundings_fill_with_that_colour():
    image = Image.new("RGB", (W, H), (10, 200, 90))
    image.paste((0, 0, 0), (20, 10, 40, 30))
    filled = np.asarray(fill_masked(image, box_mask((20, 10, 40, 30)))).astype(int)
    assert np.abs(filled - [10, 200, 90]).max() <= 1


def test_fill_everything_masked_is_grey():
    filled = fill_masked(noise(1), Image.new("L", (W, H), 255))
    assert set(filled.getdata()) == {(128, 128, 128)}


# crop_region and expand_to_aspect


def test_crop_region_pads_the_bounding_box():
    assert crop_region(box_mask((20, 10, 30, 25)), 4) == (16, 6, 34, 29)


def test_crop_region_clamps_to_the_image():
    assert crop_region(box_mask((2, 3, 60, 45)), 8) == (0, 0, W, H)


def test_crop_region_empty_mask():
    with pytest.raises(InvalidRequestError) as info:
        crop_region(Image.new("L", (W, H)), 4)
    assert info.value.field == "mask"
    assert "mask is empty: paint the area to repaint in white" in str(info.value)


def test_crop_region_negative_padding():
    with pytest.raises(InvalidRequestError, match="padding: must be 0 or more"):
        crop_region(box_mask((0, 0, 4, 4)), -2)


def test_expand_to_aspect_grows_the_short_side_around_the_centre():
    # 10x10 region, generation 512x256: width must become 20, centred on the region
    assert expand_to_aspect((20, 10, 30, 20), 512, 256, W, H) == (15, 10, 35, 20)
    # and the other way round
    assert expand_to_aspect((20, 10, 30, 20), 256, 512, W, H) == (20, 5, 30, 25)


def test_expand_to_aspect_shifts_back_inside_the_image():
    assert expand_to_aspect((0, 10, 10, 20), 512, 256, W, H) == (0, 10, 20, 20)
    assert expand_to_aspect((54, 10, 64, 20), 512, 256, W, H) == (44, 10, 64, 20)
    assert expand_to_aspect((20, 40, 30, 48), 256, 512, W, H) == (20, 28, 30, 48)


def test_expand_to_aspect_stops_at_the_image_edges():
    # 48 px tall region, target 1:4 would need 40 px wide x 160 px tall: only 48 exist
    assert expand_to_aspect((10, 0, 50, 48), 128, 512, W, H) == (10, 0, 50, 48)
    assert expand_to_aspect((0, 20, 64, 28), 512, 512, W, H) == (0, 0, 64, 48)


def test_expand_to_aspect_keeps_a_matching_region():
    assert expand_to_aspect((8, 8, 40, 24), 512, 256, W, H) == (8, 8, 40, 24)


# crop_to_mask and paste_back


def test_crop_to_mask_region_and_sizes():
    image, mask = noise(2), box_mask((20, 20, 28, 28))
    crop = crop_to_mask(image, mask, 4, 128, 64)
    assert isinstance(crop, OnlyMaskedCrop)
    x1, y1, x2, y2 = crop.region
    assert (x1, y1, x2, y2) == (8, 16, 40, 32)
    assert (x2 - x1) * 64 == (y2 - y1) * 128
    assert crop.image.size == crop.mask.size == (128, 64)
    assert crop.image.mode == "RGB" and crop.mask.mode == "L"
    assert crop.mask.getpixel((64, 32)) == 255 and crop.mask.getpixel((0, 0)) == 0


def test_paste_back_changes_only_masked_pixels():
    original, mask = noise(3), box_mask((20, 20, 28, 28))
    crop = crop_to_mask(original, mask, 4, 128, 64)
    generated = Image.new("RGB", (128, 64), (0, 255, 0))
    result = np.asarray(paste_back(original, generated, crop, mask))
    inside = np.asarray(mask) == 255
    assert np.array_equal(result[~inside], np.asarray(original)[~inside])
    assert (result[inside] == [0, 255, 0]).all()


def test_paste_back_blends_by_a_soft_mask():
    original = Image.new("RGB", (W, H), (0, 0, 0))
    mask = box_mask((16, 16, 48, 32))
    blurred = blur_mask(mask, 3)
    crop = crop_to_mask(original, blurred, 8, 64, 32)
    result = np.asarray(paste_back(original, Image.new("RGB", (64, 32), (200, 200, 200)), crop, blurred))
    soft = np.asarray(blurred)
    assert np.abs(result[..., 0].astype(int) - soft.astype(int) * 200 // 255).max() <= 1


# composite_unmasked


def test_composite_unmasked_keeps_original_outside_mask():
    original, generated, mask = noise(4), noise(5), box_mask((10, 10, 30, 30))
    result = np.asarray(composite_unmasked(original, generated, mask))
    inside = np.asarray(mask) == 255
    assert np.array_equal(result[~inside], np.asarray(original)[~inside])
    assert np.array_equal(result[inside], np.asarray(generated)[inside])


def test_composite_unmasked_size_mismatch():
    with pytest.raises(ValueError, match="sizes differ"):
        composite_unmasked(noise(4), noise(5, (32, 32)), box_mask((0, 0, 4, 4)))


# grow_canvas


def test_grow_canvas_sizes_and_placement():
    image = noise(6)
    canvas, mask = grow_canvas(image, 16, 8, 0, 24, overlap=8)
    assert canvas.size == mask.size == (W + 24, H + 24)
    assert canvas.mode == "RGB" and mask.mode == "L"
    # the old image sits at (left, up), untouched
    assert canvas.crop((16, 0, 16 + W, H)).tobytes() == image.tobytes()
    m = np.asarray(mask)
    # new area white, overlap white on grown sides, old image black elsewhere
    assert (m[:, :16] == 255).all() and (m[:, 16 + W :] == 255).all() and (m[H:, :] == 255).all()
    assert (m[:, 16:24] == 255).all()  # left overlap
    assert (m[:, 16 + W - 8 : 16 + W] == 255).all()  # right overlap
    assert (m[H - 8 : H] == 255).all()  # bottom overlap
    assert (m[0:H - 8, 24 : 16 + W - 8] == 0).all()  # top did not grow: no overlap there


def test_grow_canvas_prefills_with_edge_colours():
    canvas, _ = grow_canvas(red_blue(), 32, 32, 0, 0, overlap=0)
    pixels = np.asarray(canvas).astype(int)
    left, right = pixels[:, :32], pixels[:, -32:]
    assert (left[..., 0] > left[..., 2]).all() and (right[..., 2] > right[..., 0]).all()
    assert (pixels[:, 28, 0] > 240).all() and (pixels[:, -29, 2] > 240).all()  # 4 px out: nearly pure
    assert np.abs(pixels[..., 0] + pixels[..., 2] - 255).max() <= 2  # a blend, never darkened


def test_grow_canvas_overlap_larger_than_image_masks_everything():
    _, mask = grow_canvas(noise(7), 8, 8, 0, 0, overlap=40)
    assert set(mask.getdata()) == {255}


@pytest.mark.parametrize(
    ("amounts", "field", "text"),
    [
        ((5, 0, 0, 0), "left", "multiple of 8"),
        ((0, -8, 0, 0), "right", "multiple of 8"),
        ((0, 0, 12, 0), "up", "multiple of 8"),
        ((0, 0, 0, 9), "down", "multiple of 8"),
        ((0, 0, 0, 0), "outpaint", "all 0"),
        ((0, 4040, 0, 0), "right", "4104 px wide"),
        ((4040, 0, 0, 0), "left", "the most is 4096"),
        ((0, 0, 2024, 2032), "down", "4104 px tall"),
    ],
)
def test_grow_canvas_validation(amounts, field, text):
    with pytest.raises(InvalidRequestError, match=text) as info:
        grow_canvas(noise(8), *amounts)
    assert info.value.field == field


def test_grow_canvas_negative_overlap():
    with pytest.raises(InvalidRequestError, match="overlap"):
        grow_canvas(noise(8), 8, 0, 0, 0, overlap=-1)


def test_grow_canvas_up_to_the_limit():
    canvas, mask = grow_canvas(Image.new("RGB", (4088, 8)), 8, 0, 0, 0)
    assert canvas.size == mask.size == (4096, 8)


# mask_to_latent


def test_mask_to_latent_shape_and_binarisation():
    mask = box_mask((16, 8, 48, 40))  # 64x48 image -> 8x6 latent, 8 px per latent pixel
    latent = mask_to_latent(mask, 6, 8)
    assert latent.shape == (1, 1, 6, 8)
    assert latent.dtype == torch.float32
    expected = torch.zeros(6, 8)
    expected[1:5, 2:6] = 1
    assert torch.equal(latent[0, 0], expected)


def test_mask_to_latent_half_covered_block_is_repainted():
    latent = mask_to_latent(box_mask((0, 0, 4, 8), (8, 8)), 1, 1)  # half of one 8x8 block
    assert latent.item() == 1.0
    latent = mask_to_latent(box_mask((0, 0, 3, 8), (8, 8)), 1, 1)  # three eighths
    assert latent.item() == 0.0


def test_mask_to_latent_binarises_a_soft_mask():
    latent = mask_to_latent(blur_mask(box_mask((16, 8, 48, 40)), 6), 6, 8)
    assert set(latent.unique().tolist()) <= {0.0, 1.0}
