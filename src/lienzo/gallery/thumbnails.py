"""Thumbnails: WebPs of gallery images, cached on disk by id, size and the file's modification time."""

import io
from pathlib import Path

from PIL import Image

from lienzo.errors import ImageFileError
from lienzo.files import write_atomic
from lienzo.gallery.records import GalleryItem, file_gone


def make_thumbnail(item: GalleryItem, thumbs_dir: Path, size: int) -> bytes:
    """A WebP of ``item``'s image fitted in ``size`` x ``size``, cached under ``thumbs_dir`` by id, size and
    the file's modification time."""
    image_id = item.id
    try:
        mtime = item.path.stat().st_mtime_ns
    except FileNotFoundError:
        raise file_gone(image_id) from None
    cached = thumbs_dir / f"{image_id}-{size}-{mtime}.webp"
    if cached.is_file():
        return cached.read_bytes()
    try:
        with Image.open(item.path) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="WEBP", quality=80)
    except FileNotFoundError:
        raise file_gone(image_id) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        # Changed by hand since it was indexed. Pillow's message names the server's path: not said.
        raise ImageFileError(f"id: image {image_id}'s file is no longer a readable image") from None
    for old in thumbs_dir.glob(f"{image_id}-{size}-*.webp"):
        old.unlink(missing_ok=True)
    write_atomic(cached, lambda file: file.write(buffer.getvalue()))
    return buffer.getvalue()


def drop_thumbnails(thumbs_dir: Path, image_id: int) -> None:
    for path in thumbs_dir.glob(f"{image_id}-*.webp"):
        path.unlink(missing_ok=True)
