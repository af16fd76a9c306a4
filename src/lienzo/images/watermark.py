"""The invisible watermark: a 64-bit id hidden in the brightness of every image lienzo saves.

It has to survive what the web does to a picture: JPEG at quality 75 with 4:2:0 chroma subsampling,
a resize to half, a crop. So it lives where all three leave a signal alone:

- **Luma, low-mid frequencies.** 4:2:0 JPEG halves the colour resolution and quantises it hard, so
  the mark is a change of brightness only (R, G and B move together). Its spectrum is a band of
  about 1/12 to 1/4.5 cycle per pixel: as high as a 0.5x resize (which moves it to 1/6 to 1/2.2,
  under the new Nyquist frequency) and JPEG 75 leave alone, because pictures have less energy
  there than lower down, and their energy is what hides the mark from the detector.
- **A periodic tile.** One 128x128 pattern repeats over the picture from its top-left corner. A crop
  only shifts the tiling, and a resize only changes its period, so detection needs no original:
  the image's autocorrelation peaks at the period (the scale, searched from 0.4x to 1.1x), the
  picture folded onto one period adds up every tile, and an FFT correlation of the fold with the
  tile's fixed sync part finds the shift.
- **Spread spectrum with error correction.** The tile is 32x32 cells of +-1 chips from a fixed
  seed: a quarter of them form the sync pattern, the rest carry the 64-bit payload and a CRC-16,
  coded with the rate-1/3, constraint-length-7 convolutional code (3GPP's polynomials 133, 171,
  165) and decoded with a soft Viterbi decoder. Written here in numpy (about 30 lines) because the
  small packages (reedsolo, galois' BCH) decode hard bits only, which throws away about 2 dB that
  soft decoding keeps, and a repetition code has no coding gain at all: either would need a
  stronger, more visible mark for the same error rate.

:func:`detect` says ``detected`` when the sync correlation's peak stands ``SYNC_THRESHOLD``
standard deviations above the rest of its surface, a threshold set from unmarked images (none of
1,360 reached 5.8; ``benchmarks/watermark.py`` measures), or when the payload decodes with a valid
CRC (one chance in 65,536 for an unmarked image). ``payload`` is the id when the CRC checks.

The mark costs PSNR 38.6 dB (more where white clips it). A picture that cannot hold it is saved unmarked, with a note: too
small (either side under 256 pixels), too flat (one colour: the mark would be the only texture),
or, checked by reading every mark back before saving, one where it would not be found.
"""

import binascii
import hashlib
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image

from lienzo.errors import InvalidRequestError, LienzoError

METHOD = "lienzo-tile-ss1"
# The id a mark carries when the caller gives none; the save path passes one per image (payload_for).
PAYLOAD = b"lienzo01"
PAYLOAD_BYTES = 8
# Below 256 pixels a side, a 0.5x copy would hold less than two tiles of its 64-pixel period.
_MIN_SIDE = 256
MIN_PIXELS = _MIN_SIDE * _MIN_SIDE
# detect() looks at anything this large: a 0.5x copy of a 256x256 mark still is.
_MIN_DETECT_SIDE = 128
# ... and at most this much of it, from the centre (a crop is only a shift): bounds its time.
_MAX_DETECT_SIDE = 1024

_TILE = 128  # pixels of the pattern's period at the size it was embedded
_CELLS = 32  # chips per tile side: 4x4-pixel cells
_SYNC_CELLS = 256  # of the 1,024 cells; the other 768 carry the coded payload
_KEY = 0x6C69656E7A6F  # seeds the chips: the mark's secret, fixed so any lienzo reads any mark
# Mark's RMS change of brightness, in 0..255 levels: PSNR 20 log10(255 / 3) = 38.6 dB before clipping.
_STRENGTH = 3.0
# The mark's band, in cycles per pixel (the Gaussian edges of a band-pass filter): as high as a 0.5x
# resize and JPEG 75 leave alone, where pictures have less energy than lower down.
_BAND = (0.08, 0.22)
# A picture whose brightness varies less than this (standard deviation, levels) is one flat colour.
_FLAT_STD = 2.0
# Sync peaks of unmarked 512x512 images reached at most 5.76 standard deviations (1,360 looked at: 1/f
# noise, flat drawings and tiny-model outputs, as saved, after JPEG, 0.5x and crops); marked ones at
# least 7.6 (after 0.5x; 9 or more as saved and after JPEG 75), and below the threshold the CRC still
# decides. benchmarks/RESULTS.md has the table.
SYNC_THRESHOLD = 7.0
# Periods searched, as a fraction of the embedded one (0.4x to 1.1x resizes).
_SCALES = (0.4, 1.1)

# The convolutional code: rate 1/3, constraint length 7, terminated with 6 zero bits.
_POLYS = (0o133, 0o171, 0o165)
_MEMORY = 6
_INFO_BITS = 8 * PAYLOAD_BYTES + 16  # payload and its CRC-16
_CODED_BITS = len(_POLYS) * (_INFO_BITS + _MEMORY)  # 258


@dataclass(frozen=True)
class Detection:
    """What a look for lienzo's watermark found.

    ``detected``: the mark is there. ``payload``: its 8-byte id when the error-correcting code reads
    it back intact (None otherwise). ``score``: the sync peak in standard deviations (None when the
    image is too small to look at); ``scale``: the size it is at relative to the marked image.
    """

    detected: bool
    payload: bytes | None = None
    score: float | None = None
    scale: float | None = None

    def describe(self) -> str:
        """One line for ``lienzo info``: ``detected (payload "lienzo01", at 0.50x, sync 23.1)``."""
        if self.score is None:
            side = _MIN_DETECT_SIDE
            return f"not checked (the image is smaller than {side}x{side}, too small to hold one)"
        if not self.detected:
            return f"not detected (sync {self.score:.1f}, needs {SYNC_THRESHOLD:.1f})"
        payload = "unreadable" if self.payload is None else _show(self.payload)
        return f"detected (payload {payload}, at {self.scale:.2f}x, sync {self.score:.1f})"


@dataclass(frozen=True)
class Marked:
    """The image to save and whether it carries the watermark; ``note`` says why not when it does not."""

    image: Image.Image
    watermarked: bool
    note: str | None = None


def fits(size: tuple[int, int]) -> bool:
    """True when an image of ``size`` (width, height) has room for the mark: both sides at least 256."""
    return min(size) >= _MIN_SIDE


def payload_for(image: Image.Image) -> bytes:
    """An 8-byte id for ``image``: the start of the SHA-256 of its RGB pixels, before marking.

    Whoever holds the unmarked pixels (or the record that stores this id) can tie a copy found on
    the web back to them, even after the metadata was stripped.
    """
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    header = f"{image.width}x{image.height}:".encode()
    return hashlib.sha256(header + rgb.tobytes()).digest()[:PAYLOAD_BYTES]


def embed(image: Image.Image, payload: bytes | None = None) -> Image.Image:
    """``image`` with the watermark carrying ``payload`` (8 bytes; default :data:`PAYLOAD`), as RGB.

    ``LienzoError`` if the image is too small to hold it.
    """
    payload = _check_payload(payload)
    if not fits(image.size):
        size = f"{image.width}x{image.height}"
        raise LienzoError(f"watermark: a {size} image is too small; both sides must be at least {_MIN_SIDE}")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = rgb.shape[:2]
    tile = _STRENGTH * _tile(payload)
    reps = (-(-height // _TILE), -(-width // _TILE))
    delta = np.tile(tile, reps)[:height, :width]
    return Image.fromarray(np.clip(np.rint(rgb + delta[..., None]), 0, 255).astype(np.uint8))


def mark(image: Image.Image, payload: bytes | None = None) -> Marked:
    """Watermark ``image`` with ``payload`` if the mark reads back from it; otherwise return it unchanged, saying why.

    The read-back is one more :func:`detect` (about 0.1 s at 512x512): the provenance record never
    claims a mark that would not be found.
    """
    payload = _check_payload(payload)
    if not fits(image.size):
        size = f"{image.width}x{image.height}"
        return Marked(image, False, f"not applied: {size} is too small to hold it (both sides must be at least {_MIN_SIDE})")
    if float(np.std(_luma(image))) < _FLAT_STD:
        return Marked(image, False, "not applied: the image is one flat colour, where the mark would be the only texture")
    marked = embed(image, payload)
    found = detect(marked)
    if not found.detected or found.payload != payload:
        return Marked(image, False, "not applied: the mark would not read back (the image is too flat, too bright or too busy)")
    return Marked(marked, True)


def detect(image: Image.Image) -> Detection:
    """Look for lienzo's watermark at any size from 0.4x to 1.1x of the marked image, cropped or not.

    About 0.1 s at 512x512 and 0.2 s at 1024x1024 on a CPU (0.3 s for a process's first, which builds
    the templates); larger images are looked at in their central 1024x1024 (a crop only shifts the tiling).
    """
    if min(image.size) < _MIN_DETECT_SIDE:
        return Detection(False)
    whitened = _whiten(_luma(_centre(image)))
    periods = _candidate_periods(whitened)
    if not periods:
        return Detection(False, score=0.0, scale=1.0)
    # Each autocorrelation peak tried within 1% in 0.5% steps, then the best within 0.2% in 0.1% steps:
    # the fold blurs the mark once its period is off by more than a pixel over the folded tiles.
    coarse = max((_sync(whitened, period * (1 + 0.005 * step)) for period in periods for step in range(-2, 3)), key=_score)
    score, period, fold = max([coarse, *(_sync(whitened, coarse[1] * (1 + 0.001 * step)) for step in (-2, -1, 1, 2))], key=_score)
    payload = _decode(fold)
    return Detection(score >= SYNC_THRESHOLD or payload is not None, payload, round(score, 2), round(float(period) / _TILE, 3))


def _check_payload(payload: bytes | None) -> bytes:
    if payload is None:
        return PAYLOAD
    if not isinstance(payload, bytes) or len(payload) != PAYLOAD_BYTES:
        raise InvalidRequestError("watermark payload", f"must be {PAYLOAD_BYTES} bytes, got {payload!r}")
    return payload


def _show(payload: bytes) -> str:
    """The payload as text when it is printable ASCII (lienzo's own tag), else as hex."""
    return f'"{payload.decode()}"' if payload.isascii() and payload.decode().isprintable() else payload.hex()


def _luma(image: Image.Image) -> np.ndarray:
    """Brightness (Rec. 601 weights, what JPEG keeps at full resolution) as float32."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _centre(image: Image.Image) -> Image.Image:
    width, height = image.size
    crop_w, crop_h = min(width, _MAX_DETECT_SIDE), min(height, _MAX_DETECT_SIDE)
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


# The pattern -------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _layout() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The chips' signs (32x32), the sync cells, and for each data cell the coded bit it carries."""
    rng = np.random.default_rng(_KEY)
    signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(_CELLS, _CELLS))
    order = rng.permutation(_CELLS * _CELLS)
    data_cells = order[_SYNC_CELLS:]
    bits = np.full(_CELLS * _CELLS, -1)
    bits[data_cells] = np.arange(len(data_cells)) % _CODED_BITS
    return signs, order[:_SYNC_CELLS], bits


def _band(cells: np.ndarray) -> np.ndarray:
    """Cell values (..., 32, 32) as 128x128 periodic pixels, band-passed to :data:`_BAND`.

    Through the FFT because the tile wraps around: cv2's filters have no periodic border.
    """
    pixels = np.repeat(np.repeat(cells, _TILE // _CELLS, axis=-2), _TILE // _CELLS, axis=-1)
    fy = np.fft.fftfreq(_TILE)[:, None]
    fx = np.fft.rfftfreq(_TILE)[None, :]
    radius = np.hypot(fx, fy)
    response = np.exp(-((radius / _BAND[1]) ** 2)) * (1 - np.exp(-((radius / _BAND[0]) ** 2)))
    return np.fft.irfft2(np.fft.rfft2(pixels) * response, s=(_TILE, _TILE)).astype(np.float32)


def _tile(payload: bytes) -> np.ndarray:
    """The 128x128 pattern that carries ``payload``, scaled to an RMS of 1."""
    signs, sync, bits = _layout()
    coded = 2.0 * _encode(payload) - 1
    values = np.where(bits >= 0, coded[bits], 0.0).astype(np.float32)
    values[sync] = 1.0
    tile = _band((signs.reshape(-1) * values).reshape(_CELLS, _CELLS))
    return tile / np.sqrt(np.mean(tile**2))


@lru_cache(maxsize=1)
def _templates() -> tuple[np.ndarray, np.ndarray]:
    """What detection correlates the fold with: the sync pattern (128x128) and one pattern per coded bit (258 x 128*128)."""
    signs, sync, bits = _layout()
    flat = signs.reshape(-1)
    sync_cells = np.zeros(_CELLS * _CELLS, dtype=np.float32)
    sync_cells[sync] = flat[sync]
    per_bit = np.zeros((_CODED_BITS, _CELLS * _CELLS), dtype=np.float32)
    data = np.flatnonzero(bits >= 0)
    per_bit[bits[data], data] = flat[data]
    sync_pattern = _band(sync_cells.reshape(_CELLS, _CELLS))
    return sync_pattern - sync_pattern.mean(), _band(per_bit.reshape(-1, _CELLS, _CELLS)).reshape(_CODED_BITS, -1)


# Detection ---------------------------------------------------------------------------------------


def _whiten(luma: np.ndarray) -> np.ndarray:
    """The picture's own detail suppressed as far as cheaply possible, so the mark stands out.

    A high-pass (the mark has little energy below 1/12 cycle per pixel, pictures most of theirs),
    then a division by the local contrast, so that edges and busy texture count no more than flat
    areas.
    """
    detail = luma - cv2.GaussianBlur(luma, (0, 0), 3)
    contrast = np.sqrt(cv2.GaussianBlur(detail * detail, (0, 0), 8))
    return detail / (contrast + 1.5)


def _candidate_periods(whitened: np.ndarray, count: int = 3) -> list[float]:
    """The strongest peaks of the autocorrelation along both axes within the searched periods.

    A tiled mark repeats at its period p (and 2p, 3p ...): its autocorrelation peaks there. Each peak
    is refined to a tenth of a pixel by a parabola through its neighbours.
    """
    spectrum = np.fft.rfft2(whitened)
    auto = np.fft.irfft2(np.abs(spectrum) ** 2, s=whitened.shape)
    low = int(np.floor(_SCALES[0] * _TILE))
    high = min(int(np.ceil(_SCALES[1] * _TILE)), min(whitened.shape) // 2)
    if high <= low + 2:
        return []
    profile = auto[0, : high + 2] + auto[: high + 2, 0]
    lags = np.arange(low, high + 1)
    peaks = [lag for lag in lags if profile[lag] >= profile[lag - 1] and profile[lag] >= profile[lag + 1]]
    peaks.sort(key=lambda lag: profile[lag], reverse=True)
    periods = []
    for lag in peaks[:count]:
        left, centre, right = profile[lag - 1], profile[lag], profile[lag + 1]
        bend = left - 2 * centre + right
        periods.append(lag + (0.5 * (left - right) / bend if bend < 0 else 0.0))
    return periods


def _fold(whitened: np.ndarray, period: float) -> np.ndarray:
    """The picture resampled so that ``period`` pixels become the tile's 128, every tile added onto one 128x128."""
    factor = _TILE / period
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    resampled = cv2.resize(whitened, None, fx=factor, fy=factor, interpolation=interpolation)
    height, width = resampled.shape
    rows, cols = -(-height // _TILE), -(-width // _TILE)
    padded = np.zeros((rows * _TILE, cols * _TILE), dtype=np.float32)
    padded[:height, :width] = resampled
    total = padded.reshape(rows, _TILE, cols * _TILE).sum(axis=0).reshape(_TILE, cols, _TILE).sum(axis=1)
    # How many tiles covered each bin: the last row and column of tiles are partial.
    row_counts = np.bincount(np.arange(height) % _TILE, minlength=_TILE)
    col_counts = np.bincount(np.arange(width) % _TILE, minlength=_TILE)
    return total / np.outer(row_counts, col_counts)


def _sync(whitened: np.ndarray, period: float) -> tuple[float, float, np.ndarray]:
    """The sync score at ``period``, the period, and the fold shifted to line up with the tile.

    The score is the peak of the fold's circular correlation with the sync pattern (the FFT does all
    128x128 shifts at once), in standard deviations of that correlation surface.
    """
    sync, _ = _templates()
    fold = _fold(whitened, period)
    surface = np.fft.irfft2(np.fft.rfft2(fold) * np.conj(np.fft.rfft2(sync)), s=fold.shape)
    peak = int(np.argmax(surface))
    score = float((surface.flat[peak] - surface.mean()) / surface.std())
    shift = np.unravel_index(peak, surface.shape)
    return score, period, np.roll(fold, (-int(shift[0]), -int(shift[1])), axis=(0, 1))


def _score(found: tuple[float, float, np.ndarray]) -> float:
    return found[0]


def _decode(fold: np.ndarray) -> bytes | None:
    """The payload the aligned fold carries, or None when its CRC does not check."""
    _, per_bit = _templates()
    soft = per_bit @ fold.reshape(-1)
    bits = _viterbi(soft / (np.abs(soft).mean() + 1e-9))
    payload, check = np.packbits(bits[:64]).tobytes(), np.packbits(bits[64:]).tobytes()
    return payload if binascii.crc_hqx(payload, 0xFFFF).to_bytes(2, "big") == check else None


# The error-correcting code -----------------------------------------------------------------------


@lru_cache(maxsize=1)
def _trellis() -> np.ndarray:
    """For each 7-bit register (6 bits of state, the newest bit lowest), its 3 output bits."""
    registers = np.arange(1 << (_MEMORY + 1))
    return np.array([[bin(int(r) & poly).count("1") & 1 for poly in _POLYS] for r in registers], dtype=np.float32)


def _encode(payload: bytes) -> np.ndarray:
    """The 258 coded bits (0/1) for ``payload`` with its CRC-16, terminated in the zero state."""
    crc = binascii.crc_hqx(payload, 0xFFFF).to_bytes(2, "big")
    info = np.unpackbits(np.frombuffer(payload + crc, dtype=np.uint8))
    outputs = _trellis()
    register, coded = 0, []
    for bit in np.concatenate([info, np.zeros(_MEMORY, dtype=np.uint8)]):
        register = ((register << 1) | int(bit)) & ((1 << (_MEMORY + 1)) - 1)
        coded.append(outputs[register])
    return np.concatenate(coded)


def _viterbi(soft: np.ndarray) -> np.ndarray:
    """The info bits most likely to have given ``soft`` (positive: a 1 was sent), by the Viterbi algorithm."""
    states = 1 << _MEMORY
    signs = 2 * _trellis() - 1  # (128, 3)
    registers = np.arange(2 * states)
    metric = np.full(states, -np.inf)
    metric[0] = 0.0
    steps = len(soft) // len(_POLYS)
    choices = np.zeros((steps, states), dtype=bool)
    for step in range(steps):
        # Register r moves from state r >> 1 to state r & 63; the two registers into a state differ in their top bit.
        candidates = metric[registers >> 1] + signs @ soft[3 * step : 3 * step + 3]
        choices[step] = candidates[states:] > candidates[:states]
        metric = np.where(choices[step], candidates[states:], candidates[:states])
    state, bits = 0, []
    for step in range(steps - 1, -1, -1):
        bits.append(state & 1)
        register = state + states * int(choices[step, state])
        state = register >> 1
    return np.array(bits[::-1][: steps - _MEMORY], dtype=np.uint8)
