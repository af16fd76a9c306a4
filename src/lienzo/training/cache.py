"""What a stage reads every step, held on the training device: every image's pixels, the UNet stage's
latents, and every image's prompts as token ids.

Decoding and resizing files every step keeps a GPU waiting on one CPU thread: OpenMoji at 256² is
4,000 PNGs, but only 0.8 GB as uint8, so the pixels are decoded once (on every core) and kept on the
device. Values are the ones ``ImageDataset`` gives, to the bit; only where they live changes.
"""

import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from lienzo.training.config import Data
from lienzo.training.data import ImageDataset, ImageRecord, to_unit
from lienzo.training.stream import sample_seed

log = logging.getLogger(__name__)

# Data sets larger than this (as uint8 at the training resolution) are read from disk every step instead.
PIXEL_CACHE_BYTES = 4 * 2**30
_VARIANT_STREAM = 7  # sample_seed's second part for caption variants, apart from the stages' (0, 1)


class Pixels:
    """Training images as [-1, 1] tensors on the device, by (record index, mirror)."""

    def __init__(self, dataset: ImageDataset, device: torch.device, limit: int = PIXEL_CACHE_BYTES):
        self.dataset, self.device = dataset, device
        self.store: torch.Tensor | None = None
        size = len(dataset) * 3 * dataset.resolution**2
        if size > limit:
            log.info("data: %.1f GB of pixels is over the cache's %.1f GB; images are read from disk every step", size / 1e9, limit / 1e9)
            return
        # Pillow releases the GIL while it decodes and resizes, so threads use every core.
        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            images = list(pool.map(dataset.uint8, range(len(dataset))))
        self.store = torch.stack(images).to(device)

    def get(self, index: int, flip: bool) -> torch.Tensor:
        if self.store is None:
            return self.dataset[(index, flip)]["pixels"].to(self.device)
        pixels = to_unit(self.store[index])
        return pixels.flip(-1) if flip else pixels

    def batch(self, keys: list[tuple[int, bool]]) -> torch.Tensor:
        return torch.stack([self.get(i, flip) for i, flip in keys])


@dataclass
class Latents:
    """Posterior mean and std of every image (and its mirror, when the data flips), one row per key."""

    mean: torch.Tensor
    std: torch.Tensor
    flip: bool

    def take(self, keys: list[tuple[int, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.tensor([2 * i + f if self.flip else i for i, f in keys], device=self.mean.device)
        return self.mean[rows], self.std[rows]


@torch.no_grad()
def encode_latents(vae, pixels: Pixels, flip: bool, chunk: int = 16) -> Latents:
    """Every image encoded once, in fixed chunks (the same chunks on every device, so the same numbers)."""
    keys = [(i, f) for i in range(len(pixels.dataset)) for f in ((False, True) if flip else (False,))]
    means, stds = [], []
    for start in range(0, len(keys), chunk):
        dist = vae.encode(pixels.batch(keys[start : start + chunk])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return Latents(torch.cat(means), torch.cat(stds), flip)


@dataclass
class Prompts:
    """Token ids of every training image's prompt variants (N x variants x length), and of the empty prompt."""

    ids: torch.Tensor
    empty: torch.Tensor

    @property
    def variants(self) -> int:
        return self.ids.shape[1]


def caption_variants(caption: str, data: Data, seed: int, index: int) -> list[str]:
    """The caption, then ``data.caption_variants - 1`` variants of it, seeded by (seed, image index).

    A caption is read as comma-separated tags, as kohya's scripts and OpenMoji's captions have them:
    the first ``keep_tags`` stay in front; the rest are shuffled (``shuffle_tags``) and each dropped
    with ``tag_dropout``; ``articles`` is the chance of an "a"/"an" in front, the way people type
    prompts ("a rocket"). Short prompts then reach the captions they mean.
    """
    out = [caption]
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    for k in range(1, data.caption_variants):
        rng = random.Random(sample_seed(seed, _VARIANT_STREAM, index, k))
        kept, rest = tags[: data.keep_tags], tags[data.keep_tags :]
        if data.shuffle_tags:
            rng.shuffle(rest)
        rest = [t for t in rest if rng.random() >= data.tag_dropout]
        # Never an empty prompt: that is caption dropout's job, at its own rate.
        text = ", ".join(kept + rest) or (tags[0] if tags else "")
        if text and rng.random() < data.articles and not text.lower().startswith(_ARTICLES):
            text = _article(text) + text
        out.append(text)
    return out


_ARTICLES = ("a ", "an ", "the ")


def _article(text: str) -> str:
    """ "an " before a vowel sound, by its first letters ("a unicorn", "an owl")."""
    lower = text.lower()
    return "an " if lower[0] in "aeiou" and not lower.startswith(("uni", "use", "eu", "one")) else "a "


def tokenize_prompts(tokenizer, length: int, data: Data, seed: int, records: list[ImageRecord], prompt_for, device) -> Prompts:
    """Every image's prompt variants and the empty prompt, tokenized together once, kept on the device."""
    texts = [v for i, r in enumerate(records) for v in caption_variants(prompt_for(data, r), data, seed, i)] + [""]
    ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids.to(device)
    return Prompts(ids[:-1].view(len(records), data.caption_variants, length), ids[-1])
