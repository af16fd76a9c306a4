"""Named API keys: each person or script that uses ``lienzo serve`` gets a secret of their own (``lienzo
keys add NAME``), so that their jobs and gallery are theirs and limits can be set per key.

The keys live in one small SQLite database, ``keys.db`` in the data dir, which the CLI writes while the
server reads it. Only a hash of each secret is stored: the secret is shown once, when it is made. The
server asks :meth:`KeyStore.identify` on every request, so the keys are kept in memory and read again
only when the file has changed (one ``stat`` a request): a key added or removed by the CLI counts from
the next request on.
"""

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from lienzo.database import Database
from lienzo.errors import InvalidRequestError
from lienzo.gallery.records import NotFoundError
from lienzo.gallery.schema import migrate
from lienzo.server.job import Identity

# Oldest first, applied by lienzo.gallery.schema.migrate; append new ones, never edit one that has shipped.
KEY_MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE keys (
            name TEXT PRIMARY KEY COLLATE NOCASE,
            hash TEXT NOT NULL,
            salt TEXT NOT NULL,
            created REAL NOT NULL,
            max_queued INTEGER,
            max_pixels INTEGER
        )""",
    ),
]

PREFIX = "lz_"  # tells a lienzo key apart in a config file or a leak scanner's report
ADMIN = "admin"  # the owner --auth / --api-key credentials act as: no key may take the name
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MIN_PIXELS = 64 * 64  # the smallest image lienzo makes
# A file modified this close to when it was read may have been changed again within the same tick of
# the file system's clock (a few milliseconds to a second), leaving its mtime as it was: such a file
# is read again on every request until it is older (the "racy git" problem, solved the same way).
_RACY_SECONDS = 1.0


@dataclass(frozen=True)
class KeyInfo:
    """A key as ``lienzo keys list`` shows it: never its hash."""

    name: str
    created: float  # epoch seconds
    max_queued: int | None  # jobs it may have waiting; None: only the server's max_queue
    max_pixels: int | None  # width x height of one image; None: only the server's max_pixels


@dataclass(frozen=True)
class _Key:
    info: KeyInfo
    hash: bytes
    salt: bytes


def _hash(secret: str, salt: bytes) -> bytes:
    # SHA-256, not a slow password hash (scrypt, PBKDF2): the secret is 32 random bytes (256 bits), so
    # trying secrets against a stolen hash is hopeless without key stretching, while a slow hash would
    # cost every request tens of milliseconds. The per-key salt keeps two stores' hashes of the same
    # secret apart.
    return hashlib.sha256(salt + secret.encode("utf-8", "surrogatepass")).digest()


def check_name(name: str) -> str:
    """``name``, or InvalidRequestError naming ``name`` when it cannot be a key's name."""
    if not _NAME.fullmatch(name):
        raise InvalidRequestError("name", f"a key's name is 1 to 64 letters, digits, '_', '.' or '-', got {name[:80]!r}")
    if name.lower() == ADMIN:
        raise InvalidRequestError("name", f"{name!r} is reserved for the server's --auth / --api-key credentials")
    return name


def _check_limit(field: str, value: int | None, least: int) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
        raise InvalidRequestError(field, f"must be a whole number of at least {least} (or none: no limit of its own), got {value!r}")
    return value


class KeyStore(Database):
    """The named keys in the SQLite database at ``path`` (made if missing). Thread-safe: one connection,
    used under a lock; :meth:`close` it when done (using it after reopens the connection)."""

    def __init__(self, path: str | Path, *, timeout: float = 10.0):
        super().__init__(path, timeout)
        self._cached: tuple[_Key, ...] = ()
        self._cached_stat: tuple | None = None  # the file's (mtime_ns, size, inode) when _cached was read
        self._connection()  # fail now on a database this lienzo cannot use

    def _open(self) -> sqlite3.Connection:
        # The default rollback journal, not WAL: a commit then changes the main file itself, whose mtime tells
        # the server's cache to read it again (in WAL mode commits land in keys.db-wal).
        conn = self._connect()
        try:
            migrate(conn, self.path, KEY_MIGRATIONS)
        except BaseException:
            conn.close()
            raise
        return conn

    def _write(self, sql: str, params: tuple) -> int:
        """Run one statement in its own transaction; the number of rows it changed."""
        with self._lock:
            changed = self._connection().execute(sql, params).rowcount
            self._cached_stat = None  # read again next time, whatever the file's clock says
            return changed

    # -- managing keys --------------------------------------------------------------------------

    def add(self, name: str, *, max_queued: int | None = None, max_pixels: int | None = None) -> str:
        """Make a key called ``name`` and return its secret, which is not stored and cannot be shown again."""
        check_name(name)
        _check_limit("max_queued", max_queued, 1)
        _check_limit("max_pixels", max_pixels, _MIN_PIXELS)
        secret = PREFIX + secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        try:
            self._write(
                "INSERT INTO keys (name, hash, salt, created, max_queued, max_pixels) VALUES (?, ?, ?, ?, ?, ?)",
                (name, _hash(secret, salt).hex(), salt.hex(), time.time(), max_queued, max_pixels),
            )
        except sqlite3.IntegrityError:
            raise InvalidRequestError("name", f"a key named {name!r} exists already (names ignore case); remove it first") from None
        return secret

    def remove(self, name: str) -> None:
        if self._write("DELETE FROM keys WHERE name = ?", (name,)) == 0:
            raise self._unknown(name)

    def set_limits(self, name: str, *, max_queued: int | None = None, max_pixels: int | None = None) -> KeyInfo:
        """Replace both of ``name``'s limits; None lifts one (the server's own limits still apply)."""
        _check_limit("max_queued", max_queued, 1)
        _check_limit("max_pixels", max_pixels, _MIN_PIXELS)
        if self._write("UPDATE keys SET max_queued = ?, max_pixels = ? WHERE name = ?", (max_queued, max_pixels, name)) == 0:
            raise self._unknown(name)
        return next(info for info in self.list() if info.name.lower() == name.lower())

    def list(self) -> list[KeyInfo]:
        """Every key, by name."""
        return [key.info for key in self._keys()]

    def has_keys(self) -> bool:
        """Whether any key exists: then the server lets in only requests that carry one (or the admin's)."""
        return bool(self._keys())

    def _unknown(self, name: str) -> NotFoundError:
        known = ", ".join(info.name for info in self.list()) or "none yet: `lienzo keys add NAME` makes one"
        return NotFoundError("name", f"no key named {name!r} (keys: {known})")

    # -- checking a request's key ---------------------------------------------------------------

    def identify(self, secret: str) -> Identity | None:
        """The owner whose key ``secret`` is, with their limits; None for a secret no key has."""
        found = None
        # Every key is compared, each in constant time, and the loop never stops early: how long it
        # takes tells nothing about which key, or how much of one, the secret matched.
        for key in self._keys():
            if hmac.compare_digest(_hash(secret, key.salt), key.hash):
                found = key.info
        if found is None:
            return None
        return Identity(owner=found.name, admin=False, max_queued=found.max_queued, max_pixels=found.max_pixels)

    def _keys(self) -> tuple[_Key, ...]:
        """The keys, from memory while the file is unchanged since they were read."""
        with self._lock:
            stat = self._stat()
            if stat is None or stat != self._cached_stat:
                started = time.time()
                rows = self._connection().execute(
                    "SELECT name, hash, salt, created, max_queued, max_pixels FROM keys ORDER BY name COLLATE NOCASE"
                ).fetchall()
                self._cached = tuple(
                    _Key(KeyInfo(name, created, max_queued, max_pixels), bytes.fromhex(hash_hex), bytes.fromhex(salt_hex))
                    for name, hash_hex, salt_hex, created, max_queued, max_pixels in rows
                )
                racy = stat is None or stat[0] / 1e9 >= started - _RACY_SECONDS
                self._cached_stat = None if racy else stat
            return self._cached

    def _stat(self) -> tuple | None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:  # removed by hand: the connection still reads the old file's keys
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino
