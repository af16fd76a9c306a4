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
from PIL import Image

from lienzo.errors import InvalidRequestError
from lienzo.generation import canvas
from lienzo.generation.noise import batch_noise, varied_noise
from lienzo.generation.plan import BatchPlan, References
from lienzo.generation.samplers import build_scheduler, flux_mu, set_timesteps
from lienzo.generation.vae_decode import decode_latents, latent_space, wants_tiling
from lienzo.models.components import has_frames
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
    if config.get("shift_terminal") and plan.steps < 2:
        # diffusers stretches the levels so the last is shift_terminal: one level cannot be (its timesteps are NaN).
        raise InvalidRequestError("steps", f"must be 2 or more for {components.spec.label}: its schedule ends at a set noise level")
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
        elif components.family == "krea2" and components.is_distilled:
            mu = 1.15  # Krea2Pipeline's fixed shift for its distilled (TDM) model, written in its __call__
        else:
            mu = flux_mu((shape[1] // 2) * (shape[2] // 2), config)
    for s in schedulers:
        set_timesteps(s, plan.sampler, plan.schedule, plan.steps, device=device, family=components.family, mu=mu)
    timesteps = schedulers[0].timesteps
    if plan.from_image:
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
    if plan.init_latents is not None:
        image_latents = plan.init_latents
    elif cv.init is not None:
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


def encode_pictures(components: Components, images: list[Image.Image], generators) -> torch.Tensor:
    """The loop's latents of one picture per image (the hires fix's enlarged pictures), each sampled with its
    image's generator as an init image is."""
    latents = []
    for image, generator in zip(images, generators, strict=True):
        pixels = _processor(components).preprocess(image, height=image.height, width=image.width)
        latents.append(_encode(components, pixels.to(device=components.execution_device, dtype=components.vae.dtype), [generator]))
    return torch.cat(latents)


def _encode(components: Components, pixels: torch.Tensor, generators) -> torch.Tensor:
    """Each image samples the posterior with its own generator, before its noise (diffusers' order)."""
    vae, frames = components.vae, has_frames(components.vae)
    with torch.no_grad():
        posterior = vae.encode(pixels.unsqueeze(2) if frames else pixels).latent_dist
    image_latents = torch.cat([posterior.sample(g) for g in generators])
    if frames:
        image_latents = image_latents[:, :, 0]
    return _loop_latents(components, image_latents)


def _loop_latents(components: Components, image_latents: torch.Tensor) -> torch.Tensor:
    """The VAE's latents as the loop's: Flux.2's in 2x2 patches, then normalized (:func:`latent_space`)."""
    if components.spec.latent_patch > 1:  # Flux.2 normalizes its latents in 2x2 patches
        from diffusers import Flux2KleinPipeline  # its patching helper; imported with the model's family

        image_latents = Flux2KleinPipeline._patchify_latents(image_latents)
    mean, scale = latent_space(components.vae, image_latents.device)
    return ((image_latents - mean) * scale).to(latent_dtype(components))


# Flux2KleinPipeline shrinks a larger reference image to this many pixels, keeping its shape.
REFERENCE_AREA = 1024 * 1024


def _fit_reference(components: Components, image: Image.Image) -> tuple[Image.Image, int, int]:
    """A reference image as Flux2KleinPipeline reads it: shrunk to at most REFERENCE_AREA pixels, and the size
    its centre is cropped to, each side cut down to a multiple of a latent patch's side (16 pixels with Flux.2's VAE)."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    shrunk = Flux2ImageProcessor._resize_if_exceeds_area(image, REFERENCE_AREA)
    side = _pixels_per_latent(components)
    return shrunk, shrunk.width // side * side, shrunk.height // side * side


# QwenImageEditPlusPipeline's output size when none is given: about this many pixels, of its last image's shape
# (written in its __call__).
QWEN_EDIT_AREA = 1024 * 1024


def reference_size(components: Components, images: list[Image.Image]) -> tuple[int, int]:
    """The (width, height) of a picture given no size of its own: Flux.2's first reference as it is read;
    Qwen-Image-Edit's QWEN_EDIT_AREA of the last one's shape, each side a multiple of 32 (as its pipeline's)."""
    if components.family == "qwenimage_edit":
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

        return calculate_dimensions(QWEN_EDIT_AREA, images[-1].width / images[-1].height)
    return _fit_reference(components, images[0])[1:]


def encode_references(components: Components, images: list[Image.Image]) -> References | None:
    """Flux.2's reference images, once for the job, as Flux2KleinPipeline encodes them: each fitted, encoded to
    its latents' mode (no randomness, so no generator is drawn from), patched and normalized as the loop's
    latents, then packed one after another with their time ids 10, 20, ...; None without references.
    Qwen-Image-Edit's input images as its pipeline encodes them (:func:`_qwen_edit_references`)."""
    if not images:
        return None
    if components.family == "qwenimage_edit":
        return _qwen_edit_references(components, images)
    from diffusers import Flux2KleinPipeline  # its packing helpers; imported with the model's family
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    processor, vae, latents = Flux2ImageProcessor(vae_scale_factor=_pixels_per_latent(components)), components.vae, []
    for image in images:
        shrunk, width, height = _fit_reference(components, image)
        pixels = processor.preprocess(shrunk, height=height, width=width, resize_mode="crop")
        with torch.no_grad():
            mode = vae.encode(pixels.to(device=components.execution_device, dtype=vae.dtype)).latent_dist.mode()
        latents.append(_loop_latents(components, mode))
    tokens = torch.cat([Flux2KleinPipeline._pack_latents(latent) for latent in latents], dim=1)
    return References(tokens, Flux2KleinPipeline._prepare_image_ids(latents).to(tokens.device))


def _qwen_edit_references(components: Components, images: list[Image.Image]) -> References:
    """Qwen-Image-Edit's input images, as QwenImageEditPlusPipeline encodes them: each resized to about its
    VAE_IMAGE_SIZE pixels, keeping its shape (each side a multiple of 32), encoded as one frame to its latents'
    mode, normalized as the loop's latents, packed in 2x2 patches one image after another, with each one's shape."""
    from diffusers import QwenImagePipeline  # its packing helper; imported with the model's family
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

    processor, vae = VaeImageProcessor(vae_scale_factor=components.vae_scale_factor * 2), components.vae
    tokens, shapes = [], []
    for image in images:
        width, height = edit_plus.calculate_dimensions(edit_plus.VAE_IMAGE_SIZE, image.width / image.height)
        pixels = processor.preprocess(image, height, width).to(device=components.execution_device, dtype=vae.dtype)
        with torch.no_grad():
            latents = _loop_latents(components, vae.encode(pixels.unsqueeze(2)).latent_dist.mode()[:, :, 0])
        _, channels, h, w = latents.shape
        tokens.append(QwenImagePipeline._pack_latents(latents, 1, channels, h, w))
        shapes.append((1, h // 2, w // 2))
    return References(torch.cat(tokens, dim=1), shapes=tuple(shapes))


def decode(components: Components, latents: torch.Tensor, *, seamless: bool = False) -> np.ndarray:
    """Step 8: float pixels, N x H x W x 3 in [0, 1]; in tiles for large images, and a half-precision
    VAE that overflows decodes again in fp32.

    ``seamless`` (a tiling job, inside :func:`lienzo.generation.tiling.seamless`) decodes whole whatever
    ``vae_tiling`` says: with circular padding each tile would wrap onto its own edges, not the picture's,
    and show seams at the tile borders; a tiling image is usually of the model's own size anyway."""
    # In float32: a half-precision VAE that overflows decodes these again in float32 (vae_decode).
    mean, scale = latent_space(components.vae, latents.device)
    latents = latents.float() / scale + mean
    if components.spec.latent_patch > 1:
        from diffusers import Flux2KleinPipeline

        latents = Flux2KleinPipeline._unpatchify_latents(latents)
    tiling = "off" if seamless else components.vae_tiling
    if seamless and wants_tiling(components.vae, latents, components.vae_tiling):
        log.info("tiling: decoding %dx%d latents whole, not in VAE tiles (they would not wrap)", latents.shape[-1], latents.shape[-2])
    decoded = decode_latents(components.vae, latents, tiling=tiling)
    return _processor(components).postprocess(decoded, output_type="np")


def latent_dtype(components: Components) -> torch.dtype:
    """Latents are made in the denoising network's dtype (fp16 latents into an fp16 U-Net), the VAE's aside."""
    return components.network.dtype


def _latent_shape(components: Components, plan: BatchPlan) -> tuple[int, int, int]:
    vae = components.vae
    # Wan-style VAEs (Qwen-Image's) call their latent channels z_dim.
    channels = (vae.config.z_dim if has_frames(vae) else vae.config.latent_channels) * components.spec.latent_patch**2
    factor = _pixels_per_latent(components)
    return (channels, plan.canvas.height // factor, plan.canvas.width // factor)


def _pixels_per_latent(components: Components) -> int:
    """The side of the pixels one latent of the loop stands for (Flux.2's: a 2x2 patch of its VAE's latents)."""
    return components.vae_scale_factor * components.spec.latent_patch


def _processor(components: Components) -> VaeImageProcessor:
    return VaeImageProcessor(vae_scale_factor=_pixels_per_latent(components))
