"""OpenAI's Images API, ``/v1/images``: generations (JSON), edits and variations (multipart).

Clients written for OpenAI (the official ``openai`` package included) work unchanged: OpenAI's model
names mean the server's current model, ``size`` is ``WIDTHxHEIGHT`` or ``auto``, images come back as
base64 PNG or as URLs to ``/api/v1/jobs/{id}/images/{i}``, and errors come in OpenAI's error body.
Options lienzo cannot honour (quality, style, output format, ...) are accepted and ignored, with a
warning in the server log. A few lienzo extension fields (steps, seed, ...) may be sent alongside.
Values are validated once, by ``build_request``; errors name the OpenAI field the client sent.
"""

import io
import logging
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from fastapi import APIRouter, Form, Request, UploadFile
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, create_model

from lienzo.errors import InvalidRequestError
from lienzo.generation.fields import WITH_IMAGE
from lienzo.generation.request import MAX_SIDE, MIN_SIDE, GenerationRequest, build_request, schema_limits, table
from lienzo.images.io import decode_image, decode_mask
from lienzo.server.codec import JSONResponse, b64encode
from lienzo.server.deps import AppSettings, Queue, identity
from lienzo.server.dialect import Dialect, ErrorBody
from lienzo.server.fields import body_field, door_names
from lienzo.server.job import Job, JobStatus
from lienzo.server.jobs import JobQueue
from lienzo.server.routes.native import family_view
from lienzo.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "/v1/"
router = APIRouter(prefix="/v1/images", tags=["openai"])


# -- errors -------------------------------------------------------------------------------------

_ERROR_TYPES = {401: "invalid_request_error", 429: "rate_limit_exceeded"}
_ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="what is wrong and what is allowed, in one line")
    type: str = Field(description="invalid_request_error, rate_limit_exceeded or server_error")
    param: str | None = Field(description="the request field at fault; null: none in particular")
    code: str | None = Field(description="invalid_api_key, rate_limit_exceeded or null")


class OpenAIError(ErrorBody):
    """OpenAI's error body."""

    error: OpenAIErrorDetail

    @classmethod
    def of(cls, status: int, message: str, field: str | None) -> Self:
        kind = "server_error" if status >= 500 else _ERROR_TYPES.get(status, "invalid_request_error")
        return cls(error=OpenAIErrorDetail(message=message, type=kind, param=field, code=_ERROR_CODES.get(status)))


_SIZE_FORMAT = "size is 'WIDTHxHEIGHT' in pixels, multiples of 8 (e.g. '512x512', '768x512'), or 'auto'"


def _openai_words(field: str, name: str, message: str) -> str:
    """``n`` for batch_size wherever the message says it; a width or height error keeps its word (the
    client sent both in one size) and says how size is written."""
    if field == "batch_size":
        return message.replace("batch_size", name)
    return f"{message} ({_SIZE_FORMAT})" if name == "size" else message


# OpenAI answers an invalid request with 400, where FastAPI says 422.
DIALECT = Dialect(
    prefix=PREFIX,
    error_model=OpenAIError,
    invalid_status=400,
    fields=door_names("openai"),
    reword=_openai_words,
)


# -- request bodies -----------------------------------------------------------------------------

_IGNORED = "OpenAI option: accepted and ignored"
_EXTENSION = "lienzo extension, not in OpenAI's API"


def _ignored() -> Any:
    return Field(None, description=_IGNORED)


class _ImageOptions(BaseModel):
    """What every Images endpoint takes, and lienzo's extension fields."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="a lienzo model; OpenAI's names (dall-e-*, gpt-image-*) or none: the current one")
    n: int | None = Field(None, description="number of images (1 by default)", json_schema_extra=schema_limits("batch_size"))
    size: str | None = Field(
        None,
        description=f"'WIDTHxHEIGHT', sides multiples of 8 from {MIN_SIDE} to {MAX_SIDE} and width x height at most the server's "
        "max_pixels, or 'auto': the model's native size or the image's",
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json (default) or url, valid while the server remembers the job"
    )
    stream: bool | None = Field(None, description="only false: lienzo answers once the images are done")
    user: str | None = _ignored()
    safety_identifier: str | None = _ignored()

    def ignored_fields(self) -> list[str]:
        fields = type(self).model_fields.items()
        return [name for name, info in fields if info.description == _IGNORED and getattr(self, name) is not None]

    def extension_fields(self) -> dict[str, Any]:
        """The extension fields sent, as GenerationRequest fields."""
        field_of = {name: field for field, name in door_names("openai").items()}
        return {
            field_of.get(name, name): value
            for name, info in type(self).model_fields.items()
            if (info.description or "").startswith(_EXTENSION) and (value := getattr(self, name)) is not None
        }


def _extensions(base: type[BaseModel], modes: set[str]) -> type[BaseModel]:
    """``base`` with the table's fields that have an OpenAI name for ``modes`` and are not OpenAI's own
    (n, size): lienzo's extensions, absent meaning lienzo's default."""
    fields = {}
    for row in table():
        name = row.spec.openai
        if name and row.spec.modes & modes and name not in _ImageOptions.model_fields and name not in base.model_fields:
            # A field whose default is None says in its help what decides it (the model's family, ...).
            shown = "" if row.default is None else f" (default {row.default})"
            fields[name] = body_field(row, None, f"{_EXTENSION}: {row.spec.help}{shown}", optional=True)
    return create_model(f"_{base.__name__}Extensions", __base__=base, **fields)


class GenerationBody(_extensions(_ImageOptions, {"txt2img"})):
    prompt: str = Field(description="what to draw", json_schema_extra=schema_limits("prompt"))
    quality: str | None = _ignored()
    style: str | None = _ignored()
    background: str | None = _ignored()
    moderation: str | None = _ignored()
    output_format: str | None = _ignored()
    output_compression: int | None = _ignored()
    partial_images: int | None = _ignored()


_UploadOptions = _extensions(_ImageOptions, set(WITH_IMAGE))


class EditForm(_UploadOptions):
    image: UploadFile | None = Field(None, description="the image to edit (PNG, JPEG, WebP)")
    images: list[UploadFile] = Field(
        [], alias="image[]",
        description="as image, as the openai client sends it; the first is used, or, on a model that reads reference images "
        "(Flux.2 Klein) and with no mask, all of them as its references",
    )
    mask: UploadFile | None = Field(None, description="same size as image; its fully transparent pixels are the area to edit")
    prompt: str = Field(description="what the edited image should show", json_schema_extra=schema_limits("prompt"))
    quality: str | None = _ignored()
    background: str | None = _ignored()
    output_format: str | None = _ignored()
    output_compression: int | None = _ignored()
    input_fidelity: str | None = _ignored()
    partial_images: int | None = _ignored()

    def uploads(self) -> list[UploadFile]:
        uploads = [self.image, *self.images] if self.image is not None else self.images
        if not uploads:
            raise InvalidRequestError("image", "upload the image to edit as the multipart file field 'image'")
        return uploads


class VariationForm(_UploadOptions):
    image: UploadFile = Field(description="the image to vary (PNG, JPEG, WebP)")


class ImageData(BaseModel):
    b64_json: str | None = Field(None, description="the PNG, base64 (response_format b64_json)")
    url: str | None = Field(None, description="where to GET the PNG (response_format url)")
    revised_prompt: str | None = Field(None, description="always null: lienzo draws the prompt as given")
    filtered: str | None = Field(None, description=f'{_EXTENSION}: "blurred" or "blocked" by the safety filter; absent: shown as made')


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time, seconds")
    data: list[ImageData]
    size: str = Field(description="WIDTHxHEIGHT of the images")
    output_format: Literal["png"] = "png"


# -- translation --------------------------------------------------------------------------------

_OPENAI_MODEL = re.compile(r"(dall-e|gpt-image|chatgpt-image)", re.IGNORECASE)
_SIZE = re.compile(r"\s*(\d{1,6})\s*[x×]\s*(\d{1,6})\s*", re.IGNORECASE)


def lienzo_model(name: str | None) -> str | None:
    """The lienzo model to run, or None for the current one (also for OpenAI's own model names)."""
    if name is None or not name.strip() or _OPENAI_MODEL.match(name.strip()):
        return None
    return name.strip()


# The sizes OpenAI's models take; clients offer only these, so on a model trained smaller (lienzo-mini
# is 256x256) they are made at the model's size and answered resized (Job.fit_to_model).
OPENAI_SIZES = {(256, 256), (512, 512), (1024, 1024), (1536, 1024), (1024, 1536), (1792, 1024), (1024, 1792)}


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``"WxH"`` as (width, height); ``"auto"`` or none as (None, None). Ranges are build_request's to check."""
    if size is None or size.strip().lower() in ("", "auto"):
        return None, None
    match = _SIZE.fullmatch(size)
    if match is None:
        raise InvalidRequestError("size", f"{_SIZE_FORMAT}; got {size!r}")
    return int(match[1]), int(match[2])


def _common_fields(body: _ImageOptions, prompt: str) -> dict[str, Any]:
    if body.stream:
        raise InvalidRequestError("stream", "streaming is not supported; leave stream unset or false")
    width, height = parse_size(body.size)
    return dict(prompt=prompt, width=width, height=height, batch_size=1 if body.n is None else body.n, **body.extension_fields())


def generation_request(body: GenerationBody) -> GenerationRequest:
    with DIALECT.speaking():
        return build_request(**_common_fields(body, body.prompt))


@dataclass
class EditSource:
    image: Image.Image  # RGB, any transparency flattened onto white
    mask: Image.Image | None  # lienzo's convention: white = repaint
    erased: bool  # the mask is the image's own transparent area, whose pixels carry nothing


def transparent_area(data: bytes) -> Image.Image | None:
    """Where an already decoded-once upload is fully transparent (alpha 0), as a lienzo mask; None
    when it has no such pixel."""
    with Image.open(io.BytesIO(data)) as opened:
        image = ImageOps.exif_transpose(opened)  # upright, as decode_image and decode_mask read it
        if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
            return None
        alpha = image.convert("RGBA").getchannel("A")
    mask = alpha.point(lambda a: 255 if a == 0 else 0)
    return mask if mask.getbbox() else None


def edit_source(image_data: bytes, mask_data: bytes | None, settings: Settings) -> EditSource:
    """OpenAI's convention: the mask's fully transparent pixels are the area to edit; without a mask,
    the image's own; with neither, the whole image is redrawn (img2img)."""
    image = decode_image(image_data, field="image", max_pixels=settings.max_input_pixels)
    if mask_data is None:
        own = transparent_area(image_data)
        return EditSource(image, own, erased=own is not None)
    # Refuses image bombs, broken files and a size other than the image's, before we read its alpha.
    decode_mask(mask_data, image.size, field="mask", max_pixels=settings.max_input_pixels)
    mask = transparent_area(mask_data)
    if mask is None:
        raise InvalidRequestError(
            "mask", "has no fully transparent pixels; the area to edit is where the mask's alpha is 0 (a PNG with transparency)"
        )
    return EditSource(image, mask, erased=False)


def edit_request(form: EditForm, source: EditSource) -> GenerationRequest:
    """Inpaint where there is a mask (filling an erased area from its surroundings first), else img2img."""
    fields = _common_fields(form, form.prompt)
    fields["init_image"] = source.image
    if source.mask is not None:
        fields.update(mask=source.mask, inpainting_fill="fill" if source.erased else "original")
    with DIALECT.speaking():
        return build_request(**fields)


def takes_references(queue: JobQueue, model: str | None) -> bool:
    """Whether the model an edit runs on reads reference images (its family's, by the registry's architecture)."""
    path = queue.resolve_model(model) if model else queue.current_model()
    view = family_view(queue.registry.entry(path).architecture)
    return view is not None and view.reference_images


def reference_request(form: EditForm, images: list[Image.Image]) -> GenerationRequest:
    """gpt-image's edits without a mask: a new picture that draws from the images (Flux.2 Klein's references);
    with size auto, of the first one's size."""
    try:
        with DIALECT.speaking():
            return build_request(**_common_fields(form, form.prompt), reference_images=images)
    except InvalidRequestError as err:
        if err.field != "reference_images":
            raise
        raise InvalidRequestError("image", str(err).removeprefix("reference_images: ")) from None


def variation_request(form: VariationForm, image: Image.Image) -> GenerationRequest:
    """img2img without a prompt."""
    with DIALECT.speaking():
        return build_request(**_common_fields(form, ""), init_image=image)


def base_url(request: Request) -> str:
    """Where clients reach this server: ``public_url``, else the address the connection arrived at (the
    socket's), never the Host header, which a client or a rebinding page chooses."""
    public_url = request.app.state.settings.public_url
    if public_url:
        return public_url
    host, port = request.scope["server"]
    scheme = request.scope["scheme"]
    netloc = f"[{host}]" if ":" in host else host
    if port != {"http": 80, "https": 443}.get(scheme):
        netloc += f":{port}"
    return f"{scheme}://{netloc}{request.scope.get('root_path', '')}"


def images_response(job: Job, response_format: str | None, request: Request) -> ImagesResponse:
    def item(i: int) -> ImageData:
        # Set only for a filtered image: responses leave unset fields out, so OpenAI's shape stays as it is.
        filtered = {"filtered": job.images[i].filtered} if job.images[i].filtered else {}
        if response_format == "url":
            url = base_url(request) + request.app.url_path_for("job_image", job_id=job.id, index=i)
            return ImageData(url=url, revised_prompt=None, **filtered)
        return ImageData(b64_json=b64encode(job.png(i)), revised_prompt=None, **filtered)

    width, height = job.resize_to or ((job.images[0].width, job.images[0].height) if job.images else (0, 0))
    return ImagesResponse(
        created=int(job.finished or time.time()),
        data=[item(i) for i in range(len(job.images))],
        size=f"{width}x{height}",
        output_format="png",
    )


def job_failure(job: Job) -> JSONResponse | None:
    """The error to answer for a job that did not finish with its images; None when it did."""
    if job.status == JobStatus.DONE or (job.status == JobStatus.INTERRUPTED and job.images):
        return None
    if job.status == JobStatus.FAILED and job.error_field:
        return DIALECT.field_error(job.error_field, job.error or "")
    if job.status == JobStatus.FAILED:
        return DIALECT.error_response(500, job.error or "the job failed", None)
    return DIALECT.error_response(503, f"job {job.id} was cancelled before it finished", None)


# -- routes -------------------------------------------------------------------------------------


def _warn_ignored(body: _ImageOptions) -> None:
    ignored = body.ignored_fields()
    if ignored:
        log.warning("OpenAI images request: ignoring %s (lienzo always answers PNG)", ", ".join(ignored))


async def _run(generation: GenerationRequest, body: _ImageOptions, request: Request, queue: JobQueue) -> JSONResponse:
    fixed = (generation.width, generation.height) in OPENAI_SIZES
    with DIALECT.speaking():
        job = queue.submit(generation, model=lienzo_model(body.model), source="openai", fit_to_model=fixed, caller=identity(request))
    await queue.wait(job, request.is_disconnected)
    failure = job_failure(job)
    if failure is not None:
        return failure
    return JSONResponse(images_response(job, body.response_format, request).model_dump(mode="json", exclude_unset=True))


@router.post("/generations", response_model=ImagesResponse, response_model_exclude_unset=True)
async def create_image(body: GenerationBody, request: Request, queue: Queue) -> JSONResponse:
    """Text to image; answers when the images are done."""
    _warn_ignored(body)
    return await _run(generation_request(body), body, request, queue)


@router.post("/edits", response_model=ImagesResponse, response_model_exclude_unset=True)
async def create_image_edit(
    form: Annotated[EditForm, Form()], request: Request, queue: Queue, settings: AppSettings
) -> JSONResponse:
    """Inpaint the transparent area of ``mask`` (or of the image), or redraw the whole image (img2img); on a model
    that reads reference images, without a mask, make a new picture from the images (as gpt-image edits)."""
    _warn_ignored(form)
    uploads = form.uploads()
    if form.mask is None and takes_references(queue, lienzo_model(form.model)):
        most = settings.max_input_pixels
        images = [decode_image(await upload.read(), field="image", max_pixels=most) for upload in uploads]
        return await _run(reference_request(form, images), form, request, queue)
    image_data = await uploads[0].read()
    mask_data = await form.mask.read() if form.mask is not None else None
    return await _run(edit_request(form, edit_source(image_data, mask_data, settings)), form, request, queue)


@router.post("/variations", response_model=ImagesResponse, response_model_exclude_unset=True)
async def create_image_variation(
    form: Annotated[VariationForm, Form()], request: Request, queue: Queue, settings: AppSettings
) -> JSONResponse:
    """img2img of the image without a prompt."""
    _warn_ignored(form)
    image = decode_image(await form.image.read(), field="image", max_pixels=settings.max_input_pixels)
    return await _run(variation_request(form, image), form, request, queue)
