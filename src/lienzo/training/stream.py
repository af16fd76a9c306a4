"""What a stage trains on, drawn so that a run can stop and resume bit for bit.

Every random draw is a pure function of (seed, stage, sample position): data order, mirror flips,
crop corners, posterior samples, noise, timesteps, caption dropout. A checkpoint then needs only the
weights, EMA, optimizer, LR schedule and step, and N processes with batch B/N see the same samples
and noise as one process with batch B.
"""

import numpy as np
import torch


def sample_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, stage, position), the same on every machine."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class SampleStream:
    """The endless sequence of (record index, mirror) pairs a stage trains on: one shuffled epoch after another."""

    def __init__(self, size: int, seed: int, stage: int, flip: bool):
        self.size, self.seed, self.stage, self.flip = size, seed, stage, flip
        self._epochs: dict[int, tuple[list[int], list[bool]]] = {}

    def _epoch(self, epoch: int) -> tuple[list[int], list[bool]]:
        if epoch not in self._epochs:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.stage, 2**40 + epoch))
            order = torch.randperm(self.size, generator=g).tolist()
            flips = (torch.rand(self.size, generator=g) < 0.5).tolist() if self.flip else [False] * self.size
            self._epochs = {epoch: (order, flips)}  # only the current epoch is ever needed again
        return self._epochs[epoch]

    def take(self, position: int, count: int) -> list[tuple[int, int, bool]]:
        """``count`` samples from ``position`` on, as (position, record index, mirror)."""
        out = []
        for p in range(position, position + count):
            order, flips = self._epoch(p // self.size)
            i = order[p % self.size]
            out.append((p, i, flips[p % self.size]))
        return out


def random_crop(pixels: torch.Tensor, side: int | None, generator: torch.Generator) -> torch.Tensor:
    """A ``side`` x ``side`` window of a C,H,W image at a corner drawn from ``generator``; the image when ``side`` is None."""
    if side is None:
        return pixels
    height, width = pixels.shape[-2:]
    top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
    return pixels[:, top : top + side, left : left + side]
