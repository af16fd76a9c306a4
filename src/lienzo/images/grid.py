"""Image grids with optional row labels, for training samples and side-by-side comparisons, and the
labelled grids of X/Y/Z plots."""

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


def labelled_grid(rows: list[list[Image.Image]], columns: list[str], row_labels: list[str], title: str = "") -> Image.Image:
    """An X/Y plot as A1111 draws one: ``columns`` above the images, ``row_labels`` at their left, and
    ``title`` (the z value) on top, in a font sized to the images (legible at 100%)."""
    w, h = rows[0][0].size
    size = max(14, min(40, w // 12))
    font = ImageFont.load_default(size=size)
    pad = size // 2
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max([0, *(measure.textlength(label, font=font) for label in row_labels)]) + 2 * pad if any(row_labels) else 0
    top = (size + 2 * pad if any(columns) else 0) + (size + 2 * pad if title else 0)
    grid = Image.new("RGB", (int(left) + len(rows[0]) * w, top + len(rows) * h), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((grid.width // 2, pad), title, fill="black", font=font, anchor="mt")
    for c, label in enumerate(columns):
        draw.text((int(left) + c * w + w // 2, top - pad), label, fill="black", font=font, anchor="mb")
    for r, row in enumerate(rows):
        if r < len(row_labels):
            draw.text((int(left) - pad, top + r * h + h // 2), row_labels[r], fill="black", font=font, anchor="rm")
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((w, h)), (int(left) + c * w, top + r * h))
    return grid
