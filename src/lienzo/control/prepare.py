"""What a request needs from files before the engine runs: its ControlNet units' networks and control maps, and
the hires fix's model upscaler. Every door goes through :meth:`lienzo.studio.Studio.run`, which calls
:func:`prepare_resources`; the engine itself opens no files."""

import logging

from lienzo.control.models import find_control_model, load_control_model
from lienzo.control.preprocessors import find_preprocessor, pixel_perfect_resolution, preprocess
from lienzo.generation.control import Control
from lienzo.generation.control_unit import MAX_PROCESSOR_RES, MIN_PROCESSOR_RES
from lienzo.generation.plan import Resources
from lienzo.generation.request import GenerationRequest
from lienzo.models.components import Components
from lienzo.settings import Settings

log = logging.getLogger(__name__)

# Loaded ControlNets kept with a model: an SD 1.5 ControlNet is 0.7 GB in fp16, an SDXL one 2.5 GB.
KEEP_CONTROL_MODELS = 3


def prepare_resources(components: Components, request: GenerationRequest, settings: Settings) -> tuple[GenerationRequest, Resources]:
    """``request`` with each unit's model named by its title (``name [hash]``, as the extension's infotext and
    model list name it), and its resources: each unit's network (loaded once per model and kept) and control map
    (the preprocessor run on the unit's picture, or on the img2img input when it has none), and the hires
    fix's model upscaler. Errors name the field at fault (``controlnets.0.model``, ``hr_upscaler``)."""
    controls, units = [], []
    if request.controlnets and request.seed == -1:
        # Drawn here rather than by the engine: a seeded preprocessor (shuffle) must get the seed the infotext records.
        from lienzo.generation.noise import random_seed

        request = request.model_copy(update={"seed": random_seed()})
    width, height = _target_size(components, request)
    for index, unit in enumerate(request.controlnets):
        entry = find_control_model(unit.model, settings.models_dir, field=f"controlnets.{index}.model")
        model = _control_model(components, entry)
        picture = unit.image if unit.image is not None else request.init_image
        resolution = unit.processor_res
        if unit.pixel_perfect:
            resolution = min(max(pixel_perfect_resolution(picture.size, width, height, unit.resize_mode), MIN_PROCESSOR_RES), MAX_PROCESSOR_RES)
        # The inpaint modules read the request's mask (the extension's img2img mask); shuffle is drawn from the seed.
        mask = request.mask if find_preprocessor(unit.module).takes_mask else None
        control_map = preprocess(
            unit.module, picture, resolution, unit.threshold_a, unit.threshold_b, mask=mask, seed=request.seed,
            models_dir=settings.models_dir, field=f"controlnets.{index}.module",
        )
        unit = unit.model_copy(update={"model": entry.title})
        units.append(unit)
        controls.append(Control(unit, model, control_map))
    upscaler = None
    if request.enable_hr and request.mode == "txt2img":
        from lienzo.generation.hires import LATENT_MODES
        from lienzo.upscale.upscalers import BUILTINS, find_upscaler

        if request.hr_upscaler not in LATENT_MODES and request.hr_upscaler not in BUILTINS:
            upscaler = find_upscaler(request.hr_upscaler, settings.models_dir, field="hr_upscaler")
    if units:
        request = request.model_copy(update={"controlnets": units})
    return request, Resources(tuple(controls), upscaler)


def _target_size(components: Components, request: GenerationRequest) -> tuple[int, int]:
    """The first pass's size as the engine will make it, for pixel-perfect preprocessing."""
    from lienzo.generation.engine import native_size

    if request.init_image is not None:
        return request.width or request.init_image.width, request.height or request.init_image.height
    side = native_size(components)
    return request.width or side, request.height or side


def _control_model(components: Components, entry):
    """The entry's network on the model's device and in its U-Net's dtype, loaded once and kept (a few)."""
    cache = components.control_models
    key = (str(entry.path), entry.short_hash)
    if key not in cache:
        unet = components.unet
        cache[key] = load_control_model(entry, unet, dtype=unet.dtype, device=components.execution_device)
        log.info("loaded %s (%s)", entry.title, entry.kind)
        while len(cache) > KEEP_CONTROL_MODELS:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]
