"""A1111's upscalers and its extras API: ``/upscalers``, ``/latent-upscale-modes``, ``/extra-single-image``
and ``/extra-batch-images``, with A1111's field names, defaults and answers (its ``modules/api/models.py``).

As A1111's API, the extras answer the images and save nothing. Each output PNG keeps the input's text and
adds the step's infotext (lienzo.upscale.postprocess). The upscaling runs in a worker thread, one request
at a time: the job queue holds no lock on the device that could be shared, so an upscale may run beside a
generation, as two requests' own work.
"""

import io
import threading
from typing import Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from pydantic import BaseModel, Field

from lienzo.errors import InvalidRequestError
from lienzo.images.io import decode_image
from lienzo.server.codec import b64decode, b64encode
from lienzo.server.deps import AppSettings
from lienzo.server.routes.a1111.schemas import NamedItem, UpscalerItem
from lienzo.settings import Settings
from lienzo.upscale.postprocess import Resize, html_info, infotext, output_text, png_info, run_upscale, source_text
from lienzo.upscale.upscalers import LATENT_MODES, MAX_SCALE, MIN_SCALE, Upscaler, find_upscaler, list_upscalers

router = APIRouter()  # included in the A1111 router, which gives the prefix and tag

# One upscale at a time: two at once would need twice the memory and finish no sooner.
_running = threading.Lock()


class ExtrasBaseRequest(BaseModel):
    resize_mode: Literal[0, 1] = Field(0, description="0: upscale by upscaling_resize; 1: to upscaling_resize_w x upscaling_resize_h")
    show_extras_results: bool = Field(True, description="accepted; the images are always answered")
    gfpgan_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False, description="must be 0: lienzo has no face restorers")
    codeformer_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False, description="must be 0: lienzo has no face restorers")
    codeformer_weight: float = Field(0, ge=0, le=1, allow_inf_nan=False, description="accepted, unused (CodeFormer)")
    upscaling_resize: float = Field(2, ge=MIN_SCALE, le=MAX_SCALE, allow_inf_nan=False, description="the factor, with resize_mode 0")
    upscaling_resize_w: int = Field(512, ge=1, description="the width, with resize_mode 1")
    upscaling_resize_h: int = Field(512, ge=1, description="the height, with resize_mode 1")
    upscaling_crop: bool = Field(True, description="resize_mode 1: cover the size and crop the middle of it, else only cover it")
    upscaler_1: str = Field("None", description="an upscaler /upscalers lists; None: no upscaling")
    upscaler_2: str = Field("None", description="a second upscaler, blended over the first's result")
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False, description="upscaler_2's share of the result")


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = Field("", description="the image, base64")


class FileData(BaseModel):
    data: str = Field(description="the image, base64")
    name: str = Field(description="its file name")


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData] = Field(description="the images")  # noqa: N815 - A1111's name


class ExtrasSingleImageResponse(BaseModel):
    html_info: str = Field(description="the step's infotext as HTML")
    image: str = Field(description="the result, a base64 PNG")


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str = Field(description="the last image's step infotext as HTML")
    images: list[str] = Field(description="the results, base64 PNGs")


@router.get("/upscalers", response_model=list[UpscalerItem])
async def upscalers(settings: AppSettings) -> list[UpscalerItem]:
    """The built-ins, then the model files in the models dir's ESRGAN, RealESRGAN, SwinIR, DAT, HAT, ScuNET and
    upscale_models folders; ``model_name`` is the folder, ``scale`` the one the file's name gives."""
    return [
        UpscalerItem(name=u.name, model_name=u.folder, model_path=str(u.path) if u.path else None, model_url=None, scale=u.scale)
        for u in list_upscalers(settings.models_dir)
    ]


@router.get("/latent-upscale-modes", response_model=list[NamedItem])
async def latent_upscale_modes() -> list[NamedItem]:
    """The hires fix's ``hr_upscaler`` values that enlarge the latents rather than the picture."""
    return [NamedItem(name=name) for name in LATENT_MODES]


@router.post("/extra-single-image", response_model=ExtrasSingleImageResponse)
async def extra_single_image(body: ExtrasSingleImageRequest, settings: AppSettings) -> ExtrasSingleImageResponse:
    """Upscale one image (A1111's extras tab)."""
    step = _Step.of(body, settings)
    data = b64decode(body.image, "image")
    image = decode_image(data, field="image", max_pixels=settings.max_input_pixels)
    step.check_size(image, "image")
    encoded, text = await run_in_threadpool(step.run, image, data)
    return ExtrasSingleImageResponse(html_info=html_info(text), image=encoded)


@router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse)
async def extra_batch_images(body: ExtrasBatchImagesRequest, settings: AppSettings) -> ExtrasBatchImagesResponse:
    """Upscale several images alike; every one is read and checked before any is upscaled."""
    if len(body.imageList) > settings.max_images:
        raise InvalidRequestError("imageList", f"{len(body.imageList)} images; the limit is {settings.max_images} (max_images)")
    step = _Step.of(body, settings)
    inputs = []
    for i, item in enumerate(body.imageList):
        field = f"imageList.{i}.data"
        data = b64decode(item.data, field)
        image = decode_image(data, field=field, max_pixels=settings.max_input_pixels)
        step.check_size(image, field)
        inputs.append((image, data))
    images, text = [], ""
    for image, data in inputs:
        encoded, text = await run_in_threadpool(step.run, image, data)
        images.append(encoded)
    return ExtrasBatchImagesResponse(html_info=html_info(text), images=images)


class _Step:
    """One request's upscale settings, checked: its upscalers found, its size within the server's limits."""

    def __init__(self, resize: Resize, first: Upscaler | None, second: Upscaler | None, visibility: float, settings: Settings):
        self.resize, self.first, self.second, self.visibility, self.settings = resize, first, second, visibility, settings

    @classmethod
    def of(cls, body: ExtrasBaseRequest, settings: Settings) -> "_Step":
        for field in ("gfpgan_visibility", "codeformer_visibility"):
            if getattr(body, field) > 0:
                raise InvalidRequestError(field, "lienzo has no face restorers (GFPGAN, CodeFormer); send 0")
        if body.resize_mode == 0:
            resize = Resize(scale=body.upscaling_resize, field="upscaling_resize")
        else:
            resize = Resize(width=body.upscaling_resize_w, height=body.upscaling_resize_h, crop=body.upscaling_crop, field="upscaling_resize_w")
        first = _upscaler(body.upscaler_1, settings, "upscaler_1")
        second = _upscaler(body.upscaler_2, settings, "upscaler_2")
        return cls(resize, first, second, body.extras_upscaler_2_visibility, settings)

    def check_size(self, image: Image.Image, field: str) -> None:
        """The result's size within max_pixels (the factor within 1 to 8), before any work."""
        if self.first is None:
            return
        w, h = self.resize.output_size(image.size)
        if w * h > self.settings.max_pixels:
            raise InvalidRequestError(
                self.resize.field,
                f"{field} ({image.width}x{image.height}) would become {w}x{h} = {w * h:,} pixels; the limit is "
                f"{self.settings.max_pixels:,} (max_pixels, LIENZO_MAX_PIXELS)",
            )

    def run(self, image: Image.Image, data: bytes) -> tuple[str, str]:
        """The result as a base64 PNG, and the step's infotext ("" when upscaler_1 is None: nothing done)."""
        from lienzo.devices import pick_device

        with Image.open(io.BytesIO(data)) as raw:
            text = source_text(raw)
        step = ""
        if self.first is not None:
            with _running:
                image, info = run_upscale(
                    image, self.resize, self.first, self.second, self.visibility, device=str(pick_device(self.settings.device))
                )
            step = infotext(info)
            text = output_text(text, step)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=png_info(text))
        return b64encode(buffer.getvalue()), step


def _upscaler(name: str, settings: Settings, field: str) -> Upscaler | None:
    """The upscaler a request names; None for "None" (A1111: no upscaling, or no second upscaler)."""
    return None if name == "None" else find_upscaler(name, settings.models_dir, field)
