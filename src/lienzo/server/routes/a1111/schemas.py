"""The A1111 API's bodies, with its field names and defaults (not lienzo's), and its error body."""

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, create_model

from lienzo.generation.fields import SAME, WITH_IMAGE
from lienzo.generation.request import schema_limits, table
from lienzo.server.dialect import ErrorBody
from lienzo.server.fields import body_field

PREFIX = "/sdapi/v1"

_ERROR_KINDS = {
    400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 413: "PayloadTooLarge", 422: "UnprocessableEntity",
    429: "TooManyRequests", 500: "InternalServerError",
}


class A1111Error(ErrorBody):
    """A1111's error body: the kind of error, its detail, and the same text as ``errors``; lienzo adds ``field``."""

    error: str = Field(description="the kind of error: " + ", ".join(dict.fromkeys(_ERROR_KINDS.values())) + " or HTTPException")
    detail: str = Field(description="what is wrong and what is allowed, in one line")
    body: str = Field(description="always empty")
    errors: str = Field(description="the same as detail")
    field: str | None = Field(description="lienzo extension: the request field at fault, by its A1111 name; null: none in particular")

    @classmethod
    def of(cls, status: int, message: str, field: str | None) -> Self:
        return cls(error=_ERROR_KINDS.get(status, "HTTPException"), detail=message, body="", errors=message, field=field)


# -- request bodies -------------------------------------------------------------------------------

IGNORED = "accepted for compatibility; lienzo ignores it"
XYZ_TITLE = "x/y/z plot"  # the one A1111 script lienzo has, as script_name names it (any case)
CONTROLNET_TITLE = "controlnet"  # the one always-on script, sd-webui-controlnet's, as alwayson_scripts names it (any case)
FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
# A1111's resize_mode numbers; generation.canvas.ResizeMode names them.
RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill", 3: "just resize (latent upscale)"}


def table_fields(modes: set[str], but: set[str] = frozenset()) -> dict[str, Any]:
    """The table's plain A1111 body fields for ``modes`` (not those in ``but``), by A1111 name, with A1111's
    defaults; null is taken too, meaning lienzo's default."""
    fields = {}
    for row in table():
        spec = row.spec
        if spec.a1111 and spec.a1111_body and spec.modes & modes and spec.a1111 not in but:
            default = row.default if spec.a1111_default is SAME else spec.a1111_default
            fields[spec.a1111] = body_field(row, default, optional=True)
    return fields


class _CommonOptions(BaseModel):
    """What txt2img and img2img share besides the table's fields: A1111's own options, and what it takes
    that lienzo does not do."""

    model_config = ConfigDict(extra="allow")

    sampler_name: str | None = Field(None, description="e.g. 'Euler a', 'DPM++ 2M'; old names such as 'DPM++ 2M Karras' work")
    sampler_index: str | None = Field("Euler", description="older name of sampler_name, used when sampler_name is empty")
    scheduler: str | None = Field(
        None,
        description="schedule type, any id or label of GET /sdapi/v1/schedulers in any case (karras, sgm_uniform, "
        "'Align Your Steps', ...); one the sampler cannot run in diffusers runs as the nearest it can",
    )
    override_settings: dict[str, Any] | None = Field(
        None,
        description="sd_model_checkpoint picks this request's model, CLIP_stop_at_last_layers its clip skip; others are ignored",
    )
    send_images: bool = Field(True, description="false: answer without the images (they are saved in the outputs folder)")
    save_images: bool = Field(False, description="lienzo always saves its images")

    styles: list[str] | None = Field(None, description="names of saved presets (GET /prompt-styles), added to the prompts as A1111's styles")
    script_name: str | None = Field(
        None, description=f"'{XYZ_TITLE}' (A1111's X/Y/Z plot, with its script_args); another is refused (422), as A1111 refuses one it lacks"
    )
    alwayson_scripts: dict[str, Any] | None = Field(
        None,
        description=f"'{CONTROLNET_TITLE}' (any case) with args: sd-webui-controlnet's units (GET /controlnet/model_list, "
        "/controlnet/module_list); another script is refused (422), as A1111 refuses one it lacks",
    )

    # Accepted and ignored: lienzo has no such feature yet (a request turning one on is told so in ``info``).
    restore_faces: bool | None = Field(None, description=IGNORED)
    do_not_save_samples: bool | None = Field(False, description=IGNORED)
    do_not_save_grid: bool | None = Field(False, description=IGNORED)
    eta: float | None = Field(None, description=IGNORED)
    s_min_uncond: float | None = Field(None, description=IGNORED)
    s_churn: float | None = Field(None, description=IGNORED)
    s_tmax: float | None = Field(None, description=IGNORED)
    s_tmin: float | None = Field(None, description=IGNORED)
    s_noise: float | None = Field(None, description=IGNORED)
    override_settings_restore_afterwards: bool | None = Field(True, description="override_settings apply to one request only")
    refiner_checkpoint: str | None = Field(None, description=IGNORED)
    refiner_switch_at: float | None = Field(None, description=IGNORED)
    disable_extra_networks: bool | None = Field(False, description=IGNORED)
    comments: dict[str, Any] | None = Field(None, description=IGNORED)
    script_args: list[Any] | None = Field(
        None, description="arguments of script_name; for the X/Y/Z plot A1111 1.10's: x_type, x_values, x_values_dropdown, the same "
        "for y and z, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x/y/z, margin_size, csv_mode",
    )
    force_task_id: str | None = Field(None, description=IGNORED)
    infotext: str | None = Field(None, description=IGNORED)


# The hires fix's keys: txt2img's only (A1111's img2img has none; its denoising_strength is img2img's own).
HIRES_KEYS = frozenset(row.spec.a1111 for row in table() if row.spec.a1111 and row.spec.modes == {"txt2img"})
# What txt2img and img2img share, with A1111's defaults (not lienzo's); lienzo's extensions (fast,
# tiling, ...) come with the table.
CommonRequest = create_model("CommonRequest", __base__=_CommonOptions, **table_fields({"txt2img"}, but=HIRES_KEYS))
# A1111 names (besides the table's) that lienzo acts on.
USED = {
    "sampler_name", "sampler_index", "scheduler", "override_settings", "send_images", "save_images", "resize_mode",
    "inpainting_mask_invert", "include_init_images", "styles", "script_name", "alwayson_scripts",
    "firstphase_width", "firstphase_height", "hr_checkpoint_name",
}


def _numbered(choices: dict[int, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in choices.items())


class Txt2ImgRequest(create_model("_Txt2ImgFields", __base__=CommonRequest, **table_fields({"txt2img"}, but=set(CommonRequest.model_fields)))):
    """txt2img's body: the shared fields, the hires fix's from the table (enable_hr, hr_scale, hr_upscaler, hr_scheduler,
    ...) and A1111's own below."""

    firstphase_width: int | None = Field(
        0, description="older A1111: with firstphase_height, the first pass's size (width and height are then unused); 0: width"
    )
    firstphase_height: int | None = Field(0, description="older A1111: with firstphase_width, the first pass's size; 0: height")
    hr_checkpoint_name: str | None = Field(
        None, description="the second pass's model: empty, 'Use same checkpoint' or the request's own model (lienzo runs one model a job)"
    )


class Img2ImgRequest(create_model("_Img2ImgFields", __base__=CommonRequest, **table_fields(set(WITH_IMAGE), but=set(CommonRequest.model_fields)))):
    init_images: list[str] | None = Field(None, description="one base64 image (a data: URL prefix is fine)")
    resize_mode: int = Field(0, description=_numbered(RESIZE_MODES), json_schema_extra={"enum": list(RESIZE_MODES)})
    mask: str | None = Field(None, description="base64; white = repaint, black = keep; same size as the init image")
    mask_blur: int | None = Field(4, json_schema_extra=schema_limits("mask_blur"))
    inpainting_fill: int = Field(0, description=_numbered(FILLS), json_schema_extra={"enum": list(FILLS)})
    inpaint_full_res: bool = Field(True, description="inpaint only the masked area, at width x height, and paste it back")
    inpaint_full_res_padding: int = Field(
        0, description="pixels around the masked area (inpaint_full_res)", json_schema_extra=schema_limits("only_masked_padding")
    )
    inpainting_mask_invert: int = Field(0, description="1: repaint the black part of the mask instead")
    include_init_images: bool = Field(False, description="echo init_images and mask in the answer's parameters")
    image_cfg_scale: float | None = Field(None, description="for instruct-pix2pix models only: ignored")
    initial_noise_multiplier: float | None = Field(None, description=IGNORED)
    mask_blur_x: int | None = Field(4, description="use mask_blur")
    mask_blur_y: int | None = Field(4, description="use mask_blur")
    latent_mask: str | None = Field(None, description=IGNORED)


# -- answers --------------------------------------------------------------------------------------


class GenerationResponse(BaseModel):
    images: list[str] | None = Field(description="base64 PNGs with their infotext")
    parameters: dict = Field(description="the request as received")
    info: str = Field(description="JSON: seeds, infotexts, sizes, sampler, model, ...")


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


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str = Field(description="what sd_model_checkpoint takes: file name [short hash]")
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


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


# What clients read at start-up. Empty lists where lienzo has none of the thing yet (no face restorers,
# Real-ESRGAN or hypernetworks).


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


class PNGInfoRequest(BaseModel):
    image: str = Field(description="base64 image (a data: URL prefix is fine)")


class PNGInfoResponse(BaseModel):
    info: str = Field(description="the infotext, '' when the image has none")
    items: dict = Field(description="the image's other text fields")
    parameters: dict = Field(description="the infotext, parsed: Prompt, Negative prompt, Steps, Seed, Size-1, Size-2, ...")


class MemoryResponse(BaseModel):
    ram: dict
    cuda: dict
