"""GenerationRequest: the one object every front door builds, and the one place that knows the limits."""

import math
from collections.abc import Callable
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lienzo.errors import InvalidRequestError
from lienzo.generation.fields import (
    FAST, MASKED, OUTPAINT, REFERENCES, SEED_RESIZE, SIZE, WITH_IMAGE, InfotextKey, Limits, Row, Spec, Widget, number, rows, sizes_reader,
    spec_of, whole, yes,
)
from lienzo.generation.control_unit import CONTROLNETS, MAX_CONTROL_UNITS, ControlUnit
from lienzo.generation.lora_tags import extract_lora_tags
from lienzo.generation.prompt_schedule import split_subprompts
from lienzo.generation.samplers import resolve_sampler, schedule_label
from lienzo.generation.wildcards import parse as parse_dynamic
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
# Composable prompts: every AND subprompt adds a U-Net row for every image of a batch, all in one call
# (16 images x 32 subprompts is 512 rows); prompts in use have a handful.
MAX_SUBPROMPTS = 32
# Flux.2 Klein's reference images (its editing): Black Forest Labs give Klein up to 4. Each adds up to 4,096
# tokens (1024x1024 pixels) to every transformer call, whose attention grows with the square of the sequence.
MAX_REFERENCE_IMAGES = 4
# Flux2KleinPipeline's checks of a reference (Flux2ImageProcessor.check_image_input): its shorter side, its shape.
MIN_REFERENCE_SIDE = 64
MAX_REFERENCE_RATIO = 8
REFERENCE_MODES = frozenset(("txt2img", "img2img"))
TXT2IMG = frozenset({"txt2img"})
# A1111's hires fix: its slider goes to 4x, and its second pass is an img2img of the whole enlarged picture.
MAX_HIRES_SCALE = 4.0
HIRES_UPSCALERS = "Latent, Latent (antialiased), Latent (bicubic), Latent (bicubic antialiased), Latent (nearest), " \
    "Latent (nearest-exact), None, Lanczos, Nearest or a model upscaler (lienzo upscale --list)"


def _hires(r) -> bool:
    return r.enable_hr

Fill = Literal["fill", "original", "latent noise", "latent nothing"]

_SIDE = Limits(MIN_SIDE, MAX_SIDE, multiple=8)
_GROW = Limits(0, MAX_SIDE, multiple=8)
_SEED = Limits(-1, MAX_SEED, words=f"-1 (random) or between 0 and {MAX_SEED}")
_FROM = Limits(-1, MAX_SIDE, words=f"between -1 and {MAX_SIDE} (0 or -1: off)")
_HIRES_SIDE = Limits(0, MAX_SIDE, multiple=8, words=f"0 (from hr_scale) or a multiple of 8 up to {MAX_SIDE}")
_HIRES_RESIZE = InfotextKey(
    "Hires resize", write=lambda on, w, h: f"{w}x{h}" if on and (w or h) else None,
    read=lambda text: (True, *sizes_reader("Hires resize")(text)),
)

# What the limits leave out, as the API descriptions say it: rules across fields and the server's settings.
_UNSAID = {
    "width": "width x height is also held to the server's max_pixels",
    "height": "width x height is also held to the server's max_pixels",
    "steps": "also at most the server's max_steps",
    "batch_size": "the images of one request (batch size x batches) are also held to the server's max_images",
    "batch_count": "the images of one request (batch size x batches) are also held to the server's max_images",
}


def json_limits(name: str) -> dict[str, int | float]:
    """The limits the table holds field ``name`` to, as JSON Schema keywords ({} for none). The API
    descriptions take them from here, so that a value they allow is one the field takes (what depends on
    other fields or on the server's settings is said in words, see _UNSAID)."""
    spec = spec_of(GenerationRequest.model_fields[name])
    if spec is None:
        return {}
    if spec.max_chars is not None:
        return {"maxLength": spec.max_chars}
    return spec.limits.json() if spec.limits else {}


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


def _outpaint(side: str, where: str | None = None) -> Spec:
    return Spec(
        side.title(), f"pixels to add {where or 'on the ' + side} (multiple of 8)", modes=frozenset({"outpaint"}), limits=_GROW,
        cli=side, infotext=OUTPAINT, widget=Widget("number", step=64),
    )


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
    """Everything that decides the pixels, in AUTOMATIC1111's vocabulary, and the field table.

    ``init_image`` makes it img2img, ``mask`` inpaint, ``outpaint_*`` outpaint. ``width``/``height``
    of ``None`` mean the model's native size (txt2img) or the input image's size (the other modes).
    LoRAs come from ``loras`` and from ``<lora:NAME:WEIGHT>`` tags in the prompt (see :meth:`requested_loras`).

    Each field's :class:`~lienzo.generation.fields.Spec` is the one place for its limits, help, modes
    and names at every door: the CLI's options, the three APIs' bodies and error names, the infotext
    writer and reader, ``--from`` and the studio's controls (``GET /api/v1/fields``) are made from it.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", validate_assignment=True)

    prompt: Annotated[str, Spec(
        "Prompt", f"may hold <lora:NAME:WEIGHT> tags, WEIGHT from -{MAX_LORA_WEIGHT} to {MAX_LORA_WEIGHT}",
        max_chars=MAX_PROMPT_CHARS, a1111="prompt", a1111_default="", widget=Widget("text"),
    )] = ""
    negative_prompt: Annotated[str, Spec(
        "Negative prompt", "what the image should not show", max_chars=MAX_PROMPT_CHARS, cli="negative", cli_short="-n",
        a1111="negative_prompt", a1111_default="", openai="negative_prompt", widget=Widget("text"),
    )] = ""
    steps: Annotated[int | None, Spec(
        "Steps", "denoising steps [default: the model family's: 20; SD 3.x 28; Flux.1 dev 20, schnell 4]",
        limits=Limits(1, MAX_STEPS), cli="steps", a1111="steps", a1111_default=50, openai="steps",
        infotext=whole("Steps", always=True), widget=Widget("number"),
    )] = None
    sampler: Annotated[str | None, Spec(
        "Sampler", "sampler by its AUTOMATIC1111 name or alias, in any case (`lienzo samplers`, GET /api/v1/samplers) "
        "[default: the model family's: DPM++ 2M; Euler for SD 3.x and Flux.1]",
        cli="sampler", a1111="sampler_name", a1111_body=False, openai="sampler", infotext=InfotextKey("Sampler", always=True),
        widget=Widget("select"),
    )] = None
    schedule: Annotated[str, Spec(
        "Schedule", "schedule type by its A1111 label or id, in any case: Karras, Exponential, SGM Uniform, Align Your Steps, ... "
        "(`lienzo samplers`, GET /api/v1/samplers)",
        cli="schedule", a1111="scheduler", a1111_body=False, infotext=InfotextKey("Schedule type", always=True), widget=Widget("select"),
    )] = "Automatic"
    cfg_scale: Annotated[float | None, Spec(
        "CFG scale", "classifier-free guidance scale: how closely to follow the prompt; 1 runs no negative pass "
        "[default: the model family's: 7; SD 3.x 5; Flux.1 1]", limits=Limits(0, 30), cli="cfg",
        a1111="cfg_scale", openai="cfg_scale", infotext=number("CFG scale", always=True), widget=Widget("range", 1, 20, 0.5),
    )] = None
    distilled_cfg_scale: Annotated[float | None, Spec(
        "Distilled CFG scale", "Flux.1 dev's own guidance strength, an input of the network rather than a second pass "
        "(Forge's Distilled CFG Scale) [default: 3.5]; ignored by models without it",
        limits=Limits(0, 30), cli="distilled-cfg", a1111="distilled_cfg_scale", openai="distilled_cfg_scale",
        infotext=number("Distilled CFG Scale"), widget=Widget("range", 0, 10, 0.1),
    )] = None
    shift: Annotated[float | None, Spec(
        "Shift", "flow-matching models' timestep shift (SD 3.x: 3; Flux.1 sets it from the image size) [default: the model's]",
        limits=Limits(0.1, 20), cli="shift", a1111="shift", openai="shift", infotext=number("Shift"),
    )] = None
    seed: Annotated[int, Spec(
        "Seed", "-1 picks a random seed; image i of a batch gets seed + i",
        limits=_SEED, cli="seed", a1111="seed", openai="seed",
        infotext=whole("Seed", always=True), widget=Widget("number"),
    )] = -1
    width: Annotated[int | None, Spec(
        "Width", "multiple of 8 [default: model's native size or input size]", limits=_SIDE, cli="width", cli_short="-W",
        a1111="width", a1111_default=512, openai="size", infotext=SIZE, widget=Widget("range", 256, 1024, 64),
    )] = None
    height: Annotated[int | None, Spec(
        "Height", "multiple of 8 [default: model's native size or input size]", limits=_SIDE, cli="height", cli_short="-H",
        a1111="height", a1111_default=512, openai="size", infotext=SIZE, widget=Widget("range", 256, 1024, 64),
    )] = None
    subseed: Annotated[int, Spec(
        "Variation seed", "the seed of the noise a variation moves toward; -1 picks a random one; image i of a batch gets "
        "subseed + i (and all keep the seed)", limits=_SEED, cli="subseed", a1111="subseed", infotext=whole(
            "Variation seed", always=True, when=lambda r: r.subseed_strength > 0), widget=Widget("number"),
    )] = -1
    subseed_strength: Annotated[float, Spec(
        "Variation strength", "how far the noise moves from the seed's toward the variation seed's, 0 to 1 (0: off)",
        limits=Limits(0, 1), cli="subseed-strength", a1111="subseed_strength", infotext=number("Variation seed strength"),
        widget=Widget("range", 0, 1, 0.01),
    )] = 0.0
    seed_resize_from_w: Annotated[int, Spec(
        "Seed resize from width", "draw the seed's noise as for this width and centre it (0 or -1: off), so a seed keeps its "
        "picture at a new size", limits=_FROM, cli="seed-resize-from-w", a1111="seed_resize_from_w", a1111_default=-1,
        infotext=SEED_RESIZE,
    )] = 0
    seed_resize_from_h: Annotated[int, Spec(
        "Seed resize from height", "as seed_resize_from_w, for the height", limits=_FROM, cli="seed-resize-from-h",
        a1111="seed_resize_from_h", a1111_default=-1, infotext=SEED_RESIZE,
    )] = 0
    batch_size: Annotated[int, Spec(
        "Images", "images per batch (made together)", limits=Limits(1, MAX_BATCH_SIZE), cli="batch-size", a1111="batch_size",
        openai="n", widget=Widget("number"),
    )] = 1
    batch_count: Annotated[int, Spec(
        "Batches", "batches, one after another", limits=Limits(1, MAX_BATCH_COUNT), cli="batch-count", a1111="n_iter",
    )] = 1
    init_image: Annotated[Image.Image | None, Spec("Image", "the picture to start from", modes=WITH_IMAGE, a1111="init_images", a1111_body=False)] = None
    denoising_strength: Annotated[float, Spec(
        "Strength", "denoising strength: how much of the picture to repaint, 0 to 1", modes=WITH_IMAGE, limits=Limits(0, 1),
        mode_defaults={"outpaint": 0.8}, cli="strength", a1111="denoising_strength", openai="denoising_strength",
        infotext=number("Denoising strength", always=True), widget=Widget("range", 0, 1, 0.05),
    )] = 0.75
    mask: Annotated[Image.Image | None, Spec("Mask", "white = repaint, black = keep; the image's size", modes=frozenset({"inpaint"}), a1111="mask", a1111_body=False)] = None
    mask_blur: Annotated[int, Spec(
        "Mask blur", "pixels of soft edge around the mask", modes=MASKED, limits=Limits(0, 256, unit=" pixels"),
        mode_defaults={"outpaint": 8}, cli="mask-blur", a1111="mask_blur", a1111_body=False,
        infotext=whole("Mask blur", always=True), widget=Widget("number"),
    )] = 4
    inpainting_fill: Annotated[Fill, Spec(
        "Masked content", "what starts under the mask", modes=MASKED, mode_defaults={"outpaint": "fill"}, cli="fill",
        a1111="inpainting_fill", a1111_body=False, infotext=InfotextKey("Masked content", always=True),
    )] = "original"
    inpaint_only_masked: Annotated[bool, Spec(
        "Only masked", "crop around the mask, work at full resolution, paste back", modes=frozenset({"inpaint"}), cli="only-masked",
        a1111="inpaint_full_res", a1111_body=False, infotext=yes("Inpaint area", "Only masked"), widget=Widget("check"),
    )] = False
    only_masked_padding: Annotated[int, Spec(
        "Masked area padding", "pixels around the mask with only masked", modes=frozenset({"inpaint"}),
        limits=Limits(0, 256, unit=" pixels"), cli="padding", a1111="inpaint_full_res_padding", a1111_body=False,
        infotext=whole("Masked area padding", always=True, when=lambda r: r.inpaint_only_masked),
    )] = 32
    outpaint_left: Annotated[int, _outpaint("left")] = 0
    outpaint_right: Annotated[int, _outpaint("right")] = 0
    outpaint_up: Annotated[int, _outpaint("up", "at the top")] = 0
    outpaint_down: Annotated[int, _outpaint("down", "at the bottom")] = 0
    reference_images: Annotated[list[Image.Image], Spec(
        "Reference images", f"pictures the model draws from (Flux.2 Klein's and Qwen-Image-Edit's editing: 'make the cat "
        f"in the first image blue'), at most {MAX_REFERENCE_IMAGES}, each at least {MIN_REFERENCE_SIDE} pixels a side and "
        f"at most {MAX_REFERENCE_RATIO} times as long as wide; txt2img with no width and height takes the first one's size "
        f"(Qwen-Image-Edit: about a megapixel of the last one's shape)",
        modes=REFERENCE_MODES, cli="reference", infotext=REFERENCES,
    )] = []
    enable_hr: Annotated[bool, Spec(
        "Hires fix", "make the picture at width x height, enlarge it (hr_scale or hr_resize_x/y) and repaint it "
        "(A1111's hires fix: one job, a second img2img pass at the larger size)", modes=TXT2IMG, cli="hires",
        a1111="enable_hr", infotext=_HIRES_RESIZE, widget=Widget("check"),
    )] = False
    hr_scale: Annotated[float, Spec(
        "Upscale by", f"how much the hires fix enlarges, 1 to {MAX_HIRES_SCALE:g} (unless hr_resize_x/y are given)",
        modes=TXT2IMG, limits=Limits(1, MAX_HIRES_SCALE), cli="hires-scale", a1111="hr_scale",
        infotext=number("Hires upscale", always=True, when=lambda r: r.enable_hr and not (r.hr_resize_x or r.hr_resize_y), implies={"enable_hr": True}),
        widget=Widget("range", 1, 4, 0.05),
    )] = 2.0
    hr_resize_x: Annotated[int, Spec(
        "Resize width to", "the hires fix's width (0: from hr_scale, or from the height keeping the shape)", modes=TXT2IMG,
        limits=_HIRES_SIDE, cli="hires-width", a1111="hr_resize_x", infotext=_HIRES_RESIZE, widget=Widget("number", step=64),
    )] = 0
    hr_resize_y: Annotated[int, Spec(
        "Resize height to", "the hires fix's height (0: from hr_scale, or from the width keeping the shape)", modes=TXT2IMG,
        limits=_HIRES_SIDE, cli="hires-height", a1111="hr_resize_y", infotext=_HIRES_RESIZE, widget=Widget("number", step=64),
    )] = 0
    hr_upscaler: Annotated[str, Spec(
        "Upscaler", f"how the hires fix enlarges: {HIRES_UPSCALERS}", modes=TXT2IMG, cli="hires-upscaler",
        a1111="hr_upscaler", infotext=InfotextKey("Hires upscaler", always=True, when=_hires, implies={"enable_hr": True}),
        widget=Widget("select"),
    )] = "Latent"
    hr_second_pass_steps: Annotated[int, Spec(
        "Hires steps", "steps of the second pass (0: the same as steps); it runs denoising strength of them, as img2img",
        modes=TXT2IMG, limits=Limits(0, MAX_STEPS), cli="hires-steps", a1111="hr_second_pass_steps",
        infotext=whole("Hires steps", when=_hires), widget=Widget("number"),
    )] = 0
    hr_denoising_strength: Annotated[float, Spec(
        "Denoising strength", "how much of the enlarged picture the hires fix repaints, 0 to 1 (A1111's txt2img "
        "denoising_strength, whose default there is 0.75)", modes=TXT2IMG, limits=Limits(0, 1), cli="hires-strength",
        a1111="denoising_strength", a1111_default=0.75,
        infotext=number("Denoising strength", always=True, when=_hires), widget=Widget("range", 0, 1, 0.05),
    )] = 0.7
    hr_sampler: Annotated[str | None, Spec(
        "Hires sampler", "the second pass's sampler (None: the first pass's)", modes=TXT2IMG, cli="hires-sampler",
        a1111="hr_sampler_name", infotext=InfotextKey("Hires sampler", when=_hires), widget=Widget("select"),
    )] = None
    hr_schedule: Annotated[str, Spec(
        "Hires schedule type", "the second pass's schedule type (Automatic: the first pass's, or the hires sampler's own)",
        modes=TXT2IMG, cli="hires-schedule", a1111="hr_scheduler",
        infotext=InfotextKey("Hires schedule type", always=True, when=lambda r: r.enable_hr and (r.hr_sampler is not None or r.hr_schedule != "Automatic")),
        widget=Widget("select"),
    )] = "Automatic"
    hr_prompt: Annotated[str, Spec(
        "Hires prompt", "the second pass's prompt (empty: the prompt)", modes=TXT2IMG, max_chars=MAX_PROMPT_CHARS,
        cli="hires-prompt", a1111="hr_prompt", infotext=InfotextKey("Hires prompt", when=_hires), widget=Widget("text"),
    )] = ""
    hr_negative_prompt: Annotated[str, Spec(
        "Hires negative prompt", "the second pass's negative prompt (empty: the negative prompt)", modes=TXT2IMG,
        max_chars=MAX_PROMPT_CHARS, cli="hires-negative", a1111="hr_negative_prompt",
        infotext=InfotextKey("Hires negative prompt", when=_hires), widget=Widget("text"),
    )] = ""
    refiner: Annotated[str | None, Spec(
        "Refiner", "a second model that takes over for the last steps (A1111's refiner: the SDXL refiner, or any model "
        "of the same kind): a name or file in the models dir", cli="refiner", a1111="refiner_checkpoint",
        infotext=InfotextKey("Refiner"), widget=Widget("select"),
    )] = None
    refiner_switch_at: Annotated[float, Spec(
        "Switch at", "the share of the steps after which the refiner takes over, 0.01 to 1 (with the hires fix: of the first "
        "pass; the second pass is all the refiner's)", limits=Limits(0.01, 1), cli="refiner-switch", a1111="refiner_switch_at",
        infotext=number("Refiner switch at", always=True, when=lambda r: r.refiner is not None), widget=Widget("range", 0.01, 1, 0.01),
    )] = 0.8
    clip_skip: Annotated[int, Spec(
        "Clip skip", "stop the text encoder this many layers before its last (2: what anime models expect)", limits=Limits(1, 12),
        cli="clip-skip", a1111="CLIP_stop_at_last_layers", a1111_body=False, infotext=whole("Clip skip"),
    )] = 1
    loras: Annotated[list[LoraRef], Spec(
        "LoRAs", "LoRAs from the models dir's Lora folder, with weights; also <lora:NAME:WEIGHT> in the prompt", cli="lora",
    )] = []
    controlnets: Annotated[list[ControlUnit], Spec(
        "ControlNet", f"ControlNet / T2I-Adapter units (sd-webui-controlnet's), at most {MAX_CONTROL_UNITS}: each a picture, "
        "a preprocessor, a model from the models dir's ControlNet folder, a weight and a start and end",
        cli="control", infotext=CONTROLNETS,
    )] = []

    combinatorial: Annotated[bool, Spec(
        "Combinatorial", "{a|b} variants and __wildcards__ give every combination in order, one per image, instead of "
        "picks drawn from each image's seed", cli="combinatorial", widget=Widget("check"),
    )] = False
    styles: Annotated[list[str], Spec(
        "Styles", "saved styles (the studio's presets, A1111's styles.csv) merged into the prompts, in order: a style with "
        "{prompt} wraps the prompt, others are appended", cli="style", a1111="styles", a1111_body=False,
    )] = []
    tiling: Annotated[bool, Spec(
        "Tiling", "a seamless texture: the picture wraps around at its edges (circular padding in the U-Net and VAE)",
        cli="tiling", a1111="tiling", a1111_default=False, openai="tiling", infotext=yes("Tiling"), widget=Widget("check"),
    )] = False
    fast: Annotated[bool, Spec(
        "Fast mode", "reuse deep U-Net features across steps (DeepCache): faster, a little less faithful", cli="fast",
        a1111="fast", openai="fast", infotext=FAST, widget=Widget("check"),
    )] = False

    # Not pixels but what happens to them: None leaves the choice to the settings / the front door.
    watermark: Annotated[bool | None, Spec(
        "Watermark", "invisible watermark in saved images [default: on, or the watermark setting]", cli="watermark",
    )] = None
    credentials: Annotated[bool | None, Spec(
        "Content Credentials", "a signed C2PA manifest in saved images [default: on, or the credentials setting]", cli="credentials",
    )] = None
    safety: Annotated[SafetyPolicy | None, Spec(
        "Safety filter", "what to do with images the model's safety checker flags: off, blur or block "
        "[default: the safety_cli / safety_server setting]", cli="safety",
    )] = None

    @field_validator("*")
    @classmethod
    def _in_limits(cls, v, info):
        spec = spec_of(cls.model_fields[info.field_name])
        if spec is not None and spec.limits is not None:
            spec.limits.check(info.field_name, v)
        return v

    @field_validator("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")
    @classmethod
    def _length(cls, v: str, info) -> str:
        if len(v) > MAX_PROMPT_CHARS:
            raise ValueError(f"{info.field_name} is {len(v):,} characters long; the limit is {MAX_PROMPT_CHARS:,}")
        return v

    @field_validator("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")
    @classmethod
    def _savable(cls, v: str) -> str:
        # Refused here, at every front door, not half-way through the job: the tokenizer, the PNG's
        # text and the gallery all fail on it.
        problem = lone_surrogate(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _dynamic_syntax(cls, v: str, info) -> str:
        """Variants and wildcards are resolved per image by the engine; a ``{`` never closed is refused here."""
        try:
            parse_dynamic(v, info.field_name)
        except InvalidRequestError as err:
            raise ValueError(str(err).removeprefix(f"{info.field_name}: ")) from None
        return v

    @field_validator("prompt")
    @classmethod
    def _subprompts(cls, v: str) -> str:
        count = len(split_subprompts(v))
        if count > MAX_SUBPROMPTS:
            raise ValueError(f"has {count} subprompts joined by AND; at most {MAX_SUBPROMPTS} are allowed")
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

    @field_validator("reference_images")
    @classmethod
    def _references(cls, v: list[Image.Image]) -> list[Image.Image]:
        if len(v) > MAX_REFERENCE_IMAGES:
            raise ValueError(f"at most {MAX_REFERENCE_IMAGES} reference images are allowed, got {len(v)}")
        for place, image in enumerate(v, start=1):
            width, height = image.size
            if min(width, height) < MIN_REFERENCE_SIDE:
                raise ValueError(f"image {place} is {width}x{height}; each side must be at least {MIN_REFERENCE_SIDE} pixels")
            if max(width, height) > MAX_REFERENCE_RATIO * min(width, height):
                raise ValueError(f"image {place} is {width}x{height}; a side may be at most {MAX_REFERENCE_RATIO} times the other")
        return v

    @field_validator("refiner")
    @classmethod
    def _refiner(cls, v: str | None) -> str | None:
        v = None if v is None else v.strip()
        return None if not v or v.lower() == "none" else v

    @field_validator("controlnets")
    @classmethod
    def _units(cls, v: list[ControlUnit]) -> list[ControlUnit]:
        if len(v) > MAX_CONTROL_UNITS:
            raise ValueError(f"at most {MAX_CONTROL_UNITS} ControlNet units are allowed, got {len(v)}")
        return v

    @field_validator("sampler", "hr_sampler")
    @classmethod
    def _sampler(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            return resolve_sampler(v).name
        except InvalidRequestError as err:
            raise ValueError(str(err).removeprefix("sampler: ")) from None

    @field_validator("schedule", "hr_schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        """Any schedule id, label or alias A1111 lists, in any case, as its label; every sampler
        takes every schedule (one its scheduler cannot run runs as the nearest, see samplers.py)."""
        try:
            return schedule_label(v)
        except InvalidRequestError as err:
            raise ValueError(str(err).removeprefix("schedule: ")) from None

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
        if self.reference_images and self.mode not in REFERENCE_MODES:
            raise ValueError(f"reference_images are for txt2img and img2img, not {self.mode}")
        if self.init_image is None and any(unit.image is None for unit in self.controlnets):
            raise ValueError("a ControlNet unit without an image reads the img2img input picture; give it an image in txt2img")
        return self

    def hires_size(self, width: int, height: int) -> tuple[int, int]:
        """The hires fix's size for a first pass of ``width`` x ``height``, as A1111 works it out: hr_resize_x/y
        when given (one of them: the other keeps the shape), else hr_scale; rounded down to a multiple of 8."""
        x, y = self.hr_resize_x, self.hr_resize_y
        if x and y:
            return x, y
        if x or y:
            scale = x / width if x else y / height
        else:
            scale = self.hr_scale
        return max(8, int(width * scale) // 8 * 8), max(8, int(height * scale) // 8 * 8)

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


def table() -> list[Row]:
    """The field table, in declaration order."""
    return list(rows(GenerationRequest))


def build_request(**fields) -> GenerationRequest:
    """Validate fields into a request, turning pydantic's report into one line naming the field."""
    try:
        return GenerationRequest(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "request"
        message = first["msg"].removeprefix("Value error, ")
        raise InvalidRequestError(field, message) from None
