"""Seeds and noise.

Noise is drawn on the CPU by default: CUDA's and the CPU's generators give different numbers for the
same seed, so CPU noise is what makes a seed mean the same picture on every machine. Image ``i`` of a
batch has its own generator seeded ``seed + i``, which is what lets it be remade alone.
"""

import secrets

import torch


def random_seed() -> int:
    """A fresh seed for ``-1`` (A1111 draws from the same 32-bit range)."""
    return secrets.randbelow(2**32)


def image_generators(seed: int, count: int, device: str = "cpu") -> list[torch.Generator]:
    """One generator per image: ``seed``, ``seed + 1``, ...; used for all randomness of that image."""
    return [torch.Generator(device).manual_seed(seed + i) for i in range(count)]


def batch_noise(generators: list[torch.Generator], shape: tuple[int, ...], *, device, dtype) -> torch.Tensor:
    """Per-image Gaussian noise of ``shape`` (without batch dim) stacked into a batch."""
    noise = [torch.randn((1, *shape), generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.cat(noise).to(device=device, dtype=dtype)
