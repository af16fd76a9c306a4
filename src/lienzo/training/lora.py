"""Trainable LoRA adapters (peft) and saving them as kohya-format files that A1111, ComfyUI and lienzo load.

The file layout is kohya's: ``lora_unet_<module path, dots as underscores>.lora_down.weight`` /
``.lora_up.weight`` / ``.alpha``, and ``lora_te_`` for the text encoder (``lora_te1_`` for SDXL's first).
UNet names are diffusers' module paths for every family, which is what kohya writes for SD 1.x/2.x;
for SDXL kohya writes sgm block names instead, but A1111, ComfyUI and diffusers read both.
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save
from transformers import CLIPTextModel

from lienzo.files import write_atomic

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER = "default"  # the adapter add_lora creates and the save functions read

# kohya's ss_base_model_version, which A1111 reads to tell which models a LoRA is for.
_BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def add_lora(
    unet: UNet2DConditionModel,
    *,
    rank: int,
    alpha: float,
    text_encoder: CLIPTextModel | None = None,
    unet_targets: Sequence[str] = UNET_TARGETS,
    text_encoder_targets: Sequence[str] = TEXT_ENCODER_TARGETS,
) -> list[torch.nn.Parameter]:
    """Freeze ``unet`` (and ``text_encoder``) and add a trainable LoRA to the named layers; return its parameters.

    Each adapted layer computes ``W x + (alpha / rank) · B A x``; A starts random and B at zero (kohya's
    initialisation), so the model is unchanged until the first step.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if not alpha > 0:
        raise ValueError(f"alpha must be above 0, got {alpha}")
    models = [(unet, unet_targets)] + ([(text_encoder, text_encoder_targets)] if text_encoder is not None else [])
    parameters: list[torch.nn.Parameter] = []
    for model, targets in models:
        model.requires_grad_(False)
        # diffusers' and transformers' add_adapter: the adapter's own parameters come out trainable.
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)), adapter_name=ADAPTER)
        parameters += [p for p in model.parameters() if p.requires_grad]
    return parameters


def lora_state_dicts(unet: UNet2DConditionModel, text_encoder: CLIPTextModel | None = None) -> dict[str, torch.Tensor]:
    """The adapter weights in diffusers' LoRA layout: ``unet.<module>.lora_A.weight``, ``text_encoder.…``."""
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}
    if text_encoder is not None:
        # transformers 5 dropped CLIPTextModel's ``text_model`` level; LoRA files (and older loaders) keep it.
        inner = "" if hasattr(text_encoder, "text_model") else "text_model."
        for k, v in get_peft_model_state_dict(text_encoder, adapter_name=ADAPTER).items():
            state[f"text_encoder.{inner}{k}"] = v
    return state


def save_kohya_lora(
    path: str | os.PathLike,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel | None = None,
    *,
    family: str,
    alpha: float | None = None,
    rank: int | None = None,
    metadata: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the adapter from :func:`add_lora` as a kohya-format ``.safetensors`` file, atomically.

    ``alpha`` and ``rank`` default to the adapter's own, and must equal them when given: the file's
    ``.alpha`` tensors are what gives every loader the ``alpha / rank`` strength the adapter trained with.
    ``metadata`` joins kohya's ``ss_*`` keys (non-string values are stored as JSON); ``dtype`` is the
    weights' type in the file (float16 halves it, as kohya usually saves).
    """
    if family not in _BASE_MODEL_VERSIONS:
        raise ValueError(f"family must be one of {', '.join(_BASE_MODEL_VERSIONS)}, got {family!r}")
    config = unet.peft_config[ADAPTER]
    for given, own, what in ((alpha, config.lora_alpha, "alpha"), (rank, config.r, "rank")):
        if given is not None and given != own:
            raise ValueError(f"{what} is {given} but the adapter was made with {what} {own}")

    # 1. peft names → kohya names; the helper writes alpha = rank, so put each model's trained alpha back.
    tensors = convert_state_dict_to_kohya(lora_state_dicts(unet, text_encoder))
    te_alpha = text_encoder.peft_config[ADAPTER].lora_alpha if text_encoder is not None else None
    te_prefix = "lora_te1_" if family == "sdxl" else "lora_te_"  # SD 1.x/2.x have one text encoder: no number
    out = {}
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            value = torch.tensor(float(config.lora_alpha if key.startswith("lora_unet_") else te_alpha))
        out[key.replace("lora_te1_", te_prefix, 1)] = value.detach().to("cpu", dtype).contiguous()

    # 2. kohya's metadata, as A1111 and ComfyUI read it.
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.r),
        "ss_network_alpha": f"{config.lora_alpha:g}",
        "ss_base_model_version": _BASE_MODEL_VERSIONS[family],
        "ss_v2": str(family == "sd2"),
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})

    # 3. Write next to the target and rename, so a reader never sees half a file.
    return write_atomic(path, lambda file: file.write(save(out, metadata=meta)))
