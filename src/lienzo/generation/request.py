"""GenerationRequest: the one object every front door builds, and the one place that knows the limits."""

import math
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from lienzo.errors import InvalidRequestError
from lienzo.generation.samplers import SCHEDULES, resolve_sampler

MAX_SIDE = 4096
MAX_STEPS = 150  # AUTOMATIC1111's slider limit; more steps stop changing the picture long before
MAX_SEED = 2**32 - 1
MAX_BATCH_SIZE = 16
MAX_BATCH_COUNT = 100

Fill = Literal["fill", "original", "latent noise", "latent nothing"]

# field: (lowest, highest, unit) for every plain numeric limit.
_RANGES = {
    "steps": (1, MAX_STEPS, ""),
    "cfg_scale": (0, 30, ""),
    "batch_size": (1, MAX_BATCH_SIZE, ""),
    "batch_count": (1, MAX_BATCH_COUNT, ""),
    "clip_skip": (1, 12, ""),
    "denoising_strength": (0, 1, ""),
    "mask_blur": (0, 256, " pixels"),
    "only_masked_padding": (0, 256, " pixels"),
}


class GenerationRequest(BaseModel):
    """Everything that decides the pixels, in AUTOMATIC1111's vocabulary.

    ``init_image`` makes it img2img, ``mask`` inpaint, ``outpaint_*`` outpaint. ``width``/``height``
    of ``None`` mean the model's native size (txt2img) or the input image's size (the other modes).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", validate_assignment=True)

    prompt: str = ""
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "DPM++ 2M"
    schedule: str = "Automatic"
    seed: int = -1
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int = 1

    init_image: Image.Image | None = None
    denoising_strength: float = 0.75
    mask: Image.Image | None = None
    mask_blur: int = 4
    inpaint_only_masked: bool = False
    only_masked_padding: int = 32
    inpainting_fill: Fill = "original"
    outpaint_left: int = 0
    outpaint_right: int = 0
    outpaint_up: int = 0
    outpaint_down: int = 0

    @field_validator("width", "height")
    @classmethod
    def _side(cls, v: int | None, info) -> int | None:
        if v is not None and (v % 8 or not 64 <= v <= MAX_SIDE):
            raise ValueError(f"{info.field_name} must be a multiple of 8 between 64 and {MAX_SIDE}, got {v}")
        return v

    @field_validator(*_RANGES)
    @classmethod
    def _in_range(cls, v: float, info) -> float:
        low, high, unit = _RANGES[info.field_name]
        if not math.isfinite(v) or not low <= v <= high:
            raise ValueError(f"{info.field_name} must be between {low} and {high}{unit}, got {v}")
        return v

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v: str) -> str:
        try:
            return resolve_sampler(v).name
        except InvalidRequestError as err:
            raise ValueError(str(err).removeprefix("sampler: ")) from None

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        matches = [s for s in SCHEDULES if s.lower() == v.lower()]
        if not matches:
            raise ValueError(f"unknown schedule type {v!r}; choose one of: {', '.join(SCHEDULES)}")
        return matches[0]

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not -1 <= v <= MAX_SEED:
            raise ValueError(f"seed must be -1 (random) or between 0 and {MAX_SEED}, got {v}")
        return v

    @field_validator("outpaint_left", "outpaint_right", "outpaint_up", "outpaint_down")
    @classmethod
    def _outpaint(cls, v: int, info) -> int:
        if v % 8 or not 0 <= v <= MAX_SIDE:
            raise ValueError(f"{info.field_name} must be a multiple of 8 between 0 and {MAX_SIDE}, got {v}")
        return v

    @model_validator(mode="after")
    def _images(self) -> "GenerationRequest":
        if self.mask is not None and self.init_image is None:
            raise ValueError("mask needs an init_image to paint into")
        if self.mask is not None and self.init_image is not None and self.mask.size != self.init_image.size:
            m, i = self.mask.size, self.init_image.size
            raise ValueError(f"mask is {m[0]}x{m[1]} but the image is {i[0]}x{i[1]}; they must match")
        if self.is_outpaint and self.init_image is None:
            raise ValueError("outpainting needs an init_image to grow")
        if self.is_outpaint and self.mask is not None:
            raise ValueError("outpainting makes its own mask; give either a mask or outpaint amounts, not both")
        return self

    @property
    def is_outpaint(self) -> bool:
        return any((self.outpaint_left, self.outpaint_right, self.outpaint_up, self.outpaint_down))

    @property
    def mode(self) -> Literal["txt2img", "img2img", "inpaint", "outpaint"]:
        if self.init_image is None:
            return "txt2img"
        if self.is_outpaint:
            return "outpaint"
        return "inpaint" if self.mask is not None else "img2img"


def build_request(**fields) -> GenerationRequest:
    """Validate fields into a request, turning pydantic's report into one line naming the field."""
    try:
        return GenerationRequest(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "request"
        message = first["msg"].removeprefix("Value error, ")
        raise InvalidRequestError(field, message) from None
