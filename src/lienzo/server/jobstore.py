"""The server's durable job store: every job, queued or finished, in one SQLite file (``jobs.db``), so
that a restart finds the queue and the history where they were.

One connection, used under a lock, as the gallery's. WAL, so that reading the history never waits for
the worker's writes, and another process (a second server, ``lienzo`` commands) can open the file;
``synchronous = FULL``, so that a job the server acknowledged is on disk before the answer goes out
and a crash or power cut cannot lose it (WAL's NORMAL may lose the last commits, which unlike the
gallery's rows nothing could rebuild). History pages by a keyset cursor (the last job's created time
and id), not an offset: a page stays right while jobs are added in front of it, and costs the same on
page 1,000 as on page 1.

A request is stored as JSON (:func:`encode_request`): its images as lossless PNG, so that a job run
after a restart gets the pixels it was given.
"""

import base64
import binascii
import dataclasses
import io
import json
import math
import sqlite3
from pathlib import Path
from typing import Any

from PIL import Image

from lienzo.database import Database
from lienzo.errors import InvalidRequestError
from lienzo.gallery.rows import MAX_PAGE
from lienzo.gallery.schema import migrate
from lienzo.generation.request import GenerationRequest, build_request
from lienzo.server.job import Job, JobNotFoundError, JobStatus, SavedImage
from lienzo.settings import Settings

# Marks an image in a stored request: {"$png": base64}. No field of a request starts with "$".
_IMAGE = "$png"
# The modes PNG stores exactly (Pillow reads each back as it was written); others it cannot write
# (CMYK, F, I) or would change (P: its palette is trimmed).
_PNG_MODES = frozenset({"1", "L", "LA", "RGB", "RGBA", "I;16"})

# Migrations, oldest first (see lienzo.gallery.schema): append new ones, never edit one that has shipped.
JOB_MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            seq INTEGER NOT NULL,
            owner TEXT,
            priority INTEGER NOT NULL,
            state TEXT NOT NULL,
            source TEXT NOT NULL,
            model TEXT,
            request TEXT NOT NULL,
            fit_to_model INTEGER NOT NULL,
            created REAL NOT NULL,
            started REAL,
            finished REAL,
            attempts INTEGER NOT NULL,
            worker TEXT,
            model_name TEXT NOT NULL,
            images TEXT NOT NULL,
            error TEXT,
            error_field TEXT,
            warnings TEXT NOT NULL,
            resize_to TEXT
        )""",
        "CREATE INDEX jobs_newest ON jobs (created DESC, id DESC)",
        "CREATE INDEX jobs_owner ON jobs (owner, state)",
        "CREATE INDEX jobs_state ON jobs (state, seq)",
        "CREATE TABLE flags (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
]

_UNFINISHED = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
_COLUMNS = (
    "id", "seq", "owner", "priority", "state", "source", "model", "request", "fit_to_model", "created", "started",
    "finished", "attempts", "worker", "model_name", "images", "error", "error_field", "warnings", "resize_to",
)
# What update() writes: what changes while a job waits and runs. The request, owner and source never do.
_MUTABLE = (
    "state", "priority", "seq", "started", "finished", "attempts", "worker", "model_name", "images", "error",
    "error_field", "warnings", "resize_to",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"


# -- the request as text ----------------------------------------------------------------------------


def encode_request(request: GenerationRequest) -> str:
    """The request as JSON that :func:`decode_request` turns back into an equal one. Every image, wherever
    it sits (a field, a list, a nested model such as a ControlNet unit), becomes lossless PNG; found by
    walking the dumped fields, so a new image field is stored without being listed here. The image
    file's own ``info`` (text chunks, dpi) is not kept: only pixels, mode and size reach the engine."""
    # ensure_ascii: the text goes into SQLite as UTF-8, which a lone surrogate would fail to encode.
    return json.dumps(_plain(request.model_dump(), ""), ensure_ascii=True, separators=(",", ":"))


def decode_request(text: str) -> GenerationRequest:
    """The request :func:`encode_request` wrote, validated again as every front door's is."""
    return build_request(**_revive(json.loads(text)))


def _plain(value: Any, where: str) -> Any:
    """``value`` with its images replaced by {"$png": base64}; ``where`` names it in errors (``controlnets.1.image``)."""
    if isinstance(value, Image.Image):
        return {_IMAGE: _png(value, where)}
    if isinstance(value, dict):
        return {key: _plain(item, f"{where}.{key}" if where else str(key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}.{index}") for index, item in enumerate(value)]
    return value


def _png(image: Image.Image, where: str) -> str:
    if image.mode not in _PNG_MODES:
        raise InvalidRequestError(where, f"a {image.mode} image cannot be queued; send RGB, RGBA or L ({', '.join(sorted(_PNG_MODES))})")
    buffer = io.BytesIO()
    # compress_level 1: the fastest zlib level, still lossless; the PNG lives only in the queue's database.
    image.save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _revive(value: Any) -> Any:
    if isinstance(value, dict):
        if value.keys() == {_IMAGE}:
            with Image.open(io.BytesIO(base64.b64decode(value[_IMAGE]))) as image:
                return image.copy()  # decoded now, as a plain Image, like an upload's
        return {key: _revive(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_revive(item) for item in value]
    return value


# -- the store --------------------------------------------------------------------------------------


class JobStore(Database):
    """The jobs in ``path``: add a job when it is accepted, update it as it changes, load the unfinished
    ones when the server starts. Every method has committed when it returns.

    Thread-safe: one connection, used under a lock. :meth:`close` it when done (using it after reopens it).
    """

    def __init__(self, path: Path, timeout: float = 10.0):
        super().__init__(path, timeout)
        self._connection()  # fail now on a database this lienzo cannot use

    @classmethod
    def for_settings(cls, settings: Settings) -> "JobStore":
        return cls(settings.jobs_db)

    def _open(self) -> sqlite3.Connection:
        conn = self._connect()  # each method here is one statement, committed as it runs
        try:
            conn.row_factory = sqlite3.Row
            migrate(conn, self.path, JOB_MIGRATIONS)  # before any write: a newer lienzo's database is left as it was
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self, sql: str, params: tuple | list = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._connection().execute(sql, params)

    def _rows(self, sql: str, params: tuple | list = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._connection().execute(sql, params).fetchall()

    # -- jobs -------------------------------------------------------------------------------------

    def add(self, job: Job) -> None:
        """Store a new job whole; sqlite3.IntegrityError for an id already stored."""
        values = _mutable_values(job) | {
            "id": job.id, "owner": job.owner, "source": job.source, "model": _utf8(job.model),
            "request": encode_request(job.request), "fit_to_model": int(job.fit_to_model), "created": job.created,
        }
        self._run(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", [values[c] for c in _COLUMNS])

    def update(self, job: Job) -> None:
        """Write what changes as a job waits and runs (state, place, times, worker, images, error...);
        JobNotFoundError for a job never added."""
        values = _mutable_values(job)
        assignments = ", ".join(f"{column} = ?" for column in _MUTABLE)
        if self._run(f"UPDATE jobs SET {assignments} WHERE id = ?", [*(values[c] for c in _MUTABLE), job.id]).rowcount == 0:
            raise JobNotFoundError(f"no job {job.id} in {self.path}")

    def load(self, job_id: str) -> Job | None:
        rows = self._rows(f"{_SELECT} WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def unfinished(self) -> list[Job]:
        """The queued and running jobs, by ``seq``: what a restarting server has left to do."""
        rows = self._rows(f"{_SELECT} WHERE state IN (?, ?) ORDER BY seq, created, id", _UNFINISHED)
        return [_job(row) for row in rows]

    def history(
        self, *, state: str | None = None, owner: str | None = None, cursor: str | None = None, limit: int = 50
    ) -> tuple[list[Job], str | None]:
        """Jobs newest first, ``limit`` at a time, in ``state`` and of ``owner`` when given; and the cursor
        of the next page (None: this is the last). ``cursor`` is a previous page's."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequestError("limit", f"must be 1 to {MAX_PAGE}, got {limit}")
        where, params = [], []
        if state is not None:
            states = [status.value for status in JobStatus]
            if state not in states:
                raise InvalidRequestError("state", f"must be one of {', '.join(states)}, got {state!r}")
            where.append("state = ?")
            params.append(state)
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if cursor:
            created, job_id = _parse_cursor(cursor)
            where.append("(created < ? OR (created = ? AND id < ?))")
            params += [created, created, job_id]
        sql = f"{_SELECT} {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY created DESC, id DESC LIMIT ?"
        rows = self._rows(sql, [*params, limit + 1])
        jobs = [_job(row) for row in rows[:limit]]
        return jobs, _cursor(jobs[-1]) if len(rows) > limit else None

    def counts(self) -> dict[str, int]:
        """Jobs in each state, every state named (0 for none)."""
        counted = {row["state"]: row["n"] for row in self._rows("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}
        return {status.value: counted.get(status.value, 0) for status in JobStatus}

    def max_seq(self) -> int:
        """The highest ``seq`` of any job (0 when none): a job given one more goes behind all of them."""
        return self._rows("SELECT COALESCE(MAX(seq), 0) FROM jobs")[0][0]

    def min_seq(self) -> int:
        """The lowest ``seq`` of any job (0 when none): a job given one less goes in front of all of them."""
        return self._rows("SELECT COALESCE(MIN(seq), 0) FROM jobs")[0][0]

    # -- queue-wide state ---------------------------------------------------------------------------

    def flag(self, name: str) -> str | None:
        rows = self._rows("SELECT value FROM flags WHERE name = ?", (name,))
        return rows[0]["value"] if rows else None

    def set_flag(self, name: str, value: str | None) -> None:
        """Set flag ``name`` (such as "paused") to ``value``; None removes it."""
        if value is None:
            self._run("DELETE FROM flags WHERE name = ?", (name,))
        else:
            self._run("INSERT INTO flags (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value", (name, value))


def _mutable_values(job: Job) -> dict[str, Any]:
    images = [{f.name: getattr(saved, f.name) for f in dataclasses.fields(saved)} | {"path": str(saved.path)} for saved in job.images]
    return {
        "state": job.status.value, "priority": job.priority, "seq": job.seq, "started": job.started, "finished": job.finished,
        "attempts": job.attempts, "worker": job.worker, "model_name": job.model_name, "images": json.dumps(images),
        "error": _utf8(job.error), "error_field": job.error_field, "warnings": json.dumps(job.warnings),
        "resize_to": None if job.resize_to is None else json.dumps(list(job.resize_to)),
    }


def _utf8(text: str | None) -> str | None:
    """``text`` with any lone surrogate as "?": an error message or model name may echo a client's JSON
    ``\\ud800``, which SQLite, storing UTF-8, would refuse (and with it the whole job)."""
    return None if text is None else text.encode("utf-8", "replace").decode("utf-8")


def _job(row: sqlite3.Row) -> Job:
    resize_to = None if row["resize_to"] is None else tuple(json.loads(row["resize_to"]))
    return Job(
        id=row["id"], request=decode_request(row["request"]), model=row["model"], source=row["source"], owner=row["owner"],
        priority=row["priority"], seq=row["seq"], attempts=row["attempts"], worker=row["worker"], created=row["created"],
        status=JobStatus(row["state"]), started=row["started"], finished=row["finished"], model_name=row["model_name"],
        images=[SavedImage(**(fields | {"path": Path(fields["path"])})) for fields in json.loads(row["images"])],
        error=row["error"], error_field=row["error_field"], warnings=json.loads(row["warnings"]),
        fit_to_model=bool(row["fit_to_model"]), resize_to=resize_to,
    )


def _cursor(job: Job) -> str:
    """The opaque cursor of the page after ``job``: its created time and id, which order the history."""
    return base64.urlsafe_b64encode(json.dumps([job.created, job.id]).encode()).decode("ascii")


def _parse_cursor(cursor: str) -> tuple[float, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode("ascii")))
        valid = isinstance(created, (int, float)) and math.isfinite(created) and isinstance(job_id, str)
    except (ValueError, TypeError, UnicodeError, binascii.Error):
        valid = False
    if not valid:
        raise InvalidRequestError("cursor", f"{cursor!r} is not a cursor this server gave out (use a page's 'next')")
    return float(created), job_id
