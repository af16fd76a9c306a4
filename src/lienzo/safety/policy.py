"""What a policy does to a flagged image: ``blur`` leaves only colour, ``block`` leaves nothing."""

from dataclasses import dataclass

from PIL import Image, ImageFilter

from lienzo.safety.base import SafetyFilter, Verdict
from lienzo.settings import SafetyPolicy

# The label each policy gives a flagged image, in responses and in the infotext.
FILTERED_LABELS = {"blur": "blurred", "block": "blocked"}

# A flagged image is averaged down to this many pixels on its long side before it is blown up again:
# at 8 px a 512x512 picture keeps its colours and nothing of its shapes, text or faces.
_BLUR_CELLS = 8


@dataclass(frozen=True)
class Screened:
    """One image after the policy: the image to keep, and what was done to it (None: passed)."""

    image: Image.Image
    filtered: str | None = None  # "blurred" or "blocked"
    reason: str | None = None

    @property
    def label(self) -> str | None:
        """The infotext value: ``blurred``, or ``blurred (reason)`` when the filter gave one."""
        if self.filtered is None:
            return None
        return f"{self.filtered} ({self.reason})" if self.reason else self.filtered


def blur(image: Image.Image) -> Image.Image:
    """A blur that leaves nothing recognisable: box-average to 8 px on the long side, scale back,
    then a Gaussian of 1/16 of the long side to smooth the 8-px grid into soft colour fields."""
    image = image.convert("RGB")
    long_side = max(image.size)
    scale = _BLUR_CELLS / long_side
    small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BOX)
    return small.resize(image.size, Image.BILINEAR).filter(ImageFilter.GaussianBlur(long_side / 16))


def block(image: Image.Image) -> Image.Image:
    """A flat black image of the same size, as AUTOMATIC1111 and diffusers return for a flagged one."""
    return Image.new("RGB", image.size, (0, 0, 0))


def apply_policy(images: list[Image.Image], verdicts: list[Verdict], policy: SafetyPolicy) -> list[Screened]:
    """Blur or block the flagged images; the others pass unchanged (and ``off`` passes everything)."""
    if len(verdicts) != len(images):
        raise ValueError(f"the safety filter gave {len(verdicts)} verdicts for {len(images)} images")
    if policy == "off":
        return [Screened(image) for image in images]
    replace = blur if policy == "blur" else block
    return [
        Screened(replace(image), FILTERED_LABELS[policy], verdict.reason) if verdict.flagged else Screened(image)
        for image, verdict in zip(images, verdicts, strict=True)
    ]


def screen(safety_filter: SafetyFilter, images: list[Image.Image], policy: SafetyPolicy, prompt: str = "") -> list[Screened]:
    """Run ``safety_filter`` on a batch and apply ``policy`` to what it flags."""
    if policy == "off":
        return [Screened(image) for image in images]
    return apply_policy(images, list(safety_filter.check(images, prompt)), policy)
