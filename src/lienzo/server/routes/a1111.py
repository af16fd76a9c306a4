"""AUTOMATIC1111's web API, ``/sdapi/v1``: the paths, field names, defaults and answers its clients expect.

Routes only translate: an A1111 body becomes GenerationRequest fields (``build_request`` validates
them, and its errors are renamed back to the A1111 field), a finished Job becomes A1111's answer.
A script lienzo does not have is refused (422), as A1111 refuses one it lacks. Fields lienzo does
not implement yet (hires fix, face restoration, tiling, ...) are accepted; those a request turned
on are named in the answer's ``info`` (``ignored``) and its ``X-Lienzo-Ignored`` header, so a client
can tell its picture was made without them.
"""

import io
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from lienzo.errors import InvalidRequestError, ModelFileError
from lienzo.generation.request import GenerationRequest, build_request, schema_limits
from lienzo.generation.samplers import SAMPLERS, SCHEDULES, find_schedule, split_folded_schedule
from lienzo.gallery.store import Preset
from lienzo.images.io import decode_image, write_atomic
from lienzo.images.metadata import parse_infotext, read_parameters
from lienzo.models.registry import ModelEntry
from lienzo.server.codec import JSONResponse, b64decode, b64encode, image_from_b64, mask_from_b64
from lienzo.server.deps import AppSettings, Gallery, Queue
from lienzo.server.jobs import Job, JobQueue, JobStatus
from lienzo.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "/sdapi/v1"
router = APIRouter(prefix=PREFIX, tags=["AUTOMATIC1111"])


_ERROR_KINDS = {
    400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 413: "PayloadTooLarge", 422: "UnprocessableEntity",
    429: "TooManyRequests", 500: "InternalServerError",
}


class A1111Error(BaseModel):
    """A1111's error body: the kind of error, its detail, and the same text as ``errors``; lienzo adds ``field``."""

    error: str = Field(description="the kind of error: " + ", ".join(dict.fromkeys(_ERROR_KINDS.values())) + " or HTTPException")
    detail: str = Field(description="what is wrong and what is allowed, in one line")
    body: str = Field(description="always empty")
    errors: str = Field(description="the same as detail")
    field: str | None = Field(description="lienzo extension: the request field at fault, by its A1111 name; null: none in particular")


def error_response(status: int, message: str, field: str | None) -> JSONResponse:
    body = A1111Error(error=_ERROR_KINDS.get(status, "HTTPException"), detail=message, body="", errors=message, field=field)
    return JSONResponse(body.model_dump(), status_code=status)


# -- request bodies -------------------------------------------------------------------------------

_IGNORED = "accepted for compatibility; lienzo ignores it"
_FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
_RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill", 3: "just resize (latent upscale)"}


class _Common(BaseModel):
    """What txt2img and img2img share, with A1111's defaults (not lienzo's)."""

    model_config = ConfigDict(extra="allow")

    prompt: str | None = Field("", json_schema_extra=schema_limits("prompt"))
    negative_prompt: str | None = Field("", json_schema_extra=schema_limits("negative_prompt"))
    seed: int = Field(-1, json_schema_extra=schema_limits("seed"))
    sampler_name: str | None = Field(None, description="e.g. 'Euler a', 'DPM++ 2M'; old names such as 'DPM++ 2M Karras' work")
    sampler_index: str | None = Field("Euler", description="older name of sampler_name, used when sampler_name is empty")
    scheduler: str | None = Field(
        None,
        description="schedule type, any id or label of GET /sdapi/v1/schedulers in any case (karras, sgm_uniform, "
        "'Align Your Steps', ...); one the sampler cannot run in diffusers runs as the nearest it can",
    )
    batch_size: int = Field(1, json_schema_extra=schema_limits("batch_size"))
    n_iter: int = Field(1, description="batches, one after the other", json_schema_extra=schema_limits("batch_count"))
    steps: int = Field(50, json_schema_extra=schema_limits("steps"))
    cfg_scale: float = Field(7.0, json_schema_extra=schema_limits("cfg_scale"))
    width: int = Field(512, json_schema_extra=schema_limits("width"))
    height: int = Field(512, json_schema_extra=schema_limits("height"))
    override_settings: dict[str, Any] | None = Field(
        None,
        description="sd_model_checkpoint picks this request's model, CLIP_stop_at_last_layers its clip skip; others are ignored",
    )
    send_images: bool = Field(True, description="false: answer without the images (they are saved in the outputs folder)")
    save_images: bool = Field(False, description="lienzo always saves its images")
    fast: bool = Field(False, description="lienzo extension: fast mode (DeepCache), reusing deep U-Net features across steps")

    styles: list[str] | None = Field(None, description="names of saved presets (GET /prompt-styles), added to the prompts as A1111's styles")
    script_name: str | None = Field(None, description="lienzo has no scripts: a named one is refused (422), as A1111 refuses one it lacks")
    alwayson_scripts: dict[str, Any] | None = Field(None, description="lienzo has no scripts: any entry is refused (422), as in A1111")

    # Accepted and ignored: lienzo has no such feature yet (a request turning one on is told so in ``info``).
    subseed: int | None = Field(-1, description=_IGNORED)
    subseed_strength: float | None = Field(0, description=_IGNORED)
    seed_resize_from_h: int | None = Field(-1, description=_IGNORED)
    seed_resize_from_w: int | None = Field(-1, description=_IGNORED)
    restore_faces: bool | None = Field(None, description=_IGNORED)
    tiling: bool | None = Field(None, description=_IGNORED)
    do_not_save_samples: bool | None = Field(False, description=_IGNORED)
    do_not_save_grid: bool | None = Field(False, description=_IGNORED)
    eta: float | None = Field(None, description=_IGNORED)
    s_min_uncond: float | None = Field(None, description=_IGNORED)
    s_churn: float | None = Field(None, description=_IGNORED)
    s_tmax: float | None = Field(None, description=_IGNORED)
    s_tmin: float | None = Field(None, description=_IGNORED)
    s_noise: float | None = Field(None, description=_IGNORED)
    override_settings_restore_afterwards: bool | None = Field(True, description="override_settings apply to one request only")
    refiner_checkpoint: str | None = Field(None, description=_IGNORED)
    refiner_switch_at: float | None = Field(None, description=_IGNORED)
    disable_extra_networks: bool | None = Field(False, description=_IGNORED)
    comments: dict[str, Any] | None = Field(None, description=_IGNORED)
    script_args: list[Any] | None = Field(None, description="arguments of script_name")
    force_task_id: str | None = Field(None, description=_IGNORED)
    infotext: str | None = Field(None, description=_IGNORED)


def _numbered(choices: dict[int, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in choices.items())


class Txt2ImgRequest(_Common):
    enable_hr: bool | None = Field(False, description=_IGNORED + " (no hires fix)")
    denoising_strength: float | None = Field(0.75, description="used by the hires fix only: ignored")
    firstphase_width: int | None = Field(0, description=_IGNORED)
    firstphase_height: int | None = Field(0, description=_IGNORED)
    hr_scale: float | None = Field(2.0, description=_IGNORED)
    hr_upscaler: str | None = Field(None, description=_IGNORED)
    hr_second_pass_steps: int | None = Field(0, description=_IGNORED)
    hr_resize_x: int | None = Field(0, description=_IGNORED)
    hr_resize_y: int | None = Field(0, description=_IGNORED)
    hr_checkpoint_name: str | None = Field(None, description=_IGNORED)
    hr_sampler_name: str | None = Field(None, description=_IGNORED)
    hr_scheduler: str | None = Field(None, description=_IGNORED)
    hr_prompt: str | None = Field("", description=_IGNORED)
    hr_negative_prompt: str | None = Field("", description=_IGNORED)


class Img2ImgRequest(_Common):
    init_images: list[str] | None = Field(None, description="one base64 image (a data: URL prefix is fine)")
    resize_mode: int = Field(0, description=_numbered(_RESIZE_MODES), json_schema_extra={"enum": list(_RESIZE_MODES)})
    denoising_strength: float = Field(0.75, json_schema_extra=schema_limits("denoising_strength"))
    mask: str | None = Field(None, description="base64; white = repaint, black = keep; same size as the init image")
    mask_blur: int | None = Field(4, json_schema_extra=schema_limits("mask_blur"))
    inpainting_fill: int = Field(0, description=_numbered(_FILLS), json_schema_extra={"enum": list(_FILLS)})
    inpaint_full_res: bool = Field(True, description="inpaint only the masked area, at width x height, and paste it back")
    inpaint_full_res_padding: int = Field(
        0, description="pixels around the masked area (inpaint_full_res)", json_schema_extra=schema_limits("only_masked_padding")
    )
    inpainting_mask_invert: int = Field(0, description="1: repaint the black part of the mask instead")
    include_init_images: bool = Field(False, description="echo init_images and mask in the answer's parameters")
    image_cfg_scale: float | None = Field(None, description="for instruct-pix2pix models only: ignored")
    initial_noise_multiplier: float | None = Field(None, description=_IGNORED)
    mask_blur_x: int | None = Field(4, description="use mask_blur")
    mask_blur_y: int | None = Field(4, description="use mask_blur")
    latent_mask: str | None = Field(None, description=_IGNORED)


# Values of ignored fields that change nothing: not worth a warning.
_NEUTRAL: dict[str, tuple] = {
    "subseed_strength": (0,),
    "seed_resize_from_h": (-1, 0),
    "seed_resize_from_w": (-1, 0),
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
_DEPENDENT = {
    "subseed", "script_args", "denoising_strength", "image_cfg_scale", "mask_blur_x", "mask_blur_y",
    "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
    "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
}
_USED = {
    "prompt", "negative_prompt", "seed", "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter", "steps",
    "cfg_scale", "width", "height", "override_settings", "send_images", "save_images", "init_images", "resize_mode",
    "denoising_strength", "mask", "mask_blur", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
    "inpainting_mask_invert", "include_init_images", "fast", "styles", "script_name", "alwayson_scripts",
}
# Options lienzo acts on in override_settings.
_OVERRIDES_USED = {"sd_model_checkpoint", "CLIP_stop_at_last_layers"}


def _is_neutral(name: str, value: Any) -> bool:
    if value is None or value is False or value == "" or value == [] or value == {}:
        return True
    return isinstance(value, (bool, int, float)) and value in _NEUTRAL.get(name, ())


def ignored_fields(body: _Common) -> list[str]:
    """``name=value`` for every field lienzo ignores that the request set to something that matters."""
    ignored = [
        f"{name}={value!r}"
        for name, value in body.model_dump().items()
        if name not in _USED and name not in _DEPENDENT and not _is_neutral(name, value)
    ]
    ignored += [f"override_settings.{k}={v!r}" for k, v in (body.override_settings or {}).items() if k not in _OVERRIDES_USED]
    if isinstance(body, Img2ImgRequest) and body.resize_mode == 3:
        ignored.append("resize_mode=3 (done as a plain resize of the image, not of the latents)")
    return ignored


def check_scripts(body: _Common) -> None:
    """lienzo has no A1111 scripts; A1111 itself answers 422 for a script it does not have."""
    if body.script_name:
        raise InvalidRequestError("script_name", f"script '{body.script_name}' not found; lienzo has no scripts ({PREFIX}/scripts)")
    for name in body.alwayson_scripts or {}:
        raise InvalidRequestError("alwayson_scripts", f"always on script {name} not found; lienzo has no scripts ({PREFIX}/scripts)")


def merge_style(prompt: str, style: str) -> str:
    """A1111's rule: a style with ``{prompt}`` wraps the prompt; any other is appended after a comma."""
    if "{prompt}" in style:
        return style.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style.strip()) if part)


def apply_styles(body: _Common, presets: list[Preset]) -> tuple[_Common, list[str]]:
    """``body`` with its styles (lienzo's saved presets, by name, ignoring case) merged into its
    prompts, and a warning for each name no preset has (A1111 skips those silently)."""
    by_name = {preset.name.lower(): preset for preset in presets}
    prompt, negative, warnings = body.prompt or "", body.negative_prompt or "", []
    for name in body.styles or []:
        preset = by_name.get(name.lower())
        if preset is None:
            warnings.append(f"styles: no preset named {name!r} (GET {PREFIX}/prompt-styles lists them); it was not applied")
            continue
        prompt, negative = merge_style(prompt, preset.prompt), merge_style(negative, preset.negative_prompt)
    return body.model_copy(update={"prompt": prompt, "negative_prompt": negative}), warnings


# -- A1111 names <-> lienzo's ---------------------------------------------------------------------

# GenerationRequest's field -> the A1111 field a client sent it as.
_A1111_FIELDS = {
    "sampler": "sampler_name",
    "schedule": "scheduler",
    "batch_count": "n_iter",
    "init_image": "init_images",
    "inpaint_only_masked": "inpaint_full_res",
    "only_masked_padding": "inpaint_full_res_padding",
    "clip_skip": "CLIP_stop_at_last_layers",
}


def a1111_error(err: InvalidRequestError) -> InvalidRequestError:
    """The same error, naming the A1111 field instead of lienzo's (in the field and in the message)."""
    name = _A1111_FIELDS.get(err.field, err.field)
    message = str(err).removeprefix(f"{err.field}: ")
    if message.startswith(f"{err.field} "):
        message = name + message[len(err.field) :]
    return InvalidRequestError(name, message)


@contextmanager
def a1111_fields() -> Iterator[None]:
    """Re-raise InvalidRequestErrors with A1111's field names."""
    try:
        yield
    except InvalidRequestError as err:
        raise a1111_error(err) from None


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


def common_fields(body: _Common, options: dict[str, Any]) -> dict[str, Any]:
    """GenerationRequest fields from what txt2img and img2img share."""
    sampler, schedule = sampler_and_schedule(body.sampler_name or body.sampler_index or "Euler", body.scheduler)
    overrides = body.override_settings or {}
    return {
        "prompt": body.prompt or "",
        "negative_prompt": body.negative_prompt or "",
        "width": body.width,
        "height": body.height,
        "steps": body.steps,
        "cfg_scale": body.cfg_scale,
        "sampler": sampler,
        "schedule": schedule,
        "seed": body.seed,
        "batch_size": body.batch_size,
        "batch_count": body.n_iter,
        "clip_skip": overrides.get("CLIP_stop_at_last_layers", options.get("CLIP_stop_at_last_layers", 1)),
        "fast": body.fast,
    }


def txt2img_request(body: Txt2ImgRequest, options: dict[str, Any]) -> GenerationRequest:
    with a1111_fields():
        return build_request(**common_fields(body, options))


def resize_image(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """A1111's resize modes: 0/3 stretch, 1 scale to cover and crop the middle, 2 scale to fit and
    fill the bands by stretching the picture's edge rows or columns."""
    if image.size == (width, height):
        return image
    lanczos = Image.Resampling.LANCZOS
    if mode in (0, 3):
        return image.resize((width, height), lanczos)
    scale = (max if mode == 1 else min)(width / image.width, height / image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    resized = image.resize((w, h), lanczos)
    if mode == 1:
        left, top = (w - width) // 2, (h - height) // 2
        return resized.crop((left, top, left + width, top + height))
    out = Image.new(image.mode, (width, height))
    left, top = (width - w) // 2, (height - h) // 2
    out.paste(resized, (left, top))
    if top > 0:
        out.paste(resized.crop((0, 0, w, 1)).resize((w, top), lanczos), (left, 0))
    if height - top - h > 0:
        out.paste(resized.crop((0, h - 1, w, h)).resize((w, height - top - h), lanczos), (left, top + h))
    if left > 0:
        out.paste(resized.crop((0, 0, 1, h)).resize((left, h), lanczos), (0, top))
    if width - left - w > 0:
        out.paste(resized.crop((w - 1, 0, w, h)).resize((width - left - w, h), lanczos), (left + w, top))
    return out


def _choice(value: int, choices: dict[int, str], field: str) -> str:
    if value not in choices:
        allowed = ", ".join(f"{k} ({v})" for k, v in choices.items())
        raise InvalidRequestError(field, f"must be one of {allowed}, got {value}")
    return choices[value]


def img2img_request(body: Img2ImgRequest, options: dict[str, Any], settings: Settings) -> GenerationRequest:
    """Decode, invert and resize the images as A1111 would, then validate everything."""
    if not body.init_images:
        raise InvalidRequestError("init_images", "give one base64 image to start from")
    if len(body.init_images) > 1:
        raise InvalidRequestError("init_images", f"lienzo takes one init image per request, got {len(body.init_images)}")
    _choice(body.resize_mode, _RESIZE_MODES, "resize_mode")
    fill = _choice(body.inpainting_fill, _FILLS, "inpainting_fill")
    image = image_from_b64(body.init_images[0], "init_images[0]", settings)
    fields = {**common_fields(body, options), "denoising_strength": body.denoising_strength}
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
    if body.resize_mode != 0 and not (mask is not None and body.inpaint_full_res):
        image = resize_image(image, body.width, body.height, body.resize_mode)
        if mask is not None:
            mask = resize_image(mask, body.width, body.height, body.resize_mode)
    with a1111_fields():
        return build_request(**fields, init_image=image, mask=mask)


# -- models ---------------------------------------------------------------------------------------


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str = Field(description="what sd_model_checkpoint takes: file name [short hash]")
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


def model_item(entry: ModelEntry) -> SDModelItem:
    file_name = entry.name + (entry.path.suffix if entry.path.is_file() else "")
    return SDModelItem(
        title=f"{file_name} [{entry.short_hash}]",
        model_name=entry.name.replace("/", "_").replace("\\", "_"),
        hash=entry.short_hash,
        sha256=entry.sha256,
        filename=str(entry.path),
    )


_TITLE = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]$")


def resolve_checkpoint(queue: JobQueue, value: str, field: str) -> Path:
    """A model by A1111 title ("name.safetensors [hash]"), file name, name, short hash or path inside the
    models dir (never elsewhere: see ``JobQueue.resolve_model``)."""
    wanted = value.strip()
    match = _TITLE.match(wanted)
    keys = {wanted.lower()}
    if match:
        keys |= {match["name"].lower(), match["hash"].lower()[:10]}
    entries = queue.registry.checkpoints()
    current = queue.current_model_or_none()
    if current is not None and all(e.path != current for e in entries):  # started with --model outside the models dir
        entries.append(queue.registry.entry(current))
    for entry in entries:
        item = model_item(entry)
        aliases = {item.title, item.title.rsplit(" [", 1)[0], entry.name, item.model_name, entry.short_hash, entry.path.name}
        if keys & {a.lower() for a in aliases}:
            return entry.path
    try:  # lienzo's own extension: a path inside the models dir, to a readable checkpoint
        return queue.resolve_checkpoint(wanted, field)
    except ModelFileError:
        pass
    titles = ", ".join(model_item(e).title for e in entries) or "none"
    raise InvalidRequestError(field, f"no model named {value!r}; available: {titles}")


def current_title(queue: JobQueue) -> str | None:
    path = queue.current_model_or_none()
    return None if path is None else model_item(queue.registry.entry(path)).title


# -- per-app state: options and the Skip / Interrupt flags ----------------------------------------


OPTIONS_FILE = "a1111-options.json"
# Every option AUTOMATIC1111 documents, with its default (names and values only, for clients that read
# them); default_options overlays what lienzo really does.
_A1111_OPTIONS = Path(__file__).resolve().parents[1] / "a1111_options.json"


@dataclass
class ApiState:
    options: dict[str, Any] = dataclass_field(default_factory=dict)  # what clients POSTed to /options
    path: Path | None = None  # where they persist across restarts
    interrupted: str | None = None  # id of the job /interrupt stopped
    skipped: tuple[str, int] | None = None  # (job id, batch) /skip dropped

    @classmethod
    def load(cls, path: Path) -> "ApiState":
        """The options saved in ``path``; none when it is missing or unreadable (said in the log: a
        damaged settings file must not keep the server from starting)."""
        options: dict[str, Any] = {}
        try:
            options = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as err:
            log.warning("%s: cannot read the saved A1111 options (%s); starting from the defaults", path, err)
        return cls(options=options if isinstance(options, dict) else {}, path=path)

    def save(self) -> None:
        if self.path is not None:
            data = json.dumps(self.options, indent=1, sort_keys=True).encode()
            write_atomic(self.path, lambda file: file.write(data))


def get_api_state(request: Request) -> ApiState:
    state = getattr(request.app.state, "a1111", None)
    if state is None:
        state = request.app.state.a1111 = ApiState.load(request.app.state.settings.data_dir / OPTIONS_FILE)
    return state


State = Annotated[ApiState, Depends(get_api_state)]


def default_options(settings: Settings, queue: JobQueue) -> dict[str, Any]:
    """A1111's documented options with lienzo's values where lienzo has the setting."""
    current = queue.current_model_or_none()
    return {
        **json.loads(_A1111_OPTIONS.read_text(encoding="utf-8")),
        "samples_save": True,
        "enable_pnginfo": True,
        "CLIP_stop_at_last_layers": 1,
        "randn_source": "CPU",  # lienzo draws noise on the CPU, so a seed gives the same picture on every device
        "show_progress_every_n_steps": settings.preview_every,
        "show_progress_type": "Approx cheap",  # previews are a linear map of the latents (engine._PREVIEW_RGB)
        "save_incomplete_images": True,  # an interrupted image is saved, marked "Interrupted" in its infotext
        "outdir_samples": "",
        "outdir_txt2img_samples": str(settings.outputs_dir / "txt2img-images"),
        "outdir_img2img_samples": str(settings.outputs_dir / "img2img-images"),
        "sd_checkpoint_hash": queue.registry.entry(current).sha256 if current is not None else "",
        "face_restoration": False,
        "tiling": False,
    }


# -- generation -----------------------------------------------------------------------------------


class GenerationResponse(BaseModel):
    images: list[str] | None = Field(description="base64 PNGs with their infotext")
    parameters: dict = Field(description="the request as received")
    info: str = Field(description="JSON: seeds, infotexts, sizes, sampler, model, ...")


def _job_timestamp(job: Job) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created))


def job_info(job: Job, body: _Common, notes: "Notes | None" = None) -> dict[str, Any]:
    """A1111's ``info`` (Processed.js) for a finished job, with lienzo's ``ignored`` and ``warnings``."""
    notes = notes or Notes()
    req = job.request
    first = job.images[0].parameters if job.images else {}
    seeds = job.seeds or [req.seed]
    count = len(seeds)
    extra = {"Schedule type": first.get("Schedule type", req.schedule)}
    if "Fast" in first:
        extra["Fast"] = first["Fast"]
    return {
        "prompt": req.prompt,
        "all_prompts": [req.prompt] * count,
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * count,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "subseed_strength": 0,
        "width": req.width,
        "height": req.height,
        "sampler_name": first.get("Sampler", req.sampler),
        "cfg_scale": req.cfg_scale,
        "steps": req.steps,
        "batch_size": req.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": first.get("Model", job.model_name or None),
        "sd_model_hash": first.get("Model hash"),
        "sd_vae_name": first.get("VAE"),
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": req.denoising_strength if req.init_image is not None else None,
        "extra_generation_params": extra,
        "index_of_first_image": 0,
        "infotexts": [saved.infotext for saved in job.images],
        "styles": body.styles or [],
        "job_timestamp": _job_timestamp(job),
        "clip_skip": req.clip_skip,
        "is_using_inpainting_conditioning": False,
        # lienzo's additions. "filtered", one entry per image as in "infotexts": "blurred"/"blocked" by the
        # safety filter, or null. "ignored": fields the request turned on that lienzo does not implement yet.
        "filtered": [saved.filtered for saved in job.images],
        "ignored": notes.ignored,
        "warnings": notes.warnings + job.warnings,
    }


def echoed_parameters(body: _Common) -> dict[str, Any]:
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters.update(init_images=None, mask=None)
    return parameters


@dataclass
class Notes:
    """What a request should be told besides its images: fields ignored, and warnings."""

    ignored: list[str] = dataclass_field(default_factory=list)
    warnings: list[str] = dataclass_field(default_factory=list)

    def headers(self, job: Job) -> dict[str, str]:
        """The same as response headers, for clients that read only the images (one line each, ASCII)."""
        headers = {"X-Lienzo-Ignored": self.ignored, "X-Lienzo-Warnings": self.warnings + job.warnings}
        return {k: "; ".join(v).encode("ascii", "replace").decode().replace("\n", " ") for k, v in headers.items() if v}


def job_response(job: Job, body: _Common, notes: Notes | None = None) -> GenerationResponse | JSONResponse:
    """Images finished so far (an interrupted job keeps them, as A1111 does), or the job's error."""
    if job.status == JobStatus.FAILED:
        message = job.error or "the job failed"
        if message.startswith("internal error"):
            return error_response(500, message, None)
        if job.error_field is None:
            return error_response(422, message, None)
        err = a1111_error(InvalidRequestError(job.error_field, message.removeprefix(f"{job.error_field}: ")))
        return error_response(422, str(err), err.field)
    images = [b64encode(saved.png()) for saved in job.images] if body.send_images else []
    answer = GenerationResponse(images=images, parameters=echoed_parameters(body), info=json.dumps(job_info(job, body, notes)))
    return JSONResponse(answer.model_dump(), headers=(notes or Notes()).headers(job))


def request_model(body: _Common, queue: JobQueue) -> str | None:
    """``override_settings.sd_model_checkpoint``, resolved; None: the current model."""
    name = (body.override_settings or {}).get("sd_model_checkpoint")
    if not name:
        return None
    return str(resolve_checkpoint(queue, str(name), "override_settings.sd_model_checkpoint"))


async def generate(
    body: _Common, build: Callable[[Any], GenerationRequest], request: Request, queue: JobQueue, presets: list[Preset], endpoint: str
):
    """Refuse scripts, apply styles, note what is ignored, then run the request ``build`` makes."""
    check_scripts(body)
    notes = Notes(ignored=ignored_fields(body))
    if notes.ignored:
        log.warning("%s%s: ignoring what lienzo does not implement: %s", PREFIX, endpoint, ", ".join(notes.ignored))
    styled, notes.warnings = apply_styles(body, presets)
    gen = build(styled)
    model = request_model(body, queue)
    with a1111_fields():
        job = queue.submit(gen, model=model, source="a1111")
    await queue.wait(job, request.is_disconnected)
    return job_response(job, body, notes)


@router.post("/txt2img", response_model=GenerationResponse)
async def txt2img(body: Txt2ImgRequest, request: Request, queue: Queue, state: State, gallery: Gallery):
    """Generate from a prompt; answers when the images are done (or /interrupt stopped it)."""
    return await generate(body, lambda b: txt2img_request(b, state.options), request, queue, gallery.presets(), "/txt2img")


@router.post("/img2img", response_model=GenerationResponse)
async def img2img(body: Img2ImgRequest, request: Request, queue: Queue, settings: AppSettings, state: State, gallery: Gallery):
    """Repaint ``init_images[0]``; with a ``mask``, only the white part of it (inpainting)."""
    return await generate(body, lambda b: img2img_request(b, state.options, settings), request, queue, gallery.presets(), "/img2img")


# -- progress and control -------------------------------------------------------------------------


class ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    job: str
    job_count: int = Field(description="batches (n_iter) of the job now running; 0 when idle")
    job_timestamp: str
    job_no: int = Field(description="the batch being made, from 0")
    sampling_step: int
    sampling_steps: int


class ProgressResponse(BaseModel):
    progress: float = Field(description="0 to 1")
    eta_relative: float = Field(description="seconds left")
    state: ProgressState
    current_image: str | None = Field(None, description="live preview, base64 PNG")
    textinfo: str | None = None


def _next_job(queue: JobQueue) -> Job | None:
    """The running job, else the next one to run."""
    if queue.running is not None:
        return queue.running
    return next((job for job in queue.jobs() if job.status == JobStatus.QUEUED and queue.position(job) == 0), None)


def progress_view(queue: JobQueue, state: ApiState, with_image: bool) -> ProgressResponse:
    job = _next_job(queue)
    if job is None:
        idle = ProgressState(
            skipped=False, interrupted=False, job="", job_count=0, job_timestamp="0", job_no=0, sampling_step=0, sampling_steps=0
        )
        return ProgressResponse(progress=0, eta_relative=0, state=idle)
    running = job.status == JobStatus.RUNNING
    snapshot = ProgressState(
        skipped=state.skipped == (job.id, job.batch),
        interrupted=state.interrupted == job.id,
        job=job.request.mode,
        job_count=job.request.batch_count,
        job_timestamp=_job_timestamp(job),
        job_no=job.batch,
        sampling_step=job.step,
        sampling_steps=job.total_steps,
    )
    preview = b64encode(job.preview) if with_image and job.preview else None
    return ProgressResponse(
        progress=min(1.0, max(job.fraction, 0.01)) if running else 0,
        eta_relative=job.eta or 0,
        state=snapshot,
        current_image=preview,
    )


@router.get("/progress", response_model=ProgressResponse)
async def progress(queue: Queue, state: State, skip_current_image: Annotated[bool, Query()] = False) -> ProgressResponse:
    """The running job's progress, from any API; ``current_image`` is the latest live preview."""
    return progress_view(queue, state, with_image=not skip_current_image)


@router.post("/interrupt")
async def interrupt(queue: Queue, state: State) -> dict:
    """Stop the running job after its current step; its request answers with the images made so far."""
    job = queue.interrupt()
    if job is not None:
        state.interrupted = job.id
    return {}


@router.post("/skip")
async def skip(queue: Queue, state: State) -> None:
    """Drop the running job's current batch and go on with its next."""
    job = queue.skip()
    if job is not None:
        state.skipped = (job.id, job.batch)


# -- options --------------------------------------------------------------------------------------


def set_options(values: dict[str, Any], queue: JobQueue, state: ApiState) -> None:
    """Check every value lienzo acts on before changing anything, then apply them all and save them in
    the data dir (all but the model, which ``lienzo serve --model`` or the default decides at start).
    Options lienzo does not know are kept and returned, as A1111 does."""
    path = None
    if values.get("sd_model_checkpoint") is not None:
        path = resolve_checkpoint(queue, str(values["sd_model_checkpoint"]), "sd_model_checkpoint")
    if "CLIP_stop_at_last_layers" in values:
        with a1111_fields():
            build_request(clip_skip=values["CLIP_stop_at_last_layers"])
    if path is not None:
        queue.model = str(path)
    state.options.update({k: v for k, v in values.items() if k != "sd_model_checkpoint"})
    state.save()


@router.get("/options", response_model=dict[str, Any])
async def get_options(queue: Queue, settings: AppSettings, state: State) -> dict[str, Any]:
    """Settings: ``sd_model_checkpoint`` is the current model's title; other options as last set."""
    return {**default_options(settings, queue), **state.options, "sd_model_checkpoint": current_title(queue)}


@router.post("/options")
async def post_options(values: dict[str, Any], queue: Queue, state: State) -> None:
    """Change settings; ``sd_model_checkpoint`` (a title, name or hash) switches the model from the next job on."""
    set_options(values, queue, state)


# -- lists ----------------------------------------------------------------------------------------


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float | None
    need_inner_model: bool | None


class UpscalerItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    model_name: str | None
    model_path: str | None
    model_url: str | None
    scale: float | None


class SDVaeItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    filename: str


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class ScriptsList(BaseModel):
    txt2img: list[str]
    img2img: list[str]


@router.get("/samplers", response_model=list[SamplerItem])
async def samplers() -> list[SamplerItem]:
    return [SamplerItem(name=s.name, aliases=[], options={"scheduler": s.automatic.lower()}) for s in SAMPLERS.values()]


@router.get("/schedulers", response_model=list[SchedulerItem])
async def schedulers() -> list[SchedulerItem]:
    return [
        SchedulerItem(
            name=s.name, label=s.label, aliases=list(s.aliases) or None, default_rho=s.default_rho, need_inner_model=s.need_inner_model
        )
        for s in SCHEDULES.values()
    ]


@router.get("/sd-models", response_model=list[SDModelItem])
async def sd_models(queue: Queue) -> list[SDModelItem]:
    """Readable checkpoints only: A1111 clients offer every listed model for selection and have nowhere to
    show why one cannot load (GET /api/v1/models lists unreadable files with the reason)."""
    return [model_item(entry) for entry in queue.registry.checkpoints()]


@router.post("/refresh-checkpoints")
async def refresh_checkpoints() -> None:
    """Nothing to do: the models folder is read on every request."""


@router.get("/sd-vae", response_model=list[SDVaeItem])
async def sd_vae(queue: Queue) -> list[SDVaeItem]:
    return [SDVaeItem(model_name=e.path.name, filename=str(e.path)) for e in queue.registry.scan() if e.architecture == "VAE"]


@router.get("/loras", response_model=list[LoraItem])
async def loras(queue: Queue) -> list[LoraItem]:
    return [LoraItem(name=e.name, alias=e.name, path=str(e.path), metadata={}) for e in queue.registry.loras()]


@router.get("/upscalers", response_model=list[UpscalerItem])
async def upscalers() -> list[UpscalerItem]:
    """None: lienzo has no upscalers (hence no hires fix)."""
    return []


@router.get("/scripts", response_model=ScriptsList)
async def scripts() -> ScriptsList:
    return ScriptsList(txt2img=[], img2img=[])


# What clients read at start-up. Empty lists where lienzo has none of the thing yet (no hires fix,
# hence no latent upscale modes; no face restorers, Real-ESRGAN, hypernetworks or embeddings).


class NamedItem(BaseModel):
    name: str


class PromptStyleItem(BaseModel):
    name: str
    prompt: str | None
    negative_prompt: str | None


class FaceRestorerItem(BaseModel):
    name: str
    cmd_dir: str | None


class RealesrganItem(BaseModel):
    name: str
    path: str | None
    scale: int | None


class HypernetworkItem(BaseModel):
    name: str
    path: str | None


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, Any] = Field(description="embeddings the current model can use, by name")
    skipped: dict[str, Any] = Field(description="embeddings found that do not fit the current model")


@router.get("/latent-upscale-modes", response_model=list[NamedItem])
async def latent_upscale_modes() -> list[NamedItem]:
    return []


@router.get("/prompt-styles", response_model=list[PromptStyleItem])
async def prompt_styles(gallery: Gallery) -> list[PromptStyleItem]:
    """lienzo's saved presets (the studio's styles, /api/v1/presets); ``styles`` in a request applies them."""
    return [PromptStyleItem(name=p.name, prompt=p.prompt, negative_prompt=p.negative_prompt) for p in gallery.presets()]


@router.get("/face-restorers", response_model=list[FaceRestorerItem])
async def face_restorers() -> list[FaceRestorerItem]:
    return []


@router.get("/realesrgan-models", response_model=list[RealesrganItem])
async def realesrgan_models() -> list[RealesrganItem]:
    return []


@router.get("/hypernetworks", response_model=list[HypernetworkItem])
async def hypernetworks() -> list[HypernetworkItem]:
    return []


@router.get("/embeddings", response_model=EmbeddingsResponse)
async def embeddings() -> EmbeddingsResponse:
    return EmbeddingsResponse(loaded={}, skipped={})


@router.get("/cmd-flags", response_model=dict[str, Any])
async def cmd_flags(request: Request, settings: AppSettings, queue: Queue) -> dict[str, Any]:
    """A1111's command-line flags that have a lienzo counterpart, with lienzo's values."""
    return {
        "api": True,
        "nowebui": False,
        "port": request.url.port,
        "api_auth": None,  # never the credentials themselves
        "data_dir": str(settings.data_dir),
        "models_dir": str(settings.models_dir),
        "ckpt_dir": str(settings.models_dir),
        "ckpt": str(queue.current_model_or_none() or ""),
        "lora_dir": str(settings.models_dir / "Lora"),
        "vae_dir": str(settings.models_dir),
        "embeddings_dir": None,
        "hypernetwork_dir": None,
        "device_id": None,
        "use_cpu": [] if settings.device != "cpu" else ["all"],
        "no_half": settings.dtype == "float32",
        "no_half_vae": settings.vae_dtype == "float32",
        "lowvram": settings.low_vram,
        "medvram": False,
        "disable_safe_unpickle": False,  # lienzo never unpickles code from model files
    }


# -- png-info and memory --------------------------------------------------------------------------


class PNGInfoRequest(BaseModel):
    image: str = Field(description="base64 image (a data: URL prefix is fine)")


class PNGInfoResponse(BaseModel):
    info: str = Field(description="the infotext, '' when the image has none")
    items: dict = Field(description="the image's other text fields")
    parameters: dict = Field(description="the infotext, parsed: Prompt, Negative prompt, Steps, Seed, Size-1, Size-2, ...")


def infotext_parameters(text: str) -> dict[str, Any]:
    """A1111's parsed form: Prompt, Negative prompt, then every key; sizes also split into -1 / -2."""
    parsed = parse_infotext(text)
    out: dict[str, Any] = {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt}
    for key, value in parsed.params.items():
        size = re.fullmatch(r"(\d+)x(\d+)", value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = int(size[1]), int(size[2])
        else:
            out[key] = value
    return out


@router.post("/png-info", response_model=PNGInfoResponse)
async def png_info(body: PNGInfoRequest, settings: AppSettings) -> PNGInfoResponse:
    """The generation parameters stored in an image (PNG text chunk or EXIF UserComment)."""
    data = b64decode(body.image, "image")
    decode_image(data, field="image", max_pixels=settings.max_input_pixels)  # a real image, within the pixel limit
    text = read_parameters(io.BytesIO(data)) or ""
    with Image.open(io.BytesIO(data)) as image:
        items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str) and k != "parameters"}
    return PNGInfoResponse(info=text, items=items, parameters=infotext_parameters(text) if text else {})


class MemoryResponse(BaseModel):
    ram: dict
    cuda: dict


def _ram() -> dict[str, Any]:
    try:
        import psutil

        total, used = psutil.virtual_memory().total, psutil.Process().memory_info().rss
        return {"free": total - used, "used": used, "total": total}
    except Exception as err:  # noqa: BLE001 - optional and platform-dependent
        return {"error": str(err)}


def _cuda() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"error": "unavailable"}
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()
    return {
        "system": {"free": free, "used": total - free, "total": total},
        "allocated": {"current": stats.get("allocated_bytes.all.current", 0), "peak": stats.get("allocated_bytes.all.peak", 0)},
        "reserved": {"current": stats.get("reserved_bytes.all.current", 0), "peak": stats.get("reserved_bytes.all.peak", 0)},
    }


@router.get("/memory", response_model=MemoryResponse)
async def memory() -> MemoryResponse:
    return MemoryResponse(ram=_ram(), cuda=_cuda())

