"""Where generated images go: the save step of :class:`lienzo.studio.Studio`, which every front door calls.

Each PNG carries the A1111 infotext (``parameters``), lienzo's provenance record
(``lienzo-provenance``, see :mod:`lienzo.images.provenance`), an XMP packet labelling it
AI-generated, ``Software``, and, unless turned off, the invisible watermark in its pixels.
"""

import logging
import sqlite3
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from lienzo.gallery.importers import meta_from_infotext
from lienzo.gallery.records import GalleryError
from lienzo.gallery.store import Gallery
from lienzo.generation.engine import GeneratedImage
from lienzo.generation.request import GenerationRequest
from lienzo.images.io import save_png_numbered
from lienzo.images.metadata import parse_infotext, pnginfo
from lienzo.images.provenance import GENERATOR, PROVENANCE_KEY, XMP_KEY, Provenance, ProvenanceRecord, WatermarkInfo, xmp_packet
from lienzo.images.watermark import mark
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


def output_dir(settings: Settings, mode: str) -> Path:
    """A1111's layout: ``<outputs>/<mode>-images/<YYYY-MM-DD>/``."""
    return settings.outputs_dir / f"{mode}-images" / date.today().isoformat()


def wants_watermark(request: GenerationRequest, settings: Settings) -> bool:
    """The request's choice when it makes one, else the settings' (on unless LIENZO_WATERMARK=false)."""
    return settings.watermark if request.watermark is None else request.watermark


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
) -> SavedOutput:
    """Write one generated image, atomically, as the next free numbered PNG in ``out_dir`` (never over
    another's, even one saved at the same moment by another process), watermarked
    when ``watermark`` is on and the image can hold the mark, with its infotext and provenance; then
    add it to ``gallery`` (if given) as made by ``source`` in ``mode`` for ``owner`` (a named API key; None: none)."""
    # 1. Watermark the pixels first: the mark lives in them, and the record must say whether it is there.
    if watermark:
        marked = mark(image.image)
        pixels, info = marked.image, WatermarkInfo(marked.watermarked, note=marked.note)
    else:
        pixels, info = image.image, WatermarkInfo(False, note="turned off (by the request or LIENZO_WATERMARK=false)")

    # 2. Text chunks: infotext and Software as tEXt, the provenance JSON and XMP as iTXt.
    record = provenance.record(info)
    chunks = pnginfo(image.infotext, {"Software": GENERATOR})
    chunks.add_itxt(PROVENANCE_KEY, record.to_json())
    chunks.add_itxt(XMP_KEY, xmp_packet(record))

    # 3. Write.
    path = save_png_numbered(pixels, out_dir, image.seed, chunks)

    # 4. Index it, now that the file is whole. A gallery that fails (locked past its timeout) must not
    # lose the image: the file is kept, and reconcile adds it later.
    gallery_id = None
    if gallery is not None:
        try:
            gallery_id = gallery.add(path, meta_from_infotext(parse_infotext(image.infotext), pixels.size, image.infotext), source=source, mode=mode, owner=owner)
        except (GalleryError, sqlite3.Error) as err:
            log.warning("%s was saved but not added to the gallery (%s); `lienzo gallery reconcile` adds it", path, err)
    return SavedOutput(path, record, gallery_id)
