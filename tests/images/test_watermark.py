"""The invisible watermark: found in what lienzo saves after what the web does to it, with its id; absent from the rest."""

import io
from functools import cache

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lienzo.errors import InvalidRequestError
from lienzo.generation.engine import GeneratedImage
from lienzo.generation.request import build_request
from lienzo.images import watermark
from lienzo.images.provenance import ModelInfo, Provenance, read_provenance
from lienzo.images.watermark import METHOD, MIN_PIXELS, PAYLOAD, detect, embed, fits, mark, payload_for
from lienzo.outputs import save_generated, wants_watermark
from lienzo.settings import Settings

PROVENANCE = Provenance(ModelInfo("tiny", "ab" * 32, "abababab12", "sd1"))
ID = bytes.fromhex("0123456789abcdef")


def _picture(size=(256, 256), seed=0) -> Image.Image:
    """A smooth random colour field with grain."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(30, 225, (8, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    grain = rng.normal(0, 20, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(coarse) + grain, 0, 255).astype(np.uint8))


@cache
def _noise(size: int, seed: int = 0) -> Image.Image:
    """Colour noise with a photograph's 1/f spectrum: the picture's own detail at every scale hides the mark."""
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    falloff = 1 / np.maximum(np.hypot(fx, fy), 1 / size)
    channels = [np.fft.ifft2(falloff * np.exp(2j * np.pi * rng.random((size, size)))).real for _ in range(3)]
    mixed = np.einsum("ij,jhw->hwi", rng.normal(0.6, 0.3, (3, 3)), np.stack(channels))
    return Image.fromarray(np.clip(128 + 40 * mixed / mixed.std(), 0, 255).astype(np.uint8))


@cache
def _drawing(size: int = 512, seed: int = 0) -> Image.Image:
    """Flat-coloured shapes with black outlines on white, as an icon: mostly white, where the mark clips."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x, y = rng.integers(0, size, 2)
        radius = rng.integers(size // 16, size // 4)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x - radius, y - radius, x + radius, y + radius), fill=colour, outline="black", width=4)
    return image


IMAGES = {"noise 512": lambda: _noise(512), "drawing 512": _drawing, "noise 1024": lambda: _noise(1024, seed=1)}


@cache
def _marked(name: str) -> Image.Image:
    return embed(IMAGES[name](), ID)


def _jpeg75(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=75, subsampling=2)  # 4:2:0, as most of the web
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _half(image: Image.Image) -> Image.Image:
    return image.resize((image.width // 2, image.height // 2), Image.LANCZOS)


ATTACKS = {
    "as saved": lambda image: image,
    "JPEG 75 4:2:0": _jpeg75,
    "0.5x": _half,
    "crop 5% each edge": lambda im: im.crop((im.width // 20, im.height // 20, im.width * 19 // 20, im.height * 19 // 20)),
    "crop 10% one side": lambda im: im.crop((im.width // 10, 0, im.width, im.height)),
    "0.5x then JPEG 75": lambda image: _jpeg75(_half(image)),
}


def _psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=float) - np.asarray(b, dtype=float)) ** 2)
    return 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("name", IMAGES)
def test_the_mark_and_its_id_survive_the_web(name, attack):
    found = detect(ATTACKS[attack](_marked(name)))
    assert found.detected and found.payload == ID and found.score >= watermark.SYNC_THRESHOLD
    expected_scale = 0.5 if "0.5x" in attack else 1.0
    assert found.scale == pytest.approx(expected_scale, abs=0.01)


def test_a_large_image_is_read_in_its_centre():
    # 1536x1536 with the marked 1024x1024 in the middle: detect looks at the central 1024x1024 only.
    large = _marked("noise 1024").crop((-256, -256, 1280, 1280))
    found = detect(large)
    assert found.detected and found.payload == ID and found.scale == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("name", IMAGES)
def test_the_mark_is_invisible_by_psnr(name):
    assert 38 <= _psnr(IMAGES[name](), _marked(name)) < 45


@pytest.mark.parametrize("attack", ["as saved", "JPEG 75 4:2:0", "0.5x then JPEG 75"])
@pytest.mark.parametrize("name", IMAGES)
def test_unmarked_images_are_not_detected(name, attack):
    found = detect(ATTACKS[attack](IMAGES[name]()))
    assert not found.detected and found.payload is None and found.score < watermark.SYNC_THRESHOLD
    assert found.describe().startswith("not detected (sync ")


def test_the_default_payload_and_the_images_own_id_round_trip():
    picture = _noise(512, seed=2)
    assert detect(mark(picture).image).payload == PAYLOAD
    image_id = payload_for(picture)
    assert len(image_id) == 8 and image_id == payload_for(picture.copy()) and image_id != payload_for(_noise(512, seed=3))
    result = mark(picture, image_id)
    assert result.watermarked and result.note is None
    found = detect(_jpeg75(_half(result.image)))
    assert found.payload == image_id and found.describe().startswith(f"detected (payload {image_id.hex()}, at 0.50x, sync ")


@pytest.mark.parametrize("payload", [b"short", b"nine bytes", "lienzo01"])
def test_a_payload_must_be_eight_bytes(payload):
    with pytest.raises(InvalidRequestError, match="watermark payload: must be 8 bytes"):
        mark(_picture(), payload)


def test_the_code_corrects_flipped_bits_and_the_crc_rejects_the_rest():
    coded = watermark._encode(ID)
    assert len(coded) == 258
    soft = 2.0 * coded - 1
    flipped = soft.copy()
    flipped[np.random.default_rng(0).choice(258, 12, replace=False)] *= -1
    bits = watermark._viterbi(flipped)
    assert np.packbits(bits[:64]).tobytes() == ID
    # Noise decodes to some bit string, but one whose CRC does not check.
    noise = np.random.default_rng(1).normal(size=(128, 128)).astype(np.float32)
    assert watermark._decode(noise) is None


def test_flat_images_are_left_unmarked_saying_why():
    white = Image.new("RGB", (512, 512), "white")
    result = mark(white)
    assert not result.watermarked and "flat" in result.note and result.image is white


def test_too_small_images_are_left_unmarked_and_tiny_ones_not_checked():
    small = _picture((255, 512))
    result = mark(small)
    assert not result.watermarked and "255x512" in result.note and result.image is small
    assert not fits((255, 512)) and fits((256, 256)) and MIN_PIXELS == 256 * 256
    # A 0.5x copy of the smallest mark is still looked at; anything smaller is not.
    assert detect(_picture((128, 128))).score is not None
    tiny = detect(_picture((64, 64)))
    assert tiny.score is None and not tiny.detected and "not checked" in tiny.describe()


def _generated(image: Image.Image, seed=1) -> GeneratedImage:
    pixels = np.asarray(image, dtype=np.float32) / 255
    return GeneratedImage(image, seed, "a fox\nSteps: 2, Seed: 1, Size: 256x256", {"Seed": seed}, pixels)


def test_saved_image_carries_the_mark_and_the_record_says_so(tmp_path):
    saved = save_generated(_generated(_picture()), tmp_path, PROVENANCE, watermark=True)
    assert saved.watermarked and saved.path.name == "00000-1.png"
    found = detect(Image.open(saved.path))
    assert found.detected and found.payload is not None
    record = read_provenance(saved.path)
    # The record names the id the pixels carry (as text for lienzo's own tag, as hex for an image's id).
    assert record.watermark.embedded and record.watermark.method == METHOD
    assert record.watermark.payload in (found.payload.decode(errors="replace"), found.payload.hex())


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
    assert not saved.watermarked and not record.watermark.embedded and "too small" in record.watermark.note


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
