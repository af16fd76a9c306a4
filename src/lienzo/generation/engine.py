"""The denoising engine: txt2img, img2img, inpaint and outpaint on diffusers models and schedulers.

It follows the order of operations of diffusers' Stable Diffusion pipelines (so a txt2img or img2img
image equals theirs for the same components, scheduler and seed) and adds what they lack: A1111
prompt syntax, per-image seeds that survive batching, inpaint fill modes, "only masked" crops,
outpainting, progress/preview/cancel callbacks. It knows nothing about files, HTTP or databases.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from lienzo.errors import InvalidRequestError, LienzoError
from lienzo.generation import canvas
from lienzo.generation.conditioning import (
    check_unguided_weights,
    encode_images,
    image_texts,
    prompt_images,
    reads_negative,
    with_image_prompts,
)
from lienzo.generation.infotext import image_params, infotext_prompt, with_templates
from lienzo.generation.latents import encode_references, reference_size
from lienzo.generation.loop import CancelCheck, Interrupted, Skipped, StepReport, Stop, denoise_batch
from lienzo.generation.lora_tags import extract_lora_tags, lora_tag
from lienzo.generation.noise import Variation, random_seed
from lienzo.generation.plan import BatchPlan, Canvas, Hires, Refiner, Resources
from lienzo.generation.prompts import encode_schedules
from lienzo.generation.request import GenerationRequest
from lienzo.generation.samplers import resolve_sampler, resolve_schedule, runs_as
from lienzo.generation.wildcards import DynamicPrompts, escape
from lienzo.images.metadata import format_infotext
from lienzo.models.components import Components
from lienzo.models.families import FAMILIES, SCHNELL_STEPS
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
        factors = _PREVIEW_RGB["sdxl" if self.family in ("sdxl", "sdxl_refiner") else "sd"]
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
ImageCallback = Callable[[GeneratedImage], None]


def native_size(components: Components) -> int:
    """The side length the model was trained at (512 for SD 1.x, 768 for SD 2-v, 1024 for SDXL, SD 3.x and
    Flux.1, whose transformer config has no sample size: 128 latent pixels, as FluxPipeline's default)."""
    return int(getattr(components.network.config, "sample_size", None) or 128) * components.vae_scale_factor


def _round8(v: int) -> int:
    return max(64, v - v % 8)


def _prepare_canvas(components: Components, req: GenerationRequest) -> Canvas:
    """Resolve sizes; grow, fill and crop the input image and mask for the request's mode."""
    if req.init_image is None:
        # With reference images, their pipeline's default (Flux.2: the first one's size; Qwen-Image-Edit: about a
        # megapixel of the last one's shape); else the model's.
        side = _round8(native_size(components))
        width, height = reference_size(components, req.reference_images) if req.reference_images else (side, side)
        return Canvas(req.width or width, req.height or height)
    image, mask = req.init_image.convert("RGB"), req.mask
    if req.is_outpaint:
        # The mask reaches into the old image at least as far as the blur, so the seam is repainted.
        image, mask = canvas.grow_canvas(
            image, req.outpaint_left, req.outpaint_right, req.outpaint_up, req.outpaint_down, overlap=max(8, req.mask_blur)
        )
    width, height = req.width or _round8(image.width), req.height or _round8(image.height)
    if mask is None:
        return Canvas(width, height, init=image.resize((width, height), Image.LANCZOS))
    mask = mask.convert("L")
    blurred = canvas.blur_mask(mask, req.mask_blur)
    fill = "fill" if req.is_outpaint and req.inpainting_fill == "original" else req.inpainting_fill
    painted = canvas.fill_masked(image, mask) if fill == "fill" else image
    if req.inpaint_only_masked:
        crop = canvas.crop_to_mask(painted, blurred, req.only_masked_padding, width, height)
        return Canvas(width, height, crop.image, crop.mask, image, blurred, crop)
    size = (width, height)
    if image.size != size:
        image, blurred = image.resize(size, Image.LANCZOS), blurred.resize(size, Image.LANCZOS)
        painted = painted.resize(size, Image.LANCZOS)
    return Canvas(width, height, painted, blurred, image, blurred)


def _finish(generated: Image.Image, cv: Canvas) -> Image.Image:
    """Put the generated pixels back: paste a crop, or keep unmasked pixels exactly (A1111's overlay)."""
    if cv.crop is not None:
        return canvas.paste_back(cv.original, generated, cv.crop, cv.full_mask)
    if cv.mask is not None:
        return canvas.composite_unmasked(cv.original, generated, cv.full_mask)
    return generated


def generate(
    components: Components,
    request: GenerationRequest,
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    on_image: ImageCallback | None = None,
    skip: CancelCheck | None = None,
    interrupt: CancelCheck | None = None,
    dynamic: DynamicPrompts | None = None,
    resources: Resources | None = None,
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

    A prompt with wildcards or variants (:mod:`lienzo.generation.wildcards`) is resolved for each image
    by ``dynamic`` (its wildcard folder and mode; None: no folder, random mode) before anything is
    encoded; each image's infotext has its own text as the prompt and the template under ``Template``.
    """
    started = time.perf_counter()
    # 1. Resolve what the request leaves open: the model family's defaults, seed, sampler, schedule, sizes.
    request = family_defaults(components, request)
    seed = random_seed() if request.seed == -1 else request.seed
    sampler = resolve_sampler(request.sampler)
    schedule = resolve_schedule(sampler, request.schedule, components.scheduler_config)
    runs_as(sampler, schedule, components.scheduler_config)  # a sampler with no form for this model is refused now
    cv = _prepare_canvas(components, request)
    warnings = _size_warnings(components, cv)
    device = components.execution_device
    _check_loras(components, request)
    resources = resources or Resources()
    _check_controls(request, resources)
    policy = request.safety or "off"  # None: the front door chose nothing, and the engine does not filter
    safety = _safety_filter(components, policy)
    unchecked = "unavailable" if policy != "off" and safety is None else None

    # 2. Prompts. Wildcards and variants first: each image's text, drawn from its seed before anything
    # runs (a missing wildcard file fails here); None for prompts without them, which go on as before.
    image_count = request.batch_size * request.batch_count
    texts = image_texts(request, [seed + (0 if request.subseed_strength else k) for k in range(image_count)], dynamic)

    # Then encode once for every batch; <lora:...> tags are instructions, not words to encode.
    prompt, _ = extract_lora_tags(request.prompt)
    # Prompt editing ([from:to:when]) and alternation ([a|b]) give each step its own text; each text is encoded once.
    if texts is None:
        pos, neg = encode_schedules(
            components, prompt, request.negative_prompt, request.steps, clip_skip=request.clip_skip, device=device, cancel=cancel,
            images=prompt_images(components, request), guided=reads_negative(request),
        )
        conditioning = None
    else:
        conditioning = encode_images(components, request, texts, device, cancel)
        pos, neg = conditioning[0]
    # Composable prompts (AND) without guidance are a weighted mean of the subprompts' predictions.
    check_unguided_weights(request, [pos] if conditioning is None else [image for image, _ in conditioning])
    info_prompt = infotext_prompt(request)

    # 3.-8. One plan for every batch (the engine's only reading of the request for them); each batch
    # moves its first seed on by the batch size.
    plan = BatchPlan(
        canvas=cv, prompt=pos, negative=neg, sampler=sampler, schedule=schedule, steps=request.steps,
        cfg_scale=request.cfg_scale, denoising_strength=request.denoising_strength,
        inpainting_fill=request.inpainting_fill, fast=request.fast, batch_size=request.batch_size, first_seed=seed,
        tiling=request.tiling, distilled_cfg_scale=request.distilled_cfg_scale or 0.0, shift=request.shift,
        references=encode_references(components, request.reference_images), controls=resources.controls,
    )
    if request.enable_hr and request.mode == "txt2img":
        plan = replace(plan, hires=_hires(components, request, cv, sampler, schedule, resources, device, cancel))
    if request.refiner is not None:
        plan = replace(plan, refiner=_refiner(components, request, resources, texts is not None, cancel))
    images: list[GeneratedImage] = []
    interrupted = False
    subseed = random_seed() if request.subseed == -1 else request.subseed
    for batch in range(request.batch_count):
        first = batch * request.batch_size  # the request's index of the batch's first image
        variation = Variation(
            tuple(subseed + first + i for i in range(request.batch_size)), request.subseed_strength,
            (request.seed_resize_from_w, request.seed_resize_from_h),
        )
        batch_plan = replace(plan, first_seed=seed + (0 if variation.strength else first), variation=variation)
        if conditioning is not None:
            batch_plan = with_image_prompts(batch_plan, conditioning[first : first + request.batch_size])
        stop = Stop(cancel, skip, interrupt)
        report = _reporter(progress, components, batch, request.batch_count)
        try:
            pixels = denoise_batch(components, batch_plan, stop, report)
        except Skipped:
            continue
        except Interrupted:
            interrupted = True
            break
        finished = [_finish(Image.fromarray((array * 255).round().astype(np.uint8)), cv) for array in pixels]
        # 9. Safety filter: flagged images are blurred or blocked, never dropped, and their infotext says so.
        screened = screen(safety, finished, policy, prompt) if safety is not None else [Screened(im) for im in finished]
        for i, (array, kept) in enumerate(zip(pixels, screened, strict=True)):
            if kept.filtered is not None:
                array = np.asarray(kept.image, dtype=np.float32) / 255  # the replacement's pixels, not the original's
            image_seed = batch_plan.seeds[i]
            resolved = {
                "seed": image_seed, "subseed": variation.subseeds[i], "sampler": sampler.name, "schedule": schedule,
                "width": cv.width, "height": cv.height,
            }
            if plan.hires is not None:
                resolved["hr_schedule"] = plan.hires.schedule
            params = image_params(components, request, resolved, kept.label or unchecked)
            if stop.stopped_at is not None:
                # Not what the parameters would remake: say so, as the picture is only the estimate at that step.
                params["Interrupted"] = f"at step {stop.stopped_at} of {stop.total}"
            if texts is None:
                infotext = format_infotext(info_prompt, request.negative_prompt, params)
            else:
                image_prompt, image_negative = texts[first + i]
                params = with_templates(params, request)
                # Escaped, so that --from remakes this text instead of drawing a new one from the template.
                infotext = format_infotext(infotext_prompt(request, escape(image_prompt)), escape(image_negative), params)
            images.append(GeneratedImage(kept.image, image_seed, infotext, params, array, kept.filtered))
            if on_image is not None:
                on_image(images[-1])
        if stop.stopped_at is not None:
            interrupted = True
            break
    result_request = request.model_copy(update={"seed": seed, **({"subseed": subseed} if request.subseed_strength else {})})
    return GenerationResult(images, result_request, time.perf_counter() - started, interrupted, warnings)


def family_defaults(components: Components, request: GenerationRequest) -> GenerationRequest:
    """``request`` with what it leaves to the model (None) filled in from the family table: steps, CFG
    scale (a base model's where the family has step-distilled and base models), sampler, Flux.1 dev's distilled
    CFG scale and a flow model's fixed shift; refused here, before
    anything runs, what the family cannot do."""
    spec = components.spec
    flux_schnell = components.family == "flux" and not components.guidance_embeds
    steps, cfg = spec.default_steps, spec.default_cfg
    if components.is_distilled is False and spec.base_defaults is not None:
        steps, cfg = spec.base_defaults  # an undistilled base (Flux.2 Klein base): its pipeline's steps and CFG
    update: dict = {
        "steps": request.steps or (SCHNELL_STEPS if flux_schnell else steps),
        "cfg_scale": cfg if request.cfg_scale is None else request.cfg_scale,
        "sampler": request.sampler or spec.default_sampler,
    }
    if components.guidance_embeds:
        update["distilled_cfg_scale"] = spec.default_distilled_cfg if request.distilled_cfg_scale is None else request.distilled_cfg_scale
    if spec.flow and request.shift is None and not components.scheduler_config.get("use_dynamic_shifting"):
        update["shift"] = components.scheduler_config.get("shift", 1.0)
    if request.reference_images and not spec.reference_images:
        takers = ", ".join(f.label for f in FAMILIES.values() if f.reference_images)
        raise InvalidRequestError("reference_images", f"{spec.label} models take no reference images (only {takers} do); leave it empty")
    if spec.prompt_images and not request.reference_images:  # its pipeline has nothing to edit (and fails) without one
        raise InvalidRequestError("reference_images", f"{spec.label} edits the images it is given: give at least one")
    if request.controlnets and components.family == "sdxl_refiner":
        raise InvalidRequestError("controlnets", "the SDXL refiner takes no ControlNet units (they are made for SDXL's base U-Net)")
    if spec.is_transformer and request.controlnets and components.family != "flux":
        raise InvalidRequestError("controlnets", f"{spec.label} models take no ControlNet units yet (SD 1.x, 2.x, SDXL and Flux.1 do)")
    for index, unit in enumerate(request.controlnets if components.family == "flux" else ()):
        if unit.control_mode == "My prompt is more important":  # its decay is per U-Net level: Flux.1 has none
            raise InvalidRequestError(f"controlnets.{index}.control_mode", "Flux.1 units take Balanced or ControlNet is more important")
    if request.fast and request.controlnets:
        raise InvalidRequestError("fast", "fast mode skips the U-Net blocks ControlNets steer; turn it off to use ControlNet units")
    if spec.is_transformer:
        for name, on, why in (("fast", request.fast, "DeepCache reuses U-Net features"), ("tiling", request.tiling, "circular padding is for U-Net convolutions")):
            if on:
                raise InvalidRequestError(name, f"{spec.label} models have no {name} mode yet ({why}); turn it off")
    return request.model_copy(update=update)


def _check_controls(request: GenerationRequest, resources: Resources) -> None:
    """The prepared units must be the request's, or the pictures and their infotext would not match."""
    prepared = [control.unit for control in resources.controls]
    wanted = [unit.model_copy(update={"image": None}) for unit in request.controlnets]
    if [unit.model_copy(update={"image": None}) for unit in prepared] != wanted:
        raise LienzoError(
            f"controlnets: the request has {len(wanted)} ControlNet unit(s) but {len(prepared)} other unit(s) were prepared; "
            "prepare them with lienzo.api.prepare_resources(components, request)"
        )


def _hires(components, request: GenerationRequest, cv: Canvas, sampler, schedule: str, resources: Resources, device, cancel) -> Hires:
    """The hires fix's second pass: its size, steps, sampler, prompts and how it enlarges."""
    from lienzo.upscale.upscalers import LATENT_MODES

    width, height = request.hires_size(cv.width, cv.height)
    steps = request.hr_second_pass_steps or request.steps
    hr_sampler = resolve_sampler(request.hr_sampler) if request.hr_sampler else sampler
    hr_schedule = schedule
    if request.hr_sampler or request.hr_schedule != "Automatic":
        hr_schedule = resolve_schedule(hr_sampler, request.hr_schedule, components.scheduler_config)
    runs_as(hr_sampler, hr_schedule, components.scheduler_config)
    prompt = negative = None
    if request.hr_prompt or request.hr_negative_prompt:
        text, _ = extract_lora_tags(request.hr_prompt or request.prompt)
        prompt, negative = encode_schedules(
            components, text, request.hr_negative_prompt or request.negative_prompt, steps, clip_skip=request.clip_skip,
            device=device, cancel=cancel, guided=reads_negative(request),
        )
    upscale = None
    if request.hr_upscaler not in LATENT_MODES:
        upscale = _picture_upscaler(request.hr_upscaler, resources, str(device), cancel)
    return Hires(
        width, height, steps, request.hr_denoising_strength, hr_sampler, hr_schedule, LATENT_MODES.get(request.hr_upscaler),
        upscale, prompt, negative,
    )


def _refiner(components: Components, request: GenerationRequest, resources: Resources, dynamic: bool, cancel) -> Refiner:
    """The refiner stage: the loaded refiner, checked to work in this model's latents, with the prompts encoded by it."""
    refiner = resources.refiner
    if refiner is None:
        raise LienzoError("refiner: the refiner model was not loaded; prepare it with lienzo.api.prepare_resources(components, request)")
    if dynamic:
        raise InvalidRequestError("refiner", "wildcards and {a|b} variants are not read by the refiner yet; write the prompt out")
    problem = _refiner_mismatch(components, refiner)
    if problem:
        raise InvalidRequestError("refiner", f"{refiner.name or 'the refiner'} cannot take over from {components.name or 'this model'}: {problem}")
    prompt, _ = extract_lora_tags(request.prompt)
    pos, neg = encode_schedules(
        refiner, prompt, request.negative_prompt, request.steps, clip_skip=request.clip_skip, device=refiner.execution_device,
        cancel=cancel, guided=reads_negative(request),
    )
    return Refiner(refiner, pos, neg, request.refiner_switch_at)


def _refiner_mismatch(components: Components, refiner: Components) -> str | None:
    """Why ``refiner`` cannot denoise ``components``' latents, or None: the same latent space (VAE), the same kind of
    prediction, a U-Net, and inpainting channels on both or neither."""
    if refiner.spec.is_transformer or components.spec.is_transformer:
        return "the refiner stage is for U-Net models (SD 1.x, 2.x, SDXL)"
    if (refiner.vae_scale_factor, refiner.vae.config.latent_channels) != (components.vae_scale_factor, components.vae.config.latent_channels):
        return "their latents differ (another VAE)"
    if float(refiner.vae.config.scaling_factor) != float(components.vae.config.scaling_factor):
        return f"their VAEs scale latents differently ({refiner.vae.config.scaling_factor} and {components.vae.config.scaling_factor})"
    ours, theirs = components.scheduler_config.get("prediction_type"), refiner.scheduler_config.get("prediction_type")
    if ours != theirs:
        return f"one predicts {ours}, the other {theirs}"
    if refiner.is_inpainting != components.is_inpainting:
        return "one is an inpainting model and the other is not"
    return None


def _picture_upscaler(name: str, resources: Resources, device: str, cancel):
    """A picture to a size by the built-in or model upscaler ``name`` (a model one prepared by the service), on the
    model's device."""
    from lienzo.upscale.upscalers import BUILTINS, Upscaler, upscale

    if resources.upscaler is not None and resources.upscaler.name == name:
        upscaler = resources.upscaler
    elif name in BUILTINS:
        upscaler = Upscaler(name, None, None)
    else:
        raise LienzoError(f"hr_upscaler: {name!r} was not prepared; prepare it with lienzo.api.prepare_resources(components, request)")

    def enlarge(picture: Image.Image, width: int, height: int) -> Image.Image:
        enlarged = upscale(picture, upscaler, max(width / picture.width, height / picture.height), device=device, cancel=cancel)
        return enlarged if enlarged.size == (width, height) else enlarged.resize((width, height), Image.LANCZOS)

    return enlarge


def _reporter(progress: ProgressCallback | None, components: Components, batch: int, batch_count: int) -> StepReport | None:
    """The loop's report after each step, as the caller's :class:`Progress` (the loop knows no batches or families)."""
    if progress is None:
        return None

    def report(step: int, total: int, latents: torch.Tensor, elapsed: float) -> None:
        progress(Progress(step, total, batch, batch_count, latents, components.family, elapsed))

    return report


def _size_warnings(components: Components, cv: Canvas) -> list[str]:
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
    applied = [lora_tag(lora.name, lora.weight) for lora in components.loras.active]
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
