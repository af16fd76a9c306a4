"""Small captioned pictures for training tests, written into a folder with a CC0 LICENSE."""

from pathlib import Path

import numpy as np
from PIL import Image


def captioned_blobs(root: Path, *, noise: float = 30, varied: bool = False, caption: str = "a blob, picture {i}") -> Path:
    """Six noisy one-colour pictures with ``caption`` (``{i}``: the picture's number) beside each.
    ``varied``: the last three of odd sizes (resized and cropped by the dataset), the last with transparency."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        height, width = (70 + i, 90 - i) if varied and i >= 3 else (64, 64)
        array = np.clip(rng.normal(rng.integers(0, 256, 3), noise, (height, width, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
        if varied and i == 5:
            alpha = rng.integers(0, 256, (height, width)).astype(np.uint8)
            image = Image.fromarray(np.dstack([array, alpha]), "RGBA")
        image.save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(caption.format(i=i))
    (root / "LICENSE").write_text("CC0 1.0\n")
    return root
