"""Where generated images go: the save step of :class:`lienzo.studio.Studio`, which every front door calls.

Each PNG carries the A1111 infotext (``parameters``), lienzo's provenance record
(``lienzo-provenance``, see :mod:`lienzo.images.provenance`), an XMP packet labelling it
AI-generated, ``Software``, and, unless turned off, the invisible watermark in its pixels and a signed
C2PA manifest (Content Credentials, :mod:`lienzo.images.credentials`) over the whole file.
"""

import io
import logging
import sqlite3
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from PIL import Image

from lienzo.gallery.importers import meta_from_infotext
from lienzo.gallery.records import GalleryError
from lienzo.gallery.store import Gallery
from lienzo.generation.engine import GeneratedImage
from lienzo.generation.request import GenerationRequest
from lienzo.images.credentials import CredentialsError, Signing, manifest_for, sign_png
from lienzo.images.io import save_numbered
from lienzo.images.metadata import parse_infotext, pnginfo
from lienzo.images.provenance import (
    GENERATOR,
    PROVENANCE_KEY,
    XMP_KEY,
    CredentialsInfo,
    Provenance,
    ProvenanceRecord,
    WatermarkInfo,
    xmp_packet,
)
from lienzo.images.watermark import mark, payload_for
from lienzo.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SavedOutput:
    """Where an image was saved, the provenance record written into it and its gallery id (None:
    not in the gallery, or not yet: ``lienzo gallery reconcile`` adds it)."""

    path: Path
    record: ProvenanceRecord
    gallery_id: int | None = None

    @property
    def watermarked(self) -> bool:
        return self.record.watermark.embedded

    @property
    def signed(self) -> bool:
        """The file carries a signed C2PA manifest (Content Credentials)."""
        return self.record.credentials is not None and self.record.credentials.signed


def output_dir(settings: Settings, mode: str) -> Path:
    """A1111's layout: ``<outputs>/<mode>-images/<YYYY-MM-DD>/``."""
    return settings.outputs_dir / f"{mode}-images" / date.today().isoformat()


def wants_watermark(request: GenerationRequest, settings: Settings) -> bool:
    """The request's choice when it makes one, else the settings' (on unless LIENZO_WATERMARK=false)."""
    return settings.watermark if request.watermark is None else request.watermark


def signing_for(request: GenerationRequest, settings: Settings) -> Signing | None:
    """How to sign the request's images: the request's choice when it makes one, else the settings'
    (on unless LIENZO_CREDENTIALS=false); None: turned off."""
    wanted = settings.credentials if request.credentials is None else request.credentials
    return Signing.from_settings(settings) if wanted else None


def save_generated(
    image: GeneratedImage,
    out_dir: Path,
    provenance: Provenance,
    *,
    watermark: bool,
    gallery: Gallery | None = None,
    source: str = "cli",
    mode: str | None = None,
    owner: str | None = None,
    signing: Signing | None = None,
    parent: Image.Image | None = None,
) -> SavedOutput:
    """Write one generated image, atomically, as the next free numbered PNG in ``out_dir`` (never over
    another's, even one saved at the same moment by another process), watermarked
    when ``watermark`` is on and the image can hold the mark, with its infotext and provenance, signed
    with Content Credentials by ``signing`` (None: turned off) naming ``parent`` (the img2img/inpaint/
    outpaint input) as its ingredient; then add it to ``gallery`` (if given) as made by ``source`` in
    ``mode`` for ``owner`` (a named API key; None: none)."""
    # 1. Watermark the pixels first: the mark lives in them, and the record must say whether it is there.
    # Its payload is this image's own id (from its pixels), also in the record and, as a C2PA soft binding,
    # in the manifest: a copy whose metadata was stripped can still be matched to its credentials.
    if watermark:
        payload = payload_for(image.image)
        marked = mark(image.image, payload)
        pixels, info = marked.image, WatermarkInfo(marked.watermarked, payload=payload.hex(), note=marked.note)
    else:
        pixels, info = image.image, WatermarkInfo(False, note="turned off (by the request or LIENZO_WATERMARK=false)")

    # 2. The PNG with its text chunks, signed. The record inside says whether the file is signed, and the
    # signature covers the record: so the file is encoded, in memory, with a record saying "signed", then
    # signed; when signing fails it is encoded again with a record saying why not. Signing never loses an
    # image, and no record claims a signature its file lacks.
    if signing is None:
        record = provenance.record(info, credentials=CredentialsInfo(False, "turned off (--no-credentials, LIENZO_CREDENTIALS=false or the request)"))
        data = _encode(pixels, image.infotext, record)
    else:
        record = provenance.record(info, credentials=CredentialsInfo(True))
        try:
            manifest = manifest_for(record, parse_infotext(image.infotext).params, mode=mode, title=f"lienzo {mode or 'image'}, seed {image.seed}", edit=parent is not None)
            data = sign_png(_encode(pixels, image.infotext, record), manifest, signing.identity(), parent)
        except CredentialsError as err:
            log.warning("an image is saved without Content Credentials: %s", err)
            record = provenance.record(info, record.created, CredentialsInfo(False, f"not signed: {err}"))
            data = _encode(pixels, image.infotext, record)

    # 3. Write.
    path = save_numbered(lambda file: file.write(data), out_dir, image.seed)

    # 4. Index it, now that the file is whole. A gallery that fails (locked past its timeout) must not
    # lose the image: the file is kept, and reconcile adds it later.
    gallery_id = None
    if gallery is not None:
        try:
            gallery_id = gallery.add(path, meta_from_infotext(parse_infotext(image.infotext), pixels.size, image.infotext), source=source, mode=mode, owner=owner)
        except (GalleryError, sqlite3.Error) as err:
            log.warning("%s was saved but not added to the gallery (%s); `lienzo gallery reconcile` adds it", path, err)
    return SavedOutput(path, record, gallery_id)


def _encode(pixels: Image.Image, infotext: str, record: ProvenanceRecord) -> bytes:
    """The PNG's bytes: infotext and Software as tEXt, the provenance JSON and XMP as iTXt."""
    chunks = pnginfo(infotext, {"Software": GENERATOR})
    chunks.add_itxt(PROVENANCE_KEY, record.to_json())
    chunks.add_itxt(XMP_KEY, xmp_packet(record))
    buffer = io.BytesIO()
    pixels.save(buffer, format="PNG", pnginfo=chunks)
    return buffer.getvalue()
