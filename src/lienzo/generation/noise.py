"""Seeds and noise.

Noise is drawn on the CPU by default: CUDA's and the CPU's generators give different numbers for the
same seed, so CPU noise is what makes a seed mean the same picture on every machine. Image ``i`` of a
batch has its own generator seeded ``seed + i``, which is what lets it be remade alone.

Variation seeds are AUTOMATIC1111's, number for number with its CPU noise source: the starting noise
moves from the seed's toward the variation seed's by spherical interpolation, and "seed resize from"
draws the seed's noise at another size and centres it in the noise of the size made. Written here
because diffusers has no variation seeds; the arithmetic follows A1111's ``modules/rng.py``
(its ``slerp`` normalises along the height axis of a C x H x W noise, which this keeps, as it decides
the numbers).
"""

import secrets
from dataclasses import dataclass

import torch


def random_seed() -> int:
    """A fresh seed for ``-1`` (A1111 draws from the same 32-bit range)."""
    return secrets.randbelow(2**32)


def image_generators(seeds: list[int], device: str = "cpu") -> list[torch.Generator]:
    """One generator per image, seeded with its seed; used for all randomness of that image."""
    return [torch.Generator(device).manual_seed(seed) for seed in seeds]


def batch_noise(generators: list[torch.Generator], shape: tuple[int, ...], *, device, dtype) -> torch.Tensor:
    """Per-image Gaussian noise of ``shape`` (without batch dim) stacked into a batch."""
    noise = [torch.randn((1, *shape), generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.cat(noise).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class Variation:
    """A1111's variation seed of a batch: each image's variation seed, how far its noise moves toward
    that seed's (0 to 1), and the size (width, height; 0: off) its seed's noise is drawn at."""

    subseeds: tuple[int, ...] = ()
    strength: float = 0.0
    resize_from: tuple[int, int] = (0, 0)

    @property
    def resized(self) -> bool:
        return self.resize_from[0] > 0 and self.resize_from[1] > 0


def _fresh(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def _slerp(amount: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two C x H x W noises, normalised along dim 1 as A1111 does."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:  # nearly parallel: A1111 falls back to this blend (weights as it writes them)
        return low * amount + high * (1 - amount)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - amount) * omega) / so).unsqueeze(1) * low + (torch.sin(amount * omega) / so).unsqueeze(1) * high


def varied_noise(generators: list[torch.Generator], seeds: list[int], variation: Variation, shape: tuple[int, ...]) -> torch.Tensor:
    """The starting noise of a batch with a variation seed or a seed resize (C x H x W ``shape`` per image),
    float32 on the CPU; each image's generator is left where A1111 leaves it for the sampler's later noise."""
    channels, height, width = shape
    drawn = (channels, variation.resize_from[1] // 8, variation.resize_from[0] // 8) if variation.resized else shape
    images = []
    for i, (seed, generator) in enumerate(zip(seeds, generators, strict=True)):
        noise = _fresh(seed, drawn) if drawn != shape else torch.randn(shape, generator=generator, dtype=torch.float32)
        if variation.strength:
            noise = _slerp(variation.strength, noise, _fresh(variation.subseeds[i], drawn))
        if drawn != shape:
            # The seed's noise at the size asked for, with the drawn one centred in it (cropped if larger).
            full = torch.randn(shape, generator=generator, dtype=torch.float32)
            dx, dy = (width - drawn[2]) // 2, (height - drawn[1]) // 2
            w, h = min(drawn[2], drawn[2] + 2 * dx), min(drawn[1], drawn[1] + 2 * dy)
            tx, ty, sx, sy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
            full[:, ty : ty + h, tx : tx + w] = noise[:, sy : sy + h, sx : sx + w]
            noise = full
        images.append(noise)
    return torch.stack(images)
