"""The gallery database's schema: the migrations, applied in order by ``PRAGMA user_version``, and the
check that finds a damaged database file when it is opened."""

import logging
import sqlite3
from pathlib import Path

from lienzo.gallery.records import GalleryError

log = logging.getLogger(__name__)

# Schema migrations, oldest first: migration i takes a database from user_version i to i + 1.
# Append new ones; never edit one that has shipped.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        # AUTOINCREMENT: a deleted image's id is never given to another (URLs and thumbnails use ids).
        """CREATE TABLE images (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            path TEXT NOT NULL UNIQUE,
            created REAL NOT NULL,
            source TEXT NOT NULL,
            mode TEXT,
            prompt TEXT NOT NULL DEFAULT '',
            negative_prompt TEXT NOT NULL DEFAULT '',
            model TEXT,
            model_hash TEXT,
            seed INTEGER,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            steps INTEGER,
            cfg_scale REAL,
            sampler TEXT,
            schedule TEXT,
            infotext TEXT NOT NULL DEFAULT '',
            parameters TEXT NOT NULL DEFAULT '{}',
            favourite INTEGER NOT NULL DEFAULT 0,
            size_bytes INTEGER NOT NULL
        )""",
        "CREATE INDEX images_newest ON images (created DESC, id DESC)",
        "CREATE INDEX images_model ON images (model)",
        """CREATE VIRTUAL TABLE images_fts USING fts5(
            prompt, negative_prompt, content='images', content_rowid='id', tokenize='unicode61 remove_diacritics 2'
        )""",
        """CREATE TRIGGER images_fts_insert AFTER INSERT ON images BEGIN
            INSERT INTO images_fts (rowid, prompt, negative_prompt) VALUES (new.id, new.prompt, new.negative_prompt);
        END""",
        """CREATE TRIGGER images_fts_delete AFTER DELETE ON images BEGIN
            INSERT INTO images_fts (images_fts, rowid, prompt, negative_prompt) VALUES ('delete', old.id, old.prompt, old.negative_prompt);
        END""",
        """CREATE TRIGGER images_fts_update AFTER UPDATE OF prompt, negative_prompt ON images BEGIN
            INSERT INTO images_fts (images_fts, rowid, prompt, negative_prompt) VALUES ('delete', old.id, old.prompt, old.negative_prompt);
            INSERT INTO images_fts (rowid, prompt, negative_prompt) VALUES (new.id, new.prompt, new.negative_prompt);
        END""",
        """CREATE TABLE presets (
            name TEXT PRIMARY KEY COLLATE NOCASE,
            prompt TEXT NOT NULL,
            negative_prompt TEXT NOT NULL,
            created REAL NOT NULL
        )""",
    ),
    (
        # The named API key whose request made or imported the image (lienzo.server.keys); NULL: made
        # without one (the CLI, a server without named keys, or before there were any).
        "ALTER TABLE images ADD COLUMN owner TEXT",
        "CREATE INDEX images_owner ON images (owner COLLATE NOCASE, created DESC, id DESC)",
    ),
    (
        # Content Credentials (C2PA), read from the file when its row is written (lienzo.gallery.importers
        # .credentials_columns): credentials "lienzo" (lienzo's own signed AI-generated image) or "other"
        # (any other manifest, a tampered one included), NULL without one; credentials_state the verifier's
        # state ("valid", "tampered", ...; "unsigned": read, none). Rows from before this have both NULL:
        # reconcile reads their files once. watermark_id: the id (hex) lienzo's watermark carries in the
        # image's pixels, as its provenance record states, so that a copy stripped of its metadata leads
        # back to it; NULL: none (images from before this carry lienzo's fixed tag, not an id).
        "ALTER TABLE images ADD COLUMN credentials TEXT",
        "ALTER TABLE images ADD COLUMN credentials_state TEXT",
        "ALTER TABLE images ADD COLUMN watermark_id TEXT",
        "CREATE INDEX images_credentials ON images (credentials, created DESC, id DESC)",
        "CREATE INDEX images_watermark_id ON images (watermark_id) WHERE watermark_id IS NOT NULL",
    ),
]


def migrate(conn: sqlite3.Connection, what: Path | str = "the gallery", migrations: list[tuple[str, ...]] | None = None) -> None:
    """Bring the database to the newest schema, applying the migrations it lacks in one transaction;
    GalleryError for a database written by a newer lienzo. ``migrations``: another database's list
    (the server's job queue keeps its own file); default the gallery's."""
    migrations = MIGRATIONS if migrations is None else migrations
    latest = len(migrations)
    if _user_version(conn, what, latest) == latest:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _user_version(conn, what, latest)  # again, under the lock: another process may have migrated it
        for statements in migrations[version:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {latest}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if version < latest:
        log.info("%s: schema migrated from version %d to %d", what, version, latest)


class Damaged(Exception):
    """The database file is not one, or its pages do not add up; the message says which."""


# SQLite's result codes for a damaged file (the low byte: extended codes refine it).
_DAMAGE_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def check_pages(conn: sqlite3.Connection) -> None:
    """Damaged when the file is not a database or its pages are broken (a crash on a disk that lies
    about flushes, a copy cut short). quick_check reads each page once (about 20 ms for 5,000 images),
    and so finds damage at opening, not in the middle of a request."""
    try:
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as err:
        if (getattr(err, "sqlite_errorcode", 0) & 0xFF) in _DAMAGE_CODES:
            raise Damaged(str(err)) from err
        raise
    if problems != ["ok"]:
        raise Damaged("; ".join(problems[:3]))


def _user_version(conn: sqlite3.Connection, what: Path | str, latest: int) -> int:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > latest:
        raise GalleryError(
            f"{what} has schema version {version}, newer than this lienzo's {latest}; "
            "upgrade lienzo, or point LIENZO_DATA_DIR elsewhere"
        )
    return version

