"""The gallery, ``/api/v1/gallery``: every image lienzo made (CLI and every API) or was given, newest
first; search, filters, favourites, delete, download, import; and saved style presets, ``/api/v1/presets``.

Errors have the native shape, ``{"detail", "field"}``; an unknown id is a 404 naming ``id``.
With named API keys (lienzo.server.keys) each key's images are its own: a key lists only its own unless
it asks for others' (``?owner=``), and may change (favourite, delete) only its own; the admin sees and
changes all.
Routes are plain ``def`` (run in the thread pool): SQLite, thumbnails and reading Content Credentials
are blocking work.
"""

import dataclasses
import json
import mimetypes
from typing import Annotated, Any

from fastapi import APIRouter, File, HTTPException, Path, Query, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

from lienzo.errors import LienzoError
from lienzo.gallery.importers import credentials_kind
from lienzo.gallery.records import CREDENTIALS, GalleryItem, Preset, file_gone
from lienzo.gallery.rows import MAX_PAGE
from lienzo.images.credentials import read_credentials
from lienzo.images.io import load_image
from lienzo.images.metadata import replace_lone_surrogates
from lienzo.images.provenance import read_provenance
from lienzo.images.watermark import detect
from lienzo.server.deps import AppSettings, Caller, Gallery
from lienzo.server.job import Identity
from lienzo.server.keys import ADMIN

PREFIX = "/api/v1"
router = APIRouter(prefix=PREFIX, tags=["gallery"])

ImageId = Annotated[int, Path(alias="id", description="the image's gallery id")]


# The views are GalleryItem's columns (with its help): a column added there is answered here.
_DETAIL_ONLY = ("model_hash", "size_bytes", "infotext", "parameters", "watermark_id")


def _columns(keep) -> dict[str, Any]:
    return {
        f.name: (f.type, Field(description=f.metadata.get("help")))
        for f in dataclasses.fields(GalleryItem)
        if f.name != "path" and keep(f.name)
    }


ItemView = create_model(
    "ItemView",
    __config__=ConfigDict(protected_namespaces=()),
    **_columns(lambda name: name == "id"),
    url=(str, Field(description="the file as saved")),
    thumb_url=(str, Field(description="a WebP thumbnail, 256 pixels on its longer side")),
    **_columns(lambda name: name != "id" and name not in _DETAIL_ONLY),
)
DetailView = create_model(
    "DetailView",
    __base__=ItemView,
    **_columns(lambda name: name in _DETAIL_ONLY),
    file=(str, Field(description="the file's path on the server")),
    provenance=(dict | None, Field(description="the lienzo-provenance record in the file; null: none, or unreadable")),
)


class PageView(BaseModel):
    items: list[ItemView]
    next: str | None = Field(description="cursor for the next page (?cursor=); null: this is the last")


def _urls(item: GalleryItem) -> dict:
    base = f"{PREFIX}/gallery/{item.id}"
    return {"url": f"{base}/image", "thumb_url": f"{base}/thumb"}


def item_view(item: GalleryItem) -> ItemView:
    fields = {name: getattr(item, name) for name in ItemView.model_fields if name not in ("url", "thumb_url")}
    return ItemView(**fields, **_urls(item))


def detail_view(item: GalleryItem) -> DetailView:
    try:
        record = read_provenance(item.path)
        # An imported file's record may hold anything JSON can escape, lone surrogates included,
        # which no JSON answer can carry.
        provenance = json.loads(replace_lone_surrogates(record.to_json())) if record is not None else None
    except LienzoError:  # a damaged record, or the file has gone: the rest is still worth showing
        provenance = None
    fields = {name: getattr(item, name) for name in DetailView.model_fields if name not in ("url", "thumb_url", "file", "provenance")}
    return DetailView(**fields, **_urls(item), file=str(item.path), provenance=provenance)


ANY_OWNER = "*"


def _owner_filter(caller: Identity, owner: str | None) -> str | None:
    """The owner whose images a listing shows (None: everyone's): what ``?owner=`` asks for, and when
    it asks for nothing, the caller's own for a named key, everyone's for the admin."""
    if owner == ANY_OWNER:
        return None
    if owner:
        return owner
    return None if caller.admin else caller.owner


def _check_owner(caller: Identity, image_id: int, gallery: Gallery) -> None:
    """A named key may change only its own images: 403 naming the image otherwise."""
    if caller.admin:
        return
    owner = gallery.owner(image_id)
    if owner is None or owner.lower() != (caller.owner or "").lower():
        whose = f"{owner}'s" if owner else "made without a key"
        raise HTTPException(403, f"id: image {image_id} is {whose}; the key {caller.owner!r} may change only its own images")


@router.get("/gallery", response_model=PageView)
def list_images(
    gallery: Gallery,
    caller: Caller,
    owner: Annotated[
        str | None,
        Query(
            description=f"only this named API key's images ({ADMIN!r}: the admin's); {ANY_OWNER!r}: everyone's. "
            "Default: a named key's own, everyone's for the admin"
        ),
    ] = None,
    q: Annotated[str, Query(description="words the prompt or negative prompt holds (the last may be the start of a word)")] = "",
    model: Annotated[str | None, Query(description="only images made with this model (see /gallery/models)")] = None,
    since: Annotated[float | None, Query(description="created at or after, epoch seconds")] = None,
    until: Annotated[float | None, Query(description="created before, epoch seconds")] = None,
    favourite: Annotated[bool | None, Query(description="true: only favourites; false: only the others")] = None,
    credentials: Annotated[
        str | None,
        Query(
            description=f"Content Credentials, one of {', '.join(CREDENTIALS)}: lienzo's own signed AI-generated images, "
            "another manifest (another tool's, or a tampered one), no manifest"
        ),
    ] = None,
    cursor: Annotated[str | None, Query(description="the previous page's next")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> PageView:
    """Images newest first, a page at a time."""
    page = gallery.search(
        q, owner=_owner_filter(caller, owner), model=model, since=since, until=until, favourite=favourite, credentials=credentials,
        cursor=cursor, limit=limit,
    )
    return PageView(items=[item_view(item) for item in page.items], next=page.next)


@router.get("/gallery/models", response_model=list[str])
def list_gallery_models(gallery: Gallery) -> list[str]:
    """The models the gallery's images were made with."""
    return gallery.models()


class ImportErrorView(BaseModel):
    file: str
    detail: str


class ImportView(BaseModel):
    imported: list[ItemView]
    errors: list[ImportErrorView] = Field(description="files that were not imported, and why; the others were")


@router.post("/gallery/import", response_model=ImportView)
async def import_images(
    gallery: Gallery, settings: AppSettings, caller: Caller, files: Annotated[list[UploadFile], File(description="PNG, JPEG or WebP images, one or many")]
) -> ImportView:
    """Add images to the gallery, their bytes (and metadata) kept as they are; their parameters are read
    from lienzo's, AUTOMATIC1111's, InvokeAI's, ComfyUI's or NovelAI's metadata. They are the caller's."""
    imported, errors = [], []
    for upload in files:
        name = upload.filename or "image"
        data = await upload.read()
        try:
            item = await run_in_threadpool(gallery.import_image, data, name, max_pixels=settings.max_input_pixels, owner=caller.owner)
        except LienzoError as err:
            errors.append(ImportErrorView(file=name, detail=str(err)))
        else:
            imported.append(item_view(item))
    return ImportView(imported=imported, errors=errors)


@router.get("/gallery/{id}", response_model=DetailView)
def get_image(image_id: ImageId, gallery: Gallery) -> DetailView:
    """An image with all its parameters and its provenance record."""
    return detail_view(gallery.get(image_id))


class FavouriteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    favourite: bool


@router.patch("/gallery/{id}", response_model=DetailView)
def update_image(image_id: ImageId, body: FavouriteBody, gallery: Gallery, caller: Caller) -> DetailView:
    """Mark or unmark an image as a favourite."""
    _check_owner(caller, image_id, gallery)
    return detail_view(gallery.set_favourite(image_id, body.favourite))


@router.delete("/gallery/{id}", status_code=204)
def delete_image(image_id: ImageId, gallery: Gallery, caller: Caller) -> Response:
    """Delete the image: its file, its row and its thumbnails."""
    _check_owner(caller, image_id, gallery)
    gallery.delete(image_id)
    return Response(status_code=204)


@router.get("/gallery/{id}/image", response_class=FileResponse)
def image_file(image_id: ImageId, gallery: Gallery, download: bool = False) -> FileResponse:
    """The file as saved, metadata included; ``?download=true`` asks the browser to save it."""
    item = gallery.get(image_id)
    if not item.path.is_file():
        raise file_gone(image_id)
    media_type = mimetypes.guess_type(item.path.name)[0] or "application/octet-stream"
    if download:
        return FileResponse(item.path, media_type=media_type, filename=item.path.name, content_disposition_type="attachment")
    return FileResponse(item.path, media_type=media_type)


@router.get("/gallery/{id}/credentials", response_model=dict)
def image_credentials(image_id: ImageId, gallery: Gallery) -> dict:
    """The image's Content Credentials (C2PA manifest), verified now: ``state`` (valid, unrecognised signer,
    tampered, invalid; unsigned: none), ``kind`` (lienzo, other; null: none), signer, generator, time,
    actions, assertions and the ingredient chain. Without a manifest, ``watermark`` says whether lienzo's
    invisible watermark is in its pixels, the id it carries and ``matches``: the other gallery images
    lienzo saved with that id (the original of a copy stripped of its metadata), oldest first."""
    item = gallery.get(image_id)
    if not item.path.is_file():
        raise file_gone(image_id)
    found = read_credentials(item.path)
    if found is not None:
        return {**found.to_dict(), "kind": credentials_kind(found)}
    return {"state": "unsigned", "kind": None, "watermark": _watermark(item, gallery)}


def _watermark(item: GalleryItem, gallery: Gallery) -> dict:
    """Whether lienzo's watermark is in the image's pixels (about 0.1 s at 512², under 1 s at 1024²), the
    id it carries (hex; null when it reads back damaged) and the images saved with that id."""
    found = detect(load_image(item.path))
    payload = found.payload.hex() if found.detected and found.payload is not None else None
    matches = [] if payload is None else [other.id for other in gallery.by_watermark(payload) if other.id != item.id]
    return {"detected": found.detected, "payload": payload, "matches": matches}


@router.get("/gallery/{id}/thumb", responses={200: {"content": {"image/webp": {}}}})
def image_thumbnail(image_id: ImageId, gallery: Gallery, size: Annotated[int, Query(ge=32, le=1024)] = 256) -> Response:
    """A WebP thumbnail fitted in ``size`` x ``size``, made once and cached."""
    # An id's file does not change (a new image gets a new id), so browsers may keep it a day.
    return Response(gallery.thumbnail(image_id, size), media_type="image/webp", headers={"Cache-Control": "max-age=86400"})


class PresetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    negative_prompt: str = ""


class PresetView(BaseModel):
    name: str
    prompt: str
    negative_prompt: str
    created: float


def _preset_view(preset: Preset) -> PresetView:
    return PresetView(name=preset.name, prompt=preset.prompt, negative_prompt=preset.negative_prompt, created=preset.created)


@router.get("/presets", response_model=list[PresetView])
def list_presets(gallery: Gallery) -> list[PresetView]:
    """Saved style presets, by name."""
    return [_preset_view(preset) for preset in gallery.presets()]


@router.get("/presets/{name}", response_model=PresetView)
def get_preset(name: str, gallery: Gallery) -> PresetView:
    return _preset_view(gallery.preset(name))


@router.put("/presets/{name}", response_model=PresetView)
def put_preset(name: str, body: PresetBody, gallery: Gallery) -> PresetView:
    """Save a preset, replacing one of the same name (ignoring case)."""
    return _preset_view(gallery.put_preset(name, body.prompt, body.negative_prompt))


@router.delete("/presets/{name}", status_code=204)
def delete_preset(name: str, gallery: Gallery) -> Response:
    gallery.delete_preset(name)
    return Response(status_code=204)
