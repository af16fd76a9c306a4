"""The ``/sdapi/v1`` paths A1111's clients call: each only translates (translate, answers) and calls the queue."""

import io
import logging
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from PIL import Image

from lienzo.gallery.records import Preset
from lienzo.generation.request import GenerationRequest
from lienzo.generation.samplers import SAMPLERS, SCHEDULES
from lienzo.images.io import decode_image
from lienzo.images.metadata import read_parameters
from lienzo.models.embeddings import ModelEmbeddings, current_embeddings
from lienzo.server.codec import JSONResponse, b64decode
from lienzo.server.deps import AppSettings, Caller, Gallery, Queue, identity
from lienzo.server.job import JobStatus
from lienzo.server.jobs import JobQueue
from lienzo.server.routes.a1111 import extras
from lienzo.server.routes.a1111.controlnet import Units, control_units
from lienzo.server.routes.a1111.answers import Notes, infotext_parameters, job_response, model_item, progress_view
from lienzo.server.routes.a1111.options import Options, default_options, is_module, set_options
from lienzo.server.routes.a1111.schemas import (
    PREFIX,
    CommonRequest,
    EmbeddingsResponse,
    FaceRestorerItem,
    GenerationResponse,
    HypernetworkItem,
    Img2ImgRequest,
    LoraItem,
    MemoryResponse,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    PromptStyleItem,
    RealesrganItem,
    SamplerItem,
    SchedulerItem,
    ScriptsList,
    CONTROLNET_TITLE,
    SDModelItem,
    SDVaeItem,
    Txt2ImgRequest,
    XYZ_TITLE,
)
from lienzo.server.routes.a1111.translate import (
    DIALECT,
    apply_styles,
    check_hires_checkpoint,
    check_scripts,
    current_title,
    is_xyz,
    ignored_fields,
    img2img_request,
    request_model,
    txt2img_request,
)

from lienzo.server.routes.a1111.xyz import parse_script_args, plot_response
from lienzo.settings import Settings

# The A1111 door's one logger, named after the package (log filters name it).
log = logging.getLogger(__package__)

router = APIRouter(prefix=PREFIX, tags=["AUTOMATIC1111"])
router.include_router(extras.router)  # the upscaler lists and the extras


# -- generation -----------------------------------------------------------------------------------


async def generate(
    body: CommonRequest,
    build: Callable[[CommonRequest, Units], GenerationRequest],
    request: Request,
    queue: JobQueue,
    presets: list[Preset],
    endpoint: str,
    settings: Settings,
) -> GenerationResponse | JSONResponse:
    """Refuse scripts lienzo lacks, read the ControlNet units, apply styles, note what is ignored, then run the
    request ``build`` makes (or, for the X/Y/Z plot script, one per cell)."""
    check_scripts(body)
    plot = parse_script_args(body.script_args, endpoint.strip("/")) if is_xyz(body.script_name) else None
    hires = isinstance(body, Txt2ImgRequest) and bool(body.enable_hr)
    units = control_units(body.alwayson_scripts, settings, has_init=isinstance(body, Img2ImgRequest), hires=hires)
    notes = Notes(ignored=ignored_fields(body) + units.ignored)
    if notes.ignored:
        log.warning("%s%s: ignoring what lienzo does not implement: %s", PREFIX, endpoint, ", ".join(notes.ignored))
    styled, notes.warnings = apply_styles(body, presets)
    notes.warnings += units.warnings
    dialect = units.dialect(DIALECT)
    with dialect.speaking():
        gen = build(styled, units)
    model = request_model(body, queue)
    if isinstance(body, Txt2ImgRequest):
        check_hires_checkpoint(body, model, queue)
    if plot is not None:
        return await plot_response(body, gen, plot, model, request, queue, settings, notes)
    with dialect.speaking():
        job = queue.submit(gen, model=model, source="a1111", caller=identity(request))
    await queue.wait(job, request.is_disconnected)
    if job.status == JobStatus.FAILED and job.error_field is not None and job.error_field.startswith("controlnets"):
        # A unit's error met while the job ran: named by where the client put the unit.
        return dialect.field_error(job.error_field, job.error or "the job failed")
    return job_response(job, body, notes)


@router.post("/txt2img", response_model=GenerationResponse)
async def txt2img(body: Txt2ImgRequest, request: Request, queue: Queue, settings: AppSettings, options: Options, gallery: Gallery):
    """Generate from a prompt; answers when the images are done (or /interrupt stopped it). ``enable_hr`` adds
    A1111's hires fix; ``alwayson_scripts.controlnet`` sd-webui-controlnet's units."""
    return await generate(
        body, lambda b, units: txt2img_request(b, options.values, units.units), request, queue, gallery.presets(), "/txt2img", settings
    )


@router.post("/img2img", response_model=GenerationResponse)
async def img2img(body: Img2ImgRequest, request: Request, queue: Queue, settings: AppSettings, options: Options, gallery: Gallery):
    """Repaint ``init_images[0]``; with a ``mask``, only the white part of it (inpainting). A ControlNet unit
    without an image reads ``init_images[0]``."""
    return await generate(
        body, lambda b, units: img2img_request(b, options.values, settings, units.units), request, queue, gallery.presets(), "/img2img",
        settings,
    )


# -- progress and control -------------------------------------------------------------------------


@router.get("/progress", response_model=ProgressResponse)
async def progress(queue: Queue, skip_current_image: Annotated[bool, Query()] = False) -> ProgressResponse:
    """The running job's progress, from any API; ``current_image`` is the latest live preview."""
    return progress_view(queue, with_image=not skip_current_image)


@router.post("/interrupt")
async def interrupt(queue: Queue, caller: Caller) -> dict:
    """Stop the running job after its current step; its request answers with the images made so far."""
    queue.interrupt(caller)
    return {}


@router.post("/skip")
async def skip(queue: Queue, caller: Caller) -> None:
    """Drop the running job's current batch and go on with its next."""
    queue.skip(caller)


# -- options --------------------------------------------------------------------------------------


@router.get("/options", response_model=dict[str, Any])
async def get_options(queue: Queue, settings: AppSettings, options: Options) -> dict[str, Any]:
    """Settings: ``sd_model_checkpoint`` is the current model's title; other options as last set."""
    return {**default_options(settings, queue), **options.values, "sd_model_checkpoint": current_title(queue)}


@router.post("/options")
async def post_options(values: dict[str, Any], queue: Queue, options: Options) -> None:
    """Change settings; ``sd_model_checkpoint`` (a title, name or hash) switches the model from the next job on, and
    ``forge_additional_modules`` (text encoder and VAE files) what SD 3.x and Flux.1 transformer files load with."""
    set_options(values, queue, options)


# -- lists ----------------------------------------------------------------------------------------


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


@router.get("/sd-modules", response_model=list[SDVaeItem])
async def sd_modules(queue: Queue) -> list[SDVaeItem]:
    """Forge's modules: the text encoder and VAE files ``forge_additional_modules`` may name."""
    return [SDVaeItem(model_name=e.path.name, filename=str(e.path)) for e in queue.registry.scan() if is_module(e)]


@router.get("/loras", response_model=list[LoraItem])
async def loras(queue: Queue) -> list[LoraItem]:
    return [LoraItem(name=e.name, alias=e.name, path=str(e.path), metadata={}) for e in queue.registry.loras()]


@router.get("/scripts", response_model=ScriptsList)
async def scripts() -> ScriptsList:
    """The scripts a request may name, as A1111 lists them (titles in lower case, selectable and always-on
    together): the X/Y/Z plot (script_name, over the axes lienzo can vary) and ControlNet (alwayson_scripts)."""
    return ScriptsList(txt2img=[XYZ_TITLE, CONTROLNET_TITLE], img2img=[XYZ_TITLE, CONTROLNET_TITLE])


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
def embeddings() -> EmbeddingsResponse:
    """The textual-inversion embeddings of the current model (the one the last job ran on; none before the first):
    those it can use and those skipped for it (another width), each with A1111's fields."""
    return _embeddings_response(current_embeddings())


@router.post("/refresh-embeddings")
def refresh_embeddings() -> None:
    """Read the models dir's ``embeddings`` folder again for the current model (jobs also do when it changed);
    nothing comes back, as from A1111."""
    current_embeddings(refresh=True)


def _embeddings_response(found: ModelEmbeddings | None) -> EmbeddingsResponse:
    if found is None:
        return EmbeddingsResponse(loaded={}, skipped={})
    return EmbeddingsResponse(
        loaded={name: e.describe() for name, e in found.loaded.items()},
        skipped={name: e.describe() for name, e in found.skipped.items()},
    )


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
        "embeddings_dir": str(settings.models_dir / "embeddings"),
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


@router.post("/png-info", response_model=PNGInfoResponse)
async def png_info(body: PNGInfoRequest, settings: AppSettings) -> PNGInfoResponse:
    """The generation parameters stored in an image (PNG text chunk or EXIF UserComment)."""
    data = b64decode(body.image, "image")
    decode_image(data, field="image", max_pixels=settings.max_input_pixels)  # a real image, within the pixel limit
    text = read_parameters(io.BytesIO(data)) or ""
    with Image.open(io.BytesIO(data)) as image:
        items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str) and k != "parameters"}
    return PNGInfoResponse(info=text, items=items, parameters=infotext_parameters(text) if text else {})


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
