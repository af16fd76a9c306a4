"""The use case every front door shares: generate, then save and record.

:class:`Studio` resolves and loads a model, applies a request's LoRAs, runs the engine (with progress,
cancel, interrupt and skip), saves each image as it is done (infotext, provenance, watermark; see
:mod:`lienzo.outputs`) and records it in the gallery. The CLI, the Python API and the server's job queue
are adapters around it: each keeps only what is its own (progress bars and printing; job bookkeeping and
previews; the API's return value).
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from lienzo import outputs
from lienzo.control.prepare import prepare_resources
from lienzo.devices import configure_threads, pick_device, pick_dtype
from lienzo.errors import InvalidRequestError, LienzoError, ModelFileError
from lienzo.gallery.store import Gallery
from lienzo.generation import engine
from lienzo.generation.request import GenerationRequest, build_request
from lienzo.generation.styles import merge_styles
from lienzo.models import formats
from lienzo.models.components import Components, PromptCache
from lienzo.models.embeddings import EMBEDDINGS_FOLDER, refresh_embeddings
from lienzo.models.loading import load_components
from lienzo.models.lora import apply_loras
from lienzo.models.registry import Registry, embedded_model
from lienzo.models.speed import SpeedOptions, apply_speed
from lienzo.origins import provenance_for
from lienzo.settings import Settings

log = logging.getLogger(__name__)

# Called with each image once it is saved, and where it went.
SavedCallback = Callable[[engine.GeneratedImage, outputs.SavedOutput], None]
# Called when an image cannot be written (a full disk, a folder removed meanwhile) with the error and the
# folder; it may raise the door's own error instead. Without one the OSError itself propagates.
SaveFailedCallback = Callable[[OSError, Path], None]


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
    text_encoders: Sequence[str | Path] = (),
    t5: bool = True,
    text_encoder_device: str | None = None,
    free_text_encoders: bool | None = None,
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
    fp8: bool | None = None,
    settings: Settings | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Components:
    """Load a model by path or by name in the models dir, on the chosen device, ready to generate.

    ``dtype`` ``auto`` is fp16 on GPUs, bf16 on CPUs that compute it natively and fp32 on others;
    ``vae_dtype`` ``auto`` follows it (fp32 beside fp16 for VAEs that overflow in fp16). The speed
    switches (``threads``, ``channels_last``, ``compile``, ``vae_tiling``, ``low_vram``, ``attention_slicing``, ``int8``, ``fp8``; see
    :class:`lienzo.models.speed.SpeedOptions`) left at None come from ``settings``. ``cancel`` is asked
    while hashing and between the model's parts; when it says stop, GenerationCancelled is raised.

    An SD 3.x or Flux.1 transformer file alone (ComfyUI's ``diffusion_models``) is completed with the
    ``text_encoders`` and ``vae`` named (names in the models dir or paths), else with the ones found in the
    models dir's ``text_encoders``, ``clip`` and ``vae`` folders (see :mod:`lienzo.models.assembly`).
    ``t5`` False runs SD 3.x without its T5 text encoder (less memory, weaker prompt following).
    ``text_encoder_device`` (``cpu``) keeps the text encoders there while the network runs on ``device``.
    ``free_text_encoders`` (None: the settings') keeps them in CPU memory instead and moves them beside the
    network only to encode a text the model's prompt cache (``settings.prompt_cache_mb``) lacks, back once a
    job's prompts are encoded: the network gets their memory while it runs, as with ``text_encoder_device``,
    but they compute on the fast device, for the price of a move there and back per job with a new text
    (``components.text_encoder_offload``, :func:`lienzo.generation.prompts.text_encoders_on_call`). The two
    exclude each other. With ``low_vram`` on CUDA the text encoders are streamed layer by layer instead.
    """
    settings = settings or Settings()
    free_text_encoders = settings.free_text_encoders if free_text_encoders is None else free_text_encoders
    if free_text_encoders and text_encoder_device is not None:
        raise LienzoError(
            f"free_text_encoders: the text encoders either stay on text_encoder_device ({text_encoder_device}) "
            "or move beside the network to encode; choose one"
        )
    registry = Registry(settings.models_dir, settings.cache_dir)
    path = registry.resolve(model) if model is not None else default_model(registry, settings)
    vae_path = registry.resolve(vae, field="vae") if vae is not None else None
    text_encoder_paths = [registry.resolve(name, field="text_encoder") for name in text_encoders]
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    vae_dtype = vae_dtype or settings.vae_dtype
    torch_vae_dtype = None if vae_dtype == "auto" else pick_dtype(vae_dtype, torch_device)
    speed = SpeedOptions.from_settings(
        settings, channels_last=channels_last, compile=compile, vae_tiling=vae_tiling, low_vram=low_vram,
        attention_slicing=attention_slicing, int8=int8, fp8=fp8,
    )
    configure_threads(threads or settings.threads)
    entry = registry.entry(path, cancel=cancel)
    if entry.error:
        raise ModelFileError(f"model: {entry.error}")
    components = load_components(
        path, vae=vae_path, prediction_type=prediction_type, dtype=torch_dtype, vae_dtype=torch_vae_dtype,
        text_encoders=text_encoder_paths, t5=t5, models_dir=settings.models_dir, device=torch_device,
        low_vram=speed.low_vram, cancel=cancel,
    )
    components.name, components.short_hash, components.sha256 = Path(entry.name).name, entry.short_hash, entry.sha256
    formats.stop_if_cancelled(cancel)
    components.prompt_cache = PromptCache(max_bytes=int(settings.prompt_cache_mb * 2**20))
    components.text_encoder_offload = free_text_encoders
    if text_encoder_device is not None:
        components.text_encoder_device = pick_device(text_encoder_device)
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
    # The textual-inversion embeddings its prompts may name: the models dir's, read again when they change.
    refresh_embeddings(components, settings.models_dir / EMBEDDINGS_FOLDER)


def apply_styles(request: GenerationRequest, gallery: Gallery | None) -> GenerationRequest:
    """``request`` with its styles (the gallery's presets, by name, ignoring case) merged into its prompts,
    and none left; InvalidRequestError naming ``styles`` for a name no preset has."""
    if not request.styles:
        return request
    presets = gallery.presets() if gallery is not None else []
    prompt, negative, unknown = merge_styles(request.prompt, request.negative_prompt, request.styles, presets)
    if unknown:
        saved = ", ".join(p.name for p in presets) or "none (lienzo styles import styles.csv)"
        raise InvalidRequestError("styles", f"no style named {unknown[0]!r}; saved styles: {saved}")
    return build_request(**{**dict(request), "prompt": prompt, "negative_prompt": negative, "styles": []})


@dataclass
class Studio:
    """Generate, then save and record, for one set of settings.

    ``gallery``: where saved images are recorded (None: files only; ``lienzo gallery reconcile`` adds
    them later). ``allow_lora_paths`` False: LoRAs only by the names the models dir's ``Lora`` folder
    lists, never a path elsewhere (a server's remote clients).
    """

    settings: Settings
    gallery: Gallery | None = None
    allow_lora_paths: bool = True

    def dynamic_prompts(self, request: GenerationRequest) -> engine.DynamicPrompts:
        """Wildcards (``__name__``) come from the models dir's ``wildcards`` folder; the request picks the mode."""
        return engine.DynamicPrompts(self.settings.models_dir / "wildcards", combinatorial=request.combinatorial)

    def load_model(self, model: str | Path | None = None, **options) -> Components:
        """:func:`load_model` with these settings."""
        return load_model(model, settings=self.settings, **options)

    def _with_refiner(self, components: Components, request: GenerationRequest, resources):
        """The request's refiner (named by its A1111 title, as the infotext records it), loaded on the model's device
        and in its dtype and kept beside the model for the next job; none without one."""
        if request.refiner is None:
            return request, resources
        registry = Registry(self.settings.models_dir, self.settings.cache_dir)
        titled = registry.checkpoint_by_title(request.refiner)  # how the infotext and A1111 clients name it
        path = titled.path if titled is not None else registry.resolve(request.refiner, allow_paths=self.allow_lora_paths, field="refiner")
        entry = registry.entry(path)
        if entry.error or not entry.is_checkpoint:
            raise InvalidRequestError("refiner", f"{request.refiner!r} is not a model lienzo can load: {entry.error or entry.architecture}")
        kept = components.refiner
        if kept is None or kept[0] != (path, entry.sha256):
            components.refiner = None  # the old one's memory first
            dtype = {"torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(str(components.network.dtype), "fp32")
            loaded = load_model(path, settings=self.settings, device=str(components.execution_device), dtype=dtype)
            components.refiner = ((path, entry.sha256), loaded)
        return request.model_copy(update={"refiner": entry.title}), replace(resources, refiner=components.refiner[1])

    def run(
        self,
        components: Components,
        request: GenerationRequest,
        *,
        save: bool = True,
        out_dir: Path | None = None,
        source: str = "cli",
        progress: engine.ProgressCallback | None = None,
        cancel: engine.CancelCheck | None = None,
        interrupt: engine.CancelCheck | None = None,
        skip: engine.CancelCheck | None = None,
        on_image: engine.ImageCallback | None = None,
        on_saved: SavedCallback | None = None,
        save_failed: SaveFailedCallback | None = None,
    ) -> engine.GenerationResult:
        """Run ``request`` on loaded ``components``: apply its LoRAs, generate, and (``save``) write each
        image as it is done into ``out_dir`` (default ``<outputs>/<mode>-images/<date>/``) and the gallery,
        as made by ``source``. ``on_image`` sees each image as the engine gives it (before it is saved),
        ``on_saved`` each one saved. Limits are the door's to check, with its own field names."""
        # 0. Styles: merged into the prompts first (a door that already merged them left none).
        request = apply_styles(request, self.gallery)
        # 1. LoRAs and embeddings: exactly the request's, on the model it runs on.
        prepare_loras(components, request, self.settings, allow_paths=self.allow_lora_paths)
        # ControlNet units and the hires fix's model upscaler: loaded from the models dir, the control maps made.
        request, resources = prepare_resources(components, request, self.settings)
        request, resources = self._with_refiner(components, request, resources)
        if not save:
            return engine.generate(
                components, request, progress=progress, cancel=cancel, on_image=on_image, skip=skip, interrupt=interrupt,
                dynamic=self.dynamic_prompts(request), resources=resources,
            )

        # 2. What every image of this generation says about itself, and where it goes.
        provenance = provenance_for(components)
        watermark = outputs.wants_watermark(request, self.settings)
        signing = outputs.signing_for(request, self.settings)
        folder = out_dir or outputs.output_dir(self.settings, request.mode)

        def save_image(image: engine.GeneratedImage) -> None:
            if on_image is not None:
                on_image(image)
            try:
                saved = outputs.save_generated(
                    image, folder, provenance, watermark=watermark, gallery=self.gallery, source=source, mode=request.mode,
                    signing=signing, parent=request.init_image,
                )
            except OSError as err:
                if save_failed is not None:
                    save_failed(err, folder)
                raise
            if on_saved is not None:
                on_saved(image, saved)

        # 3. Generate; each image is saved and recorded as soon as it is done.
        return engine.generate(
            components, request, progress=progress, cancel=cancel, on_image=save_image, skip=skip, interrupt=interrupt,
            dynamic=self.dynamic_prompts(request), resources=resources,
        )

