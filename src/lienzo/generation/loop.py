"""One batch, steps 3-8 of the pipeline, and the denoising loop at its heart.

The loop only sees a :class:`~lienzo.generation.denoiser.Denoiser` and the batch's schedulers: which
network runs, with which conditioning, guidance, extra channels or cache, is the denoiser's business.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from lienzo.errors import GenerationCancelled
from lienzo.generation.control import control_stack
from lienzo.generation.denoiser import Denoiser, SwitchAt, build_denoiser
from lienzo.generation.hires import second_pass
from lienzo.generation.latents import ImageSchedulers, Start, decode, prepare_latents, prepare_timesteps
from lienzo.generation.noise import image_generators
from lienzo.generation.plan import BatchPlan
from lienzo.generation.tiling import seamless
from lienzo.models.components import Components

CancelCheck = Callable[[], bool]
# After each step: steps done, steps in all, the latents, seconds since the loop began.
StepReport = Callable[[int, int, torch.Tensor, float], None]


class Skipped(Exception):
    """The caller skipped the batch being denoised."""


class Interrupted(Exception):
    """The caller interrupted the job before the batch's first step: there is nothing to show."""


@dataclass
class Stop:
    """The caller's checks before every step, and where an interrupt stopped the batch."""

    cancel: CancelCheck | None
    skip: CancelCheck | None
    interrupt: CancelCheck | None
    stopped_at: int | None = None
    total: int = 0

    def before_step(self, done: int, total: int) -> bool:
        """Raise for cancel and skip; True when an interrupt ends the batch after ``done`` steps."""
        if self.cancel is not None and self.cancel():
            raise GenerationCancelled("generation cancelled")
        if self.skip is not None and self.skip():
            raise Skipped
        if self.interrupt is None or not self.interrupt():
            return False
        if done == 0:
            raise Interrupted
        self.stopped_at, self.total = done, total
        return True


def denoise_batch(components: Components, plan: BatchPlan, stop: Stop, report: StepReport | None = None) -> np.ndarray:
    """One batch: steps 3-8 of the pipeline. Returns float pixels, N x H x W x 3 in [0, 1].

    A tiling plan runs every U-Net and VAE call of the batch (the init image's encode, the steps, the
    decode) with circular padding, put back as it was when the batch ends, however it ends."""
    with seamless(components, plan.tiling):
        latents, steps = _one_pass(components, plan, stop, report)
        if plan.hires is not None and stop.stopped_at is None:
            # The hires fix: the same steps again on the enlarged result, as img2img (its generators drawn afresh
            # from the seeds, as A1111 draws the second pass's noise).
            second = second_pass(components, plan, latents, image_generators(plan.seeds))
            latents, _ = _one_pass(components, second, stop, _after(report, steps))
        # 8. Decode (whole, for a tiling plan: a tile would wrap onto itself).
        return decode(components, latents, seamless=plan.tiling)


def _one_pass(components: Components, plan: BatchPlan, stop: Stop, report: StepReport | None) -> tuple[torch.Tensor, int]:
    """Steps 3-7 of one pass: the latents it ends with, and how many steps it ran."""
    generators = image_generators(plan.seeds)
    # 3. Timesteps: one scheduler per image, so stochastic samplers draw each image's noise from its own seed.
    schedulers = prepare_timesteps(components, plan, generators)
    # 4. Initial latents and, for inpainting, the mask in latent space.
    start = prepare_latents(components, plan, schedulers, generators)
    # 5. The denoiser: the network, with the prompt, inpainting channels, ControlNets, guidance and cache as layers.
    control = control_stack(
        plan.controls, plan.canvas.width, plan.canvas.height, len(schedulers.timesteps), components.execution_device,
        components.network.dtype,
    )
    denoiser = build_denoiser(components, plan, start.mask, control)
    if plan.refiner is not None:
        # The refiner: its own denoiser (its network and prompts, no ControlNet units) from the switch step on.
        refiner = plan.refiner
        its_plan = replace(plan, prompt=refiner.prompt, negative=refiner.negative, controls=(), fast=False, images=())
        at = int(len(schedulers.timesteps) * refiner.switch_at)
        denoiser = SwitchAt(at, denoiser, build_denoiser(refiner.components, its_plan, start.mask))
    # 6.-7. Denoising loop.
    return denoising_loop(denoiser, schedulers, start, stop, report), len(schedulers.timesteps)


def _after(report: StepReport | None, done: int) -> StepReport | None:
    """The second pass's reports, counted on from the first pass's ``done`` steps."""
    if report is None:
        return None
    return lambda step, total, latents, elapsed: report(done + step, done + total, latents, elapsed)


def denoising_loop(
    denoiser: Denoiser, schedulers: ImageSchedulers, start: Start, stop: Stop, report: StepReport | None
) -> torch.Tensor:
    """Step the latents through the batch's timesteps; the final latents, or on an interrupt the clean
    latents the last step predicted (A1111 shows those, not the noisy state)."""
    timesteps = schedulers.timesteps
    # 4-channel models repaint everything: the unmasked part is put back after every step.
    blend = start.mask if start.mask is not None and start.mask.repaints_all else None
    latents = denoised = start.latents
    started = time.perf_counter()
    for i, t in enumerate(timesteps):
        if stop.before_step(i, len(timesteps)):
            return denoised if blend is None else blend.keep_unmasked(denoised)
        scaled = schedulers.scale(latents, t)
        pred = denoiser(scaled, t, i)
        latents, outputs = schedulers.step(pred, t, latents)
        if stop.interrupt is not None:
            denoised = schedulers.denoised(outputs, scaled, pred, t)
        if blend is not None:
            # Outside the mask, the original noised to the next step's level (clean after the last step).
            original = blend.image_latents
            if i < len(timesteps) - 1:
                original = schedulers.add_noise(original, start.noise, i + 1)
            latents = blend.keep_unmasked(latents, original)
        if report is not None:
            report(i + 1, len(timesteps), latents, time.perf_counter() - started)
    return latents
