"""The gallery: every image lienzo made or was given, indexed in one SQLite database.

The files are the truth and the rows their index. A file is written whole first (temporary file,
fsync, rename) and its row committed after, so a crash in between leaves a file without a row, never
a row without a file. :meth:`Gallery.reconcile`, run when the server starts and by ``lienzo gallery
reconcile``, adds such files, drops rows whose file has gone and removes the temporary files a
crashed write left behind.

The database runs in WAL mode so that the CLI and the server, two processes, can share it: readers
never wait, and a writer takes the write lock up front (``BEGIN IMMEDIATE``) and waits up to
``timeout`` seconds for another writer. Prompts are searchable through an FTS5 index over the
table that triggers keep in step. The schema is versioned with ``PRAGMA user_version``: opening a
database applies the migrations it lacks, in order. Opening a damaged database file moves it aside
(``gallery.db.damaged-<time>``) and rebuilds the index from the files, with a warning that says so.

Beside this module: ``records`` (what the gallery hands out, and its errors), ``rows`` (the image
rows' columns and the checks on query input), ``schema`` (migrations, damage check) and
``thumbnails``.
"""

import io
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

from PIL import Image

from lienzo.database import Database
from lienzo.errors import ImageFileError, InvalidRequestError
from lienzo.files import write_atomic
from lienzo.gallery.importers import ImageMeta, credentials_columns, read_meta, with_origin
from lienzo.gallery.records import CREDENTIALS, GalleryError, GalleryItem, NotFoundError, Page, Preset, ReconcileReport, no_image
from lienzo.gallery.rows import MAX_PAGE, SELECT, fts_query, insert_row, known_id, parse_cursor, path_text, savable
from lienzo.gallery.schema import Damaged, check_pages, migrate
from lienzo.gallery.thumbnails import drop_thumbnails, make_thumbnail
from lienzo.images.io import decode_image
from lienzo.settings import Settings

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
_IMPORT_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}
# A crashed write's temporary file is removed once it is this old: a live write takes well under a
# second, and another process (the server, while the CLI reconciles) may be in the middle of one.
STALE_TEMP_SECONDS = 300
_MODE_FOLDER = re.compile(r"(txt2img|img2img|inpaint|outpaint)-images")
_SELECT_PRESET = "SELECT name, prompt, negative_prompt, created FROM presets"


class Gallery(Database):
    """The gallery in ``db_path`` for the images under ``outputs_dir`` (and any other path added to it).

    Thread-safe: one connection, used under a lock. Open it with :meth:`for_settings` to use the
    settings' database, outputs and thumbnail cache; :meth:`close` it when done (using it after
    reopens the connection).
    """

    def __init__(self, db_path: str | Path, outputs_dir: str | Path, *, thumbs_dir: str | Path, timeout: float = 10.0):
        super().__init__(db_path, timeout)
        self.outputs_dir = Path(outputs_dir)
        self.thumbs_dir = Path(thumbs_dir)
        self._connection()  # fail now on a database this lienzo cannot use

    @classmethod
    def for_settings(cls, settings: Settings) -> "Gallery":
        return cls(settings.gallery_db, settings.outputs_dir, thumbs_dir=settings.cache_dir / "thumbs")

    # -- the connection -------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        with self._lock:
            if self._conn is None:
                try:
                    return super()._connection()
                except Damaged as damage:
                    self._rebuild(str(damage))
            return self._conn

    def _open(self) -> sqlite3.Connection:
        conn = self._connect()  # transactions are begun and ended here, explicitly
        try:
            conn.row_factory = sqlite3.Row
            check_pages(conn)
            migrate(conn, self.path)  # before any write: a database from a newer lienzo is left exactly as it was
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL is safe in WAL mode; a power cut may lose the last commits, which reconcile restores from the files.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _rebuild(self, damage: str) -> None:
        """Move the damaged database (and its WAL and shared-memory files) aside, start a new one and
        index the images under the outputs again from their own metadata. Only the database knew the
        favourites, the presets and the images saved outside the outputs dir; they are not recovered."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside, n = self.path.with_name(f"{self.path.name}.damaged-{stamp}"), 1
        while aside.exists():  # damaged again within the second
            aside, n = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{n}"), n + 1
        try:
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{self.path}{suffix}").exists():
                    os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
        except OSError as err:
            raise GalleryError(
                f"gallery: {self.path} is damaged ({damage}) and could not be moved aside ({err.strerror}); move it away by hand"
            ) from None
        self._conn = self._open()
        report = self.reconcile()
        log.warning(
            "gallery: %s was damaged (%s); it was moved to %s and the gallery rebuilt from the %d images under %s. "
            "Favourites, presets and images saved elsewhere could not be recovered.",
            self.path, damage, aside.name, report.added, self.outputs_dir,
        )

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, committed when the block ends and rolled back when it raises."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: tuple | list = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._connection().execute(sql, params).fetchall()

    # -- images ---------------------------------------------------------------------------------

    def add(
        self, path: str | Path, meta: ImageMeta, *, source: str, mode: str | None = None, created: float | None = None, owner: str | None = None
    ) -> int:
        """Index the image file at ``path``, already written whole, and return its id. ``source`` is one
        of :data:`SOURCES`; ``owner`` the named API key that made it (None: none). A path already in the
        gallery keeps its id and favourite; the rest is replaced. When ``meta`` was not read from the file
        (the save path's comes from the infotext), its credentials and watermark id are read from it,
        cheap enough for every save: c2pa hashes the file's bytes, about 2 ms for a signed 512² PNG and
        3 to 7 ms at 1024², and a file without a manifest takes under 0.5 ms."""
        path = Path(path).resolve()
        if meta.credentials_state is None:
            meta = with_origin(meta, path)
        with self._write() as conn:
            image_id = insert_row(conn, path, meta, source, mode or meta.mode, created or time.time(), replace=True)
            conn.execute("UPDATE images SET owner = ? WHERE id = ?", (owner, image_id))
            return image_id

    def get(self, image_id: int) -> GalleryItem:
        rows = self._read(f"{SELECT} WHERE id = ?", (known_id(image_id),))
        if not rows:
            raise no_image(image_id)
        return GalleryItem.from_row(rows[0])

    def owner(self, image_id: int) -> str | None:
        """The named API key that made or imported the image; None: made without one."""
        rows = self._read("SELECT owner FROM images WHERE id = ?", (known_id(image_id),))
        if not rows:
            raise no_image(image_id)
        return rows[0]["owner"]

    def search(
        self,
        q: str = "",
        *,
        owner: str | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        favourite: bool | None = None,
        credentials: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> Page:
        """Images newest first, ``limit`` at a time: those whose prompt or negative prompt holds every
        word of ``q`` (the last as a prefix), made by ``owner`` (a named API key, ignoring case; None:
        anyone's), made with ``model``, created at or after ``since`` and before ``until`` (epoch seconds),
        (not) favourites, with ``credentials`` "lienzo" (lienzo's own signed AI-generated images), "other"
        (another manifest, or a tampered one) or "none" (no manifest). ``cursor`` is a previous page's ``next``."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequestError("limit", f"must be 1 to {MAX_PAGE}, got {limit}")
        if credentials is not None and credentials not in CREDENTIALS:
            raise InvalidRequestError("credentials", f"must be one of {', '.join(CREDENTIALS)}, got {credentials!r}")
        savable("q", q)
        if model is not None:
            savable("model", model)
        if owner is not None:
            savable("owner", owner)
        where, params = [], []
        match = fts_query(q)
        if match is not None:
            where.append("id IN (SELECT rowid FROM images_fts WHERE images_fts MATCH ?)")
            params.append(match)
        if owner is not None:
            where.append("owner = ? COLLATE NOCASE")  # the collation images_owner is indexed by
            params.append(owner)
        if model is not None:
            where.append("model = ?")
            params.append(model)
        if since is not None:
            where.append("created >= ?")
            params.append(since)
        if until is not None:
            where.append("created < ?")
            params.append(until)
        if favourite is not None:
            where.append("favourite = ?")
            params.append(int(favourite))
        if credentials == "none":
            where.append("credentials IS NULL")
        elif credentials is not None:
            where.append("credentials = ?")
            params.append(credentials)
        if cursor:
            created, image_id = parse_cursor(cursor)
            where.append("(created < ? OR (created = ? AND id < ?))")
            params += [created, created, image_id]
        sql = f"{SELECT} {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY created DESC, id DESC LIMIT ?"
        rows = self._read(sql, [*params, limit + 1])
        items = [GalleryItem.from_row(row) for row in rows[:limit]]
        more = len(rows) > limit
        return Page(items, f"{items[-1].created!r}_{items[-1].id}" if more else None)

    def models(self) -> list[str]:
        """The model names images were made with, for the filter."""
        rows = self._read("SELECT DISTINCT model FROM images WHERE model IS NOT NULL AND model != '' ORDER BY model COLLATE NOCASE")
        return [row["model"] for row in rows]

    def by_watermark(self, watermark_id: str) -> list[GalleryItem]:
        """The images whose pixels were marked with ``watermark_id`` (hex) when lienzo saved them, oldest
        first: where a copy found without its metadata came from."""
        return [GalleryItem.from_row(row) for row in self._read(f"{SELECT} WHERE watermark_id = ? ORDER BY created, id", (watermark_id.lower(),))]

    def set_favourite(self, image_id: int, favourite: bool) -> GalleryItem:
        with self._write() as conn:
            if conn.execute("UPDATE images SET favourite = ? WHERE id = ?", (int(favourite), known_id(image_id))).rowcount == 0:
                raise no_image(image_id)
        return self.get(image_id)

    def delete(self, image_id: int) -> GalleryItem:
        """Delete the image's file and row together: the row is deleted, the file unlinked, then the
        deletion committed; a file that cannot be unlinked (permissions) keeps its row."""
        with self._write() as conn:
            rows = conn.execute(f"{SELECT} WHERE id = ?", (known_id(image_id),)).fetchall()
            if not rows:
                raise no_image(image_id)
            item = GalleryItem.from_row(rows[0])
            conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
            item.path.unlink(missing_ok=True)
        drop_thumbnails(self.thumbs_dir, image_id)
        return item

    def import_image(self, data: bytes, filename: str, *, max_pixels: int, owner: str | None = None) -> GalleryItem:
        """Add an image given as bytes (a PNG, JPEG or WebP dropped into the gallery): its bytes are copied
        as they are, metadata and all, into ``<outputs>/imported/<date>/``, and its parameters read
        from lienzo's, A1111's, InvokeAI's, ComfyUI's or NovelAI's metadata. Nothing is written for a
        file that is not a whole image within ``max_pixels`` (ImageFileError naming ``files``). ``owner``:
        the named API key that gave it (None: none)."""
        # 1. Validate: every pixel decodes, within the limit, in a format the gallery shows.
        decode_image(data, field="files", max_pixels=max_pixels)
        with Image.open(io.BytesIO(data)) as image:
            suffix = _IMPORT_FORMATS.get(image.format or "")
        if suffix is None:
            raise ImageFileError(f"files: {filename} is {image.format}; the gallery imports PNG, JPEG and WebP images")
        meta = read_meta(data)

        # 2. Write the bytes verbatim, atomically, under a free name (the lock keeps two imports apart).
        with self._lock:
            path = write_atomic(self._import_path(filename, suffix), lambda file: file.write(data))
            image_id = self.add(path, meta, source="import", owner=owner)
        return self.get(image_id)

    def _import_path(self, filename: str, suffix: str) -> Path:
        folder = self.outputs_dir / "imported" / date.today().isoformat()
        stem = re.sub(r"[^\w.-]+", "_", Path(filename).stem).strip("._")[:80] or "image"
        path, n = folder / f"{stem}{suffix}", 1
        while path.exists():
            path, n = folder / f"{stem}-{n}{suffix}", n + 1
        return path

    # -- thumbnails -----------------------------------------------------------------------------

    def thumbnail(self, image_id: int, size: int = 256) -> bytes:
        """A WebP of the image fitted in ``size`` x ``size``, cached under ``thumbs_dir`` by id, size and
        the file's modification time."""
        return make_thumbnail(self.get(image_id), self.thumbs_dir, size)

    # -- reconciling rows and files -------------------------------------------------------------

    def reconcile(self, *, stale_after: float = STALE_TEMP_SECONDS) -> ReconcileReport:
        """Make rows and files agree after a crash or a change made by hand: rows whose file has gone
        are deleted; images under ``outputs_dir`` without a row are added (their parameters read from
        their metadata, their source "import" under ``imported/`` and "cli" elsewhere, their mode from
        A1111's ``<mode>-images`` folders); temporary files older than ``stale_after`` seconds are
        removed; rows whose credentials were never read (indexed before the gallery read them) get them.
        Only new files (and those rows' files, once) are opened, so a gallery of thousands reconciles in
        about a second."""
        # 1. Rows whose file has gone; checked inside the transaction, so a file re-added meanwhile stays.
        with self._write() as conn:
            rows = conn.execute("SELECT id, path, credentials_state FROM images").fetchall()
            gone = [row["id"] for row in rows if not os.path.exists(row["path"])]
            conn.executemany("DELETE FROM images WHERE id = ?", [(image_id,) for image_id in gone])
        for image_id in gone:
            drop_thumbnails(self.thumbs_dir, image_id)
        known, gone_ids = {row["path"] for row in rows}, set(gone)

        # 2. Walk the outputs: new images, and the leftovers of interrupted writes.
        root = self.outputs_dir.resolve()
        new: list[Path] = []
        temp_files = 0
        now = time.time()
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = [name for name in subfolders if not name.startswith(".")]
            for name in names:
                path = Path(folder, name)
                if name.startswith(".") and name.endswith(".tmp"):
                    temp_files += _remove_if_stale(path, now - stale_after)
                elif not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES and str(path) not in known:
                    new.append(path)

        # 3. Read the new files outside the lock, then index them in one transaction. A row a writer
        # committed meanwhile for the same path is kept: it knows the image's source.
        entries = []
        for path in new:
            try:
                path_text(path)
                meta, mtime = read_meta(path), path.stat().st_mtime
            except (GalleryError, ImageFileError, FileNotFoundError) as err:
                # A name that is not UTF-8 is shown escaped: logging it raw fails in every UTF-8 handler.
                shown = str(path).encode("utf-8", "backslashreplace").decode()
                log.warning("%s: not added to the gallery: %s", shown, err)
                continue
            entries.append((path, meta, *_source_and_mode(path.relative_to(root), meta), mtime))
        unread = [(row["id"], row["path"]) for row in rows if row["credentials_state"] is None and row["id"] not in gone_ids]
        credentials = [(*credentials_columns(path), image_id) for image_id, path in unread]
        with self._write() as conn:
            added = sum(insert_row(conn, *entry, replace=False) is not None for entry in entries)
            # Only rows still unread: a writer may have replaced one meanwhile, knowing better.
            conn.executemany(
                "UPDATE images SET credentials = ?, credentials_state = ? WHERE id = ? AND credentials_state IS NULL",
                [values for values in credentials if values[1] is not None],
            )
        return ReconcileReport(added, len(gone), temp_files)

    # -- presets --------------------------------------------------------------------------------

    def presets(self) -> list[Preset]:
        return [Preset(**row) for row in self._read(f"{_SELECT_PRESET} ORDER BY name COLLATE NOCASE")]

    def preset(self, name: str) -> Preset:
        rows = self._read(f"{_SELECT_PRESET} WHERE name = ?", (savable("name", name),))
        if not rows:
            raise NotFoundError("name", f"no preset named {name!r}")
        return Preset(**rows[0])

    def put_preset(self, name: str, prompt: str, negative_prompt: str = "") -> Preset:
        """Save a preset, replacing one of the same name (names are matched ignoring case)."""
        self.put_presets([(name, prompt, negative_prompt)])
        return self.preset(name.strip())

    def put_presets(self, presets: list[tuple[str, str, str]]) -> None:
        """Save (name, prompt, negative prompt) presets in one transaction, each checked first: all or none."""
        rows = []
        for name, prompt, negative_prompt in presets:
            name = savable("name", name.strip())
            if not 1 <= len(name) <= 100:
                raise InvalidRequestError("name", f"a preset name must be 1 to 100 characters, got {len(name)} ({name[:20]!r})")
            rows.append((name, savable("prompt", prompt), savable("negative_prompt", negative_prompt), time.time()))
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO presets (name, prompt, negative_prompt, created) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET name = excluded.name, prompt = excluded.prompt, negative_prompt = excluded.negative_prompt",
                rows,
            )

    def delete_preset(self, name: str) -> None:
        with self._write() as conn:
            if conn.execute("DELETE FROM presets WHERE name = ?", (savable("name", name),)).rowcount == 0:
                raise NotFoundError("name", f"no preset named {name!r}")


def _source_and_mode(relative: Path, meta: ImageMeta) -> tuple[str, str | None]:
    """What a file's place under the outputs tells: ``imported/...`` was imported, ``<mode>-images/...``
    made in that mode (by the CLI or the server: the file does not say which; "cli" stands for both)."""
    top = relative.parts[0] if len(relative.parts) > 1 else ""
    if top == "imported":
        return "import", meta.mode
    folder = _MODE_FOLDER.fullmatch(top)
    return "cli", folder.group(1) if folder else meta.mode


def _remove_if_stale(path: Path, before: float) -> int:
    """Remove ``path`` if it was last modified before ``before``; 1 if it was removed."""
    try:
        if path.stat().st_mtime >= before:
            return 0
        path.unlink()
    except FileNotFoundError:  # its write finished (renamed) or failed (removed) meanwhile
        return 0
    return 1
