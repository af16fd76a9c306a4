"""Does a model copy its training images? Nearest training neighbour in a cheap feature space.

The features are "tiny images" (Torralba et al. 2008): the picture shrunk to 16x16 RGB, its mean
subtracted, unit length. Cosine distance in that space is 0 for a copy (also a resized or re-encoded
one) and grows with any change of layout or colour; it needs no network, so the trainer can run it
after every sample grid. ``lienzo eval`` uses a domain classifier's features for the same question.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lienzo.training.data import ImageRecord

log = logging.getLogger(__name__)

SIDE = 16
# Measured on OpenMoji at 128 px: a training image resized to 96 px and saved as JPEG q85 stays within
# 0.003 of itself (300 images), while the median distance between distinct training images and their
# nearest neighbour is 0.022. Emoji families sit closer (skin-tone and gender variants: 40% of the
# 4,051 images have one within 0.01), so on such data a flagged output may copy a close variant; the
# warning names the files to look at. The trainer's threshold (``samples.memorisation``) is 0.01.


def tiny_features(images: list[Image.Image]) -> np.ndarray:
    """N x (16*16*3) float32: each image shrunk to 16x16 RGB, mean-centred, unit length."""
    rows = []
    for image in images:
        small = np.asarray(image.convert("RGB").resize((SIDE, SIDE), Image.BOX), dtype=np.float32).reshape(-1)
        small = small - small.mean()
        rows.append(small / max(float(np.linalg.norm(small)), 1e-6))
    return np.stack(rows) if rows else np.zeros((0, SIDE * SIDE * 3), np.float32)


@dataclass
class Match:
    """A generated image's nearest training image."""

    index: int  # of the generated image
    file: str  # training file, relative to the data folder
    distance: float  # cosine distance in tiny-image space

    def is_copy(self, threshold: float) -> bool:
        return self.distance < threshold


class MemorisationCheck:
    """Compares generated images with a training set; training features are computed once."""

    def __init__(self, root: Path, records: list[ImageRecord], threshold: float):
        self.root, self.records, self.threshold = Path(root), records, threshold
        self._features: np.ndarray | None = None

    def _training(self) -> np.ndarray:
        if self._features is None:
            rows = []
            for record in self.records:
                with Image.open(self.root / record.path) as image:
                    rows.append(tiny_features([image])[0])
            self._features = np.stack(rows)
        return self._features

    def nearest(self, images: list[Image.Image]) -> list[Match]:
        """Every image's nearest training image."""
        if not images or not self.records:
            return []
        distance = 1 - tiny_features(images) @ self._training().T
        best = distance.argmin(axis=1)
        return [Match(i, self.records[j].path, float(distance[i, j])) for i, j in enumerate(best)]

    def copies(self, images: list[Image.Image], what: str) -> list[Match]:
        """The images closer to a training image than the threshold, with a warning naming the files."""
        found = [m for m in self.nearest(images) if m.is_copy(self.threshold)]
        if found:
            named = ", ".join(f"#{m.index} ~ {m.file} ({m.distance:.4f})" for m in found[:5])
            log.warning(
                "%s: %d of %d images look copied from the training set (tiny-image distance < %g): %s",
                what, len(found), len(images), self.threshold, named,
            )
        return found
