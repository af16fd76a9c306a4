"""How well lienzo's invisible watermark (invisible-watermark's DWT-DCT, 48-bit payload) survives, CPU.

Three sets of 512x512 images, marked with ``lienzo.images.watermark.embed`` as ``save_generated``
does, then looked for as saved (PNG is lossless), after JPEG re-encoding at quality 85 with the
usual 4:2:0 chroma subsampling (Pillow's default, as most encoders and sites use) and without it
(4:4:4), after a 0.5x resize (Lanczos), and after 0.5x and back up to 512 (bicubic). The same
images unmarked give the false-positive rate and the most bits an unmarked image matched. Also:
how many images ``mark`` refuses (saves unmarked) because the mark would not read back, the mean
PSNR of the marked images against the originals, and the median time to embed and to detect.

- ``tiny-model``: outputs of the tiny random SD 1.x model from tests/tiny_models.py at 512x512, one
  Euler step (random weights: colourful, noise-like pictures, not what a trained model paints; its VAE
  downsamples only 2x, so a 512x512 image is a 256x256 latent and costs about a minute on a CPU).
- ``1/f-noise``: colour noise with natural images' 1/f amplitude spectrum, a stand-in for photographs.
- ``openmoji``: OpenMoji SVGs rasterised at 512x512 onto white (flat colours, black outlines, mostly
  white), from the npm package tarball when one is found (``--openmoji``); skipped otherwise.

    python benchmarks/watermark.py [--per-set 10] [--openmoji /work/openmoji/openmoji-17.0.0.tgz]
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
from PIL import Image  # noqa: E402

from lienzo.images.watermark import detect, embed, mark  # noqa: E402

SIZE = 512
DEFAULT_OPENMOJI = Path("/work/openmoji/openmoji-17.0.0.tgz")


def tiny_model_images(count: int) -> list[Image.Image]:
    """512x512 outputs of the tiny random SD 1.x model, seeds 0..count-1, one Euler step."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import build_tiny

    from lienzo.generation import engine
    from lienzo.generation.request import build_request

    components = build_tiny("sd1")
    prompts = ["a red apple", "a lighthouse at dusk", "a forest in the fog", "a portrait of a cat"]
    images = []
    for seed in range(count):
        request = build_request(prompt=prompts[seed % len(prompts)], steps=1, width=SIZE, height=SIZE, seed=seed, sampler="Euler")
        images.append(engine.generate(components, request).images[0].image)
    return images


def pink_noise_images(count: int) -> list[Image.Image]:
    """Colour noise whose amplitude falls as 1/frequency, as natural images' does, one seed each."""
    images = []
    fy, fx = np.meshgrid(np.fft.fftfreq(SIZE), np.fft.fftfreq(SIZE), indexing="ij")
    falloff = 1 / np.maximum(np.hypot(fx, fy), 1 / SIZE)
    for seed in range(count):
        rng = np.random.default_rng(seed)
        channels = []
        for _ in range(3):
            spectrum = falloff * np.exp(2j * np.pi * rng.random((SIZE, SIZE)))
            channel = np.fft.ifft2(spectrum).real
            channels.append((channel - channel.mean()) / channel.std())
        # Mix the channels so that colours correlate, as in photographs, then map to 0..255.
        mixed = np.einsum("ij,jhw->hwi", rng.normal(0.6, 0.3, (3, 3)), np.stack(channels))
        pixels = 128 + 40 * mixed / mixed.std()
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


def openmoji_images(tgz: Path, count: int) -> list[Image.Image]:
    """Every n-th colour SVG of the OpenMoji package, rasterised onto white."""
    from lienzo.training.openmoji import rasterise

    with tarfile.open(tgz, "r:gz") as tar:
        names = sorted(n for n in tar.getnames() if n.startswith("package/color/svg/") and n.endswith(".svg"))
        step = max(1, len(names) // count)
        return [rasterise(tar.extractfile(name).read(), SIZE) for name in names[::step][:count]]


def jpeg(image: Image.Image, quality: int = 85, subsampling: int = 2) -> Image.Image:
    """JPEG round trip; ``subsampling`` as Pillow numbers it: 2 = 4:2:0, 0 = 4:4:4."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def png(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


ATTACKS = {
    "as saved": png,
    "JPEG 85 4:2:0": jpeg,
    "JPEG 85 4:4:4": lambda im: jpeg(im, subsampling=0),
    "0.5x": lambda im: im.resize((SIZE // 2, SIZE // 2), Image.LANCZOS),
    "0.5x, back to 1x": lambda im: im.resize((SIZE // 2, SIZE // 2), Image.LANCZOS).resize((SIZE, SIZE), Image.BICUBIC),
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
        hits = 0
        for image in marked:
            attacked = transform(image)
            start = time.perf_counter()
            hits += detect(attacked).detected
            detect_s.append(time.perf_counter() - start)
        row[attack] = hits
    unmarked = [detect(transform(image)) for image in images for transform in ATTACKS.values()]
    row["false +"] = sum(found.detected for found in unmarked)
    row["unmarked max"] = max(found.matching_bits for found in unmarked)
    row["refused"] = sum(not mark(image).watermarked for image in images)
    row["psnr"] = np.mean([psnr(a, b) for a, b in zip(images, marked, strict=True)])
    row["embed ms"] = 1000 * np.median(embed_s)
    row["detect ms"] = 1000 * np.median(detect_s)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-set", type=int, default=10, help="images in each set")
    parser.add_argument("--openmoji", type=Path, default=DEFAULT_OPENMOJI, help="the npm openmoji package tarball")
    args = parser.parse_args()

    sets = {"tiny-model": tiny_model_images(args.per_set), "1/f-noise": pink_noise_images(args.per_set)}
    if args.openmoji.is_file():
        sets["openmoji"] = openmoji_images(args.openmoji, args.per_set)
    else:
        print(f"openmoji: {args.openmoji} not found, set skipped")
    rows = [measure(name, images) for name, images in sets.items()]

    attacks = list(ATTACKS)
    header = ["set", "n", *attacks, "false +", "unmarked max", "refused", "PSNR dB", "embed ms", "detect ms"]
    print(f"\nDWT-DCT, 48-bit payload, detected at <= 6 wrong bits; {SIZE}x{SIZE}; counts are images detected of n")
    print(f"false +: unmarked images detected, of n x {len(attacks)} (each attack); unmarked max: most bits of 48 one matched")
    print("refused: mark() found the mark would not read back and saved the image unmarked; PSNR: marked vs original")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        cells = [row["set"], str(row["n"]), *(f"{row[a]}/{row['n']}" for a in attacks)]
        cells += [f"{row['false +']}/{row['n'] * len(attacks)}", str(row["unmarked max"]), f"{row['refused']}/{row['n']}"]
        cells += [f"{row['psnr']:.1f}"]
        cells += [f"{row['embed ms']:.0f}", f"{row['detect ms']:.0f}"]
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
