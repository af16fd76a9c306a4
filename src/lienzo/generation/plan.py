"""What one batch's denoising is asked to do, resolved from the request once.

The engine turns a :class:`~lienzo.generation.request.GenerationRequest` into a :class:`BatchPlan`
(sizes, images and mask, encoded prompts, sampler, seeds); the denoising steps read the plan and
never the request, so a door-specific field cannot leak into the loop.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from lienzo.generation import canvas
from lienzo.generation.control import Control
from lienzo.generation.noise import Variation
from lienzo.generation.prompts import ComposedPrompt, PromptSchedule
from lienzo.generation.samplers import Sampler


@dataclass(frozen=True)
class Canvas:
    """Pixels the denoiser works on, and how to put its output back into the user's image."""

    width: int
    height: int
    init: Image.Image | None = None
    mask: Image.Image | None = None  # blurred, at processing size; white = repaint
    original: Image.Image | None = None  # the full-size picture to composite into
    full_mask: Image.Image | None = None  # blurred, at original size
    crop: canvas.OnlyMaskedCrop | None = None


@dataclass(frozen=True)
class References:
    """Reference images as Flux.2's transformer reads them after the noisy latents, encoded once per job: their
    packed tokens, one image after another, and their (time, row, column, layer) ids, time 10 for the first image,
    20 for the second, ... (the noisy latents' is 0). Every row of every batch reads the same. Qwen-Image-Edit's
    network places them by ``shapes`` instead: each image's (frames, rows, columns) of 2x2 patches, its img_shapes."""

    tokens: torch.Tensor  # 1 x tokens x channels, in the network's dtype
    ids: torch.Tensor | None = None  # 1 x tokens x 4 (Flux.2's)
    shapes: tuple[tuple[int, int, int], ...] = ()  # Qwen-Image-Edit's


@dataclass(frozen=True)
class Resources:
    """What a request needs from files, loaded by the service before the engine runs (the engine opens no files):
    its ControlNet units, prepared in the request's order, and the hires fix's model upscaler (None: a built-in
    or latent one, or no hires fix)."""

    controls: tuple[Control, ...] = ()
    upscaler: object | None = None  # lienzo.upscale.upscalers.Upscaler
    refiner: object | None = None  # the refiner model's Components, loaded beside the model


@dataclass(frozen=True)
class Refiner:
    """A1111's refiner: a second model that denoises from ``switch_at`` of a pass's steps on, with the prompts as
    its own text encoders read them."""

    components: object  # lienzo.models.components.Components
    prompt: "PromptSchedule | ComposedPrompt"
    negative: PromptSchedule | None
    switch_at: float


@dataclass(frozen=True)
class Hires:
    """A1111's hires fix, the job's second stage: the first pass's latents enlarged to ``width`` x ``height``
    (in latent space for a ``Latent`` mode, else decoded, enlarged by ``upscale`` and encoded again) and
    repainted as img2img at ``denoising_strength`` over ``steps``, by the same loop."""

    width: int
    height: int
    steps: int
    denoising_strength: float
    sampler: Sampler
    schedule: str
    latent_mode: tuple[str, bool] | None  # torch's interpolation mode and antialias; None: an image upscaler
    upscale: Callable[[Image.Image, int, int], Image.Image] | None = None  # a picture to width x height
    prompt: "PromptSchedule | ComposedPrompt | None" = None  # None: the first pass's
    negative: PromptSchedule | None = None


@dataclass(frozen=True)
class BatchPlan:
    """One batch of ``batch_size`` images: images ``first_seed``, ``first_seed + 1``, ... (one generator each)."""

    canvas: Canvas
    prompt: PromptSchedule | ComposedPrompt  # per step: A1111's prompt editing and alternation; AND: composed
    negative: PromptSchedule | None  # None unguided (CFG scale 1 or less): never read, so never encoded
    sampler: Sampler
    schedule: str  # resolved: a key of samplers.SCHEDULES
    steps: int
    cfg_scale: float
    denoising_strength: float  # read only with an init image
    inpainting_fill: str  # A1111's masked content: "original", "fill", "latent noise" or "latent nothing"
    fast: bool  # DeepCache
    batch_size: int
    first_seed: int
    distilled_cfg_scale: float = 3.5  # Flux.1 dev's guidance input (a distilled model's CFG, not a second pass)
    shift: float | None = None  # flow models: a fixed timestep shift in place of the model's (Flux: its size-dependent one)
    tiling: bool = False  # seamless texture: circular padding in the U-Net and VAE (lienzo.generation.tiling)
    variation: Variation = Variation()  # A1111's variation seed and seed resize (off by default)
    # Dynamic prompts: (prompt, negative) for each image when the batch's images have different texts;
    # empty: every image has ``prompt`` and ``negative``.
    images: tuple[tuple[PromptSchedule | ComposedPrompt, PromptSchedule], ...] = ()
    references: References | None = None  # Flux.2's reference images; None: none
    controls: tuple[Control, ...] = ()  # ControlNet / T2I-Adapter units, prepared
    hires: Hires | None = None  # A1111's hires fix: a second stage after this plan's pass
    init_latents: torch.Tensor | None = None  # img2img from latents (the hires fix's second pass), one row per image
    refiner: Refiner | None = None  # A1111's refiner: a second model for the last steps

    def image_prompts(self) -> tuple[tuple[PromptSchedule | ComposedPrompt, PromptSchedule], ...]:
        """(prompt, negative) of each of the batch's images."""
        return self.images or ((self.prompt, self.negative),) * self.batch_size

    @property
    def from_image(self) -> bool:
        """img2img: the pass starts from a picture (or its latents) noised to ``denoising_strength``."""
        return self.canvas.init is not None or self.init_latents is not None

    @property
    def guided(self) -> bool:
        """Guidance 1 is the conditional prediction alone: the unconditional pass is skipped."""
        return self.cfg_scale > 1.0

    @property
    def seeds(self) -> list[int]:
        """Each image's seed: ``first_seed + i``, or, with a variation seed, ``first_seed`` for all (A1111's
        rule: the images of a variation batch differ by their variation seeds)."""
        return [self.first_seed + (0 if self.variation.strength else i) for i in range(self.batch_size)]
