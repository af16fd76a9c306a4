"""A data folder's manifest: what ``scan_folder`` found (every image's path, sha256, caption, label; the
problems; the licence and source), written as JSON beside a model or at a data folder's root, read back
and summarised for a model card."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from lienzo.errors import DatasetError
from lienzo.files import write_atomic

if TYPE_CHECKING:
    from lienzo.training.data import DatasetScan

log = logging.getLogger(__name__)

MANIFEST_NAME = "lienzo-manifest.json"
MANIFEST_FORMAT = "lienzo-dataset-manifest"
MANIFEST_VERSION = 1
_NOTICE_MAX_CHARS = 1000
_MANIFEST_KEYS = ("root", "created", "source", "licence", "licence_file", "counts", "images", "problems", "duplicates")
_COUNT_KEYS = ("files_seen", "images", "captioned", "labels", "problems", "duplicates")


def is_manifest(path: Path) -> bool:
    """True for a manifest lienzo wrote (``format`` is its first key), whatever its name."""
    if path.suffix.lower() != ".json":
        return False
    try:
        with path.open("rb") as file:
            return f'"{MANIFEST_FORMAT}"'.encode() in file.read(256)
    except OSError:
        return False


def own_manifest(root: Path) -> dict:
    """The manifest ``lienzo dataset check`` left at the folder's root (its default name), or {}."""
    path = root / MANIFEST_NAME
    if not is_manifest(path):
        return {}
    try:
        return read_manifest(path)
    except DatasetError as err:
        log.warning("%s; its licence and source are not used", err)
        return {}


def _licence_notice(manifest: dict) -> str | None:
    """The licence file's text after the licence's name (the attribution CC BY asks to pass on), while
    the data folder is still there to read it from."""
    if not manifest["licence_file"]:
        return None
    try:
        text = (Path(manifest["root"]) / manifest["licence_file"]).read_text(encoding="utf-8-sig", errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    notice = " ".join(lines[1:])
    # A short notice is an attribution; a long one is the licence's full text, which the card names by file.
    return notice if 0 < len(notice) <= _NOTICE_MAX_CHARS else None


def _manifest(scan: DatasetScan) -> dict:
    return {
        # "format" first: scan_folder recognises a manifest by it in the file's first bytes.
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "root": str(scan.root),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": scan.source,
        "licence": scan.licence,
        "licence_file": scan.licence_file,
        "counts": {
            "files_seen": scan.files_seen,
            "images": len(scan.records),
            "captioned": scan.captioned,
            "labels": scan.labels,
            "problems": len(scan.problems),
            "duplicates": scan.duplicates_dropped,
        },
        "images": [asdict(r) for r in scan.records],
        "problems": [asdict(p) for p in scan.problems],
        "duplicates": scan.duplicates,
    }


def write_manifest(scan: DatasetScan, path: Path, *, field: str = "manifest") -> str:
    """Write the scan as a JSON manifest, atomically; return the SHA-256 of the bytes written.

    The same folder gives the same bytes apart from ``created``. Parent folders are created.
    Failure raises ``DatasetError`` naming ``field`` (a CLI passes its flag) and leaves no file.
    """
    data = (json.dumps(_manifest(scan), indent=2, ensure_ascii=False) + "\n").encode()
    path = Path(path)
    try:
        write_atomic(path, lambda file: file.write(data))
    except (FileExistsError, NotADirectoryError) as err:
        raise DatasetError(f"{field}: cannot write {path} (a folder on the way is a file)") from err
    except OSError as err:
        raise DatasetError(f"{field}: cannot write {path} ({err.strerror or err})") from err
    return hashlib.sha256(data).hexdigest()


def read_manifest(path: Path) -> dict:
    """Read a manifest written by ``write_manifest``; ``DatasetError`` if it is missing, corrupt or another format."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DatasetError(f"manifest: {path} does not exist") from err
    except OSError as err:
        raise DatasetError(f"manifest: cannot read {path} ({err.strerror or err})") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"manifest: {path} is not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DatasetError(f"manifest: {path} is not a lienzo dataset manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise DatasetError(f"manifest: {path} has version {manifest.get('version')!r}; this lienzo reads version {MANIFEST_VERSION}")
    counts = manifest.get("counts")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    missing += [f"counts.{k}" for k in _COUNT_KEYS if not isinstance(counts, dict) or k not in counts]
    if missing:
        raise DatasetError(f"manifest: {path} lacks {', '.join(missing)}")
    return manifest


def manifest_summary(manifest: dict, sha256: str) -> dict:
    """The facts about the training data that a model card states."""
    counts = manifest["counts"]
    return {
        "images": counts["images"],
        "captioned": counts["captioned"],
        "labels": counts["labels"],
        "licence": manifest["licence"],
        "licence_file": manifest["licence_file"],
        "source": manifest["source"],
        "notice": _licence_notice(manifest),
        "sha256": sha256,
        "problems": counts["problems"],
        "duplicates": counts["duplicates"],
    }
