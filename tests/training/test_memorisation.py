"""The memorisation check: exact and re-encoded copies of training images are flagged, new pictures pass."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from lienzo.training.data import scan_folder
from lienzo.training.memorisation import MemorisationCheck, tiny_features


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """Twelve different pictures: coloured shapes on white at different places."""
    root = tmp_path_factory.mktemp("memorise")
    rng = np.random.default_rng(3)
    for i in range(12):
        array = np.full((96, 96, 3), 255, np.uint8)
        x, y = rng.integers(0, 60, 2)
        array[y : y + 36, x : x + 36] = rng.integers(0, 200, 3)
        Image.fromarray(array).save(root / f"shape-{i:02d}.png")
    return root, scan_folder(root).records


def _jpeg(image: Image.Image, quality: int = 85) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_features_are_unit_length_and_mean_free():
    features = tiny_features([Image.new("RGB", (40, 30), (10, 200, 30)), Image.effect_noise((64, 64), 40)])
    assert features.shape == (2, 768)
    assert np.allclose(features[1].sum(), 0, atol=1e-3) and np.isclose(np.linalg.norm(features[1]), 1, atol=1e-5)


def test_copies_are_flagged_with_the_training_file_and_new_pictures_pass(training, caplog):
    root, records = training
    check = MemorisationCheck(root, records, threshold=0.01)
    copy = Image.open(root / "shape-04.png").convert("RGB")
    reencoded = _jpeg(copy.resize((128, 128)))
    fresh = Image.new("RGB", (96, 96), "white")
    fresh.paste((30, 90, 200), (10, 50, 90, 70))  # a wide bar: no training picture has one
    nearest = check.nearest([copy, reencoded, fresh])
    assert [m.file for m in nearest[:2]] == ["shape-04.png", "shape-04.png"]
    assert nearest[0].distance < 1e-4 and nearest[1].distance < 0.01 and nearest[2].distance > 0.05
    with caplog.at_level(logging.WARNING, logger="lienzo.training.memorisation"):
        copies = check.copies([copy, reencoded, fresh], "samples at step 9")
    assert [m.index for m in copies] == [0, 1]
    assert "samples at step 9: 2 of 3 images look copied" in caplog.text and "shape-04.png" in caplog.text
    assert check.copies([fresh], "fresh") == []
