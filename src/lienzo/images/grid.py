"""Image grids with optional row labels, for training samples and side-by-side comparisons."""

from PIL import Image, ImageDraw, ImageFont

_LABEL_HEIGHT = 14


def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None, gap: int = 2) -> Image.Image:
    """Tile ``rows`` of equally sized images on white; ``labels`` are written above each row."""
    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one image")
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    band = _LABEL_HEIGHT if labels else 0
    grid = Image.new("RGB", (cols * (w + gap) + gap, len(rows) * (h + gap + band) + gap), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r, row in enumerate(rows):
        top = gap + r * (h + gap + band)
        if labels:
            draw.text((gap, top), labels[r][: max(8, cols * w // 6)], fill="black", font=font)
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((w, h)), (gap + c * (w + gap), top + band))
    return grid
