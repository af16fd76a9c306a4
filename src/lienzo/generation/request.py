"""GenerationRequest: the one object every front door builds, and the one place that knows the limits."""

import math
from collections.abc import Callable
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lienzo.errors import InvalidRequestError
from lienzo.generation.lora_tags import extract_lora_tags
from lienzo.generation.samplers import resolve_sampler, schedule_label
from lienzo.images.metadata import lone_surrogate
from lienzo.settings import SafetyPolicy

MIN_SIDE = 64
MAX_SIDE = 4096
MAX_STEPS = 150  # AUTOMATIC1111's slider limit; more steps stop changing the picture long before
MAX_SEED = 2**32 - 1
MAX_BATCH_SIZE = 16
MAX_BATCH_COUNT = 100
# A1111 takes negative LoRA weights too (they push away from the LoRA); beyond ±10 any LoRA is noise.
MAX_LORA_WEIGHT = 10
# Long prompts are real (A1111 encodes them in 75-token chunks, BREAK starts another), but every chunk is a
# text-encoder pass and widens every U-Net step: 40,000 characters is about 10,000 CLIP tokens of prompt
# text (4 characters a token), ten times the longest prompts in use. Characters, not tokens: exact, and
# counted without loading a tokenizer, so a client can check it too.
MAX_PROMPT_CHARS = 40_000

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
_OUTPAINT = ("outpaint_left", "outpaint_right", "outpaint_up", "outpaint_down")
# What the limits leave out, as the API descriptions say it: rules across fields and the server's settings.
_UNSAID = {
    "width": "width x height is also held to the server's max_pixels",
    "height": "width x height is also held to the server's max_pixels",
    "steps": "also at most the server's max_steps",
    "batch_size": "the images of one request (batch size x batches) are also held to the server's max_images",
    "batch_count": "the images of one request (batch size x batches) are also held to the server's max_images",
}


def json_limits(name: str) -> dict[str, int | float]:
    """The limits the validators below hold ``name`` to, as JSON Schema keywords ({} for none). The API
    descriptions take them from here, so that a value they allow is one the field takes (what depends on
    other fields or on the server's settings is said in words, see _UNSAID)."""
    if name in ("width", "height"):
        return {"minimum": MIN_SIDE, "maximum": MAX_SIDE, "multipleOf": 8}
    if name in _OUTPAINT:
        return {"minimum": 0, "maximum": MAX_SIDE, "multipleOf": 8}
    if name == "seed":
        return {"minimum": -1, "maximum": MAX_SEED}
    if name in ("prompt", "negative_prompt"):
        return {"maxLength": MAX_PROMPT_CHARS}
    if name in _RANGES:
        low, high, _ = _RANGES[name]
        return {"minimum": low, "maximum": high}
    return {}


def schema_limits(name: str) -> Callable[[dict[str, Any]], None]:
    """A ``json_schema_extra`` for an API field that carries ``name``: its limits, on the value (not on
    the null an optional field also takes), and what they leave out, in the field's description."""
    keywords, unsaid = json_limits(name), _UNSAID.get(name)

    def extra(schema: dict[str, Any]) -> None:
        for branch in schema.get("anyOf", [schema]):
            if branch.get("type") != "null":
                branch.update(keywords)
        if unsaid:
            schema["description"] = "; ".join(filter(None, [schema.get("description"), unsaid]))

    return extra


def _check_lora_weight(weight: float, what: str) -> float:
    if not math.isfinite(weight) or not -MAX_LORA_WEIGHT <= weight <= MAX_LORA_WEIGHT:
        raise ValueError(f"{what} must be between -{MAX_LORA_WEIGHT} and {MAX_LORA_WEIGHT}, got {weight:g}")
    return weight


class LoraRef(BaseModel):
    """A LoRA by name (a file in the models dir's ``Lora`` folder, by stem, or a path) and its weight.

    Also accepts ``"name"``, ``("name",)`` and ``("name", 0.5)``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The validators below check these (with messages that say what is allowed); the schema tells clients.
    name: str = Field(description="not blank, without '<', '>' or ':'", json_schema_extra={"minLength": 1, "pattern": "^[^<>:]*$"})
    weight: float = Field(1.0, json_schema_extra={"minimum": -MAX_LORA_WEIGHT, "maximum": MAX_LORA_WEIGHT})

    @model_validator(mode="before")
    @classmethod
    def _from_short_forms(cls, v):
        if isinstance(v, str):
            return {"name": v}
        if isinstance(v, (tuple, list)):
            if not 1 <= len(v) <= 2:
                raise ValueError(f"a LoRA is (name, weight), got {v!r}")
            return dict(zip(("name", "weight"), v))
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        v = v.strip()
        # The name goes into the infotext as <lora:NAME:WEIGHT>, which these characters would break.
        if not v or any(c in v for c in "<>:"):
            raise ValueError(f"a LoRA name must be non-empty, without '<', '>' or ':', got {v!r}")
        problem = lone_surrogate(v)
        if problem is not None:
            raise ValueError(f"a LoRA name {problem}")
        return v

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: float) -> float:
        return _check_lora_weight(v, "a LoRA weight")


class GenerationRequest(BaseModel):
    """Everything that decides the pixels, in AUTOMATIC1111's vocabulary.

    ``init_image`` makes it img2img, ``mask`` inpaint, ``outpaint_*`` outpaint. ``width``/``height``
    of ``None`` mean the model's native size (txt2img) or the input image's size (the other modes).
    LoRAs come from ``loras`` and from ``<lora:NAME:WEIGHT>`` tags in the prompt (see :meth:`requested_loras`).
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
    loras: list[LoraRef] = []

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
    # DeepCache: reuse deep U-Net features across steps; faster, a little less faithful. Never on by default.
    fast: bool = False

    # Not pixels but what happens to them: None leaves the choice to the settings / the front door.
    watermark: bool | None = None  # invisible watermark in saved images (settings default: on)
    safety: SafetyPolicy | None = None  # safety filter policy (defaults: blur in the server, off in the CLI)

    @field_validator("width", "height")
    @classmethod
    def _side(cls, v: int | None, info) -> int | None:
        if v is not None and (v % 8 or not MIN_SIDE <= v <= MAX_SIDE):
            raise ValueError(f"{info.field_name} must be a multiple of 8 between {MIN_SIDE} and {MAX_SIDE}, got {v}")
        return v

    @field_validator(*_RANGES)
    @classmethod
    def _in_range(cls, v: float, info) -> float:
        low, high, unit = _RANGES[info.field_name]
        if not math.isfinite(v) or not low <= v <= high:
            raise ValueError(f"{info.field_name} must be between {low} and {high}{unit}, got {v}")
        return v

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _length(cls, v: str, info) -> str:
        if len(v) > MAX_PROMPT_CHARS:
            raise ValueError(f"{info.field_name} is {len(v):,} characters long; the limit is {MAX_PROMPT_CHARS:,}")
        return v

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _savable(cls, v: str) -> str:
        # Refused here, at every front door, not half-way through the job: the tokenizer, the PNG's
        # text and the gallery all fail on it.
        problem = lone_surrogate(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("prompt")
    @classmethod
    def _lora_tags(cls, v: str) -> str:
        try:
            _, tags = extract_lora_tags(v)
        except InvalidRequestError as err:
            raise ValueError(str(err).removeprefix("prompt: ")) from None
        for name, weight in tags:
            _check_lora_weight(weight, f"the weight in <lora:{name}:{weight:g}>")
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
        """Any schedule id, label or alias A1111 lists, in any case, as its label; every sampler
        takes every schedule (one its scheduler cannot run runs as the nearest, see samplers.py)."""
        try:
            return schedule_label(v)
        except InvalidRequestError as err:
            raise ValueError(str(err).removeprefix("schedule: ")) from None

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not -1 <= v <= MAX_SEED:
            raise ValueError(f"seed must be -1 (random) or between 0 and {MAX_SEED}, got {v}")
        return v

    @field_validator(*_OUTPAINT)
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

    def requested_loras(self) -> list[LoraRef]:
        """The LoRAs to apply: the prompt's tags in order, then ``loras`` no tag names (for a name in
        both, the tag's weight wins, as what the prompt shows is what the image got)."""
        _, tags = extract_lora_tags(self.prompt)
        tagged = {name for name, _ in tags}
        fields = {lora.name: lora for lora in self.loras if lora.name not in tagged}
        return [LoraRef(name=name, weight=weight) for name, weight in tags] + list(fields.values())

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
