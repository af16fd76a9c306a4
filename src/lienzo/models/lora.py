"""LoRA files applied to loaded models, in the formats people download.

U-Net families (SD 1.x, 2.x, XL): kohya's format (A1111, ComfyUI, Civitai) and diffusers/peft's.
They also take LyCORIS files (LoHa, LoKr, (IA)³, full diffs; see :mod:`lienzo.models.lycoris`), whose layers
join a file's LoRA layers under its one adapter.
Flux.1: diffusers/peft, kohya (``lora_unet_double_blocks_…``, ``lora_te1_`` for CLIP-L), ComfyUI/BFL
(``diffusion_model.double_blocks.…``, with ``lora_down``/``lora_up`` or ``lora_A``/``lora_B``) and XLabs.
SD 3.x: diffusers/peft only (see :func:`_refuse_unconvertible`).
Chroma: its transformer keeps Flux.1's block names, so every Flux.1 format above is read for it (ChromaPipeline
uses Flux.1's loader); only the transformer takes LoRAs (see :func:`_loadable_parts`).
Z-Image: diffusers/peft, ComfyUI/ai-toolkit (``diffusion_model.layers.0.attention.to_q…``) and kohya
(``lora_unet_layers_0_attention_to_q``, a fused ``…_attention_qkv`` split per projection).
Qwen-Image: diffusers/peft, ComfyUI/ai-toolkit (``diffusion_model.transformer_blocks.…``) and kohya
(``lora_unet_transformer_blocks_0_attn_to_q``); the transformer only.
Flux.2 Klein: diffusers/peft, ComfyUI/ai-toolkit (BFL's ``diffusion_model.double_blocks.…`` with ``lora_A``/``lora_B``
or ``lora_down``/``lora_up``) and kohya (``lora_unet_double_blocks_…``); the transformer only. Its BFL names are
Flux.1's, so a LoRA naming only shared blocks is told apart by whether its layers fit (Flux.2's MLPs are wider).

diffusers does the reading: each family's loader mixin's ``lora_state_dict`` turns the file's names into
diffusers ones (SDXL's sgm block names too, Flux's fused qkv split per projection), and
``load_lora_adapter`` / ``load_lora_into_text_encoder`` inject peft adapters. Each file is loaded once
per :class:`Components` (the adapters are remembered in ``components.loras``); after that
:func:`apply_loras` only switches adapters on, off and to new weights, so a server can keep one model
and give every request its own LoRAs.
"""

import itertools
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.loaders import (
    Flux2LoraLoaderMixin,
    FluxLoraLoaderMixin,
    Krea2LoraLoaderMixin,
    QwenImageLoraLoaderMixin,
    SD3LoraLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
    ZImageLoraLoaderMixin,
)
from diffusers.loaders.lora_base import (
    LORA_ADAPTER_METADATA_KEY,
    LoraBaseMixin,
    disable_lora_for_text_encoder,
    enable_lora_for_text_encoder,
    set_adapters_for_text_encoder,
)
from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_diffusers
from peft.tuners.tuners_utils import BaseTunerLayer

from lienzo.errors import LienzoError, ModelFileError
from lienzo.models import formats, lycoris
from lienzo.models.components import ActiveLora, Components
from lienzo.models.families import FAMILIES
from lienzo.models.quiet import first_line, quiet_transformers
from lienzo.models.registry import LORA_SHORT_HASH, lora_hash
from lienzo.models.speed import offload_suspended

log = logging.getLogger(__name__)

# The parts of a model a LoRA file can change, as Components names them; the denoising networks
# (U-Net, transformer) take adapters through diffusers' PeftAdapterMixin, the text encoders through peft.
_PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
_NETWORKS = ("unet", "transformer")

# Each family's diffusers LoRA loader: the key converter and the parts it loads (_lora_loadable_modules).
_MIXINS: dict[str, type[LoraBaseMixin]] = {
    "sd1": StableDiffusionLoraLoaderMixin,
    "sd2": StableDiffusionLoraLoaderMixin,
    "sdxl": StableDiffusionXLLoraLoaderMixin,
    "sd3": SD3LoraLoaderMixin,
    "flux": FluxLoraLoaderMixin,
    "chroma": FluxLoraLoaderMixin,  # as ChromaPipeline does: Chroma's transformer keeps Flux.1's module names
    "zimage": ZImageLoraLoaderMixin,
    "flux2": Flux2LoraLoaderMixin,
    "qwenimage": QwenImageLoraLoaderMixin,
    "qwenimage_edit": QwenImageLoraLoaderMixin,  # as QwenImageEditPlusPipeline's: Qwen-Image's network
    "krea2": Krea2LoraLoaderMixin,
}
# Families whose network is laid out as another's, so that the other's LoRAs fit it where layers agree:
# Chroma is Flux.1 with its modulation layers replaced by one small network, and people train Chroma
# LoRAs under Flux.1's block names (kohya's lora_unet_double_blocks_…, ComfyUI's diffusion_model.…).
# Qwen-Image-Edit's network is Qwen-Image's.
_SAME_LAYOUT = {"chroma": "flux", "qwenimage_edit": "qwenimage"}
# Layouts whose block names a family's own original names share, so that a LoRA naming only those says no
# family: Flux.2 keeps Flux.1's double_blocks/single_blocks names; its layers' widths tell them apart.
_SHARED_NAMES = {"flux2": ("flux",)}
# Which parts a family's LoRAs may change, where not all its mixin's _lora_loadable_modules: Flux.1's
# loader (which ChromaPipeline uses) names CLIP-L "text_encoder", but Chroma's text_encoder is T5.
_LOADABLE_PARTS = {"chroma": ("transformer",)}

# Block names only one network layout has, in every naming the files use (kohya joins them with "_",
# the others with "."): a LoRA naming them was trained for that layout. The U-Net families share one
# layout, and telling them apart is left to whether the layers fit (their names mostly agree).
_LAYOUT_MARKS = {
    # Flux.2's modulation shared by each stream, its fused single-block projection and gated MLPs; checked
    # before Flux.1's, whose block names it shares.
    "flux2": (
        "double_stream_modulation", "single_stream_modulation", "to_qkv_mlp_proj", "time_guidance_embed", "ff.linear_in",
        "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
    ),
    "flux": ("double_blocks", "single_blocks", "single_transformer_blocks"),
    "sd3": ("joint_blocks",),
    # Z-Image's refiners and its feed_forward (the others call theirs ff or mlp); its main blocks are just "layers".
    "zimage": ("noise_refiner", "context_refiner", "feed_forward"),
    # Qwen-Image's per-stream modulation and MLPs, named so in all its formats (diffusers' names are its original
    # ones); after Flux's, whose BFL names have img_mod/img_mlp inside double_blocks.
    "qwenimage": ("img_mod", "txt_mod", "img_mlp", "txt_mlp"),
    "unet": ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block"),
}


@dataclass
class _Loaded:
    adapter: str
    stamp: tuple[int, int]  # size and mtime of the file the adapter was read from
    short_hash: str
    parts: tuple[str, ...]  # which of _PARTS it changes


def apply_loras(components: Components, loras: list[tuple[Path, str, float]]) -> list[ActiveLora]:
    """Make exactly ``loras`` — (file, name, weight) — active on ``components``, every other LoRA inactive.

    Files are read on first use and kept as peft adapters; a file changed on disk is read again. A weight
    of 0 loads the file (so a broken one still fails) but leaves it off, and with nothing active the
    models compute exactly what they computed before any LoRA was loaded. Adapters that other code added
    (a LoRA being trained) are left alone as long as no LoRA file was ever applied to these components.
    The result is also stored in ``components.loras.active``, for the infotext and provenance.
    """
    loaded: dict[str, _Loaded] = components.loras.adapters
    chosen = [(_load(components, Path(path)), Path(path), name, float(weight)) for path, name, weight in loras]
    for part in _PARTS:
        model = getattr(components, part)
        if model is not None and any(part in entry.parts for entry in loaded.values()):
            on = [(entry.adapter, weight) for entry, _, _, weight in chosen if part in entry.parts and weight != 0]
            _activate(part, model, on)
    active = [ActiveLora(name, weight, entry.short_hash, path.resolve()) for entry, path, name, weight in chosen]
    components.loras.active = active
    return active


def _activate(part: str, model: torch.nn.Module, on: list[tuple[str, float]]) -> None:
    names, weights = [a for a, _ in on], [w for _, w in on]
    if part in _NETWORKS:
        if names:
            model.set_adapters(names, weights)
            model.enable_lora()
        else:
            model.disable_lora()
    elif names:
        set_adapters_for_text_encoder(names, model, weights)
        enable_lora_for_text_encoder(model)
    else:
        disable_lora_for_text_encoder(model)


def _load(components: Components, path: Path) -> _Loaded:
    """The adapter holding ``path``, reading the file into every part it fits unless already done."""
    if not path.is_file():
        raise ModelFileError(f"lora: {path}: no such file")
    if components.speed.int8:
        raise LienzoError(f"lora: {path.name} cannot be added to a model whose linear layers are int8; load it without int8")
    key = str(path.resolve())
    stat = path.stat()
    stamp = (stat.st_size, stat.st_mtime_ns)
    loaded: dict[str, _Loaded] = components.loras.adapters
    previous = loaded.get(key)
    if previous is not None and previous.stamp == stamp:
        return previous
    # Low-VRAM offload keeps weights off the modules; adapters are added to the whole modules.
    with offload_suspended(components):
        if previous is not None:
            _forget(components, previous.adapter)
            del loaded[key]
        # "lora_" in the name: transformers' load_adapter tells adapter weights from base weights by whether
        # their names contain the adapter's name, so a short name such as "a" would match every weight.
        used = {entry.adapter for entry in loaded.values()}
        adapter = next(f"lora_{n}" for n in itertools.count() if f"lora_{n}" not in used)
        parts = _load_layers(components, path, adapter)
        if not parts:
            _forget(components, adapter)
    if not parts:
        raise ModelFileError(
            f"lora: none of the layers in {path.name} exist in this {components.family} model; "
            "is it a LoRA for another model family?"
        )
    entry = _Loaded(adapter, stamp, lora_hash(path)[:LORA_SHORT_HASH], parts)
    loaded[key] = entry
    log.info("loaded LoRA %s as adapter %s into %s", path.name, adapter, ", ".join(parts))
    return entry


def _load_layers(components: Components, path: Path, adapter: str) -> tuple[str, ...]:
    """Read the file into adapter ``adapter``: its LoRA layers with diffusers, then (U-Net families) its LyCORIS
    layers with lienzo.models.lycoris; returns the parts it changed."""
    tensors = formats.load_state_dict(path)
    layers = [] if components.spec.is_transformer else lycoris.take_layers(path, tensors)
    # LoRA layers first: diffusers refuses an adapter name a model already has, peft adds to it.
    parts = _inject(components, path, *_read(path, tensors, components), adapter) if tensors else ()
    if layers:
        try:
            with quiet_transformers():
                parts = (*parts, *lycoris.inject(components, path, layers, adapter))
        except ModelFileError:
            _forget(components, adapter)
            raise
    return tuple(p for p in _PARTS if p in parts)


def _read(path: Path, tensors: dict[str, torch.Tensor], components: Components) -> tuple[dict, dict | None, dict | None]:
    """The file's tensors in diffusers' layout, kohya alphas folded in, and diffusers' adapter metadata."""
    # Alphas are named by module alone in peft-style files ("transformer.x.alpha"); everything else says lora.
    strange = next((k for k in tensors if "lora" not in k and not k.endswith(".alpha")), None)
    if strange is not None:
        raise ModelFileError(
            f"lora: {path.name} is not a LoRA: it holds tensors such as {strange!r}; "
            "checkpoints belong in the models folder, not its Lora folder"
        )
    _refuse_other_layouts(path, tensors, components)
    _refuse_unconvertible(path, tensors, components)
    if components.family in ("flux", "chroma"):
        _name_comfy_pairs_as_kohya(tensors)
    if components.family == "flux2":
        _name_comfy_pairs_as_peft(tensors)
    if components.family == "flux":
        _warn_t5_layers(path, tensors)
    _fold_alphas(tensors)
    try:
        state_dict, network_alphas = _convert(components, tensors)
    except (ValueError, KeyError, AssertionError) as err:
        raise ModelFileError(
            f"lora: {path.name} is in a LoRA format lienzo cannot read ({first_line(err)}); "
            "kohya and diffusers/peft LoRAs are supported, and LyCORIS files for SD 1.x, 2.x and XL"
        ) from None
    metadata = None
    if formats.sniff(path) == "safetensors":
        stored = formats.read_metadata(path).get(LORA_ADAPTER_METADATA_KEY)
        metadata = json.loads(stored) if stored else None
    return state_dict, network_alphas, metadata


def _convert(components: Components, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict | None]:
    """diffusers' names for the file's tensors, and the alphas diffusers kept apart (None: none)."""
    if components.family not in _MIXINS:
        raise ModelFileError(f"lora: LoRAs on {components.spec.label} models are not supported yet")
    mixin = _MIXINS[components.family]
    if mixin is FluxLoraLoaderMixin:
        # Recognises kohya, ComfyUI (diffusion_model.…), XLabs and diffusers names by themselves.
        state_dict, network_alphas = mixin.lora_state_dict(tensors, return_alphas=True)
    elif components.family in ("sd3", "zimage", "flux2", "qwenimage", "qwenimage_edit", "krea2"):
        # Z-Image's, Flux.2's, Qwen-Image's and Krea 2's converters recognise their other namings (kohya,
        # ComfyUI/ai-toolkit) and diffusers' by themselves too.
        state_dict, network_alphas = mixin.lora_state_dict(tensors), None
    else:
        # unet_config: kohya names SDXL's UNet blocks the sgm way (input_blocks.4.1); the config maps them.
        state_dict, network_alphas = mixin.lora_state_dict(tensors, unet_config=components.unet.config)
    return _text_encoder_names_current(state_dict), network_alphas


def _text_encoder_names_current(state_dict: dict) -> dict:
    """Name every text-encoder layer the way diffusers currently does (``q_proj.lora_linear_layer.down``).

    Its text-encoder loader guesses the naming of what it is given and guesses wrong twice: the old
    naming its kohya converters write (``self_attn.to_q_lora.down``) only when an ``out_proj`` layer is
    among the layers, and peft's (``mlp.fc1.lora_A``) only for attention layers; a LoRA with only
    q/k/v, or only MLP layers, would fail to load. The current naming it always reads.
    """
    encoder_keys = [k for k in state_dict if k.startswith("text_encoder")]
    if not encoder_keys:
        return state_dict
    rest = {k: v for k, v in state_dict.items() if not k.startswith("text_encoder")}
    old = {k: state_dict[k] for k in encoder_keys if "_lora." in k}
    current = convert_state_dict_to_diffusers(old, original_type=StateDictType.DIFFUSERS_OLD) if old else {}
    for key in (k for k in encoder_keys if k not in old):
        # peft's A and B are the down and up matrices: a rename, as diffusers' own PEFT table does for attention.
        current[key.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up.")] = state_dict[key]
    return {**rest, **current}


def _layout(tensors: dict[str, torch.Tensor]) -> str | None:
    """The network layout (a key of _LAYOUT_MARKS) a LoRA's layer names belong to, None if they do not say."""
    for layout, marks in _LAYOUT_MARKS.items():
        if any(mark in key for key in tensors for mark in marks):
            return layout
    return None


def _layout_label(layout: str) -> str:
    return "SD 1.x, 2.x or XL" if layout == "unet" else FAMILIES[layout].label


def _refuse_other_layouts(path: Path, tensors: dict[str, torch.Tensor], components: Components) -> None:
    """A LoRA whose layer names belong to another network layout (an SD 1.5 LoRA on Flux, a Flux LoRA on
    SD 3) is refused before any converter sees it: they would fail it with a message about key names.
    A Flux.1 LoRA on Chroma is not another layout (see _SAME_LAYOUT)."""
    theirs = _layout(tensors)
    family = components.family
    ours = _SAME_LAYOUT.get(family, family) if components.spec.is_transformer else "unet"
    if theirs is not None and theirs != ours and theirs not in _SHARED_NAMES.get(family, ()):
        raise ModelFileError(
            f"lora: {path.name} is a LoRA for {_layout_label(theirs)}, "
            f"but this model ({components.name or components.family}) is {components.spec.label}"
        )


def _refuse_unconvertible(path: Path, tensors: dict[str, torch.Tensor], components: Components) -> None:
    """SD 3.x LoRAs named the way SAI's checkpoints are (kohya ``lora_unet_joint_blocks_…``, ComfyUI
    ``diffusion_model.joint_blocks.…``) or with kohya's text-encoder names: diffusers (0.42) has no
    converter for them, and its SD 3 loader would pass them on unconverted, so that nothing fits."""
    if components.family != "sd3":
        return
    native = next((k for k in tensors if k.startswith(("lora_unet_", "lora_te", "diffusion_model.", "text_encoders."))), None)
    if native is not None:
        raise ModelFileError(
            f"lora: {path.name} is an SD 3.x LoRA in kohya/ComfyUI naming (such as {native!r}), which lienzo cannot "
            "convert yet; only diffusers/peft-format SD 3.x LoRAs (transformer.…lora_A) are supported"
        )


def _name_comfy_pairs_as_kohya(tensors: dict[str, torch.Tensor]) -> None:
    """Rename ComfyUI/BFL pairs written with peft's ``lora_A``/``lora_B`` to kohya's ``lora_down``/``lora_up``.

    diffusers reads ComfyUI's ``diffusion_model.double_blocks.…`` names only in its kohya converter, which
    looks for ``lora_down``; the matrices are the same (A = down, B = up), so only the names change.
    """
    for key in [k for k in tensors if k.startswith(("diffusion_model.", "text_encoders."))]:
        renamed = key.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")
        if renamed != key:
            tensors[renamed] = tensors.pop(key)


def _name_comfy_pairs_as_peft(tensors: dict[str, torch.Tensor]) -> None:
    """Rename ComfyUI/BFL pairs written with kohya's ``lora_down``/``lora_up`` to peft's ``lora_A``/``lora_B``.

    diffusers' Flux.2 loader sends any file with a ``lora_down`` to its kohya converter, which reads only
    ``lora_unet_…`` names and would drop ComfyUI's ``diffusion_model.…`` ones; its ai-toolkit converter reads
    those under either matrix name, so only the names change (A = down, B = up)."""
    for key in [k for k in tensors if k.startswith("diffusion_model.")]:
        renamed = key.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight")
        if renamed != key:
            tensors[renamed] = tensors.pop(key)


def _warn_t5_layers(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Say that a Flux.1 LoRA's T5 layers (kohya's ``lora_te2_``, ComfyUI's ``text_encoders.t5xxl``) go unused:
    diffusers converts and loads Flux.1 LoRAs for the transformer and CLIP-L only, and drops the rest."""
    t5 = {k.split(".lora_")[0] for k in tensors if k.startswith(("lora_te2_", "text_encoders.t5xxl.")) and ".lora_" in k}
    if t5:
        log.warning("%s: its %d T5 layers are ignored; Flux.1 LoRAs change the transformer and CLIP-L only", path.name, len(t5))


def _fold_alphas(tensors: dict[str, torch.Tensor]) -> None:
    """Scale each module's down matrix (kohya's ``lora_down``, peft's ``lora_A``) by its alpha / rank and
    drop the alpha.

    The product is what kohya, A1111 and ComfyUI compute; folding it in is needed because diffusers 0.42
    keeps only the most common alpha when modules differ (its per-module alpha names for attention layers
    and text encoders match no module), which would silently give those layers the wrong strength.
    """
    for key in [k for k in tensors if k.endswith(".alpha")]:
        alpha = tensors.pop(key).item()
        module = key.removesuffix(".alpha")
        down_key = next((k for k in (f"{module}.lora_down.weight", f"{module}.lora_A.weight") if k in tensors), None)
        if down_key is not None:
            down = tensors[down_key]
            tensors[down_key] = down.float() * (alpha / down.shape[0])


def _inject(components: Components, path: Path, state_dict, network_alphas, metadata, adapter: str) -> tuple[str, ...]:
    """Load the adapter into every part the file has weights for; returns the parts it changed."""
    try:
        with quiet_transformers(), warnings.catch_warnings():
            # peft warns whenever a model gets a second adapter; holding many is what this module is for.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
            return tuple(p for p in _PARTS if _inject_part(components, p, path, state_dict, network_alphas, metadata, adapter))
    except (ValueError, RuntimeError) as err:
        _forget(components, adapter)
        raise ModelFileError(
            f"lora: {path.name} does not fit this {components.family} model ({first_line(err)}); "
            "is it a LoRA for another model family?"
        ) from None


def _inject_part(components: Components, part: str, path: Path, state_dict, network_alphas, metadata, adapter: str) -> bool:
    """Load the file's layers for one part; True if any of them fit."""
    # One "down" matrix per layer, whichever naming the file uses (kohya converted, diffusers, peft).
    expected = sum(1 for k in state_dict if k.startswith(f"{part}.") and ("lora_A" in k or ".down." in k))
    model = getattr(components, part)
    if not expected:
        return False
    if model is None:
        log.warning("%s: its %d %s layers are ignored; this model has no %s", path.name, expected, part, part)
        return False
    mixin = _MIXINS[components.family]
    if part not in _loadable_parts(components.family):
        # Flux.1's text_encoder_2 and Chroma's text_encoder are T5, which diffusers loads no LoRA into.
        log.warning("%s: its %d %s layers are ignored; LoRAs cannot change this model's %s", path.name, expected, part, part)
        return False
    part_metadata = _part_metadata(metadata, part)
    if part in _NETWORKS:
        model.load_lora_adapter(state_dict, prefix=part, network_alphas=network_alphas, adapter_name=adapter, metadata=part_metadata)
    else:
        mixin.load_lora_into_text_encoder(
            state_dict, network_alphas, model, prefix=part, adapter_name=adapter, metadata=part_metadata
        )
    found = sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {}))
    if found < expected:
        log.warning("%s: %d of its %d %s layers fit no layer of this model and are ignored", path.name, expected - found, expected, part)
    return found > 0


def _loadable_parts(family: str) -> tuple[str, ...]:
    return _LOADABLE_PARTS.get(family, tuple(_MIXINS[family]._lora_loadable_modules))


def _part_metadata(metadata: dict | None, part: str) -> dict | None:
    # diffusers stores one LoraConfig per part, under "unet.r", "transformer.lora_alpha", ...
    if metadata is None or not any(k.startswith(f"{part}.") for k in metadata):
        return None
    return metadata


def _forget(components: Components, adapter: str) -> None:
    """Remove an adapter from every part that has it (after a failed load, or when its file changed)."""
    for part in _PARTS:
        model = getattr(components, part)
        if model is not None and adapter in getattr(model, "peft_config", {}):
            if part in _NETWORKS:
                model.delete_adapters(adapter)
            else:
                model.delete_adapter(adapter)
