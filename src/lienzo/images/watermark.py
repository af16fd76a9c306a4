"""The invisible watermark: a fixed lienzo payload hidden in the pixels of every image lienzo saves.

invisible-watermark's DWT-DCT method (``dwtDct``), as Stable Diffusion's reference scripts and
SDXL apply it: the image's U (blue-difference) channel goes through one Haar wavelet level, and
the largest coefficient of each 4x4 block of the low band is quantised (step 36) so that it
carries one bit of the 48-bit payload, repeated across the picture. Of what the package returns,
only that low-band change is kept (see :func:`_low_band_only`). Pixels go in as uint8 BGR,
the way ``cv2.imread`` reads a file, so anyone can check a lienzo image without lienzo::

    from imwatermark import WatermarkDecoder
    WatermarkDecoder("bytes", 48).decode(cv2.imread("00001-42.png"), "dwtDct")  # b'lienzo'

Flat white cannot carry a bit: writing one raises U, white's blue is already at 255, and the
change is clipped away, so white blocks vote 0 for every bit and a picture more than about half
white (emoji, icons) reads as unmarked. :func:`detect` therefore reads twice: as the package does,
then, if that fails, leaving out the near-white blocks. What the mark does not survive, as
``benchmarks/watermark.py`` measures: resizing, and JPEG with 4:2:0 chroma subsampling (most JPEGs).
Every mark is read back before the image is saved, so the provenance record never claims a
watermark that :func:`detect` would not find.
"""

from dataclasses import dataclass

import numpy as np
import pywt
from PIL import Image

from lienzo.errors import LienzoError

PAYLOAD = b"lienzo"
PAYLOAD_BITS = 8 * len(PAYLOAD)  # 48
METHOD = "dwtDct"
# invisible-watermark refuses images with fewer pixels than 256x256 (it raises RuntimeError).
_MIN_SIDE = 256
MIN_PIXELS = _MIN_SIDE * _MIN_SIDE
# Detected when at most 6 of the 48 bits differ. An unmarked image's bits are close to coin flips,
# and P(at most 6 of 48 wrong) = 5e-8 per reading, 1e-7 for detect's two; an unmarked flat image
# reads as all zeros, 28 bits wrong.
MAX_BIT_ERRORS = 6
# invisible-watermark's dwtDct layout: 4x4 blocks of the U channel's Haar low band (8x8 pixels),
# quantisation step 36. A block whose pixels are all this bright is near-white and carries no bit.
_BLOCK = 4
_STEP = 36
_NEAR_WHITE = 250

_PAYLOAD_ARRAY = np.unpackbits(np.frombuffer(PAYLOAD, dtype=np.uint8)).astype(bool)
# OpenCV's YUV, which invisible-watermark converts with: Y = 0.299 R + 0.587 G + 0.114 B,
# U = 0.492 (B - Y) + 128; raising U by 1 with Y and V kept moves R, G, B by 0, -0.395, +2.032.
_LUMA = np.array([0.299, 0.587, 0.114])
_U_TO_RGB = np.array([0.0, -0.395, 2.032])


@dataclass(frozen=True)
class Detection:
    """What a look for lienzo's watermark found; ``matching_bits`` is None when the image is too small to look."""

    matching_bits: int | None
    total_bits: int = PAYLOAD_BITS

    @property
    def detected(self) -> bool:
        return self.matching_bits is not None and self.total_bits - self.matching_bits <= MAX_BIT_ERRORS

    def describe(self) -> str:
        """One line for ``lienzo info``: ``detected (payload "lienzo": 48/48 bits match)``."""
        if self.matching_bits is None:
            return f"not checked (the image has fewer pixels than {_MIN_SIDE}x{_MIN_SIDE}, too few to hold one)"
        verdict = "detected" if self.detected else "not detected"
        return f'{verdict} (payload "{PAYLOAD.decode()}": {self.matching_bits}/{self.total_bits} bits match)'


@dataclass(frozen=True)
class Marked:
    """The image to save and whether it carries the watermark; ``note`` says why not when it does not."""

    image: Image.Image
    watermarked: bool
    note: str | None = None


def fits(size: tuple[int, int]) -> bool:
    """True when an image of ``size`` (width, height) has room for the payload."""
    width, height = size
    return width * height >= MIN_PIXELS


def embed(image: Image.Image) -> Image.Image:
    """``image`` with the watermark in its pixels, as RGB; ``LienzoError`` if it is too small to hold it."""
    if not fits(image.size):
        size = f"{image.width}x{image.height}"
        raise LienzoError(f"watermark: a {size} image is too small; it needs at least {MIN_PIXELS:,} pixels")
    encoder = _imwatermark().WatermarkEncoder()
    encoder.set_watermark("bytes", PAYLOAD)
    marked = encoder.encode(_bgr(image), METHOD)
    return _low_band_only(image, marked[..., ::-1])


def detect(image: Image.Image) -> Detection:
    """Look for lienzo's watermark; an image too small to hold one gives ``matching_bits=None``.

    First as invisible-watermark reads it; when that finds more than 6 bits wrong, once more
    without the near-white blocks, where no bit survives (see the module's docstring).
    """
    if not fits(image.size):
        return Detection(None)
    bits = _imwatermark().WatermarkDecoder("bits", PAYLOAD_BITS).decode(_bgr(image), METHOD)
    matching = int(np.count_nonzero(np.asarray(bits, dtype=bool) == _PAYLOAD_ARRAY))
    if PAYLOAD_BITS - matching > MAX_BIT_ERRORS:
        matching = max(matching, int(np.count_nonzero(read_bits(image, skip_near_white=True) == _PAYLOAD_ARRAY)))
    return Detection(matching)


def read_bits(image: Image.Image, *, skip_near_white: bool) -> np.ndarray:
    """The 48 bits as invisible-watermark's dwtDct decoder reads them, optionally without near-white blocks.

    Each block votes for bit ``block index % 48`` by whether its largest low-band coefficient (after
    the first) sits in the upper half of its quantisation step; a bit is 1 when more than half of its
    votes are (the package's ``mean * 255 > 127``). With ``skip_near_white=False`` this is the
    package's reading, bit for bit.
    """
    import cv2  # installed with invisible-watermark; the colour conversion must be the one it uses

    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4
    u = cv2.cvtColor(np.ascontiguousarray(rgb[:height, :width, ::-1]), cv2.COLOR_BGR2YUV)[..., 1]
    low = pywt.dwt2(u, "haar")[0]
    rows, cols = low.shape[0] // _BLOCK, low.shape[1] // _BLOCK
    blocks = low[: rows * _BLOCK, : cols * _BLOCK].reshape(rows, _BLOCK, cols, _BLOCK).swapaxes(1, 2).reshape(-1, _BLOCK * _BLOCK)
    largest = np.argmax(np.abs(blocks[:, 1:]), axis=1) + 1
    votes = np.abs(blocks[np.arange(len(blocks)), largest]) % _STEP > _STEP / 2
    bit = np.arange(len(blocks)) % PAYLOAD_BITS
    keep = np.ones(len(blocks), dtype=bool)
    if skip_near_white:
        side = 2 * _BLOCK
        darkest = rgb[: rows * side, : cols * side].reshape(rows, side, cols, side, 3).min(axis=(1, 3, 4))
        keep = darkest.reshape(-1) < _NEAR_WHITE
    ones = np.bincount(bit[keep], weights=votes[keep], minlength=PAYLOAD_BITS)
    counts = np.bincount(bit[keep], minlength=PAYLOAD_BITS)
    return ones * 255 > 127 * np.maximum(counts, 1)


def mark(image: Image.Image) -> Marked:
    """Watermark ``image`` if it can hold the mark so that it reads back; otherwise return it unchanged, saying why.

    The read-back costs one more decode (about 40 ms at 512x512 on one CPU core) and keeps pixels
    untouched where the mark would not be found anyway: mostly white or very smooth images.
    """
    if not fits(image.size):
        size = f"{image.width}x{image.height}"
        return Marked(image, False, f"not applied: {size} has fewer pixels than {_MIN_SIDE}x{_MIN_SIDE}, too few to hold it")
    marked = embed(image)
    if not detect(marked).detected:
        return Marked(image, False, "not applied: the image is too flat (large white or smooth areas) for the mark to read back")
    return Marked(marked, True)


def _low_band_only(original: Image.Image, marked: np.ndarray) -> Image.Image:
    """``original`` plus only the change the mark made to the Haar low band of the U channel.

    invisible-watermark 0.2 rebuilds U with the horizontal and vertical detail bands swapped
    (``idwt2((cA, (cV, cH, cD)))``), which mirrors the colour detail of every 2x2 block. Detection
    reads the low band alone, so keeping the original detail costs the mark nothing and lifts the
    PSNR of textured pictures from 34-37 dB to about 42 dB.
    """
    before = np.asarray(original.convert("RGB"), dtype=np.float64)
    after = np.asarray(marked, dtype=np.float64)
    # The package marks the top-left part whose sides are multiples of 4 and leaves the rest.
    height, width = before.shape[0] // 4 * 4, before.shape[1] // 4 * 4
    low_before = pywt.dwt2(_u(before[:height, :width]), "haar")[0]
    low_after = pywt.dwt2(_u(after[:height, :width]), "haar")[0]
    zeros = np.zeros_like(low_before)
    shift = pywt.idwt2((low_after - low_before, (zeros, zeros, zeros)), "haar")
    result = before.copy()
    result[:height, :width] += shift[..., None] * _U_TO_RGB
    return Image.fromarray(np.clip(np.round(result), 0, 255).astype(np.uint8))


def _u(rgb: np.ndarray) -> np.ndarray:
    return 0.492 * (rgb[..., 2] - rgb @ _LUMA) + 128


def _bgr(image: Image.Image) -> np.ndarray:
    """uint8 BGR pixels, as cv2.imread gives them: the layout the watermark is written and read in."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[..., ::-1])


def _imwatermark():
    """The invisible-watermark package, imported on first use (it imports OpenCV, ~0.2 s)."""
    try:
        import imwatermark
    except ImportError as err:
        # opencv-python needs the system's libGL.so.1 (Debian: apt-get install libgl1).
        raise LienzoError(
            f"watermark: cannot load the invisible-watermark package ({err}); reinstall lienzo "
            "(pip install -e .), or turn watermarking off with LIENZO_WATERMARK=false"
        ) from None
    return imwatermark
