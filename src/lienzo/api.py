"""The Python API: ``load_model`` and ``generate``, the same engine every other front door calls."""

import logging
from collections.abc import Callable
from pathlib import Path

from lienzo.devices import configure_threads, pick_device, pick_dtype
from lienzo.errors import ModelFileError
from lienzo.generation import engine, limits
from lienzo.generation.request import GenerationRequest, build_request
from lienzo.models import formats
from lienzo.models.components import Components
from lienzo.models.loading import load_components
from lienzo.models.lora import apply_loras
from lienzo.models.registry import Registry, embedded_model
from lienzo.models.speed import SpeedOptions, apply_speed
from lienzo.settings import Settings

log = logging.getLogger(__name__)


def default_model(registry: Registry, settings: Settings) -> Path:
    """The model used when none is named: the settings' ``default_model``, else the one lienzo ships,
    else the first checkpoint in the models dir."""
    if settings.default_model:
        return registry.resolve(settings.default_model)
    embedded = embedded_model()
    if embedded is not None:
        return embedded
    for path in registry.candidates():
        if registry.entry(path).is_checkpoint:
            return path
    raise ModelFileError(
        f"model: no model given and none found in {registry.models_dir}; "
        "pass --model PATH or put a .safetensors checkpoint or diffusers folder there"
    )


def load_model(
    model: str | Path | None = None,
    *,
    vae: str | Path | None = None,
    prediction_type: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    vae_dtype: str | None = None,
    threads: int | None = None,
    channels_last: bool | None = None,
    compile: bool | None = None,
    vae_tiling: str | None = None,
    low_vram: bool | None = None,
    attention_slicing: bool | None = None,
    int8: bool | None = None,
    settings: Settings | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Components:
    """Load a model by path or by name in the models dir, on the chosen device, ready to generate.

    ``dtype`` ``auto`` is fp16 on GPUs, bf16 on CPUs that compute it natively and fp32 on others;
    ``vae_dtype`` ``auto`` follows it (fp32 beside fp16 for VAEs that overflow in fp16). The speed
    switches (``threads``, ``channels_last``, ``compile``, ``vae_tiling``, ``low_vram``, ``attention_slicing``, ``int8``; see
    :class:`lienzo.models.speed.SpeedOptions`) left at None come from ``settings``. ``cancel`` is asked
    while hashing and between the model's parts; when it says stop, GenerationCancelled is raised.
    """
    settings = settings or Settings()
    registry = Registry(settings.models_dir, settings.cache_dir)
    path = registry.resolve(model) if model is not None else default_model(registry, settings)
    vae_path = registry.resolve(vae, field="vae") if vae is not None else None
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    vae_dtype = vae_dtype or settings.vae_dtype
    torch_vae_dtype = None if vae_dtype == "auto" else pick_dtype(vae_dtype, torch_device)
    speed = SpeedOptions.from_settings(
        settings, channels_last=channels_last, compile=compile, vae_tiling=vae_tiling, low_vram=low_vram,
        attention_slicing=attention_slicing, int8=int8,
    )
    configure_threads(threads or settings.threads)
    entry = registry.entry(path, cancel=cancel)
    if entry.error:
        raise ModelFileError(f"model: {entry.error}")
    components = load_components(
        path, vae=vae_path, prediction_type=prediction_type, dtype=torch_dtype, vae_dtype=torch_vae_dtype, cancel=cancel
    )
    components.name, components.short_hash, components.sha256 = Path(entry.name).name, entry.short_hash, entry.sha256
    formats.stop_if_cancelled(cancel)
    if not (speed.low_vram and torch_device.type == "cuda"):  # offloaded models stay in CPU memory
        components.to(torch_device)
    log.info("loaded %s on %s in %s (VAE %s)", entry.name, torch_device, torch_dtype, components.vae.dtype)
    return apply_speed(components, speed, torch_device)


def prepare_loras(
    components: Components, request: GenerationRequest, settings: Settings | None = None, *, allow_paths: bool = True
) -> None:
    """Apply exactly the request's LoRAs (``loras`` and ``<lora:...>`` prompt tags) to ``components``,
    finding each name in the models dir's ``Lora`` folder; call it before every ``engine.generate``.
    ``allow_paths`` False (a server's remote clients): only LoRAs the folder lists, see ``Registry.resolve_lora``."""
    settings = settings or Settings()
    registry = Registry(settings.models_dir, settings.cache_dir)
    loras = request.requested_loras()
    apply_loras(components, [(registry.resolve_lora(lora.name, allow_paths=allow_paths), lora.name, lora.weight) for lora in loras])


def generate(
    request: GenerationRequest | None = None,
    *,
    model: Components | str | Path | None = None,
    progress: engine.ProgressCallback | None = None,
    cancel: engine.CancelCheck | None = None,
    on_image: engine.ImageCallback | None = None,
    **fields,
) -> engine.GenerationResult:
    """Generate images: ``generate(prompt="a red apple", steps=20, model="sd15")`` or with a request.
    The settings' limits apply, as on every front door: raise them with LIENZO_MAX_PIXELS, ..."""
    request = request or build_request(**fields)
    limits.check_limits(request, Settings(), count_batches=False)
    components = model if isinstance(model, Components) else load_model(model)
    prepare_loras(components, request)
    return engine.generate(components, request, progress=progress, cancel=cancel, on_image=on_image)
