"""LyCORIS files (LoHa, LoKr, (IA)³, full diffs, LoCon) for SD 1.x, 2.x and XL, loaded beside LoRAs.

Civitai's LyCORIS files name their layers as kohya's LoRAs do (``lora_unet_…``, ``lora_te_…``, ``lora_te1_`` /
``lora_te2_`` for SDXL's encoders, SDXL's U-Net by its sgm blocks) and hold each layer's factors under LyCORIS's
tensor names. Each layer changes its module's weight W by ``multiplier * delta``, as LyCORIS, A1111 and ComfyUI
compute it:

- LoHa: ``delta = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) * alpha / dim``, dim = ``hada_w1_b``'s rows; a conv layer in
  LyCORIS's CP form rebuilds each product from ``hada_t1`` / ``hada_t2`` first.
- LoKr: ``delta = kron(w1, w2) * alpha / dim``, each of w1 and w2 stored whole or as a product ``_a @ _b``
  (w2 of a conv also in CP form, ``lokr_t2``); dim is the rank of the factorised w2, else of the factorised w1.
  Where both are whole, or the file has no alpha, the scale is 1.
- (IA)³: ``delta = W ⊙ weight``, the vector scaling W's output channels (its input channels where ``on_input``);
  the bias stays. There is no alpha.
- full: ``delta = diff``, and ``diff_b`` is added to the bias.
- LoCon in CP form (a conv LoRA with a ``lora_mid`` core): ``delta = up · mid · down * alpha / dim`` (the 1x1 up
  and down convolutions around the k x k core, composed), dim = ``lora_down``'s rows. A plain LoCon (lora_down /
  lora_up on a conv) is a kohya LoRA layer, which :mod:`lienzo.models.lora` reads with diffusers.

A missing alpha means a scale of 1 for every kind.

LoHa and LoKr are peft's: its ``LoHaLayer`` / ``LoKrLayer`` compute exactly these deltas (same formulas, same
``alpha / r`` scale, same tensor names). peft derives the factors' shapes from its config, though, and for LoKr
that config (one decompose factor, one choice of which factor to split) cannot describe every file LyCORIS writes
(per-layer factorisation, full-matrix and unbalanced options), so the file's factors replace the ones peft made.
peft's (IA)³ cannot take a request's weight (it has no ``set_scale``) and scales the bias too, and peft has no full
diff and no CP-form LoCon, so those three are applied by :class:`LycorisDeltaLayer` here, computing the delta at
each call from the file's tensors and the module's own weight (a stored (IA)³ delta would copy every weight it
touches).

Both kinds of layer are peft tuner layers under the file's one adapter name, so that
:func:`lienzo.models.lora.apply_loras` switches them on, off and to new weights per request as it does LoRAs.
"""

import logging
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from peft import IA3Config, LoHaConfig, LoKrConfig, inject_adapter_in_model
from peft.tuners.lycoris_utils import LycorisLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lienzo.errors import ModelFileError
from lienzo.models.components import Components
from lienzo.models.quiet import first_line

log = logging.getLogger(__name__)

# Each kind's tensors, by their names after the layer's name (``lora_unet_….hada_w1_a``); any may have an alpha.
KINDS: dict[str, frozenset[str]] = {
    "LoHa": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    "LoKr": frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "(IA)³": frozenset({"weight", "on_input"}),
    "full": frozenset({"diff", "diff_b"}),
    # A conv LoRA in LyCORIS's CP form (a plain lora_down / lora_up pair is a LoRA layer, which diffusers reads).
    "LoCon": frozenset({"lora_down.weight", "lora_mid.weight", "lora_up.weight"}),
}
# The tensors without which a layer of a kind has no delta: one of each group's alternatives.
_REQUIRED = {
    "LoHa": [({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},)],
    "LoKr": [({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"}), ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"})],
    "(IA)³": [({"weight"},)],
    "full": [({"diff"},)],
    "LoCon": [({"lora_down.weight", "lora_mid.weight", "lora_up.weight"},)],
}
# kohya LoRA layers' tensors: left to lienzo.models.lora, which reads them with diffusers.
_LORA = frozenset({"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"})
# What LyCORIS's other kinds store, to name them when refusing a file.
_OTHER_KINDS = {
    "oft_blocks": "OFT", "oft_diag": "OFT", "oft_R": "OFT", "boft_blocks": "BOFT", "boft_R": "BOFT",
    "w_norm": "norm", "b_norm": "norm", "a1.weight": "GLoRA", "b1.weight": "GLoRA",
}
# kohya's prefixes: the U-Net's, SD 1.x/2.x's text encoder's, SDXL's two text encoders'.
_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_PEFT_CONFIGS = {"LoHa": LoHaConfig, "LoKr": LoKrConfig}


@dataclass(eq=False)
class Layer:
    """One LyCORIS layer of a file: its kohya name, its kind (a key of KINDS), its tensors by their names after
    the layer's name, and its alpha (None: none)."""

    name: str
    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None

    def rank_and_alpha(self) -> tuple[int, float]:
        """peft's r and alpha for a LoHa or LoKr layer: alpha / r is LyCORIS's scale (see the module docstring)."""
        t = self.tensors
        if self.kind == "LoHa":
            dim = t["hada_w1_b"].shape[0]
        else:
            dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
        if dim is None or self.alpha is None:
            return dim or 1, float(dim or 1)
        return dim, self.alpha


def take_layers(path: Path, tensors: dict[str, torch.Tensor]) -> list[Layer]:
    """Take the LyCORIS layers out of a kohya-named file's ``tensors``, leaving its LoRA layers (if any) there.

    Raises ModelFileError, naming the file and the kind, for a layer of a kind lienzo cannot apply.
    """
    by_layer: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        name, _, rest = key.partition(".")
        if name.startswith(_PREFIXES):
            by_layer[name][rest] = tensor
    layers = []
    for name, own in by_layer.items():
        names = set(own) - {"alpha"}
        if names <= _LORA:
            continue
        kind = next((k for k, allowed in KINDS.items() if names <= allowed), None)
        if kind is None:
            _refuse(path, name, names)
        for group in _REQUIRED[kind]:
            if not any(required <= names for required in group):
                needed = " or ".join("+".join(sorted(r)) for r in group)
                raise ModelFileError(f"lora: {path.name}: its {kind} layer {name} lacks {needed}")
        alpha = own.get("alpha")
        for key in own:
            del tensors[f"{name}.{key}"]
        layers.append(Layer(name, kind, {k: v for k, v in own.items() if k != "alpha"}, None if alpha is None else alpha.item()))
    return layers


def _refuse(path: Path, layer: str, names: set[str]) -> NoReturn:
    if "dora_scale" in names:
        kind = "weight-decomposed (DoRA) LyCORIS"
    else:
        kind = next((_OTHER_KINDS[n] for n in sorted(names) if n in _OTHER_KINDS), None)
        kind = kind or f"unknown LyCORIS ({', '.join(sorted(names))})"
    raise ModelFileError(
        f"lora: {path.name} holds {kind} layers (such as {layer}), which lienzo cannot apply; "
        "LoRA, LoCon, LoHa, LoKr, (IA)³ and full-diff layers are supported"
    )


def inject(components: Components, path: Path, layers: list[Layer], adapter: str) -> tuple[str, ...]:
    """Add ``layers`` to the modules they name as adapter ``adapter``; returns the parts changed. Layers naming
    no module of this model are ignored with a warning, as LoRA layers are."""
    try:
        targets = _targets(components, layers)
    except (ValueError, KeyError, IndexError) as err:
        raise ModelFileError(
            f"lora: {path.name} names its layers in a way lienzo cannot map to this model ({first_line(err)})"
        ) from None
    changed = []
    for part in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(components, part)
        mine = [(layer, module) for layer, (p, module) in targets.items() if p == part]
        if not mine:
            continue
        if model is None:
            log.warning("%s: its %d %s layers are ignored; this model has no %s", path.name, len(mine), part, part)
            continue
        modules = dict(model.named_modules())
        fitting = [(layer, name) for layer, name in ((layer, _module_name(modules, m)) for layer, m in mine) if name]
        if len(fitting) < len(mine):
            log.warning(
                "%s: %d of its %d %s layers fit no layer of this model and are ignored",
                path.name, len(mine) - len(fitting), len(mine), part,
            )
        if fitting:
            try:
                _inject_part(model, path, fitting, adapter, is_text_encoder=part != "unet")
            except ModelFileError:
                raise
            except (ValueError, RuntimeError, TypeError) as err:
                raise ModelFileError(
                    f"lora: {path.name} does not fit this {components.family} model's {part} ({first_line(err)})"
                ) from None
            changed.append(part)
    return tuple(changed)


def _targets(components: Components, layers: list[Layer]) -> dict[Layer, tuple[str, str]]:
    """Each layer's part and module name there (diffusers' names), as diffusers' kohya LoRA converter renames them.

    The converter reads lora_down/lora_up pairs only, so each layer is given a 1x1 stand-in pair holding its index,
    and the converted name whose pair holds that index is the layer's module: its renaming rules (SDXL's sgm blocks
    mapped through the U-Net's config, the resnets' and embeddings' names) then apply to LyCORIS layers unchanged.
    """
    stand_ins = {}
    for i, layer in enumerate(layers):
        stand_ins[f"{layer.name}.lora_down.weight"] = torch.full((1, 1), float(i))
        stand_ins[f"{layer.name}.lora_up.weight"] = torch.zeros(1, 1)
    mixin = StableDiffusionXLLoraLoaderMixin if components.family == "sdxl" else StableDiffusionLoraLoaderMixin
    converted, _ = mixin.lora_state_dict(stand_ins, unet_config=components.unet.config)
    unet = convert_unet_state_dict_to_peft({k: v for k, v in converted.items() if k.startswith("unet.")})
    # The converter names text-encoder attention layers the old way (self_attn.to_q_lora) and MLP layers the new.
    old = {k: v for k, v in converted.items() if k.startswith("text_encoder") and "_lora." in k}
    new = {k: v for k, v in converted.items() if k.startswith("text_encoder") and "_lora." not in k}
    encoders = {
        **(convert_state_dict_to_peft(old, original_type=StateDictType.DIFFUSERS_OLD) if old else {}),
        **(convert_state_dict_to_peft(new, original_type=StateDictType.DIFFUSERS) if new else {}),
    }
    targets = {}
    for key, index in {**unet, **encoders}.items():
        if key.endswith(".lora_A.weight"):
            part, _, module = key.removesuffix(".lora_A.weight").partition(".")
            targets[layers[int(index.item())]] = (part, module)
    return targets


def _module_name(modules: dict[str, nn.Module], name: str) -> str | None:
    """``name`` among a model's ``modules``, None if it has no such Linear or Conv2d. transformers' CLIPTextModel
    keeps its encoder at the top (``encoder.layers.0…``) where kohya names include ``text_model.``."""
    for candidate in (name, name.removeprefix("text_model.")):
        module = modules.get(candidate)
        if module is not None:
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if isinstance(base, (nn.Linear, nn.Conv2d)):
                return candidate
    return None


def _inject_part(model: nn.Module, path: Path, fitting: list[tuple[Layer, str]], adapter: str, is_text_encoder: bool) -> None:
    with warnings.catch_warnings():
        # peft warns whenever a model gets a second adapter; holding many is what lienzo.models.lora does.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        for kind in _PEFT_CONFIGS:
            of_kind = [(layer, name) for layer, name in fitting if layer.kind == kind]
            if of_kind:
                _inject_peft(model, path, kind, of_kind, adapter)
        own = [(layer, name) for layer, name in fitting if layer.kind not in _PEFT_CONFIGS]
        for layer, name in own:
            _attach_delta(model, path, layer, name, adapter)
    if own and adapter not in getattr(model, "peft_config", {}):
        # Where peft added no layer of this adapter, it is registered as peft would have, so that deleting it by
        # name (diffusers' delete_adapters, transformers' delete_adapter) reaches these layers too.
        model.peft_config = {**getattr(model, "peft_config", {}), adapter: IA3Config(target_modules=[n for _, n in own])}
    if is_text_encoder:
        # What transformers' own load_adapter sets: its delete_adapter refuses a model without it.
        model._hf_peft_config_loaded = True


def _inject_peft(model: nn.Module, path: Path, kind: str, layers: list[tuple[Layer, str]], adapter: str) -> None:
    """Add LoHa or LoKr layers with peft, then put the file's factors in place of the ones peft made."""
    ranks = {re.escape(name): layer.rank_and_alpha() for layer, name in layers}
    config = _PEFT_CONFIGS[kind](
        target_modules=[name for _, name in layers],
        rank_pattern={k: r for k, (r, _) in ranks.items()},
        alpha_pattern={k: a for k, (_, a) in ranks.items()},
    )
    inject_adapter_in_model(config, model, adapter_name=adapter)
    for layer, name in layers:
        module = model.get_submodule(name)
        _put_factors(module, adapter, layer.tensors)
        try:
            # Computed once here so that factors that do not fit the module fail now, naming the file.
            module.get_delta_weight(adapter)
        except RuntimeError as err:
            raise ModelFileError(f"lora: {path.name}: its {kind} layer {layer.name} does not fit {name} ({first_line(err)})") from None


def _put_factors(module: LycorisLayer, adapter: str, factors: dict[str, torch.Tensor]) -> None:
    """Replace the adapter's factors in a peft LoHa/LoKr layer by the file's, in the dtype peft chose for its own;
    the layer computes its delta from whichever of its factors the adapter has (see the module docstring)."""
    made = [getattr(module, n).pop(adapter) for n in module.adapter_layer_names if adapter in getattr(module, n)]
    like = made[0]
    for name, tensor in factors.items():
        getattr(module, name)[adapter] = nn.Parameter(tensor.to(like.device, like.dtype), requires_grad=False)


def _attach_delta(model: nn.Module, path: Path, layer: Layer, name: str, adapter: str) -> None:
    """Add an (IA)³, full or LoCon-CP layer to module ``name``, wrapping it in a LycorisDeltaLayer unless it is one."""
    module = model.get_submodule(name)
    if not isinstance(module, LycorisDeltaLayer):
        parent_name, _, child = name.rpartition(".")
        module = LycorisDeltaLayer(module)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    module.add(adapter, layer.kind, layer.tensors, layer.alpha)
    weight = module.get_base_layer().weight
    try:
        delta, bias = module.delta(adapter)
        fits = delta.shape == weight.shape and (bias is None or bias.shape == weight.shape[:1])
        problem = "" if fits else f"{tuple(delta.shape)} for a weight of {tuple(weight.shape)}"
    except RuntimeError as err:
        problem = first_line(err)
    if problem:
        module.delete_adapter(adapter)
        raise ModelFileError(f"lora: {path.name}: its {layer.kind} layer {layer.name} does not fit {name} ({problem})")


class LycorisDeltaLayer(nn.Module, BaseTunerLayer):
    """A Linear or Conv2d plus the adapters peft has no layer for: (IA)³, full diffs and LoCon in CP form (see the
    module docstring).

    Each call adds ``weight * delta`` of every active adapter, computed from its tensors (and for (IA)³ the module's
    weight) at that moment, to the module's output; an inactive or disabled adapter leaves the output exactly as
    the module's own.
    """

    adapter_layer_names = ("lycoris_tensors",)
    other_param_names = ("lycoris_kind", "lycoris_alpha", "lycoris_scale")

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lycoris_tensors = nn.ModuleDict()
        self.lycoris_kind: dict[str, str] = {}
        self.lycoris_alpha: dict[str, float] = {}  # the file's alpha / dim (LoCon), else 1
        self.lycoris_scale: dict[str, float] = {}  # the request's weight
        self._disable_adapters = False
        self._active_adapter = []
        self.merged_adapters = []

    def add(self, adapter: str, kind: str, tensors: dict[str, torch.Tensor], alpha: float | None) -> None:
        weight = self.get_base_layer().weight
        # Parameter names cannot hold dots: LoCon's lora_down.weight is kept as lora_down.
        self.lycoris_tensors[adapter] = nn.ParameterDict({
            k.removesuffix(".weight"): nn.Parameter(v.to(weight.device, weight.dtype), requires_grad=False)
            for k, v in tensors.items() if k != "on_input"
        })
        on_input = "on_input" in tensors and bool(tensors["on_input"].item())
        self.lycoris_kind[adapter] = f"{kind} on input" if on_input else kind
        dim = tensors["lora_down.weight"].shape[0] if kind == "LoCon" else None
        self.lycoris_alpha[adapter] = alpha / dim if dim and alpha is not None else 1.0
        self.lycoris_scale[adapter] = 1.0

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.lycoris_scale:
            self.lycoris_scale[adapter] = scale

    def delta(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The adapter's change to the weight and to the bias (None: none), at weight 1."""
        weight, t, kind = self.get_base_layer().weight, self.lycoris_tensors[adapter], self.lycoris_kind[adapter]
        if kind == "full":
            return t["diff"], t["diff_b"] if "diff_b" in t else None
        if kind == "LoCon":
            # up (out, r, 1, 1) @ mid (r, r, k, k) @ down (r, in, 1, 1), summed over both ranks.
            rebuilt = torch.einsum("i j k l, j r, p i -> p r k l", t["lora_mid"], t["lora_down"].flatten(1), t["lora_up"].flatten(1))
            return rebuilt * self.lycoris_alpha[adapter], None
        # (IA)³: one factor per output channel (axis 0 of the weight), or per input channel (axis 1).
        axis = 1 if kind.endswith("on input") else 0
        shape = [1] * weight.dim()
        shape[axis] = weight.shape[axis]
        return weight * t["weight"].reshape(shape), None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        base = self.get_base_layer()
        for adapter in self.active_adapters:
            if adapter not in self.lycoris_tensors:
                continue
            weight, bias = self.delta(adapter)
            scale = self.lycoris_scale[adapter]
            bias = None if bias is None else bias * scale
            if isinstance(base, nn.Conv2d):
                result = result + F.conv2d(x, weight * scale, bias, base.stride, base.padding, base.dilation, base.groups)
            else:
                result = result + F.linear(x, weight * scale, bias)
        return result
