"""Training data: every file judged, captions and labels read, manifest stable, tensors exact; the CLI reports it."""

import hashlib
import io
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from lienzo.cli import app
from lienzo.errors import DatasetError
from lienzo.training.data import ImageDataset, ImageRecord, scan_folder
from lienzo.training.manifest import manifest_summary, read_manifest, write_manifest

VALID = ["a.png", "b.jpg", "cats/c1.png", "cats/c2.webp", "dogs/d1.bmp", "dogs/d2.gif", "dogs/deep/d3.png"]


def _random_image(seed: int, size=(40, 24), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path) -> Path:
    """Seven valid images (two labels, RGBA and palette among them), captions, and one of every kind of trouble."""
    root = tmp_path / "data"
    for sub in ("cats", "dogs/deep", ".cache"):
        (root / sub).mkdir(parents=True)
    _random_image(0, mode="RGBA").save(root / "a.png")
    _random_image(1, (30, 50)).save(root / "b.jpg", quality=95)
    _random_image(2).save(root / "cats/c1.png")
    _random_image(3, (64, 64)).save(root / "cats/c2.webp", lossless=True)
    _random_image(4).save(root / "dogs/d1.bmp")
    _random_image(5, mode="P").save(root / "dogs/d2.gif")
    _random_image(6).save(root / "dogs/deep/d3.png")
    (root / "a.txt").write_text("  a red square \n")
    (root / "cats/c1.caption").write_text("a cat")
    (root / "cats/c2.txt").write_text("")
    (root / "zz-copy.png").write_bytes((root / "a.png").read_bytes())
    (root / "cats/broken.png").write_bytes(np.random.default_rng(7).bytes(300))
    jpeg = _encoded(_random_image(8), "JPEG")
    (root / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "notes.pdf").write_bytes(b"%PDF-1.4")
    (root / "orphan.txt").write_text("a caption for nothing")
    (root / ".DS_Store").write_bytes(b"\0")
    (root / ".cache/hidden.png").write_bytes(b"not even an image")
    (root / "LICENSE.md").write_text("\n  CC BY-SA 4.0  \n\nfull text follows\n")
    return root


def test_scan_sorts_images_from_problems(folder):
    scan = scan_folder(folder)
    assert [r.path for r in scan.records] == VALID
    problems = {p.path: p.kind for p in scan.problems}
    assert problems == {"cats/broken.png": "corrupt", "cut.jpg": "truncated", "notes.pdf": "not an image", "orphan.txt": "not an image"}
    assert scan.duplicates == [["a.png", "zz-copy.png"]]
    assert scan.files_seen == len(VALID) + len(problems) + 1 == 12
    a = scan.records[0]
    assert (a.width, a.height, a.sha256) == (40, 24, hashlib.sha256((folder / "a.png").read_bytes()).hexdigest())
    assert scan.records[1].width == 30 and scan.records[1].height == 50


def test_captions_and_labels(folder):
    records = {r.path: r for r in scan_folder(folder).records}
    assert records["a.png"].caption == "a red square"
    assert records["cats/c1.png"].caption == "a cat"
    assert records["cats/c2.webp"].caption == ""
    assert records["b.jpg"].caption is None
    assert [records[p].label for p in VALID] == [None, None, "cats", "cats", "dogs", "dogs", "dogs"]
    scan = scan_folder(folder)
    assert scan.labels == {"cats": 2, "dogs": 3} and scan.captioned == 2


def test_licence_from_file_or_argument(folder):
    scan = scan_folder(folder)
    assert (scan.licence, scan.licence_file, scan.source) == ("CC BY-SA 4.0", "LICENSE.md", None)
    scan = scan_folder(folder, licence="MIT", source="my photos")
    assert (scan.licence, scan.licence_file, scan.source) == ("MIT", None, "my photos")


def test_unreadable_and_too_large_are_reported_not_raised(folder, monkeypatch):
    # chmod cannot take read access away from root, and tests often run as root: refuse the read instead.
    read_bytes = Path.read_bytes

    def refuse(path):
        if path.name == "b.jpg":
            raise PermissionError(13, "Permission denied")
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    # Pillow refuses images over twice this many pixels as decompression bombs; 64x64 is the largest here.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 2 - 1)
    problems = {p.path: (p.kind, p.detail) for p in scan_folder(folder).problems}
    assert problems["b.jpg"] == ("unreadable", "Permission denied")
    assert problems["cats/c2.webp"][0] == "too large"


def test_progress_counts_every_candidate(folder):
    calls = []
    scan_folder(folder, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 12) for i in range(1, 13)]


def test_manifest_round_trip_and_stable_bytes(folder, tmp_path):
    scan = scan_folder(folder)
    first, second = tmp_path / "m1.json", tmp_path / "m2.json"
    digest = write_manifest(scan, first)
    write_manifest(scan_folder(folder), second)
    assert digest == hashlib.sha256(first.read_bytes()).hexdigest()
    manifest = read_manifest(first)
    assert [ImageRecord(**r) for r in manifest["images"]] == scan.records
    assert manifest["problems"] == [asdict(p) for p in scan.problems] and manifest["duplicates"] == scan.duplicates

    def without_created(path):
        return [line for line in path.read_text().splitlines() if '"created"' not in line]

    assert without_created(first) == without_created(second)
    assert manifest_summary(manifest, digest) == {
        "images": 7, "captioned": 2, "labels": {"cats": 2, "dogs": 3}, "licence": "CC BY-SA 4.0", "licence_file": "LICENSE.md",
        "source": None, "notice": "full text follows", "sha256": digest, "problems": 4, "duplicates": 1,
    }


def test_manifest_in_the_folder_is_not_scanned(folder):
    write_manifest(scan_folder(folder), folder / "renamed.json")
    assert scan_folder(folder).files_seen == 12


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"{not json", "is not valid JSON"),
        (b'{"format": "something else"}', "is not a lienzo dataset manifest"),
        (b'{"format": "lienzo-dataset-manifest", "version": 99}', "has version 99"),
        (b'{"format": "lienzo-dataset-manifest", "version": 1, "counts": {}}', "lacks root"),
    ],
)
def test_read_manifest_errors(tmp_path, content, message):
    path = tmp_path / "manifest.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        read_manifest(path)


def test_unwritable_manifest_leaves_no_file(folder, tmp_path):
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(DatasetError, match=r"^out: cannot write .*file.txt/m.json"):
        write_manifest(scan_folder(folder), tmp_path / "file.txt" / "m.json", field="out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "file.txt"]


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"^data: .*missing does not exist$"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"^data: .*file.png is not a folder$"):
        scan_folder(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no valid images in .*empty \(found no files"):
        scan_folder(tmp_path / "empty").require_images()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"")
    (broken / "y.doc").write_bytes(b"doc")
    with pytest.raises(DatasetError, match=r"no valid images in .*broken \(2 files seen: 1 corrupt, 1 not an image\)$"):
        scan_folder(broken).require_images()


def test_dataset_tensors_exact_and_deterministic(folder):
    records = scan_folder(folder).records
    dataset = ImageDataset(folder, records, resolution=16)
    assert len(dataset) == 7
    for index in range(len(dataset)):
        item = dataset[index, False]
        pixels = item["pixels"]
        assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
        assert pixels.min() >= -1 and pixels.max() <= 1
        assert torch.equal(pixels, dataset[index, False]["pixels"])
        assert torch.equal(dataset[index, True]["pixels"], torch.flip(pixels, dims=[-1]))
    item = dataset[2, True]
    assert (item["caption"], item["label"], item["index"]) == ("a cat", "cats", 2)
    assert (dataset[1, False]["caption"], dataset[1, False]["label"]) == ("", "")


@pytest.mark.parametrize("name", ["half.png", "half.gif"])
def test_dataset_composites_transparency_on_white(tmp_path, name):
    image = Image.new("RGBA", (32, 64), (255, 0, 0, 255))
    image.paste((0, 0, 0, 0), (0, 0, 32, 32))
    image.save(tmp_path / name)  # the GIF is saved as a palette image with a transparent index
    scan = scan_folder(tmp_path)
    pixels = ImageDataset(tmp_path, scan.records, resolution=32)[0, False]["pixels"]
    # The centre crop of a 32x64 image spans rows 16 to 47: transparent above row 32, red below.
    assert torch.equal(pixels[:, :16], torch.ones(3, 16, 32))
    assert torch.equal(pixels[:, 16:], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 16, 32))


def _check(*args):
    return CliRunner().invoke(app, ["dataset", "check", *map(str, args)], catch_exceptions=False)


def test_cli_check_reports_and_writes_manifest(folder):
    result = _check(folder, "--source", "camera roll")
    assert result.exit_code == 0, result.output
    for text in ("files seen: 12", "valid images: 7", "40x24 / 40x24 / 64x64", "captioned: 2 of 7", "cats 2, dogs 3", "CC BY-SA 4.0",
                 "cut.jpg", "truncated", "notes.pdf", "kept a.png, skipped zz-copy.png"):
        assert text in result.stdout, text
    manifest = read_manifest(folder / "lienzo-manifest.json")
    assert manifest["source"] == "camera roll"
    assert hashlib.sha256((folder / "lienzo-manifest.json").read_bytes()).hexdigest() in result.stdout


def test_a_later_scan_keeps_what_the_folder_manifest_says(folder):
    """``dataset check --source/--licence`` once, then every scan (the trainer's too) records them."""
    (folder / "LICENSE.md").unlink()
    assert _check(folder, "--source", "camera roll", "--licence", "CC0-1.0").exit_code == 0
    scan = scan_folder(folder)
    assert (scan.source, scan.licence, scan.licence_file) == ("camera roll", "CC0-1.0", None)
    assert scan_folder(folder, source="my photos").source == "my photos"  # the caller's word still wins
    (folder / "LICENSE").write_text("MIT License\n")
    assert scan_folder(folder).licence == "MIT License"  # a licence file says more than an old manifest
    (folder / "lienzo-manifest.json").write_text('{"format": "lienzo-dataset-manifest", "version": 99}')
    assert scan_folder(folder).source is None  # an unreadable manifest is passed over, with a warning


def test_cli_check_licence_override_and_manifest_path(folder, tmp_path):
    result = _check(folder, "--licence", "CC0-1.0", "--manifest", tmp_path / "out/m.json")
    assert result.exit_code == 0 and "licence: CC0-1.0" in result.stdout
    assert read_manifest(tmp_path / "out/m.json")["licence"] == "CC0-1.0"


def test_cli_check_errors_are_one_line(folder, tmp_path):
    (tmp_path / "file.txt").write_text("")
    result = _check(folder, "--manifest", tmp_path / "file.txt/manifest.json")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: --manifest: cannot write" in result.stderr and "file.txt/manifest.json" in result.stderr

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"\x89PNG garbage")
    result = _check(broken)
    assert result.exit_code == 2
    assert "x.png" in result.stdout and "corrupt" in result.stdout
    assert "error: data: no valid images in" in result.stderr
    assert not (broken / "lienzo-manifest.json").exists()

    result = _check(tmp_path / "nowhere")
    assert result.exit_code == 2 and "does not exist" in result.stderr
