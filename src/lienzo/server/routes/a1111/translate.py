"""An A1111 request body as GenerationRequest fields, and A1111's names for lienzo's.

``build_request`` validates; its errors, and the queue's, are renamed back to the A1111 field the
client sent (``DIALECT``). A script lienzo does not have is refused (422), as A1111 refuses one it
lacks; the always-on ControlNet script's units are read by :mod:`.controlnet`. txt2img's hires fix
fields are the table's, with A1111's names. Fields lienzo does not implement yet are accepted; those a
request turned on are listed by ``ignored_fields`` so that the answer can name them.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import ImageOps

from lienzo.errors import InvalidRequestError, ModelFileError
from lienzo.gallery.records import Preset
from lienzo.generation.canvas import ResizeMode, resize_image
from lienzo.generation.control_unit import ControlUnit
from lienzo.generation.request import GenerationRequest, build_request, table
from lienzo.generation.samplers import find_schedule, split_folded_schedule
from lienzo.generation.styles import merge_styles
from lienzo.server.codec import image_from_b64, mask_from_b64
from lienzo.server.dialect import Dialect
from lienzo.server.fields import door_names
from lienzo.server.jobs import JobQueue
from lienzo.server.routes.a1111.schemas import (
    CONTROLNET_TITLE, FILLS, PREFIX, RESIZE_MODES, USED, XYZ_TITLE, A1111Error, CommonRequest, Img2ImgRequest, Txt2ImgRequest,
)
from lienzo.settings import Settings

DIALECT = Dialect(prefix=PREFIX, error_model=A1111Error, fields=door_names("a1111"))


# -- what lienzo ignores --------------------------------------------------------------------------

# Values of ignored fields that change nothing: not worth a warning.
_NEUTRAL: dict[str, tuple] = {
    "eta": (0, 1),
    "s_min_uncond": (0,),
    "s_churn": (0,),
    "s_tmax": (0, float("inf")),
    "s_tmin": (0,),
    "s_noise": (1,),
    "override_settings_restore_afterwards": (True,),
    "initial_noise_multiplier": (1,),
}
# Ignored fields that only mean something together with another one (reported through that one).
_DEPENDENT = {"script_args", "image_cfg_scale", "mask_blur_x", "mask_blur_y"}
_USED = USED | {row.spec.a1111 for row in table() if row.spec.a1111}
# txt2img's own keys in an img2img body: A1111's img2img has no hires fix (its denoising_strength is its own).
_NOT_IMG2IMG = (set(Txt2ImgRequest.model_fields) - set(CommonRequest.model_fields)) - {"denoising_strength"}
# "The first pass's": what A1111's UI sends for the second pass's own sampler, scheduler and model when none is chosen.
_SAME_SAMPLER, _SAME_SCHEDULER, _SAME_CHECKPOINT = "use same sampler", "use same scheduler", "use same checkpoint"
# Options lienzo acts on in override_settings.
_OVERRIDES_USED = {"sd_model_checkpoint", "CLIP_stop_at_last_layers", "tiling"}


def _is_neutral(name: str, value: Any) -> bool:
    if value is None or value is False or value == "" or value == [] or value == {}:
        return True
    return isinstance(value, (bool, int, float)) and value in _NEUTRAL.get(name, ())


def ignored_fields(body: CommonRequest) -> list[str]:
    """``name=value`` for every field lienzo ignores that the request set to something that matters."""
    img2img = isinstance(body, Img2ImgRequest)
    ignored = [
        f"{name}={value!r}"
        for name, value in body.model_dump().items()
        if (name not in _USED or (img2img and name in _NOT_IMG2IMG)) and name not in _DEPENDENT and not _is_neutral(name, value)
    ]
    ignored += [f"override_settings.{k}={v!r}" for k, v in (body.override_settings or {}).items() if k not in _OVERRIDES_USED]
    if isinstance(body, Img2ImgRequest) and body.resize_mode == ResizeMode.LATENT_UPSCALE:
        ignored.append("resize_mode=3 (done as a plain resize of the image, not of the latents)")
    return ignored


def is_xyz(script_name: str | None) -> bool:
    """The request names A1111's X/Y/Z plot, the one script lienzo has."""
    return (script_name or "").strip().lower() == XYZ_TITLE


def check_scripts(body: CommonRequest) -> None:
    """A1111 answers 422 for a script it does not have; lienzo has the X/Y/Z plot and the always-on ControlNet
    (A1111 matches titles in any case)."""
    if body.script_name and not is_xyz(body.script_name):
        raise InvalidRequestError("script_name", f"script '{body.script_name}' not found; lienzo has '{XYZ_TITLE}' only ({PREFIX}/scripts)")
    for name in body.alwayson_scripts or {}:
        if name.strip().lower() != CONTROLNET_TITLE:
            raise InvalidRequestError("alwayson_scripts", f"always on script {name} not found; lienzo has: {CONTROLNET_TITLE} ({PREFIX}/scripts)")


# -- styles ---------------------------------------------------------------------------------------


def apply_styles(body: CommonRequest, presets: list[Preset]) -> tuple[CommonRequest, list[str]]:
    """``body`` with its styles (lienzo's saved presets, by name, ignoring case) merged into its
    prompts, and a warning for each name no preset has (A1111 skips those silently)."""
    prompt, negative, unknown = merge_styles(body.prompt or "", body.negative_prompt or "", body.styles or [], presets)
    warnings = [f"styles: no preset named {name!r} (GET {PREFIX}/prompt-styles lists them); it was not applied" for name in unknown]
    return body.model_copy(update={"prompt": prompt, "negative_prompt": negative}), warnings


# -- A1111 body -> GenerationRequest --------------------------------------------------------------


def schedule_name(scheduler: str | None) -> str:
    """A1111's scheduler id, label or alias in any case (``karras``, ``sgm_uniform``, ``SGMUniform``,
    ``Align Your Steps``) as lienzo's schedule; an unknown one is passed on for build_request to refuse
    with the list."""
    if not scheduler:
        return "Automatic"
    return find_schedule(scheduler) or scheduler


def sampler_and_schedule(sampler: str, scheduler: str | None) -> tuple[str, str]:
    """Split older A1111 names such as "DPM++ 2M Karras" into sampler and schedule; an explicit
    non-automatic ``scheduler`` wins over the suffix. An unknown sampler is passed on for build_request
    to refuse with the list."""
    schedule = schedule_name(scheduler)
    base, folded = split_folded_schedule(sampler)
    return base, folded if folded is not None and schedule == "Automatic" else schedule


def common_fields(body: CommonRequest, options: Mapping[str, Any], mode: str = "txt2img") -> dict[str, Any]:
    """GenerationRequest fields from the table's plain A1111 fields for ``mode`` (null: lienzo's default),
    the sampler and schedule, and the clip skip of override_settings or the server's options."""
    fields = {
        row.name: value
        for row in table()
        if row.spec.a1111_body and row.spec.a1111 and mode in row.spec.modes and (value := getattr(body, row.spec.a1111)) is not None
    }
    fields["sampler"], fields["schedule"] = sampler_and_schedule(body.sampler_name or body.sampler_index or "Euler", body.scheduler)
    overrides = body.override_settings or {}
    fields["clip_skip"] = overrides.get("CLIP_stop_at_last_layers", options.get("CLIP_stop_at_last_layers", 1))
    # A1111 1.6 moved the Tiling checkbox into its settings: a client may send it either way.
    fields["tiling"] = bool(fields.get("tiling") or overrides.get("tiling", options.get("tiling", False)))
    return fields


def hires_fields(body: Txt2ImgRequest, fields: dict[str, Any]) -> dict[str, Any]:
    """A1111's hires fix keys as the request's: the second pass's sampler and scheduler ("Use same sampler",
    "Use same scheduler" and empty: the first pass's; an old folded name such as "DPM++ 2M Karras" carries its
    schedule), A1111's defaults for null, and the older first-pass size."""
    hires: dict[str, Any] = {}
    if body.denoising_strength is None:  # null: A1111's own default, not lienzo's
        hires["hr_denoising_strength"] = Txt2ImgRequest.model_fields["denoising_strength"].default
    if not body.hr_upscaler:
        hires["hr_upscaler"] = "Latent"
    sampler = (body.hr_sampler_name or "").strip()
    scheduler = (body.hr_scheduler or "").strip()
    same_scheduler = not scheduler or scheduler.lower() == _SAME_SCHEDULER
    hires["hr_sampler"], hires["hr_schedule"] = None, "Automatic" if same_scheduler else schedule_name(scheduler)
    if sampler and sampler.lower() != _SAME_SAMPLER:
        base, folded = split_folded_schedule(sampler)
        hires["hr_sampler"] = base
        if same_scheduler:
            # A1111 runs another sampler with the first pass's schedule unless the name folds its own.
            hires["hr_schedule"] = folded or fields["schedule"]
    # A1111 (its StableDiffusionProcessingTxt2Img.__post_init__): a first-pass size makes the first pass that size;
    # the hires size then comes from it (hr_scale) or from hr_resize_x/y as always.
    first = (body.firstphase_width or 0, body.firstphase_height or 0)
    if any(first):
        if not all(first):
            name = "firstphase_height" if first[0] else "firstphase_width"
            raise InvalidRequestError(name, "give both firstphase_width and firstphase_height (the first pass's size), or neither")
        hires["width"], hires["height"] = first
    return hires


def check_hires_checkpoint(body: Txt2ImgRequest, model: str | None, queue: JobQueue) -> None:
    """The hires fix runs on the request's model: lienzo loads one model a job. ``model``: the request's
    (override_settings), None for the current one."""
    name = (body.hr_checkpoint_name or "").strip()
    if not name or name.lower() == _SAME_CHECKPOINT or not body.enable_hr:
        return
    wanted = resolve_checkpoint(queue, name, "hr_checkpoint_name")
    used = Path(model) if model is not None else queue.current_model_or_none()
    if used is None or wanted.resolve() != used.resolve():
        raise InvalidRequestError(
            "hr_checkpoint_name", f"{name!r} is not the request's model; lienzo runs the hires fix on the same model: "
            "send 'Use same checkpoint', leave it empty, or pick the model with override_settings.sd_model_checkpoint",
        )


def txt2img_request(body: Txt2ImgRequest, options: Mapping[str, Any], controlnets: Sequence[ControlUnit] = ()) -> GenerationRequest:
    """The request of a txt2img body, with its hires fix and the ControlNet units read from its alwayson_scripts."""
    fields = common_fields(body, options)
    fields.update(hires_fields(body, fields))
    with DIALECT.speaking():
        return build_request(**fields, controlnets=list(controlnets))


def _choice(value: int, choices: dict[int, str], field: str) -> str:
    if value not in choices:
        allowed = ", ".join(f"{k} ({v})" for k, v in choices.items())
        raise InvalidRequestError(field, f"must be one of {allowed}, got {value}")
    return choices[value]


def img2img_request(body: Img2ImgRequest, options: Mapping[str, Any], settings: Settings, controlnets: Sequence[ControlUnit] = ()) -> GenerationRequest:
    """Decode, invert and resize the images as A1111 would, then validate everything (with the ControlNet units
    read from alwayson_scripts; one without an image reads the init image)."""
    if not body.init_images:
        raise InvalidRequestError("init_images", "give one base64 image to start from")
    if len(body.init_images) > 1:
        raise InvalidRequestError("init_images", f"lienzo takes one init image per request, got {len(body.init_images)}")
    _choice(body.resize_mode, RESIZE_MODES, "resize_mode")
    fill = _choice(body.inpainting_fill, FILLS, "inpainting_fill")
    image = image_from_b64(body.init_images[0], "init_images[0]", settings)
    fields = common_fields(body, options, "img2img")
    mask = None
    if body.mask:
        mask = mask_from_b64(body.mask, image.size, "mask", settings)
        if body.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        fields.update(
            mask_blur=body.mask_blur if body.mask_blur is not None else (body.mask_blur_x or 0),
            inpainting_fill=fill,
            inpaint_only_masked=body.inpaint_full_res,
            only_masked_padding=body.inpaint_full_res_padding,
        )
    # "Only masked" works on a crop of the full-size image (A1111 skips resize_mode there too);
    # mode 0 is the engine's own stretch.
    mode = ResizeMode(body.resize_mode)
    if mode != ResizeMode.JUST_RESIZE and not (mask is not None and body.inpaint_full_res):
        image = resize_image(image, body.width, body.height, mode)
        if mask is not None:
            mask = resize_image(mask, body.width, body.height, mode)
    with DIALECT.speaking():
        return build_request(**fields, init_image=image, mask=mask, controlnets=list(controlnets))


# -- checkpoints ----------------------------------------------------------------------------------


def resolve_checkpoint(queue: JobQueue, value: str, field: str) -> Path:
    """A model by A1111 title ("name.safetensors [hash]"), file name, name, short hash or path inside the
    models dir (never elsewhere: see ``JobQueue.resolve_model``)."""
    # The current model may lie outside the models dir (lienzo serve --model): clients list it, so it can be chosen.
    current = queue.current_model_or_none()
    entry = queue.registry.checkpoint_by_title(value, also=current)
    if entry is not None:
        return entry.path
    try:  # lienzo's own extension: a path inside the models dir, to a readable checkpoint
        return queue.resolve_checkpoint(value.strip(), field)
    except ModelFileError:
        pass
    titles = ", ".join(e.title for e in queue.registry.checkpoints(also=current)) or "none"
    raise InvalidRequestError(field, f"no model named {value!r}; available: {titles}")


def current_title(queue: JobQueue) -> str | None:
    path = queue.current_model_or_none()
    return None if path is None else queue.registry.entry(path).title


def request_model(body: CommonRequest, queue: JobQueue) -> str | None:
    """``override_settings.sd_model_checkpoint``, resolved; None: the current model."""
    name = (body.override_settings or {}).get("sd_model_checkpoint")
    if not name:
        return None
    return str(resolve_checkpoint(queue, str(name), "override_settings.sd_model_checkpoint"))
