"""A ControlNet unit as a request holds it, in sd-webui-controlnet's vocabulary, and its infotext.

The field names, value spellings and defaults are the extension's (its ``ControlNetUnit``), so that its API
bodies, its infotext (``ControlNet 0: "Module: canny, Model: ..., Weight: 1, ..."``) and lienzo's CLI and
studio all say the same. What the unit's image and model become (a control map, a loaded network) is
the service's work (:mod:`lienzo.control.prepare`); the denoiser only sees prepared controls. This module
imports no torch: the CLI validates units before anything heavy.
"""

from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lienzo.errors import LienzoError
from lienzo.generation.fields import InfotextKey, image_hash

ControlMode = Literal["Balanced", "My prompt is more important", "ControlNet is more important"]
ResizeMode = Literal["Just Resize", "Crop and Resize", "Resize and Fill"]
CONTROL_MODES: tuple[str, ...] = ControlMode.__args__
RESIZE_MODES: tuple[str, ...] = ResizeMode.__args__
# The extension's UI offers 3 units by default and up to 10 in its settings; each unit is a second network
# pass over every row of every step.
MAX_CONTROL_UNITS = 8
MAX_CONTROL_WEIGHT = 2.0  # the extension's slider
MIN_PROCESSOR_RES, MAX_PROCESSOR_RES = 64, 2048


class ControlUnit(BaseModel):
    """One ControlNet (or T2I-Adapter) unit: a picture, what turns it into a control map, the network that
    reads the map and how strongly and when it steers the picture."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    image: Image.Image | None = Field(None, description="the input picture; None: the img2img input image")
    module: str = Field("none", description="preprocessor (sd-webui-controlnet's module name or alias); none: the image is the map")
    model: str = Field(description="ControlNet or T2I-Adapter in the models dir's ControlNet folder: name, file name or 'name [hash]'")
    weight: float = Field(1.0, ge=0, le=MAX_CONTROL_WEIGHT, description=f"how strongly it steers, 0 to {MAX_CONTROL_WEIGHT:g}")
    guidance_start: float = Field(0.0, ge=0, le=1, description="share of the steps before it starts, 0 to 1")
    guidance_end: float = Field(1.0, ge=0, le=1, description="share of the steps after which it stops, 0 to 1")
    control_mode: ControlMode = "Balanced"
    resize_mode: ResizeMode = "Crop and Resize"
    pixel_perfect: bool = Field(False, description="run the preprocessor at the picture's own resolution")
    processor_res: int = Field(512, ge=MIN_PROCESSOR_RES, le=MAX_PROCESSOR_RES, description="preprocessor resolution, pixels")
    threshold_a: float | None = Field(None, description="the preprocessor's first slider (canny: low threshold); None: its default")
    threshold_b: float | None = Field(None, description="the preprocessor's second slider (canny: high threshold); None: its default")

    @field_validator("module")
    @classmethod
    def _module(cls, v: str) -> str:
        from lienzo.control.preprocessors import find_preprocessor

        return find_preprocessor(v.strip() or "none").name

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        v = v.strip()
        if not v or v.lower() == "none":
            raise ValueError("name a ControlNet model (lienzo models lists them)")
        return v

    @model_validator(mode="after")
    def _window(self) -> "ControlUnit":
        if self.guidance_start > self.guidance_end:
            raise ValueError(f"guidance_start ({self.guidance_start:g}) must not be after guidance_end ({self.guidance_end:g})")
        return self

    def active(self, step: int, steps: int) -> bool:
        """Whether the unit steers step ``step`` (0-based) of ``steps``: the extension's rule, on the share of
        the steps done, both ends included."""
        done = step / steps
        return self.guidance_start <= done <= self.guidance_end


# -- infotext ---------------------------------------------------------------------------------------

# (infotext word, field) in the extension's order; the words are its field names in title case.
_WORDS = (
    ("Module", "module"), ("Model", "model"), ("Weight", "weight"), ("Resize Mode", "resize_mode"),
    ("Processor Res", "processor_res"), ("Threshold A", "threshold_a"), ("Threshold B", "threshold_b"),
    ("Guidance Start", "guidance_start"), ("Guidance End", "guidance_end"), ("Pixel Perfect", "pixel_perfect"),
    ("Control Mode", "control_mode"),
)
_FIELDS = dict(_WORDS)
_NUMBERS = {"weight": float, "processor_res": int, "threshold_a": float, "threshold_b": float, "guidance_start": float, "guidance_end": float}


def write_unit(unit: ControlUnit) -> str:
    """``Module: canny, Model: name [hash], Weight: 1.0, ...`` as the extension writes a unit (its unset
    sliders left out)."""
    values = {word: getattr(unit, name) for word, name in _WORDS}
    return ", ".join(f"{word}: {value}" for word, value in values.items() if value is not None)


def read_unit(text: str, key: str) -> dict:
    """A unit's fields (no image) from its infotext; keys the extension writes that lienzo has no use for
    (``Low Vram``, ``Hr Option``, ``Save Detected Map``) are passed over."""
    fields: dict = {}
    for item in text.split(","):
        word, sep, value = item.strip().partition(": ")
        if not sep:
            raise LienzoError(f"infotext {key!r} must be 'Module: NAME, Model: NAME, ...', got {text!r}")
        name = _FIELDS.get(word)
        if name is None:
            continue
        if name in _NUMBERS:
            try:
                fields[name] = _NUMBERS[name](float(value)) if _NUMBERS[name] is int else float(value)
            except ValueError:
                raise LienzoError(f"infotext {key!r}: {word} must be a number, got {value!r}") from None
        elif name == "pixel_perfect":
            fields[name] = value == "True"
        else:
            fields[name] = value
    if "model" not in fields:
        raise LienzoError(f"infotext {key!r} names no Model")
    return fields


def _write_units(units: list[ControlUnit]) -> dict[str, str] | None:
    """``ControlNet 0``, ``ControlNet 1``, ... as the extension writes them, then lienzo's ``Control images``: the
    hash of each unit's input picture (the extension keeps none), so that a remake can check it was given the same
    pictures; ``-`` for a unit that read the img2img input."""
    if not units:
        return None
    written = {f"ControlNet {i}": write_unit(unit) for i, unit in enumerate(units)}
    hashes = ", ".join(image_hash(u.image) if u.image is not None else "-" for u in units)
    return written | {"Control images": f"{len(units)}: {hashes}"}


def _is_unit_key(key: str) -> bool:
    number = key.removeprefix("ControlNet ")
    return (number != key and number.isdigit()) or key == "Control images"


def _read_units(texts: dict[str, str]) -> list[dict]:
    """Each unit's fields, with ``image`` the hash of the picture it was made with (None: the img2img input, or
    not recorded). The pictures are not in the infotext: a remake must be given them again (see check_control_images)."""
    numbered = sorted((int(k.removeprefix("ControlNet ")), v) for k, v in texts.items() if k != "Control images")
    units = [read_unit(text, f"ControlNet {i}") for i, text in numbered]
    hashes: tuple[str, ...] = ()
    if "Control images" in texts:
        count, _, listed = texts["Control images"].partition(":")
        hashes = tuple(h.strip() for h in listed.split(",") if h.strip())
        if not count.strip().isdigit() or int(count) != len(hashes) or len(hashes) != len(units):
            raise LienzoError(f"infotext 'Control images' must be 'COUNT: HASH, ...' with one hash per unit, got {texts['Control images']!r}")
    for unit, recorded in zip(units, hashes):
        unit["image"] = None if recorded == "-" else recorded
    return units


CONTROLNETS = InfotextKey("ControlNet", write=_write_units, read=_read_units, matches=_is_unit_key)


def check_control_images(recorded: list[dict], images: list[Image.Image | None], flag: str = "controlnets") -> None:
    """A remake's control pictures must be the ones the picture recorded, unit by unit: the infotext keeps only
    their hashes. ``flag`` is what the door calls the field."""
    if len(images) != len(recorded):
        raise LienzoError(f"{flag}: the picture was made with {len(recorded)} ControlNet unit(s); give {len(recorded)} control image(s), got {len(images)}")
    for place, (unit, image) in enumerate(zip(recorded, images, strict=True)):
        wanted = unit.get("image")
        given = None if image is None else image_hash(image)
        if wanted is not None and given != wanted:
            raise LienzoError(f"{flag}: control image {place + 1} ({given or 'none'}) is not the one the picture was made with ({wanted})")
