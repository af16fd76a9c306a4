"""The latent side of one batch: its schedulers and timesteps, its starting latents and mask, the decode.

Randomness is drawn in diffusers' order from one generator per image (:mod:`lienzo.generation.noise`):
the init image's posterior sample, then the noise, then A1111's "latent noise" fill; changing that
order changes every img2img and inpaint picture.
"""

import inspect
import logging
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor

from lienzo.generation import canvas
from lienzo.generation.noise import batch_noise, varied_noise
from lienzo.generation.plan import BatchPlan
from lienzo.generation.samplers import build_scheduler, flux_mu, set_timesteps
from lienzo.generation.vae_decode import decode_latents, wants_tiling
from lienzo.models.components import Components

log = logging.getLogger(__name__)


class ImageSchedulers:
    """One diffusers scheduler per image, stepped as one batch, so stochastic samplers draw each
    image's noise from its own generator (image ``i`` of a batch is remade alone from ``seed + i``)."""

    def __init__(self, schedulers: list, generators: list[torch.Generator], timesteps: torch.Tensor):
        self.schedulers = schedulers
        self.timesteps = timesteps  # the ones this batch runs: img2img skips the first part of the schedule
        self._step_kwargs = [_step_kwargs(s, g) for s, g in zip(schedulers, generators, strict=True)]

    @property
    def init_noise_sigma(self) -> float:
        """What pure noise is scaled by at the first step (flow-matching schedulers start at sigma 1)."""
        return getattr(self.schedulers[0], "init_noise_sigma", 1.0)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        """``original`` noised to the level of timestep number ``index`` of this batch (flow-matching
        schedulers call it ``scale_noise``: (1 - sigma) * original + sigma * noise)."""
        scheduler, timesteps = self.schedulers[0], self.timesteps[index : index + 1].repeat(len(self.schedulers))
        if hasattr(scheduler, "scale_noise"):
            return scheduler.scale_noise(original, timesteps, noise)
        return scheduler.add_noise(original, noise, timesteps)

    def scale(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's input for ``latents`` at ``t`` (Euler-style schedulers divide by the noise level;
        flow-matching ones take the latents as they are)."""
        if not hasattr(self.schedulers[0], "scale_model_input"):
            return latents
        return torch.cat([s.scale_model_input(latents[j : j + 1], t) for j, s in enumerate(self.schedulers)])

    def step(self, pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The latents after one step, and each scheduler's output (for :meth:`denoised`)."""
        outputs = [s.step(pred[j : j + 1], t, latents[j : j + 1], **self._step_kwargs[j]) for j, s in enumerate(self.schedulers)]
        return torch.cat([out.prev_sample for out in outputs]), outputs

    def denoised(self, outputs: list, scaled: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latents the last step predicted, one row per image."""
        pairs = zip(self.schedulers, outputs, strict=True)
        return torch.cat([denoised_estimate(s, out, scaled[j : j + 1], pred[j : j + 1], t) for j, (s, out) in enumerate(pairs)])


def _step_kwargs(scheduler, generator: torch.Generator) -> dict:
    """Pass ``eta`` / ``generator`` only to schedulers that take them, as diffusers' pipelines do."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def denoised_estimate(scheduler, output, sample: torch.Tensor, pred: torch.Tensor, t) -> torch.Tensor:
    """The clean latents a step predicted (A1111 shows them when interrupted, not the noisy state).

    Most diffusers schedulers return it; the multistep DPM++ and UniPC solvers keep it as their
    last model output; PNDM has only its noise prediction, turned into x0 with the step's ᾱ."""
    for name in ("pred_original_sample", "denoised"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    config = scheduler.config
    predicts_x0 = str(config.get("algorithm_type", "")).endswith("++") or config.get("predict_x0", False)
    if predicts_x0 and getattr(scheduler, "model_outputs", None) and scheduler.model_outputs[-1] is not None:
        return scheduler.model_outputs[-1]
    if not hasattr(scheduler, "alphas_cumprod"):
        # Flow matching: x_t = (1 - sigma) x0 + sigma noise and the network predicts noise - x0,
        # so x0 = x_t - sigma * v, with sigma the timestep on the 0-1 scale.
        return sample - (t / config.num_train_timesteps) * pred
    alpha = scheduler.alphas_cumprod[int(t)].to(device=sample.device, dtype=sample.dtype)
    if config.prediction_type == "v_prediction":
        return alpha.sqrt() * sample - (1 - alpha).sqrt() * pred
    return (sample - (1 - alpha).sqrt() * pred) / alpha.sqrt()


def prepare_timesteps(components: Components, plan: BatchPlan, generators: list[torch.Generator]) -> ImageSchedulers:
    """Step 3: a scheduler per image with ``plan.steps`` timesteps; img2img keeps the last ``strength`` share."""
    device, config = components.execution_device, components.scheduler_config
    if plan.shift is not None:
        config = {**config, "shift": plan.shift, "use_dynamic_shifting": False}
    schedulers = [build_scheduler(plan.sampler, plan.schedule, config, seed=s) for s in plan.seeds]
    # Flux shifts its schedule by the image's size: mu from the number of 2x2 latent patches, as FluxPipeline.
    mu = None
    if config.get("use_dynamic_shifting"):
        shape = _latent_shape(components, plan)
        if components.family == "flux2":  # Flux2KleinPipeline's own fit, of the latents' count and the steps
            from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

            mu = compute_empirical_mu(shape[1] * shape[2], plan.steps)
        else:
            mu = flux_mu((shape[1] // 2) * (shape[2] // 2), config)
    for s in schedulers:
        set_timesteps(s, plan.sampler, plan.schedule, plan.steps, device=device, family=components.family, mu=mu)
    timesteps = schedulers[0].timesteps
    if plan.canvas.init is not None:
        # img2img runs the last ``strength`` share of the schedule, as diffusers and A1111 do.
        t_start = max(plan.steps - min(int(plan.steps * plan.denoising_strength), plan.steps), 0)
        start = t_start * schedulers[0].order
        timesteps = timesteps[start:]
        for s in schedulers:
            if hasattr(s, "set_begin_index"):
                s.set_begin_index(start)
    return ImageSchedulers(schedulers, generators, timesteps)


@dataclass(frozen=True)
class LatentMask:
    """Inpainting in latent space: where to repaint, and what to keep elsewhere."""

    mask: torch.Tensor  # N x 1 x h x w, 1 = repaint
    image_latents: torch.Tensor  # the init image's latents, after the masked-content fill
    masked_latents: torch.Tensor | None = None  # inpainting models' extra input: the image with the mask blanked

    @property
    def repaints_all(self) -> bool:
        """4-channel models do not see the mask: the loop puts the unmasked part back after every step."""
        return self.masked_latents is None

    def keep_unmasked(self, latents: torch.Tensor, original: torch.Tensor | None = None) -> torch.Tensor:
        """``latents`` under the mask, ``original`` (by default the image's latents) elsewhere."""
        keep = self.image_latents if original is None else original
        return (1 - self.mask) * keep + self.mask * latents


@dataclass(frozen=True)
class Start:
    """Where the loop starts: the latents, the noise they were made with, and the mask, if any."""

    latents: torch.Tensor
    noise: torch.Tensor  # 4-channel inpainting noises the original to each step's level with it
    mask: LatentMask | None = None


def prepare_latents(components: Components, plan: BatchPlan, schedulers: ImageSchedulers, generators) -> Start:
    """Step 4: pure noise, or the encoded image (masked content filled) noised to the first timestep."""
    cv, dtype = plan.canvas, latent_dtype(components)
    shape = _latent_shape(components, plan)
    pixels = image_latents = None
    if cv.init is not None:
        pixels = _processor(components).preprocess(cv.init, height=cv.height, width=cv.width)
        pixels = pixels.to(device=components.execution_device, dtype=components.vae.dtype)
        image_latents = _encode(components, pixels, generators)
    if plan.variation.strength or plan.variation.resized:
        noise = varied_noise(generators, plan.seeds, plan.variation, shape).to(device=components.execution_device, dtype=dtype)
    else:
        noise = batch_noise(generators, shape, device=components.execution_device, dtype=dtype)
    # After the noise: "latent noise" draws a second noise from the same generators.
    mask = prepare_mask(components, plan, pixels, image_latents, generators) if cv.mask is not None else None
    original = mask.image_latents if mask is not None else image_latents
    if original is None or (mask is not None and plan.denoising_strength >= 1.0):
        latents = noise * schedulers.init_noise_sigma
    elif len(schedulers.timesteps):
        latents = schedulers.add_noise(original, noise, 0)
    else:
        latents = original
    return Start(latents, noise, mask)


def prepare_mask(components: Components, plan: BatchPlan, pixels, image_latents, generators) -> LatentMask:
    """The mask at latent size, A1111's masked content, and for inpainting models the masked image's latents."""
    cv, device, dtype, n = plan.canvas, components.execution_device, latent_dtype(components), plan.batch_size
    shape = _latent_shape(components, plan)
    mask = canvas.mask_to_latent(cv.mask, shape[1], shape[2]).to(device=device, dtype=dtype).repeat(n, 1, 1, 1)
    filled = _fill_latents(image_latents, mask, plan.inpainting_fill, generators, shape)
    if not components.is_inpainting:
        return LatentMask(mask, filled)
    keep = (_processor(components).preprocess(cv.mask.convert("RGB"), height=cv.height, width=cv.width)[:, :1] < 0).to(pixels)
    vae = components.vae
    with torch.no_grad():
        masked_latents = vae.config.scaling_factor * vae.encode(pixels * keep).latent_dist.mode()
    return LatentMask(mask, filled, masked_latents.to(dtype).repeat(n, 1, 1, 1))


def _fill_latents(image_latents, mask, fill: str, generators, latent_shape) -> torch.Tensor:
    """A1111's masked-content modes in latent space: fresh noise, or nothing (zeros), under the mask."""
    if fill == "latent noise":
        noise = batch_noise(generators, latent_shape, device=image_latents.device, dtype=image_latents.dtype)
        return image_latents * (1 - mask) + noise * mask
    if fill == "latent nothing":
        return image_latents * (1 - mask)
    return image_latents


def _encode(components: Components, pixels: torch.Tensor, generators) -> torch.Tensor:
    """Each image samples the posterior with its own generator, before its noise (diffusers' order)."""
    vae = components.vae
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    image_latents = torch.cat([posterior.sample(g) for g in generators])
    if components.spec.latent_patch > 1:
        return _patched(vae, image_latents).to(latent_dtype(components))
    if vae.config.get("shift_factor") is not None:  # SD 3.x and Flux.1 VAEs centre their latents first
        image_latents = image_latents - vae.config.shift_factor
    return (vae.config.scaling_factor * image_latents).to(latent_dtype(components))


def decode(components: Components, latents: torch.Tensor, *, seamless: bool = False) -> np.ndarray:
    """Step 8: float pixels, N x H x W x 3 in [0, 1]; in tiles for large images, and a half-precision
    VAE that overflows decodes again in fp32.

    ``seamless`` (a tiling job, inside :func:`lienzo.generation.tiling.seamless`) decodes whole whatever
    ``vae_tiling`` says: with circular padding each tile would wrap onto its own edges, not the picture's,
    and show seams at the tile borders; a tiling image is usually of the model's own size anyway."""
    if components.spec.latent_patch > 1:
        latents = _unpatched(components.vae, latents)
    tiling = "off" if seamless else components.vae_tiling
    if seamless and wants_tiling(components.vae, latents, components.vae_tiling):
        log.info("tiling: decoding %dx%d latents whole, not in VAE tiles (they would not wrap)", latents.shape[-1], latents.shape[-2])
    decoded = decode_latents(components.vae, latents, tiling=tiling)
    return _processor(components).postprocess(decoded, output_type="np")


def _batch_norm(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and standard deviation Flux.2's VAE keeps of its patched latents, as ``like``'s."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def _patched(vae, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's latents as the loop's: 2x2 patches, normalized (``Flux2KleinPipeline._encode_vae_image``)."""
    from diffusers import Flux2KleinPipeline  # its patching helpers; imported with the model's family

    patched = Flux2KleinPipeline._patchify_latents(latents)
    mean, std = _batch_norm(vae, patched)
    return (patched - mean) / std


def _unpatched(vae, latents: torch.Tensor) -> torch.Tensor:
    """The loop's latents back as the VAE's, as ``Flux2KleinPipeline`` decodes them."""
    from diffusers import Flux2KleinPipeline

    mean, std = _batch_norm(vae, latents)
    return Flux2KleinPipeline._unpatchify_latents(latents * std + mean)


def latent_dtype(components: Components) -> torch.dtype:
    """Latents are made in the denoising network's dtype (fp16 latents into an fp16 U-Net), the VAE's aside."""
    return components.network.dtype


def _latent_shape(components: Components, plan: BatchPlan) -> tuple[int, int, int]:
    factor, channels = _pixels_per_latent(components), components.vae.config.latent_channels * components.spec.latent_patch**2
    return (channels, plan.canvas.height // factor, plan.canvas.width // factor)


def _pixels_per_latent(components: Components) -> int:
    """The side of the pixels one latent of the loop stands for (Flux.2's: a 2x2 patch of its VAE's latents)."""
    return components.vae_scale_factor * components.spec.latent_patch


def _processor(components: Components) -> VaeImageProcessor:
    return VaeImageProcessor(vae_scale_factor=_pixels_per_latent(components))
