"""The denoising engine: txt2img, img2img, inpaint and outpaint on diffusers models and schedulers.

It follows the order of operations of diffusers' Stable Diffusion pipelines (so a txt2img or img2img
image equals theirs for the same components, scheduler and seed) and adds what they lack: A1111
prompt syntax, per-image seeds that survive batching, inpaint fill modes, "only masked" crops,
outpainting, progress/preview/cancel callbacks. It knows nothing about files, HTTP or databases.
"""

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from lienzo import __version__
from lienzo.errors import GenerationCancelled, LienzoError
from lienzo.generation import canvas
from lienzo.generation.deepcache import DeepCacheUNet, fast_label
from lienzo.generation.lora_tags import extract_lora_tags, lora_tag
from lienzo.generation.noise import batch_noise, image_generators, random_seed
from lienzo.generation.prompts import PromptEmbeddings, encode_pair
from lienzo.generation.request import GenerationRequest
from lienzo.generation.samplers import build_scheduler, resolve_sampler, resolve_schedule, set_timesteps
from lienzo.generation.vae_decode import decode_latents
from lienzo.images.metadata import format_infotext
from lienzo.models.components import Components
from lienzo.models.speed import INT8
from lienzo.safety import SafetyFilter, Screened, screen

log = logging.getLogger(__name__)

# Models already reported as having no safety filter for a blur/block policy (names, for the log only).
_WARNED_UNFILTERED: set[str] = set()

# Linear maps from the 4 latent channels to RGB, fitted for the SD 1.x/2.x and SDXL VAEs; a preview
# costs one 4x3 matmul instead of a VAE decode (the "Approx cheap" live preview of A1111).
_PREVIEW_RGB = {
    "sd": torch.tensor(
        [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
    ),
    "sdxl": torch.tensor(
        [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]]
    ),
}


@dataclass
class Progress:
    """One finished denoising step of one batch; ``preview()`` renders the current latents cheaply."""

    step: int
    total_steps: int
    batch: int
    batch_count: int
    latents: torch.Tensor
    family: str
    elapsed: float

    def preview(self) -> list[Image.Image]:
        factors = _PREVIEW_RGB["sdxl" if self.family == "sdxl" else "sd"]
        if self.latents.shape[1] != factors.shape[0]:
            return []
        rgb = torch.einsum("bchw,cr->bhwr", self.latents.float().cpu(), factors)
        arrays = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().byte().numpy()
        return [Image.fromarray(a) for a in arrays]


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    infotext: str
    parameters: dict
    pixels: np.ndarray = field(repr=False)  # HxWx3 float32 in [0, 1], before 8-bit rounding
    filtered: str | None = None  # "blurred" or "blocked" by the safety filter; None: shown as made


@dataclass
class GenerationResult:
    images: list[GeneratedImage]
    request: GenerationRequest
    seconds: float
    interrupted: bool = False  # stopped early; the last image is the denoised estimate of its last step
    warnings: list[str] = field(default_factory=list)  # what the caller should tell the user (also logged)


ProgressCallback = Callable[[Progress], None]
CancelCheck = Callable[[], bool]
ImageCallback = Callable[[GeneratedImage], None]


@dataclass
class _Canvas:
    """Pixels the denoiser works on, and how to put its output back into the user's image."""

    width: int
    height: int
    init: Image.Image | None = None
    mask: Image.Image | None = None  # blurred, at processing size; white = repaint
    original: Image.Image | None = None  # the full-size picture to composite into
    full_mask: Image.Image | None = None  # blurred, at original size
    crop: canvas.OnlyMaskedCrop | None = None


def native_size(components: Components) -> int:
    """The side length the model was trained at (512 for SD 1.x, 768 for SD 2-v, 1024 for SDXL)."""
    return int(components.unet.config.sample_size) * components.vae_scale_factor


def _round8(v: int) -> int:
    return max(64, v - v % 8)


def _prepare_canvas(components: Components, req: GenerationRequest) -> _Canvas:
    """Resolve sizes; grow, fill and crop the input image and mask for the request's mode."""
    if req.init_image is None:
        side = _round8(native_size(components))
        return _Canvas(req.width or side, req.height or side)
    image, mask = req.init_image.convert("RGB"), req.mask
    if req.is_outpaint:
        # The mask reaches into the old image at least as far as the blur, so the seam is repainted.
        image, mask = canvas.grow_canvas(
            image, req.outpaint_left, req.outpaint_right, req.outpaint_up, req.outpaint_down, overlap=max(8, req.mask_blur)
        )
    width, height = req.width or _round8(image.width), req.height or _round8(image.height)
    if mask is None:
        return _Canvas(width, height, init=image.resize((width, height), Image.LANCZOS))
    mask = mask.convert("L")
    blurred = canvas.blur_mask(mask, req.mask_blur)
    fill = "fill" if req.is_outpaint and req.inpainting_fill == "original" else req.inpainting_fill
    painted = canvas.fill_masked(image, mask) if fill == "fill" else image
    if req.inpaint_only_masked:
        crop = canvas.crop_to_mask(painted, blurred, req.only_masked_padding, width, height)
        return _Canvas(width, height, crop.image, crop.mask, image, blurred, crop)
    size = (width, height)
    if image.size != size:
        image, blurred = image.resize(size, Image.LANCZOS), blurred.resize(size, Image.LANCZOS)
        painted = painted.resize(size, Image.LANCZOS)
    return _Canvas(width, height, painted, blurred, image, blurred)


def _finish(generated: Image.Image, cv: _Canvas) -> Image.Image:
    """Put the generated pixels back: paste a crop, or keep unmasked pixels exactly (A1111's overlay)."""
    if cv.crop is not None:
        return canvas.paste_back(cv.original, generated, cv.crop, cv.full_mask)
    if cv.mask is not None:
        return canvas.composite_unmasked(cv.original, generated, cv.full_mask)
    return generated


def _step_kwargs(scheduler, generator: torch.Generator) -> dict:
    """Pass ``eta`` / ``generator`` only to schedulers that take them, as diffusers' pipelines do."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def _sdxl_conditioning(components, pos: PromptEmbeddings, neg: PromptEmbeddings, cv: _Canvas, n: int, cfg: bool, device, dtype):
    """SDXL's micro-conditioning: pooled text embeddings and (original size, crop, target size) ids."""
    if components.family != "sdxl":
        return None
    time_ids = torch.tensor([[cv.height, cv.width, 0, 0, cv.height, cv.width]], dtype=dtype, device=device)
    pooled = pos.pooled.repeat(n, 1)
    ids = time_ids.repeat(n, 1)
    if cfg:
        pooled = torch.cat([neg.pooled.repeat(n, 1), pooled])
        ids = torch.cat([ids, ids])
    return {"text_embeds": pooled.to(device=device, dtype=dtype), "time_ids": ids}


def generate(
    components: Components,
    request: GenerationRequest,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    on_image: ImageCallback | None = None,
    skip: CancelCheck | None = None,
    interrupt: CancelCheck | None = None,
) -> GenerationResult:
    """Run a request on loaded components (already on their device) and return the images.

    ``progress`` is called after every step, ``cancel`` before every prompt chunk encoded and every
    step (return True to stop with GenerationCancelled), ``on_image`` as soon as each image is
    finished (so a caller can save it before a later batch is cancelled). ``skip``, also checked
    before every step, drops the batch being denoised and goes on with the next one (A1111's
    "Skip"). ``interrupt``, checked there too, ends the job as A1111's "Interrupt" does: the batch
    being denoised is finished from the clean image its last step predicted, and later batches are
    not made. With ``request.safety`` blur or block, ``components.safety_filter`` checks every
    finished batch (None counts as off: the front doors choose the default).
    """
    started = time.perf_counter()
    # 1. Resolve what the request leaves open: seed, sampler, schedule, sizes.
    seed = random_seed() if request.seed == -1 else request.seed
    sampler = resolve_sampler(request.sampler)
    schedule = resolve_schedule(sampler, request.schedule)
    cv = _prepare_canvas(components, request)
    warnings = _size_warnings(components, cv)
    device = components.execution_device
    _check_loras(components, request)
    policy = request.safety or "off"  # None: the front door chose nothing, and the engine does not filter
    safety = _safety_filter(components, policy)
    unchecked = "unavailable" if policy != "off" and safety is None else None

    # 2. Encode prompts once for every batch; <lora:...> tags are instructions, not words to encode.
    prompt, _ = extract_lora_tags(request.prompt)
    pos, neg = encode_pair(components, prompt, request.negative_prompt, clip_skip=request.clip_skip, device=device, cancel=cancel)
    info_prompt = _infotext_prompt(request)

    images: list[GeneratedImage] = []
    interrupted = False
    for batch in range(request.batch_count):
        first = seed + batch * request.batch_size
        stop = _Stop(cancel, skip, interrupt)
        try:
            pixels = _denoise(components, request, cv, pos, neg, first, sampler, schedule, batch, progress, stop)
        except _Skipped:
            continue
        except _Interrupted:
            interrupted = True
            break
        finished = [_finish(Image.fromarray((array * 255).round().astype(np.uint8)), cv) for array in pixels]
        # 9. Safety filter: flagged images are blurred or blocked, never dropped, and their infotext says so.
        screened = screen(safety, finished, policy, prompt) if safety is not None else [Screened(im) for im in finished]
        for i, (array, kept) in enumerate(zip(pixels, screened, strict=True)):
            if kept.filtered is not None:
                array = np.asarray(kept.image, dtype=np.float32) / 255  # the replacement's pixels, not the original's
            params = _parameters(components, request, cv, first + i, sampler.name, schedule, kept.label or unchecked)
            if stop.stopped_at is not None:
                # Not what the parameters would remake: say so, as the picture is only the estimate at that step.
                params["Interrupted"] = f"at step {stop.stopped_at} of {stop.total}"
            infotext = format_infotext(info_prompt, request.negative_prompt, params)
            images.append(GeneratedImage(kept.image, first + i, infotext, params, array, kept.filtered))
            if on_image is not None:
                on_image(images[-1])
        if stop.stopped_at is not None:
            interrupted = True
            break
    result_request = request.model_copy(update={"seed": seed})
    return GenerationResult(images, result_request, time.perf_counter() - started, interrupted, warnings)


def _size_warnings(components: Components, cv: _Canvas) -> list[str]:
    """A size far from the model's: past about twice its side, models repeat subjects and break into tiles."""
    native = native_size(components)
    if max(cv.width, cv.height) <= 2 * native:
        return []
    message = (
        f"{cv.width}x{cv.height} is more than twice the side this model was trained at ({native}x{native}); "
        f"expect repeated subjects, noise or tiles: ask for about {native}x{native}"
    )
    log.warning("%s", message)
    return [message]


def _check_loras(components: Components, request: GenerationRequest) -> None:
    """The LoRAs applied to the model must be the ones the request asks for, or its pixels and infotext would lie."""
    wanted = [lora_tag(lora.name, lora.weight) for lora in request.requested_loras()]
    applied = [lora_tag(name, weight) for name, weight, _ in components.extra.get("active_loras", [])]
    if wanted != applied:
        raise LienzoError(
            f"loras: the request asks for {' '.join(wanted) or 'no LoRA'} but the model has {' '.join(applied) or 'none'} "
            "applied; apply them first with lienzo.api.prepare_loras(components, request)"
        )


def _safety_filter(components: Components, policy: str) -> SafetyFilter | None:
    """The model's filter, loaded onto its device, when the policy needs one; None when it is off or
    the model has none (its images then pass, and their infotext says "Safety filter: unavailable")."""
    if policy == "off":
        return None
    if components.safety_filter is None:
        name = components.name or str(components.source or "the model")
        if name not in _WARNED_UNFILTERED:  # once per model: a server would otherwise say it on every job
            _WARNED_UNFILTERED.add(name)
            log.warning("safety policy %r: %s has no safety filter, so its images pass unchecked", policy, name)
        return None
    components.safety_filter.prepare(components.execution_device)
    return components.safety_filter


def _infotext_prompt(request: GenerationRequest) -> str:
    """The prompt as given, plus a tag for each LoRA given only in ``loras``, so A1111 and --from can remake it."""
    tagged = {name for name, _ in extract_lora_tags(request.prompt)[1]}
    extra = [lora_tag(lora.name, lora.weight) for lora in request.requested_loras() if lora.name not in tagged]
    return " ".join([request.prompt, *extra]) if extra else request.prompt


class _Skipped(Exception):
    """The caller skipped the batch being denoised."""


class _Interrupted(Exception):
    """The caller interrupted the job before the batch's first step: there is nothing to show."""


@dataclass
class _Stop:
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
            raise _Skipped
        if self.interrupt is None or not self.interrupt():
            return False
        if done == 0:
            raise _Interrupted
        self.stopped_at, self.total = done, total
        return True


def _denoised(scheduler, output, sample: torch.Tensor, pred: torch.Tensor, t) -> torch.Tensor:
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
    alpha = scheduler.alphas_cumprod[int(t)].to(device=sample.device, dtype=sample.dtype)
    if config.prediction_type == "v_prediction":
        return alpha.sqrt() * sample - (1 - alpha).sqrt() * pred
    return (sample - (1 - alpha).sqrt() * pred) / alpha.sqrt()


def _denoise(components, req, cv, pos, neg, first_seed, sampler, schedule, batch, progress, stop: _Stop) -> np.ndarray:
    """One batch: steps 3-8 of the pipeline. Returns float pixels, N x H x W x 3 in [0, 1]."""
    unet, vae = components.unet, components.vae
    device, dtype = components.execution_device, unet.dtype
    n = req.batch_size
    cfg = req.cfg_scale > 1.0  # guidance 1 is the conditional prediction alone: skip the second pass
    processor = VaeImageProcessor(vae_scale_factor=components.vae_scale_factor)
    latent_shape = (vae.config.latent_channels, cv.height // components.vae_scale_factor, cv.width // components.vae_scale_factor)
    generators = image_generators(first_seed, n)
    seeds = [first_seed + i for i in range(n)]

    # 3. One scheduler per image, so stochastic samplers draw each image's noise from its own seed.
    schedulers = [build_scheduler(sampler, schedule, components.scheduler_config, seed=s) for s in seeds]
    for s in schedulers:
        set_timesteps(s, sampler, schedule, req.steps, device=device, family=components.family)
    timesteps = schedulers[0].timesteps
    start = 0
    if cv.init is not None:
        # img2img runs the last ``strength`` share of the schedule, as diffusers and A1111 do.
        t_start = max(req.steps - min(int(req.steps * req.denoising_strength), req.steps), 0)
        start = t_start * schedulers[0].order
        timesteps = timesteps[start:]
        for s in schedulers:
            if hasattr(s, "set_begin_index"):
                s.set_begin_index(start)

    # 4. Prompt embeddings for the batch, [uncond..., cond...] as diffusers orders them.
    embeds = pos.embeds.repeat(n, 1, 1)
    if cfg:
        embeds = torch.cat([neg.embeds.repeat(n, 1, 1), embeds])
    embeds = embeds.to(device=device, dtype=dtype)
    added = _sdxl_conditioning(components, pos, neg, cv, n, cfg, device, dtype)

    # 5. Initial latents: pure noise, or the encoded image noised to the first timestep.
    image_latents = mask = masked_latents = None
    if cv.init is not None:
        image = processor.preprocess(cv.init, height=cv.height, width=cv.width).to(device=device, dtype=vae.dtype)
        with torch.no_grad():
            posterior = vae.encode(image).latent_dist
        # Each image samples the posterior with its own generator, before its noise (diffusers' order).
        image_latents = torch.cat([posterior.sample(g) for g in generators])
        image_latents = (vae.config.scaling_factor * image_latents).to(dtype)
    noise = batch_noise(generators, latent_shape, device=device, dtype=dtype)
    if cv.mask is not None:
        mask = canvas.mask_to_latent(cv.mask, latent_shape[1], latent_shape[2]).to(device=device, dtype=dtype)
        mask = mask.repeat(n, 1, 1, 1)
        image_latents = _fill_latents(image_latents, mask, req.inpainting_fill, generators, latent_shape)
        if components.is_inpainting:
            keep = (processor.preprocess(cv.mask.convert("RGB"), height=cv.height, width=cv.width)[:, :1] < 0).to(image)
            with torch.no_grad():
                masked_latents = vae.config.scaling_factor * vae.encode(image * keep).latent_dist.mode()
            masked_latents = masked_latents.to(dtype).repeat(n, 1, 1, 1)
    if image_latents is None or (mask is not None and req.denoising_strength >= 1.0):
        latents = noise * schedulers[0].init_noise_sigma
    elif len(timesteps):
        latents = schedulers[0].add_noise(image_latents, noise, timesteps[:1].repeat(n))
    else:
        latents = image_latents

    # 6.-7. Denoising loop.
    step_kwargs = [_step_kwargs(s, g) for s, g in zip(schedulers, generators, strict=True)]
    # Fast mode: one full U-Net pass every few steps, the deep features reused in between (DeepCache).
    denoiser = DeepCacheUNet(unet) if req.fast else unet
    started = time.perf_counter()
    denoised = latents
    for i, t in enumerate(timesteps):
        if stop.before_step(i, len(timesteps)):
            latents = denoised if mask is None or masked_latents is not None else (1 - mask) * image_latents + mask * denoised
            break
        scaled = torch.cat([s.scale_model_input(latents[j : j + 1], t) for j, s in enumerate(schedulers)])
        model_in = torch.cat([scaled, scaled]) if cfg else scaled
        if masked_latents is not None:
            extra = torch.cat([mask, masked_latents], dim=1)
            model_in = torch.cat([model_in, torch.cat([extra, extra]) if cfg else extra], dim=1)
        with torch.no_grad():
            pred = denoiser(model_in, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]
        if cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + req.cfg_scale * (cond - uncond)
        outputs = [s.step(pred[j : j + 1], t, latents[j : j + 1], **step_kwargs[j]) for j, s in enumerate(schedulers)]
        latents = torch.cat([out.prev_sample for out in outputs])
        if stop.interrupt is not None:
            denoised = torch.cat(
                [_denoised(s, out, scaled[j : j + 1], pred[j : j + 1], t) for j, (s, out) in enumerate(zip(schedulers, outputs))]
            )
        if mask is not None and masked_latents is None:
            # 4-channel models repaint only the mask: the rest is reset to the original, noised to the next step.
            keep = image_latents
            if i < len(timesteps) - 1:
                keep = schedulers[0].add_noise(image_latents, noise, timesteps[i + 1 : i + 2].repeat(n))
            latents = (1 - mask) * keep + mask * latents
        if progress is not None:
            progress(Progress(i + 1, len(timesteps), batch, req.batch_count, latents, components.family, time.perf_counter() - started))

    # 8. Decode: in tiles for large images; a half-precision VAE that overflows decodes again in fp32.
    decoded = decode_latents(vae, latents, tiling=components.vae_tiling)
    return processor.postprocess(decoded, output_type="np")


def _fill_latents(image_latents, mask, fill: str, generators, latent_shape) -> torch.Tensor:
    """A1111's masked-content modes in latent space: fresh noise, or nothing (zeros), under the mask."""
    if fill == "latent noise":
        noise = batch_noise(generators, latent_shape, device=image_latents.device, dtype=image_latents.dtype)
        return image_latents * (1 - mask) + noise * mask
    if fill == "latent nothing":
        return image_latents * (1 - mask)
    return image_latents


def _parameters(
    components: Components, req: GenerationRequest, cv: _Canvas, seed: int, sampler: str, schedule: str, safety: str | None = None
) -> dict:
    """The infotext fields of one image, in A1111's order."""
    params = {
        "Steps": req.steps,
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": f"{req.cfg_scale:g}",
        "Seed": seed,
        "Size": f"{cv.width}x{cv.height}",
        "Model hash": components.short_hash or None,
        "Model": components.name or None,
    }
    if cv.init is not None:
        params["Denoising strength"] = f"{req.denoising_strength:g}"
    if cv.mask is not None:
        params["Mask blur"] = req.mask_blur
        params["Masked content"] = req.inpainting_fill
        if req.inpaint_only_masked:
            params["Inpaint area"] = "Only masked"
            params["Masked area padding"] = req.only_masked_padding
    if req.is_outpaint:
        params["Outpaint"] = f"left {req.outpaint_left}, right {req.outpaint_right}, up {req.outpaint_up}, down {req.outpaint_down}"
    if req.clip_skip > 1:
        params["Clip skip"] = req.clip_skip
    if components.extra.get("vae_name"):
        params["VAE"] = components.extra["vae_name"]
    # A1111's form: "name: short hash, ..."; its reader splits on those characters, so names lose them.
    hashes = [f"{name.replace(':', '').replace(',', '')}: {h}" for name, _, h in components.extra.get("active_loras", []) if h]
    if hashes:
        params["Lora hashes"] = ", ".join(hashes)
    if req.fast:
        params["Fast"] = fast_label()
    if components.extra.get(INT8):  # a load-time switch, so only a record: --from does not turn it on
        params["Int8"] = "U-Net linear layers"
    if safety:
        params["Safety filter"] = safety
    params["Version"] = f"lienzo {__version__}"
    return params
