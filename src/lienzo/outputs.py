"""Where generated images go: one save path for every front door (CLI, server), PNG with infotext."""

from datetime import date
from pathlib import Path

from lienzo.generation.engine import GeneratedImage
from lienzo.images.io import next_image_path, save_png_atomic
from lienzo.images.metadata import pnginfo
from lienzo.settings import Settings


def output_dir(settings: Settings, mode: str) -> Path:
    """A1111's layout: ``<outputs>/<mode>-images/<YYYY-MM-DD>/``."""
    return settings.outputs_dir / f"{mode}-images" / date.today().isoformat()


def save_generated(image: GeneratedImage, out_dir: Path) -> Path:
    """Write one generated image, atomically, as the next numbered PNG in ``out_dir`` with its infotext."""
    return save_png_atomic(image.image, next_image_path(out_dir, image.seed), pnginfo(image.infotext))
