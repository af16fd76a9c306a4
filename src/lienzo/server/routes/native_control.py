"""What lienzo's own API offers around generation, ``/api/v1``: the ControlNet models and preprocessors (with a
preprocessor run on its own, for a client's live preview of a control map), the upscalers (and one image upscaled,
as A1111's extras tab), and the textual-inversion embeddings a prompt can name.

The work here runs outside the job queue, as the A1111 door's extras do: a control map or an upscale is one
request's own work and answers the image. Routes that read files or pixels are plain ``def`` (run in the thread
pool), so that none blocks the event loop, and every image is held to the server's pixel limits before any work.
"""

import io
import threading

from fastapi import APIRouter, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from lienzo.control.models import control_models
from lienzo.control.preprocessors import IP_ADAPTER_MODULES, PREPROCESSORS, RESOLUTION, Preprocessor, find_preprocessor, preprocess
from lienzo.errors import InvalidRequestError
from lienzo.generation.control_unit import MAX_PROCESSOR_RES, MIN_PROCESSOR_RES
from lienzo.images.io import decode_image
from lienzo.models.embeddings import current_embeddings
from lienzo.server.codec import b64decode, image_from_b64, mask_from_b64
from lienzo.server.deps import AppSettings, Queue
from lienzo.server.routes.native import PREFIX, ControlUnitBody
from lienzo.settings import Settings
from lienzo.upscale.postprocess import Resize, infotext, output_text, png_info, run_upscale, source_text
from lienzo.upscale.upscalers import LATENT_MODES, MAX_SCALE, MIN_SCALE, find_upscaler, list_upscalers, target_size

router = APIRouter(prefix=PREFIX, tags=["lienzo"])

_PNG = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}}

# One upscale at a time: two at once would need twice the memory and finish no sooner.
_upscaling = threading.Lock()


class PNGResponse(Response):
    media_type = "image/png"


def _png(image: Image.Image, text: dict[str, str] | None = None) -> PNGResponse:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(text) if text else None)
    return PNGResponse(buffer.getvalue())


def _check_output(size: tuple[int, int], settings: Settings, field: str, what: str) -> None:
    """An image this route would make, held to max_pixels before the work is done."""
    width, height = size
    if width * height > settings.max_pixels:
        raise InvalidRequestError(
            field, f"{what} would be {width}x{height} = {width * height:,} pixels; the limit is {settings.max_pixels:,} (max_pixels)"
        )


# -- ControlNet -------------------------------------------------------------------------------------


class ControlModelView(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str = Field(description="'name [hash]', as sd-webui-controlnet names it; a unit's model may be this or the name")
    name: str
    kind: str = Field(description="controlnet or t2i_adapter")
    family: str | None = Field(description="the models it fits: sd1, sd2, sdxl or flux; null: the file does not tell")


# Plain ``def``: listing reads the files' headers (a .pth whole).
@router.get("/controlnet/models", response_model=list[ControlModelView])
def list_control_models(settings: AppSettings) -> list[ControlModelView]:
    """The ControlNets and T2I-Adapters in the models dir's ControlNet folders, in name order."""
    return [ControlModelView(title=e.title, name=e.name, kind=e.kind, family=e.family) for e in control_models(settings.models_dir)]


class SliderView(BaseModel):
    name: str
    value: float = Field(description="its default")
    min: float
    max: float
    step: float


class PreprocessorView(BaseModel):
    name: str = Field(description="sd-webui-controlnet's module name")
    alias: str = Field(description="the name its UI shows; a unit's module may be either")
    sliders: list[SliderView] = Field(
        description="processor_res (when the first is Resolution), then threshold_a and threshold_b, in that order"
    )
    resolution: bool = Field(description="whether the first slider is the resolution (processor_res)")
    model_free: bool = Field(description="it needs no annotator file")
    annotator: str | None = Field(description="the lllyasviel/Annotators file it needs in the models dir's annotators folder")
    takes_mask: bool = Field(description="an inpaint module: the map includes the mask")
    image_prompt: bool = Field(description="an IP-Adapter module: it makes no map, the IP-Adapter reads the picture itself")


def preprocessor_view(p: Preprocessor) -> PreprocessorView:
    return PreprocessorView(
        name=p.name, alias=p.alias, sliders=[SliderView(**vars(s)) for s in p.sliders], resolution=p.has_resolution,
        model_free=p.model_free, annotator=p.annotator, takes_mask=p.takes_mask, image_prompt=p.embeds,
    )


@router.get("/controlnet/preprocessors", response_model=list[PreprocessorView])
async def list_preprocessors() -> list[PreprocessorView]:
    """Every preprocessor (module) a unit may name, with its sliders: those that make a map, then the IP-Adapter ones."""
    return [preprocessor_view(p) for p in (*PREPROCESSORS.values(), *IP_ADAPTER_MODULES.values())]


@router.get("/controlnet/unit")
async def unit_schema() -> dict:
    """The JSON Schema of a ControlNet unit as the submit bodies take it (``controlnets``): its fields, limits,
    defaults and choices, from which a client builds its controls."""
    return ControlUnitBody.model_json_schema()


class DetectBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="the picture, base64 (a data: URL prefix is fine)")
    module: str = Field("canny", description="the preprocessor: a name or alias from GET /controlnet/preprocessors")
    processor_res: int = Field(
        RESOLUTION.value, ge=MIN_PROCESSOR_RES, le=MAX_PROCESSOR_RES, description="the short side the picture is scaled to first"
    )
    threshold_a: float | None = Field(None, description="the module's first slider; null: its default")
    threshold_b: float | None = Field(None, description="the module's second slider; null: its default")
    mask: str | None = Field(None, description="inpaint modules: base64, white = repaint; the image's size")
    seed: int | None = Field(None, description="shuffle: the seed of its noise; null: a random one")


def _map_size(preprocessor: Preprocessor, size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """The map's size: the picture's short side scaled to the resolution, for a module that has one."""
    if not preprocessor.has_resolution:
        return size
    return target_size(size, resolution / min(size))


# Plain ``def``: the preprocessor runs here (the neural ones on the server's device).
@router.post("/controlnet/detect", response_class=PNGResponse, responses=_PNG)
def detect(body: DetectBody, settings: AppSettings) -> PNGResponse:
    """The control map a preprocessor makes of the picture (a unit's map before the ControlNet reads it), as a PNG."""
    preprocessor = find_preprocessor(body.module)
    preprocessor.slider_values(body.processor_res, body.threshold_a, body.threshold_b)
    preprocessor.annotator_path(settings.models_dir)
    image = image_from_b64(body.image, "image", settings)
    size = _map_size(preprocessor, image.size, body.processor_res)
    _check_output(size, settings, "processor_res", f"the {image.width}x{image.height} picture's map")
    mask = mask_from_b64(body.mask, image.size, "mask", settings) if body.mask is not None else None
    control_map = preprocess(
        preprocessor.name, image, body.processor_res, body.threshold_a, body.threshold_b, mask=mask, seed=body.seed,
        models_dir=settings.models_dir, device=settings.device,
    )
    return _png(control_map)


# -- upscaling --------------------------------------------------------------------------------------


class UpscalerView(BaseModel):
    name: str = Field(description="as A1111 names it: a latent mode, None, Lanczos, Nearest or a model file's stem")
    latent: bool = Field(description="it enlarges the latents: only the hires fix (hr_upscaler) takes it, POST /upscale does not")
    scale: int | None = Field(description="a model's native scale, when its file's name tells it")
    folder: str | None = Field(description="the models dir's folder of a model file; null: built in")


@router.get("/upscalers", response_model=list[UpscalerView])
def list_upscaler_views(settings: AppSettings) -> list[UpscalerView]:
    """The hires fix's latent modes, then the upscalers that enlarge pictures: the built-ins and the model files in the
    models dir's ESRGAN, RealESRGAN, SwinIR, DAT, HAT, ScuNET and upscale_models folders."""
    latent = [UpscalerView(name=name, latent=True, scale=None, folder=None) for name in LATENT_MODES]
    return latent + [UpscalerView(name=u.name, latent=False, scale=u.scale, folder=u.folder) for u in list_upscalers(settings.models_dir)]


class UpscaleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="the picture, base64 (a data: URL prefix is fine)")
    upscaler: str = Field("Lanczos", description="an upscaler GET /upscalers lists that is not latent")
    scale: float = Field(2.0, ge=MIN_SCALE, le=MAX_SCALE, allow_inf_nan=False, description=f"how much larger, {MIN_SCALE} to {MAX_SCALE}")


# Plain ``def``: the upscaler runs here, a model one in tiles on the server's device.
@router.post("/upscale", response_class=PNGResponse, responses=_PNG)
def upscale_image(body: UpscaleBody, settings: AppSettings) -> PNGResponse:
    """The picture enlarged by ``scale``, as a PNG that keeps its text and adds A1111's postprocessing infotext
    ("Postprocess upscale by: 2, Postprocess upscaler: Lanczos"); nothing is saved on the server."""
    if body.upscaler in LATENT_MODES:
        raise InvalidRequestError("upscaler", f"{body.upscaler} enlarges latents (the hires fix's); pick one of None, Lanczos, Nearest or a model")
    upscaler = find_upscaler(body.upscaler, settings.models_dir)
    data = b64decode(body.image, "image")
    image = decode_image(data, field="image", max_pixels=settings.max_input_pixels)
    _check_output(target_size(image.size, body.scale), settings, "scale", f"the {image.width}x{image.height} picture at {body.scale:g}x")
    with Image.open(io.BytesIO(data)) as raw:
        text = source_text(raw)
    from lienzo.devices import pick_device

    with _upscaling:
        result, info = run_upscale(image, Resize(scale=body.scale), upscaler, device=str(pick_device(settings.device)))
    return _png(result, output_text(text, infotext(info)))


# -- embeddings -------------------------------------------------------------------------------------


class EmbeddingView(BaseModel):
    name: str = Field(description="what a prompt writes to use it")
    size_bytes: int
    short_hash: str
    fits: bool | None = Field(
        description="whether the current model can use it (its text encoders' width); null: not known until that model has run a job"
    )


# Plain ``def``: listing hashes new files.
@router.get("/embeddings", response_model=list[EmbeddingView])
def list_embeddings(queue: Queue) -> list[EmbeddingView]:
    """The textual-inversion embeddings in the models dir's embeddings folder, in name order."""
    current = current_embeddings()
    loaded, skipped = (current.loaded, current.skipped) if current is not None else ({}, {})

    def fits(name: str) -> bool | None:
        return True if name in loaded else False if name in skipped else None

    return [
        EmbeddingView(name=e.name, size_bytes=e.size_bytes, short_hash=e.short_hash, fits=fits(e.name)) for e in queue.registry.embeddings()
    ]
