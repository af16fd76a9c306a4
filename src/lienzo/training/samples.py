"""Sample grids during training: images through the same engine as ``lienzo generate`` (UNet stage) or
reconstructions (VAE stage), and a memorisation check of the UNet's samples against the training images."""

import csv
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from PIL import Image

from lienzo.generation.engine import generate
from lienzo.generation.request import build_request
from lienzo.images.grid import image_grid
from lienzo.models.components import Components
from lienzo.training.config import Samples
from lienzo.training.data import ImageDataset, ImageRecord
from lienzo.training.memorisation import MemorisationCheck


class SampleGrids:
    """The grids of one run; ``memorisation.csv`` in ``training`` gets every UNet sample's nearest training file."""

    def __init__(self, config: Samples, resolution: int, training: Path, data: Path, records: list[ImageRecord]):
        self.config, self.resolution, self.training = config, resolution, training
        # Cheap to build: the training images' features are computed at the first check.
        self.memorisation = MemorisationCheck(data, records, config.memorisation) if config.memorisation > 0 else None

    def unet(self, components: Components, step: int) -> Image.Image:
        """One row per prompt, ``per_prompt`` images each, with the config's sampler, steps and seed."""
        s = self.config
        rows = []
        for prompt in s.prompts:
            request = build_request(
                prompt=prompt, steps=s.steps, cfg_scale=s.cfg_scale, sampler=s.sampler, seed=s.seed,
                batch_size=s.per_prompt, width=self.resolution, height=self.resolution,
            )
            rows.append([i.image for i in generate(components, request).images])
        if self.memorisation is not None:
            self._check_memorisation(step, rows)
        return image_grid(rows, labels=s.prompts)

    def _check_memorisation(self, step: int, rows: list[list[Image.Image]]) -> None:
        """Warn when samples copy training images; every sample's nearest file goes to memorisation.csv."""
        images = [image for row in rows for image in row]
        matches = self.memorisation.nearest(images)
        self.memorisation.copies(images, f"samples at unet step {step}")
        path = self.training / "memorisation.csv"
        new = not path.exists()
        per_prompt, threshold = self.config.per_prompt, self.memorisation.threshold
        with path.open("a", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "prompt", "sample", "nearest_training_file", "distance", "copy"])
            for m in matches:
                prompt = self.config.prompts[m.index // per_prompt]
                writer.writerow([step, prompt, m.index % per_prompt, m.file, f"{m.distance:.5f}", int(m.is_copy(threshold))])

    @staticmethod
    @torch.no_grad()
    def vae(vae: AutoencoderKL, dataset: ImageDataset, device: torch.device) -> Image.Image:
        """The first 8 training images above their reconstructions (the posterior's mode, decoded)."""
        count = min(8, len(dataset))
        pixels = torch.stack([dataset[(i, False)]["pixels"] for i in range(count)]).to(device)
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
        return image_grid([[_to_pil(p) for p in pixels], [_to_pil(d) for d in decoded]], labels=["images", "reconstructions"])


def _to_pil(t: torch.Tensor) -> Image.Image:
    array = ((t.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
