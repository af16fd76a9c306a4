"""OpenMoji preparation on a small package built like the npm one: rasterised, captioned, split, attributed."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lienzo.cli import app
from lienzo.errors import DatasetError
from lienzo.training.data import scan_folder
from lienzo.training.manifest import read_manifest
from lienzo.training.openmoji import Emoji, holdout_split, prepare_openmoji

SVG = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><circle cx="36" cy="36" r="{r}" fill="{fill}"/></svg>'
# cairosvg cannot draw a marker that points at nothing; the package has one such file.
BROKEN = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><path d="M0 0L9 9" marker-end="url(#gone)"/></svg>'


def _package(path: Path) -> Path:
    entries, files = [], {}
    for i in range(24):
        subgroup = "face-smiling" if i < 12 else "fruit"
        code = f"1F6{i:02X}"
        base = {"hexcode": code, "group": "smileys" if i < 12 else "food", "subgroups": subgroup,
                "annotation": f"thing {i}", "tags": "round, happy" if i % 2 else "", "openmoji_tags": "", "openmoji_author": "A. Artist",
                "skintone_base_hexcode": "1F601" if i == 2 else ""}
        entries.append(base)
        files[f"package/color/svg/{code}.svg"] = (BROKEN if i == 23 else SVG.format(r=10 + i, fill="#d22f27")).encode()
    files["package/data/openmoji.json"] = json.dumps(entries).encode()
    files["package/package.json"] = b'{"name": "openmoji", "version": "17.0.0"}'
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_prepare_rasterises_captions_splits_and_attributes(tmp_path):
    package = _package(tmp_path / "openmoji-17.0.0.tgz")
    counts = prepare_openmoji(package, tmp_path / "om", size=64, holdout=0.25, seed=1)
    assert counts == {"failed": 1, "train": 17, "holdout": 6}  # 3 of 12 per subgroup held out, one SVG undrawable
    om = tmp_path / "om"
    image = Image.open(om / "train" / "smileys" / "1F600.png")
    assert image.size == (64, 64) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[32, 32]) == (210, 47, 39)  # on white, in colour
    index = json.loads((om / "openmoji-index.json").read_text())
    assert index["failed"] == ["1F617"] and index["licence"] == "CC BY-SA 4.0"
    # A skin-tone variant without tags borrows its base emoji's.
    two = next(e for e in index["images"] if e["hexcode"] == "1F602")
    assert two["caption"] == "thing 2, round, happy" and two["author"] == "A. Artist"
    held = [e for e in index["images"] if e["split"] == "holdout"]
    assert sorted(e["subgroup"] for e in held) == ["face-smiling"] * 3 + ["fruit"] * 3
    assert (om / held[0]["path"]).is_file()
    manifest = read_manifest(om / "train" / "lienzo-manifest.json")
    assert manifest["licence"] == "CC BY-SA 4.0" and "openmoji.org" in manifest["source"]
    assert manifest["root"] == str(om / "train")
    assert scan_folder(om / "train").source == manifest["source"]  # what the trainer will record
    assert len(manifest["images"]) == 17 and all(len(i["sha256"]) == 64 and i["caption"] for i in manifest["images"])
    assert "OpenMoji" in (om / "train" / "LICENSE").read_text()
    assert not (om / ".openmoji.tmp").exists()
    with pytest.raises(DatasetError, match="already holds"):
        prepare_openmoji(package, om)


def test_holdout_is_stratified_and_seeded():
    emojis = [Emoji(f"{g}{i}", "x", [], "g", g, "") for g in ("a", "b") for i in range(40)]
    held = holdout_split(emojis, 0.05, seed=0)
    assert sum(h.startswith("a") for h in held) == 2 and sum(h.startswith("b") for h in held) == 2
    assert held == holdout_split(emojis, 0.05, seed=0) != holdout_split(emojis, 0.05, seed=1)


def test_cli_and_a_wrong_package(tmp_path):
    package = _package(tmp_path / "openmoji.tgz")
    result = CliRunner().invoke(app, ["dataset", "openmoji", str(package), str(tmp_path / "om"), "--size", "32"])
    assert result.exit_code == 0, result.output
    assert "held-out images, CC BY-SA 4.0" in result.output and "1 SVGs could not be drawn" in result.output
    (tmp_path / "junk.tgz").write_bytes(b"junk")
    bad = CliRunner().invoke(app, ["dataset", "openmoji", str(tmp_path / "junk.tgz"), str(tmp_path / "om2")])
    assert bad.exit_code == 2 and "is not the npm openmoji package" in bad.output
