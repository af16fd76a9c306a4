"""Image rows: their columns, inserting one, and the checks on what a query is given (ids, cursors,
text SQLite can store, search words as an FTS5 query)."""

import json
import math
import re
import sqlite3
from pathlib import Path

from lienzo.errors import InvalidRequestError
from lienzo.gallery.importers import ImageMeta
from lienzo.gallery.records import GalleryError, no_image
from lienzo.images.metadata import lone_surrogate

SOURCES = ("cli", "native", "a1111", "openai", "import")
COLUMNS = (
    "path, created, source, mode, prompt, negative_prompt, model, model_hash, seed, width, height, steps, "
    "cfg_scale, sampler, schedule, infotext, parameters, size_bytes, credentials, credentials_state, watermark_id"
)
SELECT = f"SELECT id, favourite, owner, {COLUMNS} FROM images"
MAX_PAGE = 200
# Ids are SQLite rowids, 1 to 2**63 - 1; a number outside cannot even be bound to a query.
MAX_ID = 2**63 - 1


def fts_query(text: str) -> str | None:
    """User text as a safe FTS5 query: every word must match, the last one as a prefix (so results
    follow typing). Each word is quoted, so what FTS5 would read as syntax (``"``, ``-``, ``:``,
    ``*``, ``AND``, ``NEAR``) is only text; None when the text holds no word at all."""
    words = re.findall(r"\w+", text)
    if not words:
        return None
    return " ".join(f'"{word}"' for word in words) + "*"


def parse_cursor(cursor: str) -> tuple[float, int]:
    created, _, image_id = cursor.partition("_")
    try:
        parsed = float(created), int(image_id)
    except ValueError:
        parsed = None
    # An id beyond a rowid's range would fail to bind; the gallery gives out finite times and real ids.
    if parsed is None or not math.isfinite(parsed[0]) or not 1 <= parsed[1] <= MAX_ID:
        raise InvalidRequestError("cursor", f"{cursor!r} is not a cursor the gallery gave out (use a page's 'next')")
    return parsed


def known_id(image_id: int) -> int:
    """``image_id``, or NotFoundError for a number no row can have (SQLite would refuse to bind it)."""
    if not 1 <= image_id <= MAX_ID:
        raise no_image(image_id)
    return image_id


def savable(field: str, text: str) -> str:
    """``text``, or InvalidRequestError naming ``field`` when SQLite (UTF-8) cannot store or look it up."""
    problem = lone_surrogate(text)
    if problem is not None:
        raise InvalidRequestError(field, problem)
    return text


def insert_row(conn: sqlite3.Connection, path: Path, meta: ImageMeta, source: str, mode: str | None, created: float, *, replace: bool) -> int | None:
    """Insert a row for ``path``; an existing row is replaced (``replace``) or kept (returns None)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    values = (
        path_text(path), created, source, mode, meta.prompt, meta.negative_prompt, meta.model, meta.model_hash, meta.seed,
        meta.width, meta.height, meta.steps, meta.cfg_scale, meta.sampler, meta.schedule, meta.infotext,
        json.dumps(meta.parameters), path.stat().st_size, meta.credentials, meta.credentials_state, meta.watermark_id,
    )
    if replace:
        names = [name.strip() for name in COLUMNS.split(",")][1:]
        conflict = "DO UPDATE SET " + ", ".join(f"{name} = excluded.{name}" for name in names)
    else:
        conflict = "DO NOTHING"
    placeholders = ", ".join("?" * len(values))
    row = conn.execute(f"INSERT INTO images ({COLUMNS}) VALUES ({placeholders}) ON CONFLICT (path) {conflict} RETURNING id", values).fetchone()
    return None if row is None else row["id"]


def path_text(path: Path) -> str:
    """``path`` as the gallery stores it, or GalleryError for a file name that is not UTF-8 (Python
    reads such a name with surrogates, which SQLite cannot store)."""
    if lone_surrogate(str(path)) is not None:
        raise GalleryError(f"gallery: the file name is not valid UTF-8; rename the file to add it ({ascii(path.name)})")
    return str(path)

