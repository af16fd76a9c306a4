"""sd-webui-controlnet's API: its units in ``alwayson_scripts`` and its ``/controlnet/*`` paths.

A1111 clients drive ControlNet through the extension, so its spellings are the contract: a unit is a dict
of the extension's ``ControlNetUnit`` fields (with its older aliases: ``input_image``, ``mask_image``,
``lowvram``, ``guidance``, ``guessmode``), ``resize_mode`` and ``control_mode`` may be numbers or names, and
``processor_res`` / ``threshold_a`` / ``threshold_b`` of -1, or out of the module's range, are its default
(the extension resets them, with a line in its log; here the client is told in ``warnings``). What lienzo
cannot do with a unit is refused (422) naming the unit's A1111 path, ``alwayson_scripts.controlnet.args[N].FIELD``,
never silently dropped. The ``/controlnet`` paths answer as the extension's ``scripts/api.py`` does, with
A1111's error body.
"""

import io
import logging
import threading
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lienzo.control.models import ControlEntry, control_models, find_control_model
from lienzo.control.preprocessors import IP_ADAPTER_MODULES, PREPROCESSORS, RESOLUTION, Preprocessor, Slider, find_preprocessor, preprocess
from lienzo.errors import InvalidRequestError, ModelFileError
from lienzo.generation.control_unit import CONTROL_MODES, MAX_CONTROL_UNITS, RESIZE_MODES, ControlUnit
from lienzo.server.codec import b64encode, image_from_b64, mask_from_b64
from lienzo.server.deps import AppSettings
from lienzo.server.dialect import Dialect
from lienzo.server.routes.a1111.schemas import CONTROLNET_TITLE, A1111Error
from lienzo.settings import Settings

log = logging.getLogger(__package__)

PREFIX = "/controlnet"
# The extension's API version (its external_code.get_api_version): clients check it before sending units.
API_VERSION = 2
ARGS = f"alwayson_scripts.{CONTROLNET_TITLE}.args"
# The /controlnet paths answer errors with A1111's body, as the extension's do (they live in A1111's app).
DIALECT = Dialect(prefix=PREFIX, error_model=A1111Error)

# The extension's older resize mode labels, which its API still takes.
_RESIZE_ALIASES = {
    "inner fit (scale to fit)": "Crop and Resize", "scale to fit (inner fit)": "Crop and Resize",
    "outer fit (shrink to fit)": "Resize and Fill", "envelope (outer fit)": "Resize and Fill",
}
# Older key -> the extension's key (its legacy_field_alias and mask_alias).
_ALIASES = {"input_image": "image", "mask_image": "mask", "lowvram": "low_vram", "guidance": "guidance_end"}
_SAME_HIRES = "Both"  # lienzo's units steer both passes of the hires fix
_HIRES_OPTIONS = ("Both", "Low res only", "High res only")


class UnitArgs(BaseModel):
    """One entry of ``alwayson_scripts.controlnet.args``: the extension's ``ControlNetUnit`` fields and defaults
    (unknown keys are passed over, as the extension passes them over)."""

    model_config = ConfigDict(extra="ignore")

    enabled: bool | None = Field(None, description="false: skipped; absent: on when the unit has an image")
    image: str | dict[str, Any] | list[Any] | None = Field(
        None, description="base64 (a data: URL prefix is fine), {'image': b64, 'mask': b64} or [image, mask]; none: the img2img image"
    )
    mask: str | None = Field(None, description="only the inpaint modules read a mask; lienzo's read the request's own mask")
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    resize_mode: int | str = "Crop and Resize"
    low_vram: bool = False
    processor_res: float = -1
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: int | str = "Balanced"
    pixel_perfect: bool = False
    guessmode: bool | None = None
    hr_option: str = _SAME_HIRES
    save_detected_map: bool = True
    inpaint_crop_input_image: bool = True
    advanced_weighting: list[float] | None = None
    effective_region_mask: str | None = None


@dataclass
class Units:
    """A request's enabled units, where each came from (``places``: its index in ``args``) and what the client
    should be told (values reset to a module's default, fields lienzo ignores)."""

    units: list[ControlUnit] = field(default_factory=list)
    places: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def dialect(self, base: Dialect) -> Dialect:
        """``base`` that also names each unit's fields by the A1111 path the client sent them at: an error the
        job meets later (``controlnets.0.model``) then names ``alwayson_scripts.controlnet.args[2].model``."""
        names = {"controlnets": ARGS}
        for index, place in enumerate(self.places):
            for name in (*ControlUnit.model_fields, "mask", "seed"):
                names[f"controlnets.{index}.{name}"] = f"{ARGS}[{place}].{name}"
        return replace(base, fields={**base.fields, **names})


def find_script(scripts: dict[str, Any] | None) -> Any:
    """The ControlNet entry of ``alwayson_scripts`` (its title in any case, as A1111 matches script titles); any
    other entry is refused as A1111 refuses a script it lacks."""
    found = None
    for name, value in (scripts or {}).items():
        if name.strip().lower() != CONTROLNET_TITLE:
            raise InvalidRequestError("alwayson_scripts", f"always on script {name} not found; lienzo has: {CONTROLNET_TITLE}")
        found = value
    return found


def control_units(scripts: dict[str, Any] | None, settings: Settings, *, has_init: bool, hires: bool) -> Units:
    """The enabled units of ``alwayson_scripts``, checked: each one's module, model, sliders and image, with
    errors naming its A1111 path. ``has_init``: img2img, where a unit without an image reads the init image."""
    entry = find_script(scripts)
    if entry is None:
        return Units()
    if not isinstance(entry, dict) or not isinstance(entry.get("args", []), list):
        raise InvalidRequestError(ARGS, "must be a list of ControlNet units: {\"args\": [{\"module\": ..., \"model\": ..., ...}]}")
    found = Units()
    for place, raw in enumerate(entry.get("args", [])):
        path = f"{ARGS}[{place}]"
        args = _unit_args(raw, path)
        if not _enabled(args):
            continue
        if len(found.units) == MAX_CONTROL_UNITS:
            raise InvalidRequestError(ARGS, f"at most {MAX_CONTROL_UNITS} enabled ControlNet units are allowed")
        found.units.append(_unit(args, path, settings, found, has_init=has_init, hires=hires))
        found.places.append(place)
    return found


def _unit_args(raw: Any, path: str) -> UnitArgs:
    if not isinstance(raw, dict):
        raise InvalidRequestError(path, f"must be a ControlNet unit (a JSON object), got {type(raw).__name__}")
    values = dict(raw)
    for alias, key in _ALIASES.items():
        if alias in values:
            if values.get(key) is not None:
                raise InvalidRequestError(f"{path}.{alias}", f"give either {alias} or {key}, not both")
            values[key] = values.pop(alias)
    try:
        return UnitArgs.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"][:1])
        raise InvalidRequestError(f"{path}.{where}", first["msg"]) from None


def _enabled(args: UnitArgs) -> bool:
    """The extension's rule: ``enabled`` false skips a unit; a unit that does not say is on when it has a picture
    (clients send their unused unit slots as image-less defaults)."""
    if args.enabled is not None:
        return args.enabled
    return bool(args.image)


def _unit(args: UnitArgs, path: str, settings: Settings, found: Units, *, has_init: bool, hires: bool) -> ControlUnit:
    module = find_preprocessor(args.module.strip() or "none", f"{path}.module")
    try:
        module.annotator_path(settings.models_dir)
    except ModelFileError as err:
        raise InvalidRequestError(f"{path}.module", str(err)) from None
    model = _model(args.model, path, settings)
    image, has_mask = _image(args.image, path, settings)
    has_mask = has_mask or bool(args.mask)
    if image is None and not has_init:
        raise InvalidRequestError(f"{path}.image", "the unit is enabled but has no image; in txt2img each unit needs one")
    if has_mask and module.takes_mask:
        raise InvalidRequestError(f"{path}.mask", f"lienzo's {module.alias} reads the request's own mask (img2img mask); send it there")
    if hires and args.hr_option != _SAME_HIRES:
        raise InvalidRequestError(
            f"{path}.hr_option", f"lienzo's units steer both passes of the hires fix: send {_SAME_HIRES!r} (one of {', '.join(_HIRES_OPTIONS)}), got {args.hr_option!r}"
        )
    names = tuple(f"{path}.{name}" for name in ("processor_res", "threshold_a", "threshold_b"))
    res, a, b = slider_values(module, (args.processor_res, args.threshold_a, args.threshold_b), names, found.warnings)
    found.ignored += [
        f"{path}.{name}" for name, on in (
            ("mask", has_mask), ("advanced_weighting", bool(args.advanced_weighting)),
            ("effective_region_mask", bool(args.effective_region_mask)),
        ) if on
    ]
    values = {
        "image": image, "module": module.name, "model": model.title, "weight": args.weight, "guidance_start": args.guidance_start,
        "guidance_end": args.guidance_end, "control_mode": _control_mode(args, path), "resize_mode": _resize_mode(args.resize_mode, path),
        "pixel_perfect": args.pixel_perfect, "threshold_a": a, "threshold_b": b,
    }
    if res is not None:
        values["processor_res"] = res
    try:
        return ControlUnit(**values)
    except ValidationError as err:
        first = err.errors()[0]
        where = f"{path}.{first['loc'][0]}" if first["loc"] else path
        raise InvalidRequestError(where, first["msg"].removeprefix("Value error, ")) from None


def _model(name: str, path: str, settings: Settings) -> ControlEntry:
    if not name.strip() or name.strip().lower() == "none":
        available = ", ".join(e.title for e in control_models(settings.models_dir)) or "none"
        raise InvalidRequestError(f"{path}.model", f"the unit is enabled but names no model ({name!r}); available: {available}")
    return find_control_model(name, settings.models_dir, field=f"{path}.model")


def _image(value: Any, path: str, settings: Settings) -> tuple[Image.Image | None, bool]:
    """The unit's picture from the extension's shapes: base64, ``{"image": ..., "mask": ...}``, ``[image, mask]``
    or a one-item list of those (several pictures are for the IP-Adapter modules lienzo lacks); and whether a
    mask came with it."""
    mask = None
    if isinstance(value, list):
        if len(value) == 2 and all(isinstance(v, str) or v is None for v in value):
            value, mask = value
        elif len(value) == 1:
            value = value[0]
        elif value:
            raise InvalidRequestError(f"{path}.image", f"lienzo takes one picture per unit, got {len(value)}")
        else:
            value = None
    if isinstance(value, dict):
        value, mask = value.get("image"), value.get("mask")
    if not value:
        return None, False
    if not isinstance(value, str):
        raise InvalidRequestError(f"{path}.image", "must be a base64 image, {'image': b64, 'mask': b64} or [image, mask]")
    return image_from_b64(value, f"{path}.image", settings), bool(mask)


def _resize_mode(value: int | str, path: str) -> str:
    """0, 1, 2 or the names (3, A1111's latent resize, is Just Resize as in the extension), in any case."""
    if isinstance(value, int):
        if value == 3:
            return RESIZE_MODES[0]
        if 0 <= value < len(RESIZE_MODES):
            return RESIZE_MODES[value]
    else:
        key = value.strip().lower()
        for mode in RESIZE_MODES:
            if key == mode.lower():
                return mode
        if key in _RESIZE_ALIASES:
            return _RESIZE_ALIASES[key]
    allowed = ", ".join(f"{i} ({m})" for i, m in enumerate(RESIZE_MODES))
    raise InvalidRequestError(f"{path}.resize_mode", f"must be one of {allowed}, got {value!r}")


def _control_mode(args: UnitArgs, path: str) -> str:
    """0, 1, 2 or the names; the old ``guessmode: true`` (when control_mode is left at its default) is
    "ControlNet is more important", the mode that replaced it."""
    value = args.control_mode
    if args.guessmode and value in (0, CONTROL_MODES[0]):
        return CONTROL_MODES[2]
    if isinstance(value, int):
        if 0 <= value < len(CONTROL_MODES):
            return CONTROL_MODES[value]
    else:
        for mode in CONTROL_MODES:
            if value.strip().lower() == mode.lower():
                return mode
    allowed = ", ".join(f"{i} ({m})" for i, m in enumerate(CONTROL_MODES))
    raise InvalidRequestError(f"{path}.control_mode", f"must be one of {allowed}, got {value!r}")


def slider_values(
    module: Preprocessor, values: tuple[float, float, float], names: tuple[str, str, str], warnings: list[str]
) -> tuple[int | None, float | None, float | None]:
    """The extension's bound check of (processor_res, threshold_a, threshold_b), known to the client as ``names``:
    -1, or a value outside the module's slider, is the slider's default (a warning says so for a value the client
    chose); None for a slider the module lacks."""
    thresholds = [*(module.sliders[1:] if module.has_resolution else module.sliders), None, None]
    sliders = (RESOLUTION if module.has_resolution else None, *thresholds[:2])
    res, a, b = (_bounded(slider, value, name, warnings) for slider, value, name in zip(sliders, values, names))
    return (None if res is None else int(round(res))), a, b


def _bounded(slider: Slider | None, value: float | None, where: str, warnings: list[str]) -> float | None:
    if slider is None:
        return None
    if value is None or value == -1:
        return slider.value
    if not slider.min <= value <= slider.max:
        warnings.append(f"{where}={value:g} is outside {slider.name} ({slider.min:g} to {slider.max:g}); its default {slider.value:g} was used, as the extension does")
        return slider.value
    return value


# -- /controlnet ----------------------------------------------------------------------------------

router = APIRouter(prefix=PREFIX, tags=["ControlNet (sd-webui-controlnet)"])

# One detect at a time: the neural modules hold their network on the device while they run.
_detecting = threading.Lock()


class VersionResponse(BaseModel):
    version: int


class ModelListResponse(BaseModel):
    model_list: list[str] = Field(description="'name [hash]' of every ControlNet and T2I-Adapter in the models dir's ControlNet folder")


class ModuleListResponse(BaseModel):
    module_list: list[str]
    module_detail: dict[str, dict[str, Any]] = Field(description="per module: model_free and its sliders (resolution, threshold_a, threshold_b)")


class ControlType(BaseModel):
    module_list: list[str]
    model_list: list[str]
    default_option: str
    default_model: str


class ControlTypesResponse(BaseModel):
    control_types: dict[str, ControlType]


class SettingsResponse(BaseModel):
    control_net_unit_count: int = Field(description="the most units a request may enable")


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    controlnet_module: str = Field("none", description="a module of /controlnet/module_list, by name or alias")
    controlnet_input_images: list[str] = Field([], description="base64 images (a data: URL prefix is fine)")
    controlnet_images: list[str] = Field([], description="what the webuiapi client sends for controlnet_input_images (lienzo takes either)")
    controlnet_masks: list[str] = Field([], description="one mask per image, for the inpaint modules (white: repaint)")
    controlnet_processor_res: float = Field(-1, description="the module's resolution; -1: its default")
    controlnet_threshold_a: float = Field(-1, description="the module's first slider; -1: its default")
    controlnet_threshold_b: float = Field(-1, description="the module's second slider; -1: its default")
    low_vram: bool = Field(False, description="accepted; lienzo ignores it")


class DetectResponse(BaseModel):
    images: list[str] = Field(description="the control maps, base64 PNGs, in the images' order")
    info: str


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=API_VERSION)


@router.get("/model_list", response_model=ModelListResponse)
def model_list(settings: AppSettings, update: bool = Query(True, description="accepted: the folder is read on every request")) -> ModelListResponse:
    """The models a unit's ``model`` may name, as the extension lists them (titles, no "None")."""
    return ModelListResponse(model_list=[e.title for e in control_models(settings.models_dir)])


# Every module a unit may name: those that make a control map, then the IP-Adapter ones (they read the picture itself).
_MODULES = {**PREPROCESSORS, **IP_ADAPTER_MODULES}


@router.get("/module_list", response_model=ModuleListResponse)
async def module_list(alias_names: bool = Query(False, description="the UI's names (softedge_hed) instead of the modules' (hed)")) -> ModuleListResponse:
    names = [p.alias if alias_names else p.name for p in _MODULES.values()]
    return ModuleListResponse(module_list=names, module_detail={n: _detail(p) for n, p in zip(names, _MODULES.values())})


def _detail(module: Preprocessor) -> dict[str, Any]:
    """The extension's module_detail: ``model_free`` is its word for a module that works without a ControlNet model
    (its reference and revision modules; lienzo has none of those), and ``sliders`` keeps its places (resolution,
    threshold_a, threshold_b), so a module without a resolution slider starts with null."""
    sliders: list[dict | None] = [vars(s).copy() for s in module.sliders]
    if sliders and not module.has_resolution:
        sliders.insert(0, None)
    return {"model_free": False, "sliders": sliders}


# Control types as the extension's UI groups them: the modules of each (by UI name) and the word its models' names hold.
_CONTROL_TYPES: dict[str, tuple[tuple[str, ...], str]] = {
    "Canny": (("canny", "invert"), "canny"),
    "Lineart": (("lineart_standard", "lineart", "lineart_coarse", "invert"), "lineart"),
    "SoftEdge": (("hed",), "softedge"),
    "Scribble/Sketch": (("scribble_xdog", "invert"), "scribble"),
    "Tile/Blur": (("tile_resample", "blur_gaussian"), "tile"),
    "Inpaint": (("inpaint", "inpaint_only"), "inpaint"),
    "Shuffle": (("shuffle",), "shuffle"),
    "T2I-Adapter": (("color",), "t2i"),
    "IP-Adapter": (tuple(IP_ADAPTER_MODULES), "ip-adapter"),
}


@router.get("/control_types", response_model=ControlTypesResponse)
def control_types(settings: AppSettings) -> ControlTypesResponse:
    """"All", then a type per kind of map lienzo's modules make, with the models whose names say that kind; each
    list starts with the extension's "none" / "None"."""
    titles = [e.title for e in control_models(settings.models_dir)]
    types = {"All": ControlType(module_list=[p.alias for p in _MODULES.values()], model_list=["None", *titles], default_option="none", default_model="None")}
    for name, (modules, word) in _CONTROL_TYPES.items():
        aliases = [_MODULES[m].alias for m in modules]
        models = [t for t in titles if word in t.lower()]
        types[name] = ControlType(
            module_list=["none", *aliases], model_list=["None", *models], default_option=aliases[0], default_model=models[0] if models else "None"
        )
    return ControlTypesResponse(control_types=types)


@router.get("/settings", response_model=SettingsResponse)
async def controlnet_settings() -> SettingsResponse:
    return SettingsResponse(control_net_unit_count=MAX_CONTROL_UNITS)


@router.post("/detect", response_model=DetectResponse)
async def detect(body: DetectRequest, settings: AppSettings) -> DetectResponse:
    """Run a module on each image and answer the control maps (the extension's preprocessor preview)."""
    images_field = "controlnet_input_images" if body.controlnet_input_images else "controlnet_images"
    encoded = body.controlnet_input_images or body.controlnet_images
    module = find_preprocessor(body.controlnet_module, "controlnet_module")
    if not encoded:
        raise InvalidRequestError("controlnet_input_images", "No image selected: give one or more base64 images")
    if len(encoded) > settings.max_images:
        raise InvalidRequestError(images_field, f"{len(encoded)} images; the limit is {settings.max_images} (max_images)")
    if module.takes_mask and len(body.controlnet_masks) != len(encoded):
        raise InvalidRequestError("controlnet_masks", f"{module.alias} needs one mask per image ({len(encoded)}), got {len(body.controlnet_masks)}")
    try:
        module.annotator_path(settings.models_dir)
    except ModelFileError as err:
        raise InvalidRequestError("controlnet_module", str(err)) from None
    warnings: list[str] = []
    values = (body.controlnet_processor_res, body.controlnet_threshold_a, body.controlnet_threshold_b)
    res, a, b = slider_values(module, values, ("controlnet_processor_res", "controlnet_threshold_a", "controlnet_threshold_b"), warnings)
    for warning in warnings:
        log.warning("%s/detect: %s", PREFIX, warning)
    jobs = []
    for i, value in enumerate(encoded):
        image = image_from_b64(value, f"{images_field}[{i}]", settings)
        mask = mask_from_b64(body.controlnet_masks[i], image.size, f"controlnet_masks[{i}]", settings) if module.takes_mask else None
        jobs.append((image, mask))
    maps = [await run_in_threadpool(_detect_one, module, image, mask, (res, a, b), settings) for image, mask in jobs]
    return DetectResponse(images=maps, info="Success")


def _detect_one(module: Preprocessor, image: Image.Image, mask: Image.Image | None, sliders: tuple, settings: Settings) -> str:
    """One control map as a base64 PNG (its resolution slider error names the request's field)."""
    with _detecting:
        result = preprocess(
            module.name, image, *sliders, mask=mask, models_dir=settings.models_dir, device=settings.device, field="controlnet_module"
        )
    buffer = io.BytesIO()
    result.save(buffer, format="PNG")
    return b64encode(buffer.getvalue())
