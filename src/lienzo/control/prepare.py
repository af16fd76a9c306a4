"""What a request needs from files before the engine runs: its ControlNet units' networks and control maps (an
IP-Adapter unit's: its adapter and the picture's CLIP embeddings), and the hires fix's model upscaler. Every door goes through :meth:`lienzo.studio.Studio.run`, which calls
:func:`prepare_resources`; the engine itself opens no files."""

import logging

from lienzo.control.ip_adapter import encode_image, encoder_for, find_image_encoder, load_image_encoder, load_ip_adapter
from lienzo.control.models import find_control_model, load_control_model
from lienzo.control.preprocessors import IP_ADAPTER_MODULES, find_preprocessor, pixel_perfect_resolution, preprocess
from lienzo.errors import InvalidRequestError
from lienzo.generation.control import UNION_MODES, Control
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
    (the preprocessor run on the unit's picture, or on the img2img input when it has none; an IP-Adapter unit's
    picture is encoded by its CLIP vision encoder instead), and the hires fix's model upscaler. Errors name the field at fault (``controlnets.0.model``, ``hr_upscaler``)."""
    controls, units = [], []
    if request.controlnets:
        from lienzo.generation.engine import family_defaults

        # The engine's refusals (a family that takes no units, a control mode it cannot do) before any file is read.
        family_defaults(components, request)
    if request.controlnets and request.seed == -1:
        # Drawn here rather than by the engine: a seeded preprocessor (shuffle) must get the seed the infotext records.
        from lienzo.generation.noise import random_seed

        request = request.model_copy(update={"seed": random_seed()})
    width, height = _target_size(components, request)
    for index, unit in enumerate(request.controlnets):
        entry = find_control_model(unit.model, settings.models_dir, field=f"controlnets.{index}.model")
        picture = unit.image if unit.image is not None else request.init_image
        if _is_image_prompt(unit, entry, index):
            if components.spec.is_transformer:
                raise InvalidRequestError(f"controlnets.{index}.model", f"{entry.title} is an IP-Adapter for SD models; {components.spec.label} takes none")
            unit = unit.model_copy(update={"model": entry.title})
            units.append(unit)
            controls.append(_image_prompt(components, unit, entry, picture, settings, index))
            continue
        model = _control_model(components, entry)
        if getattr(model, "union", False) and unit.module not in UNION_MODES:
            # A Union ControlNet reads which kind of map it is given; lienzo tells it by the preprocessor.
            raise InvalidRequestError(
                f"controlnets.{index}.module",
                f"{entry.title} is a Union ControlNet: it must know the kind of map, so pick one of the modules {', '.join(UNION_MODES)}",
            )
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
        from lienzo.upscale.upscalers import LATENT_MODES
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


def _is_image_prompt(unit, entry, index: int) -> bool:
    """Whether the unit is an IP-Adapter unit: an ip-adapter module with an IP-Adapter model. Either without the
    other is refused, naming the field to change."""
    embeds = find_preprocessor(unit.module).embeds
    if embeds and entry.kind != "ip_adapter":
        raise InvalidRequestError(
            f"controlnets.{index}.model", f"{unit.module} makes an image prompt for an IP-Adapter, and {entry.title} is not one"
        )
    if entry.kind == "ip_adapter" and not embeds:
        modules = ", ".join(IP_ADAPTER_MODULES)
        raise InvalidRequestError(f"controlnets.{index}.module", f"{entry.title} is an IP-Adapter: use one of the modules {modules}")
    return embeds


def _image_prompt(components: Components, unit, entry, picture, settings: Settings, index: int) -> Control:
    """An IP-Adapter unit: its adapter and CLIP image encoder (each loaded once and kept) and the picture's embeddings."""
    adapter = _control_model(components, entry)
    encoder_name = encoder_for(unit.module, entry.name)
    path = find_image_encoder(settings.models_dir, encoder_name)
    encoder = _cached(components, ("clip_vision", str(path)), lambda: load_image_encoder(path, dtype=components.unet.dtype, device=components.execution_device))
    config = encoder.config
    gives = config.hidden_size if adapter.reads_hidden_states else config.projection_dim
    if gives != adapter.embed_width:
        raise InvalidRequestError(
            f"controlnets.{index}.module",
            f"{entry.title} reads {adapter.embed_width}-wide CLIP embeddings; {unit.module} runs the {encoder_name} encoder "
            f"({path.name}), which gives {gives}: pick the module made for this adapter (or ip-adapter-auto)",
        )
    embeds = encode_image(encoder, picture, adapter.reads_hidden_states)
    return Control(unit, adapter, picture, image_embeds=embeds)


def _cached(components: Components, key: tuple, load):
    """``load()``'s model, kept with the model's other control networks (a few, the least recently used dropped)."""
    cache = components.control_models
    if key not in cache:
        cache[key] = load()
        while len(cache) > KEEP_CONTROL_MODELS:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def _control_model(components: Components, entry):
    """The entry's network on the model's device and in its U-Net's (Flux.1: transformer's) dtype, loaded once and
    kept (a few)."""
    network = components.network
    load = load_ip_adapter if entry.kind == "ip_adapter" else load_control_model

    def loaded():
        model = load(entry.path, network, dtype=network.dtype, device=components.execution_device)
        log.info("loaded %s (%s)", entry.title, entry.kind)
        return model

    return _cached(components, (str(entry.path), entry.short_hash), loaded)
