"""LoRA files applied to loaded models: kohya's format (A1111, ComfyUI, Civitai) and diffusers/peft's.

diffusers does the reading: ``lora_state_dict`` turns kohya names into diffusers ones (SDXL's sgm block
names too), ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` inject peft adapters. Each file is
loaded once per :class:`Components` (the adapters are remembered in ``components.loras``); after that
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
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from diffusers.loaders.lora_base import (
    LORA_ADAPTER_METADATA_KEY,
    disable_lora_for_text_encoder,
    enable_lora_for_text_encoder,
    set_adapters_for_text_encoder,
)
from peft.tuners.tuners_utils import BaseTunerLayer

from lienzo.errors import LienzoError, ModelFileError
from lienzo.models.quiet import first_line, quiet_transformers
from lienzo.models import formats
from lienzo.models.components import ActiveLora, Components
from lienzo.models.registry import LORA_SHORT_HASH, lora_hash
from lienzo.models.speed import offload_suspended

log = logging.getLogger(__name__)

# The parts of a model a LoRA file can change, as Components names them.
_PARTS = ("unet", "text_encoder", "text_encoder_2")


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
    if part == "unet":
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
        state_dict, network_alphas, metadata = _read(path, components)
        parts = _inject(components, path, state_dict, network_alphas, metadata, adapter)
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


def _read(path: Path, components: Components) -> tuple[dict, dict | None, dict | None]:
    """The file's tensors in diffusers' layout, kohya alphas folded in, and diffusers' adapter metadata."""
    tensors = formats.load_state_dict(path)
    strange = next((k for k in tensors if "lora" not in k), None)
    if strange is not None:
        raise ModelFileError(
            f"lora: {path.name} is not a LoRA: it holds tensors such as {strange!r}; "
            "checkpoints belong in the models folder, not its Lora folder"
        )
    _fold_alphas(tensors)
    try:
        # unet_config: kohya names SDXL's UNet blocks the sgm way (input_blocks.4.1); the config maps them.
        state_dict, network_alphas = _mixin(components).lora_state_dict(tensors, unet_config=components.unet.config)
    except ValueError as err:
        raise ModelFileError(
            f"lora: {path.name} is in a LoRA format lienzo cannot read ({first_line(err)}); "
            "kohya and diffusers/peft LoRAs are supported, LyCORIS LoHa/LoKr are not"
        ) from None
    metadata = None
    if formats.sniff(path) == "safetensors":
        stored = formats.read_metadata(path).get(LORA_ADAPTER_METADATA_KEY)
        metadata = json.loads(stored) if stored else None
    return state_dict, network_alphas, metadata


def _fold_alphas(tensors: dict[str, torch.Tensor]) -> None:
    """Scale each kohya ``lora_down`` by its module's alpha / rank and drop the alpha.

    The product is what kohya, A1111 and ComfyUI compute; folding it in is needed because diffusers 0.42
    keeps only the most common alpha when modules differ (its per-module alpha names for attention layers
    and text encoders match no module), which would silently give those layers the wrong strength.
    """
    for key in [k for k in tensors if k.endswith(".alpha")]:
        alpha = tensors.pop(key).item()
        down_key = key.removesuffix(".alpha") + ".lora_down.weight"
        if down_key in tensors:
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
    mixin, part_metadata = _mixin(components), _part_metadata(metadata, part)
    if part == "unet":
        mixin.load_lora_into_unet(state_dict, network_alphas, model, adapter_name=adapter, metadata=part_metadata)
    else:
        mixin.load_lora_into_text_encoder(
            state_dict, network_alphas, model, prefix=part, adapter_name=adapter, metadata=part_metadata
        )
    found = sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {}))
    if found < expected:
        log.warning("%s: %d of its %d %s layers fit no layer of this model and are ignored", path.name, expected - found, expected, part)
    return found > 0


def _mixin(components: Components) -> type[StableDiffusionLoraLoaderMixin] | type[StableDiffusionXLLoraLoaderMixin]:
    return StableDiffusionXLLoraLoaderMixin if components.family == "sdxl" else StableDiffusionLoraLoaderMixin


def _part_metadata(metadata: dict | None, part: str) -> dict | None:
    # diffusers stores one LoraConfig per part, under "unet.r", "text_encoder.lora_alpha", ...
    if metadata is None or not any(k.startswith(f"{part}.") for k in metadata):
        return None
    return metadata


def _forget(components: Components, adapter: str) -> None:
    """Remove an adapter from every part that has it (after a failed load, or when its file changed)."""
    for part in _PARTS:
        model = getattr(components, part)
        if model is not None and adapter in getattr(model, "peft_config", {}):
            if part == "unet":
                model.delete_adapters(adapter)
            else:
                model.delete_adapter(adapter)
