"""Where generated images go: one save path for every front door (CLI, server).

Each PNG carries the A1111 infotext (``parameters``), lienzo's provenance record
(``lienzo-provenance``, see :mod:`lienzo.images.provenance`), an XMP packet labelling it
AI-generated, ``Software``, and, unless turned off, the invisible watermark in its pixels.
"""

from dataclasses import dataclass
from datetime import date
from pathlib import Path

from lienzo.generation.engine import GeneratedImage
from lienzo.generation.request import GenerationRequest
from lienzo.images.io import next_image_path, save_png_atomic
from lienzo.images.metadata import pnginfo
from lienzo.images.provenance import GENERATOR, PROVENANCE_KEY, XMP_KEY, Provenance, ProvenanceRecord, WatermarkInfo, xmp_packet
from lienzo.images.watermark import mark
from lienzo.settings import Settings


@dataclass(frozen=True)
class SavedOutput:
    """Where an image was saved and the provenance record written into it."""

    path: Path
    record: ProvenanceRecord

    @property
    def watermarked(self) -> bool:
        return self.record.watermark.embedded


def output_dir(settings: Settings, mode: str) -> Path:
    """A1111's layout: ``<outputs>/<mode>-images/<YYYY-MM-DD>/``."""
    return settings.outputs_dir / f"{mode}-images" / date.today().isoformat()


def wants_watermark(request: GenerationRequest, settings: Settings) -> bool:
    """The request's choice when it makes one, else the settings' (on unless LIENZO_WATERMARK=false)."""
    return settings.watermark if request.watermark is None else request.watermark


def save_generated(image: GeneratedImage, out_dir: Path, provenance: Provenance, *, watermark: bool) -> SavedOutput:
    """Write one generated image, atomically, as the next numbered PNG in ``out_dir``, watermarked
    when ``watermark`` is on and the image can hold the mark, with its infotext and provenance."""
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
    path = save_png_atomic(pixels, next_image_path(out_dir, image.seed), chunks)
    return SavedOutput(path, record)
