"""A1111's hires fix as the second stage of one job: the first pass's result, enlarged, repainted as img2img.

The second pass is the same loop on a plan derived from the first (:func:`second_pass`): A1111's order of
work, so that its pictures and infotext are remade. A ``Latent`` upscaler enlarges the latents themselves (torch's
interpolation, A1111's modes); any other decodes the first pass, enlarges the pictures and encodes them again.
"""

from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from lienzo.generation.latents import decode, encode_pictures
from lienzo.generation.noise import Variation
from lienzo.generation.plan import BatchPlan, Canvas
from lienzo.models.components import Components


def second_pass(components: Components, plan: BatchPlan, latents: torch.Tensor, generators) -> BatchPlan:
    """The img2img plan that repaints ``plan``'s enlarged result (``latents``, one row per image)."""
    hires = plan.hires
    if hires.latent_mode is not None:
        mode, antialias = hires.latent_mode
        factor = components.vae_scale_factor * components.spec.latent_patch
        size = (hires.height // factor, hires.width // factor)
        keywords = {"antialias": True} if antialias else {}
        init = torch.nn.functional.interpolate(latents.float(), size=size, mode=mode, **keywords).to(latents.dtype)
    else:
        pixels = decode(components, latents, seamless=plan.tiling)
        pictures = [Image.fromarray((array * 255).round().astype(np.uint8)) for array in pixels]
        enlarged = [hires.upscale(picture, hires.width, hires.height) for picture in pictures]
        init = encode_pictures(components, enlarged, generators)
    # The seed's noise is drawn at the new size: a resize-from size was the first pass's affair.
    variation = Variation(plan.variation.subseeds, plan.variation.strength)
    return replace(
        plan, canvas=Canvas(hires.width, hires.height), steps=hires.steps, denoising_strength=hires.denoising_strength,
        sampler=hires.sampler, schedule=hires.schedule, prompt=hires.prompt or plan.prompt,
        negative=hires.negative if hires.prompt is not None else plan.negative, variation=variation, init_latents=init,
        hires=None, references=plan.references,
        # The refiner took over during the first pass: the second pass is all its own.
        refiner=replace(plan.refiner, switch_at=0.0) if plan.refiner is not None else None,
    )
