"""OpenMoji as a training folder: ``lienzo dataset openmoji openmoji-17.0.0.tgz OUT``.

Reads the npm package (``npm pack openmoji``) without unpacking it, rasterises every colour SVG onto
white with cairosvg, and writes the layout the trainer reads: ``OUT/train/<group>/<hexcode>.png`` with
a same-name ``.txt`` caption, a held-out split in ``OUT/holdout/`` (about 5%, stratified by subgroup),
a LICENSE file with the attribution, ``OUT/openmoji-index.json`` (hexcode, annotation, group,
subgroup, author, split of every image) and a lienzo manifest in each split's folder
(``lienzo-manifest.json``: source, licence, sha256 and caption of every image), which the trainer
reads the data's source from.
"""

import dataclasses
import io
import json
import logging
import os
import random
import shutil
import tarfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lienzo.errors import DatasetError
from lienzo.training.data import scan_folder
from lienzo.training.manifest import MANIFEST_NAME, write_manifest

LICENCE = "CC BY-SA 4.0"
SOURCE = "OpenMoji (https://openmoji.org), the open-source emoji and icon project, npm package openmoji"
ATTRIBUTION = (
    "All emojis designed by OpenMoji – the open-source emoji and icon project. License: CC BY-SA 4.0 "
    "(https://creativecommons.org/licenses/by-sa/4.0/). Authors of each emoji: openmoji-index.json."
)
log = logging.getLogger(__name__)
_MAX_TAGS = 6  # a caption longer than this mostly repeats the annotation in other words


@dataclass
class Emoji:
    hexcode: str
    annotation: str
    tags: list[str]
    group: str
    subgroup: str
    author: str

    @property
    def caption(self) -> str:
        """``grinning face, cheerful, happy, smile``: the annotation, then tags it does not already say."""
        words = [self.annotation]
        for tag in self.tags:
            if tag and tag not in words and tag not in self.annotation and len(words) <= _MAX_TAGS:
                words.append(tag)
        return ", ".join(words)


def read_index(tgz: Path) -> tuple[list[Emoji], str]:
    """Every emoji in ``data/openmoji.json``; skin-tone variants take their base emoji's tags."""
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            data = json.load(tar.extractfile("package/data/openmoji.json"))
            version = json.load(tar.extractfile("package/package.json")).get("version", "?")
    except (OSError, tarfile.TarError, KeyError, json.JSONDecodeError) as err:
        raise DatasetError(f"openmoji: {tgz} is not the npm openmoji package (npm pack openmoji): {err}") from None
    tags = {e["hexcode"]: _split(e.get("tags", "")) + _split(e.get("openmoji_tags", "")) for e in data}
    emojis = []
    for e in data:
        own = tags[e["hexcode"]] or tags.get(e.get("skintone_base_hexcode") or "", [])
        emojis.append(Emoji(e["hexcode"], e["annotation"].strip(), own, e["group"], e["subgroups"], e.get("openmoji_author", "")))
    return emojis, version


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def holdout_split(emojis: list[Emoji], share: float, seed: int) -> set[str]:
    """About ``share`` of each subgroup (at least one of every subgroup with 10 or more), chosen by ``seed``."""
    by_subgroup: dict[str, list[str]] = defaultdict(list)
    for e in emojis:
        by_subgroup[e.subgroup].append(e.hexcode)
    rng = random.Random(seed)
    held: set[str] = set()
    for subgroup in sorted(by_subgroup):
        codes = sorted(by_subgroup[subgroup])
        count = round(len(codes) * share)
        if count == 0 and len(codes) >= 10:
            count = 1
        held.update(rng.sample(codes, count))
    return held


def rasterise(svg: bytes, size: int) -> Image.Image:
    """An SVG drawn at ``size`` x ``size`` onto white."""
    import cairosvg  # needs the system's libcairo; imported only when OpenMoji is prepared

    png = cairosvg.svg2png(bytestring=svg, output_width=size, output_height=size, background_color="white")
    return Image.open(io.BytesIO(png)).convert("RGB")


def prepare_openmoji(
    tgz: Path, out: Path, *, size: int = 128, holdout: float = 0.05, seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Write the training and held-out folders; returns the image count of each split."""
    emojis, version = read_index(tgz)
    held = holdout_split(emojis, holdout, seed)
    if any((out / split).exists() for split in ("train", "holdout")):
        raise DatasetError(f"out: {out} already holds a prepared OpenMoji; choose an empty folder")
    # Built in a work folder and moved into place at the end: an interrupted run leaves no half data set.
    work = out / ".openmoji.tmp"
    shutil.rmtree(work, ignore_errors=True)
    index, failed = [], []
    with tarfile.open(tgz, "r:gz") as tar:
        for n, e in enumerate(emojis):
            svg = tar.extractfile(f"package/color/svg/{e.hexcode}.svg").read()
            try:
                image = rasterise(svg, size)
            except Exception as err:  # noqa: BLE001 - cairosvg fails in many ways on odd SVGs; one must not stop the rest
                failed.append(e.hexcode)
                log.warning("openmoji: cannot draw %s.svg (%s: %s); skipped", e.hexcode, type(err).__name__, err)
                continue
            split = "holdout" if e.hexcode in held else "train"
            folder = work / split / e.group
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{e.hexcode}.png", format="PNG")
            (folder / f"{e.hexcode}.txt").write_text(e.caption + "\n")
            index.append({"path": f"{split}/{e.group}/{e.hexcode}.png", "hexcode": e.hexcode, "annotation": e.annotation,
                          "caption": e.caption, "group": e.group, "subgroup": e.subgroup, "author": e.author, "split": split})
            if progress is not None:
                progress(n + 1, len(emojis))
    index_data = {"version": version, "licence": LICENCE, "size": size, "holdout": holdout, "seed": seed, "failed": failed, "images": index}
    (work / "openmoji-index.json").write_text(json.dumps(index_data, indent=1))
    counts = {"failed": len(failed)}
    for split in ("train", "holdout"):
        (work / split / "LICENSE").write_text(f"{LICENCE}\n\n{ATTRIBUTION}\n")
        scan = scan_folder(work / split, licence=LICENCE, source=f"{SOURCE} {version}; {ATTRIBUTION}")
        # In the folder, under the name the trainer reads its source from; its root is where it will be.
        write_manifest(dataclasses.replace(scan, root=out / split), work / split / MANIFEST_NAME)
        counts[split] = len(scan.records)
    for entry in work.iterdir():
        os.replace(entry, out / entry.name)
    work.rmdir()
    return counts
