"""The invisible watermark: found in what lienzo saves, absent from what it did not mark, off when asked."""

import numpy as np
import pytest
from imwatermark import WatermarkDecoder
from PIL import Image, ImageDraw

from lienzo.generation.engine import GeneratedImage
from lienzo.generation.request import build_request
from lienzo.images.provenance import ModelInfo, Provenance, read_provenance
from lienzo.images.watermark import MIN_PIXELS, PAYLOAD, PAYLOAD_BITS, detect, embed, mark, read_bits
from lienzo.outputs import save_generated, wants_watermark
from lienzo.settings import Settings

PROVENANCE = Provenance(ModelInfo("tiny", "ab" * 32, "abababab12", "sd1"))


def _picture(size=(256, 256), seed=0) -> Image.Image:
    """A smooth random colour field with grain. DWT-DCT writes a bit by moving the largest low-band
    coefficient of each block, so it needs texture: on smooth areas some bits read back wrong."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(30, 225, (8, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    grain = rng.normal(0, 20, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(coarse) + grain, 0, 255).astype(np.uint8))


def _emoji(seed=0) -> Image.Image:
    """An emoji-like picture: a textured disc with a black outline on a white background (75% white)."""
    image = Image.new("RGB", (256, 256), "white")
    disc = Image.new("L", (256, 256), 0)
    ImageDraw.Draw(disc).ellipse((68, 68, 188, 188), fill=255)
    image.paste(_picture(seed=seed), mask=disc)
    ImageDraw.Draw(image).ellipse((68, 68, 188, 188), outline="black", width=4)
    return image


def _generated(image: Image.Image, seed=1) -> GeneratedImage:
    pixels = np.asarray(image, dtype=np.float32) / 255
    return GeneratedImage(image, seed, "a fox\nSteps: 2, Seed: 1, Size: 256x256", {"Seed": seed}, pixels)


def test_marked_image_is_detected_and_looks_the_same():
    picture = _picture()
    marked = embed(picture)
    found = detect(marked)
    assert found.detected and found.matching_bits >= PAYLOAD_BITS - 2
    # Invisible: a peak signal-to-noise ratio above 38 dB (the mark alone measures about 42 dB).
    mse = np.mean((np.asarray(marked, dtype=float) - np.asarray(picture, dtype=float)) ** 2)
    assert 0 < mse and 10 * np.log10(255**2 / mse) > 38


@pytest.mark.parametrize("seed", range(4))
def test_unmarked_images_are_not_detected(seed):
    found = detect(_picture(seed=seed))
    assert found.matching_bits is not None and not found.detected


def test_flat_white_cannot_hold_the_mark_so_it_is_not_applied():
    white = Image.new("RGB", (256, 256), "white")
    result = mark(white)
    assert not result.watermarked and "flat" in result.note
    assert result.image is white


def test_mostly_white_pictures_are_read_without_their_white_blocks():
    picture = _emoji()
    marked = mark(picture)
    assert marked.watermarked and detect(marked.image).detected
    # The package's own reading fails here: white blocks vote 0 for every bit.
    payload = np.unpackbits(np.frombuffer(PAYLOAD, dtype=np.uint8)).astype(bool)
    assert np.count_nonzero(read_bits(marked.image, skip_near_white=False) != payload) > 6
    assert np.count_nonzero(read_bits(marked.image, skip_near_white=True) != payload) <= 6
    for seed in range(3):
        assert not detect(_emoji(seed)).detected


@pytest.mark.parametrize(
    "picture", [_picture(), _emoji(), Image.new("RGB", (300, 260), (20, 90, 200))], ids=["texture", "emoji", "flat blue"]
)
def test_reading_all_blocks_is_the_packages_reading(picture):
    for image in (picture, embed(picture)):
        pkg = WatermarkDecoder("bits", PAYLOAD_BITS).decode(np.asarray(image)[..., ::-1].copy(), "dwtDct")
        assert np.array_equal(np.asarray(pkg, dtype=bool), read_bits(image, skip_near_white=False))


def test_too_small_images_are_left_unmarked_and_not_checked():
    small = _picture((64, 64))
    result = mark(small)
    assert not result.watermarked and "64x64" in result.note and result.image is small
    assert detect(small).matching_bits is None and "not checked" in detect(small).describe()
    # The limit is the pixel count invisible-watermark asks for, whatever the shape.
    assert mark(_picture((512, 128))).watermarked and 512 * 128 == MIN_PIXELS


def test_saved_image_carries_the_mark_and_the_record_says_so(tmp_path):
    saved = save_generated(_generated(_picture()), tmp_path, PROVENANCE, watermark=True)
    assert saved.watermarked and saved.path.name == "00000-1.png"
    assert detect(Image.open(saved.path)).detected
    record = read_provenance(saved.path)
    assert record.watermark.embedded and record.watermark.method == "dwtDct" and record.watermark.payload == "lienzo"


def test_watermark_off_saves_the_pixels_untouched_and_the_record_says_so(tmp_path):
    picture = _picture()
    saved = save_generated(_generated(picture), tmp_path, PROVENANCE, watermark=False)
    assert not saved.watermarked
    assert np.array_equal(np.asarray(Image.open(saved.path)), np.asarray(picture))
    assert not detect(Image.open(saved.path)).detected
    record = read_provenance(saved.path)
    assert not record.watermark.embedded and "turned off" in record.watermark.note


def test_a_small_saved_image_says_why_it_has_no_mark(tmp_path):
    saved = save_generated(_generated(_picture((64, 64))), tmp_path, PROVENANCE, watermark=True)
    record = read_provenance(saved.path)
    assert not saved.watermarked and not record.watermark.embedded and "too few" in record.watermark.note


@pytest.mark.parametrize(
    ("requested", "setting", "expected"),
    [(None, True, True), (None, False, False), (False, True, False), (True, False, True)],
)
def test_the_request_overrides_the_settings(tmp_path, requested, setting, expected):
    settings = Settings(data_dir=tmp_path, watermark=setting)
    assert wants_watermark(build_request(prompt="a fox", watermark=requested), settings) is expected


def test_watermark_setting_reads_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LIENZO_WATERMARK", "false")
    assert Settings(data_dir=tmp_path).watermark is False
