"""Training data: check every file in a folder, record what was found in a manifest, serve images as tensors.

Folder conventions: same-name ``.txt`` (or ``.caption``) files are captions, as kohya's scripts read
them; top-level sub-folders are class labels, as torchvision's ``ImageFolder`` reads them.
"""

import hashlib
import io
import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError

from lienzo.errors import DatasetError
from lienzo.images.io import load_image
from lienzo.training.manifest import is_manifest, own_manifest

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
# In order of preference when an image has both.
CAPTION_SUFFIXES = (".txt", ".caption")

_LICENCE_NAME = re.compile(r"(licen[cs]e|copying)(\.(txt|md))?", re.IGNORECASE)
_LICENCE_MAX_CHARS = 200
# EXIF orientations 5 to 8 turn the picture a quarter: the stored width is the displayed height.
_QUARTER_TURNS = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class ImageRecord:
    """One usable training image. ``path`` is POSIX and relative to the data folder; sizes are as displayed (EXIF-upright)."""

    path: str
    sha256: str
    width: int
    height: int
    caption: str | None
    label: str | None


@dataclass(frozen=True)
class Problem:
    """A file that was skipped. ``kind``: corrupt, truncated, unreadable, not an image, too large."""

    path: str
    kind: str
    detail: str


@dataclass
class DatasetScan:
    """What ``scan_folder`` found: the images to train on, and why every other file was left out.

    ``files_seen`` counts the files that were candidates for images (hidden files, captions,
    licence files and lienzo manifests are not candidates), so it equals
    ``len(records) + len(problems)`` plus the duplicates that were dropped.
    """

    root: Path
    records: list[ImageRecord]
    problems: list[Problem]
    duplicates: list[list[str]]
    licence: str | None
    licence_file: str | None
    source: str | None
    files_seen: int

    @property
    def labels(self) -> dict[str, int]:
        """Images per label, by label name; images at the root have none and are not counted."""
        return dict(sorted(Counter(r.label for r in self.records if r.label is not None).items()))

    @property
    def captioned(self) -> int:
        """Images with a non-empty caption."""
        return sum(bool(r.caption) for r in self.records)

    @property
    def duplicates_dropped(self) -> int:
        """Files left out because an earlier file (by path) has the same bytes."""
        return sum(len(group) - 1 for group in self.duplicates)

    def require_images(self) -> None:
        """Raise ``DatasetError`` when nothing in the folder can be trained on, saying what was there instead."""
        if self.records:
            return
        if not self.files_seen:
            found = "found no files; hidden files, captions and licence files are not counted"
        else:
            kinds = Counter(p.kind for p in self.problems)
            found = f"{_plural(self.files_seen, 'file')} seen: " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        raise DatasetError(f"data: no valid images in {self.root} ({found})")


def scan_folder(
    root: Path,
    *,
    licence: str | None = None,
    source: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DatasetScan:
    """Decode every file under ``root`` and sort the usable images from the rest; never raises for a bad file.

    ``licence`` and ``source`` are recorded as given; without them, what the folder says of itself:
    the first line of a LICENSE / LICENCE / COPYING file at the root, and the licence and source in the
    folder's own manifest (``lienzo dataset check --source``, ``lienzo dataset openmoji``).
    ``progress(done, total)`` is called after each file. Of files with identical bytes only the first
    (by path) becomes a record.
    """
    # 1. Check the folder
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"data: {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"data: {root} is not a folder")

    # 2. Find the candidates and, beside them, the captions and the licence file
    candidates, captions, licence_path = _walk(root)

    # 3. Decode every candidate; keep the first of each set of identical files
    records: list[ImageRecord] = []
    problems: list[Problem] = []
    paths_by_hash: dict[str, list[str]] = {}
    for done, path in enumerate(candidates, 1):
        result = _inspect(root, path, captions.get(path))
        if isinstance(result, Problem):
            problems.append(result)
        else:
            same = paths_by_hash.setdefault(result.sha256, [])
            same.append(result.path)
            if len(same) == 1:
                records.append(result)
        if progress is not None:
            progress(done, len(candidates))
    duplicates = [paths for paths in paths_by_hash.values() if len(paths) > 1]

    # 4. Licence and source: the caller's word, else the folder's licence file, else its own manifest
    licence_file = None
    if licence is None and licence_path is not None:
        licence, licence_file = _first_line(licence_path), licence_path.relative_to(root).as_posix()
    recorded = own_manifest(root)
    licence = licence or recorded.get("licence")
    source = source or recorded.get("source")

    scan = DatasetScan(root, records, problems, duplicates, licence, licence_file, source, len(candidates))
    log.info("scanned %s: %d images, %d problems, %d duplicates", root, len(records), len(problems), scan.duplicates_dropped)
    return scan


def _walk(root: Path) -> tuple[list[Path], dict[Path, Path], Path | None]:
    """The files to check (sorted by relative path), each image's caption file, and the root's licence file."""
    candidates: list[Path] = []
    captions: dict[Path, Path] = {}
    licence_path = None
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        folder = Path(folder)
        names = sorted(f for f in files if not f.startswith("."))
        image_stems = {Path(n).stem for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES}
        caption_files = {folder / n for n in names if Path(n).suffix.lower() in CAPTION_SUFFIXES and Path(n).stem in image_stems}
        # Least preferred first, so that a .txt overwrites a .caption of the same stem.
        by_preference = sorted(caption_files, key=lambda p: (-CAPTION_SUFFIXES.index(p.suffix.lower()), p.name))
        caption_of = {p.stem: p for p in by_preference}
        for name in names:
            path = folder / name
            if path in caption_files:
                continue
            if _LICENCE_NAME.fullmatch(name):
                if folder == root and licence_path is None:
                    licence_path = path
                continue
            if is_manifest(path):
                continue
            candidates.append(path)
            if path.stem in caption_of and path.suffix.lower() in IMAGE_SUFFIXES:
                captions[path] = caption_of[path.stem]
    candidates.sort(key=lambda p: p.relative_to(root).as_posix())
    return candidates, captions, licence_path


def _inspect(root: Path, path: Path, caption_path: Path | None) -> ImageRecord | Problem:
    """Fully decode one file: a record if it is a usable image, otherwise the reason it is not."""
    rel = path.relative_to(root).as_posix()
    suffix = path.suffix.lower()
    if suffix in CAPTION_SUFFIXES:
        return Problem(rel, "not an image", "a caption file with no image of the same name")
    if suffix not in IMAGE_SUFFIXES:
        return Problem(rel, "not an image", f"{suffix or 'no'} extension; images are {', '.join(sorted(IMAGE_SUFFIXES))}")
    if not path.is_file():
        return Problem(rel, "unreadable", "a broken link" if path.is_symlink() else "not a regular file")
    try:
        data = path.read_bytes()
    except OSError as err:
        return Problem(rel, "unreadable", err.strerror or str(err))
    if not data:
        return Problem(rel, "corrupt", "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            # Decode every pixel: Image.open reads only the header, and a truncated file fails only here.
            image.load()
            width, height = image.size
            if image.getexif().get(ExifTags.Base.Orientation) in _QUARTER_TURNS:
                width, height = height, width
    except Image.DecompressionBombError as err:
        return Problem(rel, "too large", str(err))
    except UnidentifiedImageError:
        return Problem(rel, "corrupt", "Pillow cannot identify it as an image")
    except (OSError, SyntaxError, ValueError) as err:
        # Pillow reports broken data as OSError, SyntaxError ("broken PNG file") or ValueError, by format and
        # by where it breaks; a file cut short says "image file is truncated" or "Truncated File Read".
        kind = "truncated" if "truncated" in str(err).lower() else "corrupt"
        return Problem(rel, kind, str(err))
    label = rel.split("/", 1)[0] if "/" in rel else None
    caption = _read_caption(caption_path) if caption_path is not None else None
    return ImageRecord(rel, hashlib.sha256(data).hexdigest(), width, height, caption, label)


def _read_caption(path: Path) -> str | None:
    try:
        # utf-8-sig: captions saved by Windows Notepad start with a byte-order mark.
        return path.read_text(encoding="utf-8-sig", errors="replace").strip()
    except OSError as err:
        log.warning("caption %s cannot be read (%s); its image is used without one", path, err.strerror or err)
        return None


def _first_line(path: Path) -> str | None:
    """The licence named by the first non-empty line of ``path``, e.g. "CC BY-SA 4.0" or "MIT License"."""
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as err:
        log.warning("licence file %s cannot be read (%s)", path, err.strerror or err)
        return None
    return next((line.strip()[:_LICENCE_MAX_CHARS] for line in text.splitlines() if line.strip()), None)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class ImageDataset(torch.utils.data.Dataset):
    """Scanned images as square tensors in [-1, 1], the range the VAE encodes.

    A key is ``(record index, horizontal flip)``: the sampler draws the flip, so every
    random choice lives in one seeded place and any item can be remade exactly.
    """

    def __init__(self, root: Path, records: list[ImageRecord], resolution: int):
        self.root = Path(root)
        self.records = records
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, bool]) -> dict:
        index, flip = key
        record = self.records[index]
        pixels = to_unit(self.uint8(index))
        if flip:
            pixels = pixels.flip(-1)
        return {"pixels": pixels.contiguous(), "caption": record.caption or "", "label": record.label or "", "index": index}

    def uint8(self, index: int) -> torch.Tensor:
        """Image ``index`` as a uint8 C,H,W tensor: read, resized and cropped to the resolution."""
        record = self.records[index]
        size = self.resolution

        # 1. Read: first frame, upright by EXIF, transparency composited onto white
        image = load_image(self.root / record.path, field="data")

        # 2. Resize so the shorter side is `resolution`
        width, height = image.size
        if min(width, height) != size:
            scale = size / min(width, height)
            new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
            # reducing_gap 3: a box pre-shrink first, many times faster on camera-sized photos and,
            # per Pillow's documentation, indistinguishable from plain LANCZOS at this gap.
            image = image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)

        # 3. Crop the centre square
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))

        # 4. To a CHW tensor
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to floats in [-1, 1], the range the VAE encodes."""
    return pixels.float().div(127.5).sub(1.0)
