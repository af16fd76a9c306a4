"""Small pictures for tests: captioned ones for training, written into a folder with a CC0 LICENSE, and control maps."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


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


def control_map(seed: int, size: int = 64) -> Image.Image:
    """A white-on-black line drawing, as a ControlNet reads an edge map; ``seed`` moves its shapes."""
    image = Image.new("RGB", (size, size), "black")
    draw = ImageDraw.Draw(image)
    draw.rectangle((8 + seed * 4, 10, 40, 50), outline="white", width=3)
    draw.ellipse((30, 5 + seed * 3, 60, 35), outline="white", width=2)
    return image
