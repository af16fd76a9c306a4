"""What the gallery hands out: an image's row, a page of them, a preset, a reconcile report, and the
errors it raises."""

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from lienzo.errors import LienzoError


# The credentials filter's values: lienzo's own signed AI-generated images, any other manifest, none.
CREDENTIALS = ("lienzo", "other", "none")


class GalleryError(LienzoError):
    """The gallery's database cannot be used (a newer schema, a broken file)."""


class NotFoundError(GalleryError):
    """No image (or preset) by that id (or name); ``field`` names which."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class GalleryItem:
    """One image's row. ``parameters`` are request fields that remake it; ``created`` is epoch seconds."""

    id: int
    path: Path
    created: float = field(metadata={"help": "epoch seconds"})
    source: str = field(metadata={"help": "cli, native, a1111, openai or import"})
    mode: str | None = field(metadata={"help": "txt2img, img2img, inpaint or outpaint; null: unknown"})
    prompt: str
    negative_prompt: str
    model: str | None
    model_hash: str | None
    seed: int | None
    width: int
    height: int
    steps: int | None
    cfg_scale: float | None
    sampler: str | None
    schedule: str | None
    infotext: str = field(metadata={"help": "the parameters in AUTOMATIC1111's layout"})
    parameters: dict = field(
        metadata={"help": "request fields that remake the image: POST them to /api/v1/{mode} (with init_image, and mask, for the image modes)"}
    )
    favourite: bool
    size_bytes: int
    owner: str | None = field(metadata={"help": "the named API key that made or imported it; null: made without one"})
    credentials: str | None = field(
        metadata={"help": "Content Credentials (C2PA): 'lienzo' (signed by lienzo as AI-generated), 'other' (another tool's, or tampered); null: none"}
    )
    credentials_state: str | None = field(
        metadata={"help": "the manifest's state: valid, unrecognised signer, tampered or invalid; 'unsigned': none; null: not read yet"}
    )
    watermark_id: str | None = field(
        metadata={"help": "the id (hex) lienzo's watermark carries in its pixels, as its provenance record states; null: none"}
    )

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "GalleryItem":
        values = dict(row)
        values.update(path=Path(row["path"]), parameters=json.loads(row["parameters"]), favourite=bool(row["favourite"]))
        return cls(**values)


@dataclass(frozen=True)
class Page:
    """One page of a listing, newest first; ``next`` is the cursor of the page after it (None: the last)."""

    items: list[GalleryItem]
    next: str | None


@dataclass(frozen=True)
class Preset:
    """A saved style: prompt and negative prompt to start from."""

    name: str
    prompt: str
    negative_prompt: str
    created: float


@dataclass(frozen=True)
class ReconcileReport:
    """What :meth:`Gallery.reconcile` changed."""

    added: int  # files that had no row
    removed: int  # rows whose file had gone
    temp_files: int  # leftovers of interrupted atomic writes


def file_gone(image_id: int) -> NotFoundError:
    """Image ``image_id``'s row outlived its file. The message is for HTTP clients too: no server path."""
    return NotFoundError("id", f"image {image_id}'s file is gone; `lienzo gallery reconcile` drops its row")


def no_image(image_id: int) -> NotFoundError:
    return NotFoundError("id", f"no image with id {image_id} in the gallery")

