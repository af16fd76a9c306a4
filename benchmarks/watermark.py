"""How well lienzo's invisible watermark (a tiled spread-spectrum mark in luma, 64-bit payload) survives the web, CPU.

Sets of images (512x512 unless ``--size``), marked with ``lienzo.images.watermark.embed`` as
``save_generated`` does, then looked for as saved (PNG is lossless), after JPEG re-encoding at
quality 75 with 4:2:0 chroma subsampling (Pillow's default, as most encoders and sites use) and
at 85 without it (4:4:4), after a 0.5x resize (Lanczos), after crops (5% off every edge: 19% of
the area; 10% of the width off the left side), and after 0.5x then JPEG 75 and JPEG 75 then 0.5x
(what a site that shrinks uploads does). Each cell counts the marked images detected and, after
the slash, those whose 64-bit payload read back intact.

False positives are counted on ``--unmarked`` pictures nobody marked (default 1,000: half 1/f
noise, half flat drawings, each put through one of the attacks in turn) and on every set's
unmarked images under every attack. Also: the highest sync score an unmarked image reached (the
detection threshold is ``SYNC_THRESHOLD``), how many images ``mark`` refuses (saves unmarked)
because the mark would not read back, the mean and lowest PSNR of the marked images against the
originals, and the median time to embed and to detect.

- ``tiny-model``: outputs of the tiny random SD 1.x model from tests/tiny_models.py, one Euler step
  (random weights: colourful, noise-like pictures, not what a trained model paints; its VAE
  downsamples only 2x, so a 512x512 image costs about a minute on a CPU: ``--tiny`` sets how many).
- ``1/f-noise``: colour noise with natural images' 1/f amplitude spectrum, a stand-in for photographs.
- ``drawings``: flat-coloured shapes with black outlines on white, a stand-in for icons and emoji.
- ``openmoji``: OpenMoji SVGs rasterised onto white (flat colours, black outlines, mostly white),
  from the npm package tarball when one is found (``--openmoji``); skipped otherwise.

    python benchmarks/watermark.py [--per-set 20] [--tiny 5] [--unmarked 1000] [--size 512]
"""

import argparse
import io
import os
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from lienzo.images.watermark import SYNC_THRESHOLD, detect, embed, mark  # noqa: E402

DEFAULT_OPENMOJI = Path("/work/openmoji/openmoji-17.0.0.tgz")


def tiny_model_images(count: int, size: int) -> list[Image.Image]:
    """Outputs of the tiny random SD 1.x model, seeds 0..count-1, one Euler step."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import build_tiny

    from lienzo.generation import engine
    from lienzo.generation.request import build_request

    components = build_tiny("sd1")
    prompts = ["a red apple", "a lighthouse at dusk", "a forest in the fog", "a portrait of a cat"]
    images = []
    for seed in range(count):
        request = build_request(prompt=prompts[seed % len(prompts)], steps=1, width=size, height=size, seed=seed, sampler="Euler")
        images.append(engine.generate(components, request).images[0].image)
    return images


def pink_noise_images(count: int, size: int, first_seed: int = 0) -> list[Image.Image]:
    """Colour noise whose amplitude falls as 1/frequency, as natural images' does, one seed each."""
    images = []
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    falloff = 1 / np.maximum(np.hypot(fx, fy), 1 / size)
    for seed in range(first_seed, first_seed + count):
        rng = np.random.default_rng(seed)
        channels = []
        for _ in range(3):
            spectrum = falloff * np.exp(2j * np.pi * rng.random((size, size)))
            channel = np.fft.ifft2(spectrum).real
            channels.append((channel - channel.mean()) / channel.std())
        # Mix the channels so that colours correlate, as in photographs, then map to 0..255.
        mixed = np.einsum("ij,jhw->hwi", rng.normal(0.6, 0.3, (3, 3)), np.stack(channels))
        pixels = 128 + 40 * mixed / mixed.std()
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


def drawing_images(count: int, size: int, first_seed: int = 0) -> list[Image.Image]:
    """Six to twelve flat-coloured discs and boxes with black outlines on white, one seed each."""
    images = []
    for seed in range(first_seed, first_seed + count):
        rng = np.random.default_rng(seed)
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(6, 13)):
            x, y = rng.integers(0, size, 2)
            radius = rng.integers(size // 16, size // 4)
            box = (x - radius, y - radius, x + radius, y + radius)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape(box, fill=colour, outline="black", width=max(2, size // 128))
        images.append(image)
    return images


def openmoji_images(tgz: Path, count: int, size: int) -> list[Image.Image]:
    """Every n-th colour SVG of the OpenMoji package, rasterised onto white."""
    from lienzo.training.openmoji import rasterise

    with tarfile.open(tgz, "r:gz") as tar:
        names = sorted(n for n in tar.getnames() if n.startswith("package/color/svg/") and n.endswith(".svg"))
        step = max(1, len(names) // count)
        return [rasterise(tar.extractfile(name).read(), size) for name in names[::step][:count]]


def jpeg(image: Image.Image, quality: int, subsampling: int) -> Image.Image:
    """JPEG round trip; ``subsampling`` as Pillow numbers it: 2 = 4:2:0, 0 = 4:4:4."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def png(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def half(image: Image.Image) -> Image.Image:
    return image.resize((image.width // 2, image.height // 2), Image.LANCZOS)


def crop_edges(image: Image.Image) -> Image.Image:
    """5% off every edge."""
    dx, dy = image.width // 20, image.height // 20
    return image.crop((dx, dy, image.width - dx, image.height - dy))


def crop_side(image: Image.Image) -> Image.Image:
    """10% of the width off the left."""
    return image.crop((image.width // 10, 0, image.width, image.height))


ATTACKS = {
    "as saved": png,
    "JPEG 75 4:2:0": lambda im: jpeg(im, 75, 2),
    "JPEG 85 4:4:4": lambda im: jpeg(im, 85, 0),
    "0.5x": half,
    "crop 5% each edge": crop_edges,
    "crop 10% one side": crop_side,
    "0.5x, JPEG 75": lambda im: jpeg(half(im), 75, 2),
    "JPEG 75, 0.5x": lambda im: half(jpeg(im, 75, 2)),
}


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def measure(name: str, images: list[Image.Image]) -> dict:
    embed_s, detect_s = [], []
    marked = []
    for image in images:
        start = time.perf_counter()
        marked.append(embed(image))
        embed_s.append(time.perf_counter() - start)
    row = {"set": name, "n": len(images)}
    for attack, transform in ATTACKS.items():
        found = []
        for image in marked:
            attacked = transform(image)
            start = time.perf_counter()
            found.append(detect(attacked))
            detect_s.append(time.perf_counter() - start)
        row[attack] = (sum(f.detected for f in found), sum(f.payload is not None for f in found))
    unmarked = [detect(transform(image)) for image in images for transform in ATTACKS.values()]
    row["false +"] = (sum(found.detected for found in unmarked), len(unmarked))
    row["unmarked max"] = max(found.score for found in unmarked)
    row["refused"] = sum(not mark(image).watermarked for image in images)
    scores = [psnr(a, b) for a, b in zip(images, marked, strict=True)]
    row["psnr"] = (np.mean(scores), np.min(scores))
    row["embed ms"] = 1000 * np.median(embed_s)
    row["detect ms"] = 1000 * np.median(detect_s)
    return row


def false_positives(count: int, size: int) -> tuple[int, int, float]:
    """Unmarked pictures (half 1/f noise, half drawings, seeds unused above), each through the next attack.

    Returns how many were detected, how many were looked at, and the highest sync score.
    """
    transforms = list(ATTACKS.values())
    detected, highest = 0, 0.0
    for index in range(count):
        make = pink_noise_images if index % 2 == 0 else drawing_images
        image = make(1, size, first_seed=10_000 + index)[0]
        found = detect(transforms[index % len(transforms)](image))
        detected += found.detected
        highest = max(highest, found.score)
    return detected, count, highest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-set", type=int, default=20, help="images in each set but tiny-model's")
    parser.add_argument("--tiny", type=int, default=5, help="tiny-model images (about a minute each at 512x512)")
    parser.add_argument("--unmarked", type=int, default=1000, help="extra unmarked pictures for the false-positive count")
    parser.add_argument("--size", type=int, default=512, help="side of the square images")
    parser.add_argument("--openmoji", type=Path, default=DEFAULT_OPENMOJI, help="the npm openmoji package tarball")
    args = parser.parse_args()

    sets = {}
    if args.tiny:
        sets["tiny-model"] = tiny_model_images(args.tiny, args.size)
    sets["1/f-noise"] = pink_noise_images(args.per_set, args.size)
    sets["drawings"] = drawing_images(args.per_set, args.size)
    if args.openmoji.is_file():
        sets["openmoji"] = openmoji_images(args.openmoji, args.per_set, args.size)
    else:
        print(f"openmoji: {args.openmoji} not found, set skipped")
    rows = [measure(name, images) for name, images in sets.items()]
    extra = false_positives(args.unmarked, args.size)

    attacks = list(ATTACKS)
    header = ["set", "n", *attacks, "false +", "unmarked max", "refused", "PSNR dB mean (min)", "embed ms", "detect ms"]
    print(f"\nTiled spread-spectrum luma mark, 64-bit payload; {args.size}x{args.size}; detected at sync >= {SYNC_THRESHOLD}")
    print("cells: images detected / payload read back intact, of n; false +: unmarked images detected (each under every attack)")
    print("unmarked max: highest sync score of an unmarked image; refused: mark() saved the image unmarked; PSNR: marked vs original")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        cells = [row["set"], str(row["n"]), *(f"{row[a][0]}/{row[a][1]}" for a in attacks)]
        cells += [f"{row['false +'][0]}/{row['false +'][1]}", f"{row['unmarked max']:.2f}", f"{row['refused']}/{row['n']}"]
        cells += [f"{row['psnr'][0]:.1f} ({row['psnr'][1]:.1f})", f"{row['embed ms']:.0f}", f"{row['detect ms']:.0f}"]
        print(" | ".join(cells))
    total = sum(row["false +"][1] for row in rows) + extra[1]
    found = sum(row["false +"][0] for row in rows) + extra[0]
    print(f"\nunmarked pictures: {extra[0]} of {extra[1]} extra (1/f noise and drawings, one attack each) detected, highest sync {extra[2]:.2f};")
    print(f"with each set's unmarked images under every attack: {found} of {total}")


if __name__ == "__main__":
    main()
