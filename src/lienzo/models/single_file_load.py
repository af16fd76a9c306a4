"""Loading single-file Stable Diffusion checkpoints (original ldm / AUTOMATIC1111 key names), offline.

Diffusers' ``from_single_file`` fetches model configs from the hub. Here every config is read from the
tensor shapes instead, so a tiny test model loads exactly like a real one. Key renaming on the way in
uses diffusers' own converters (``diffusers.loaders.single_file_utils``); the way out (export) is in
:mod:`lienzo.models.single_file_save`.
"""

import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    SD_2_TEXT_ENCODER_KEYS_TO_IGNORE,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from lienzo.errors import LienzoError, ModelFileError
from lienzo.models.components import Components, vae_dtype_for
from lienzo.models.formats import (
    UNET_PREFIX,
    VAE_PREFIX,
    detect_architecture,
    load_state_dict,
    read_metadata,
    sniff,
    stop_if_cancelled,
)
from lienzo.models.single_file_layout import (
    _CLIP_PAD,
    _OPEN_CLIP_PAD,
    _TEXT_ENCODERS,
    _TextEncoderSlot,
    bundled_tokenizer,
    scheduler_config_for,
)

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
# Spellings seen in sidecar YAMLs (ldm's `parameterization`) and in `modelspec.prediction_type` metadata.
_PREDICTION_ALIASES = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
# SD 2.x defaults to v: the SD2 checkpoints people use (2.0-v, 2.1-768) are v models. SD 2.x base
# (512 px, epsilon) users put a sidecar .yaml next to the file or pass prediction_type="epsilon".
_FAMILY_PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon", "sdxl_refiner": "epsilon"}
_IMAGE_SIZE = {"sd1": 512, "sd2": 768, "sdxl": 1024, "sdxl_refiner": 1024}
# The refiner works in SDXL's latent space, with SDXL's VAE.
_VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025, "sdxl_refiner": 0.13025}
# Every SD VAE downsamples 8x; the UNet's sample_size is the native image size in latents.
_VAE_DOWNSCALE = 8
# SDXL embeds each of its 6 size/crop conditioning numbers (the refiner: 5, with an aesthetic score) with 256
# sinusoidal channels.
_SDXL_TIME_EMBED_DIM = 256
# OpenCLIP's contrastive temperature; a text encoder on its own never uses it.
_OPEN_CLIP_UNUSED = {"logit_scale"}

# Where the numbers of a text-encoder config sit, in transformers' CLIP names and in OpenCLIP's.
_CLIP_NAMES = {
    "token": "text_model.embeddings.token_embedding.weight",
    "position": "text_model.embeddings.position_embedding.weight",
    "fc1": "text_model.encoder.layers.0.mlp.fc1.weight",
    "layers": "text_model.encoder.layers.",
}
_OPEN_CLIP_NAMES = {
    "token": "token_embedding.weight",
    "position": "positional_embedding",
    "fc1": "transformer.resblocks.0.mlp.c_fc.weight",
    "layers": "transformer.resblocks.",
}

_VAE_PARTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")
# diffusers < 0.14 named the VAE attention projections query/key/value/proj_attn.
_DEPRECATED_VAE_ATTENTION = re.compile(r"(mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.")
_DEPRECATED_VAE_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def load_single_file(
    path,
    *,
    prediction_type: str | None = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Components:
    """Load an SD 1.x / 2.x / XL (or XL refiner) checkpoint with ldm key names; every config is read from its tensors.

    ``prediction_type`` ("epsilon" or "v_prediction") overrides what the file says; otherwise it comes
    from a sidecar ``<stem>.yaml``, then ``modelspec.prediction_type`` metadata, then a ``v_pred``
    marker tensor, then the family default. ``vae_dtype`` None: see :func:`vae_dtype_for`. ``cancel`` is
    asked between the parts (GenerationCancelled when it says stop).
    """
    # 1. Validate the request and read the tensors
    path = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise LienzoError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    state_dict = load_state_dict(path)
    arch = detect_architecture({key: tuple(tensor.shape) for key, tensor in state_dict.items()}, name=path.name)
    try:
        # 2. UNet
        stop_if_cancelled(cancel)
        unet = _load_unet(state_dict, arch.family, path.name, dtype)
        # 3. VAE
        stop_if_cancelled(cancel)
        vae = _load_ldm_vae(
            state_dict,
            scaling_factor=_VAE_SCALING[arch.family],
            sample_size=_IMAGE_SIZE[arch.family],
            name=path.name,
            # The config read from the tensors leaves force_upcast at AutoencoderKL's default.
            dtype=vae_dtype_for({}, dtype, vae_dtype),
        )
        # 4. Text encoders and their tokenizers
        text = {}
        for slot in _TEXT_ENCODERS[arch.family]:
            stop_if_cancelled(cancel)
            text[slot.encoder_attr] = _load_text_encoder(state_dict, slot, path.name, dtype)
            text[slot.tokenizer_attr] = bundled_tokenizer(_OPEN_CLIP_PAD if slot.open_clip else _CLIP_PAD)
    except KeyError as err:
        raise ModelFileError(
            f"{path.name} is missing the tensor {err.args[0]!r}; the file is incomplete or not a standard checkpoint"
        ) from err
    # 5. Noise schedule
    resolved, source = _resolve_prediction_type(path, prediction_type, arch.family, state_dict)
    logger.info("loaded %s as %s, %s prediction (from %s)", path.name, arch.label, resolved, source)
    return Components(
        unet=unet,
        vae=vae,
        scheduler_config=scheduler_config_for(resolved),
        family=arch.family,
        name=path.stem,
        source=path,
        **text,
    )


def load_vae_file(path, *, scaling_factor: float = 0.18215, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """Load a standalone VAE: ldm keys (with or without ``first_stage_model.``) or a diffusers VAE state dict.

    The scaling factor belongs to the latent space of the model the VAE is paired with, not to the
    file: pass 0.13025 for SDXL, or copy ``components.vae.config.scaling_factor``.
    """
    path = Path(path)
    state_dict = load_state_dict(path)
    try:
        if any(key.startswith("encoder.down_blocks.") for key in state_dict):
            renamed = {
                _DEPRECATED_VAE_ATTENTION.sub(lambda m: m[1] + _DEPRECATED_VAE_NAMES[m[2]] + ".", key): tensor
                for key, tensor in state_dict.items()
            }
            with init_empty_weights():
                vae = AutoencoderKL(**_vae_config(renamed, scaling_factor, _IMAGE_SIZE["sd1"]))
            return _assign_weights(vae, renamed, "VAE", path.name, dtype)
        return _load_ldm_vae(
            state_dict, scaling_factor=scaling_factor, sample_size=_IMAGE_SIZE["sd1"], name=path.name, dtype=dtype
        )
    except KeyError as err:
        raise ModelFileError(f"{path.name} is missing the VAE tensor {err.args[0]!r}") from err


# --- loading: UNet ---------------------------------------------------------------------------


def _load_unet(state_dict: dict, family: str, name: str, dtype: torch.dtype) -> UNet2DConditionModel:
    # 1. The two facts diffusers' converter needs before a config exists. ldm numbers input blocks
    #    as conv_in, then per level: layers_per_block resnets (+ attention) and a downsampler
    #    (none after the last level), so there are levels * (layers_per_block + 1) of them.
    ldm_keys = [key[len(UNET_PREFIX) :] for key in state_dict if key.startswith(UNET_PREFIX)]
    input_blocks = {key.split(".")[1] for key in ldm_keys if key.startswith("input_blocks.")}
    levels = 1 + sum(key.startswith("input_blocks.") and key.endswith(".0.op.weight") for key in ldm_keys)
    layout = {
        "layers_per_block": len(input_blocks) // levels - 1,
        "addition_embed_type": "text_time" if "label_emb.0.0.weight" in ldm_keys else None,
    }
    # 2. Rename; the converter maps ldm tensors one to one, so a count mismatch means some were skipped
    converted = convert_ldm_unet_checkpoint(state_dict, layout)
    if len(converted) != len(ldm_keys):
        unused = len(ldm_keys) - len(converted)
        raise ModelFileError(f"{name}: {unused} of its {len(ldm_keys)} UNet tensors fit no Stable Diffusion UNet layer")
    # 3. Build an empty UNet from the inferred config and put the tensors in
    with init_empty_weights():
        unet = UNet2DConditionModel(**_unet_config(converted, family, layout["layers_per_block"], name))
    return _assign_weights(unet, converted, "UNet", name, dtype)


def _unet_config(sd: dict, family: str, layers_per_block: int, name: str) -> dict:
    """UNet2DConditionModel arguments read from diffusers-named UNet tensors."""
    levels = 1 + max((int(key.split(".")[1]) for key in sd if key.startswith("down_blocks.")), default=0)
    channels = [sd[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(levels)]
    depth = [_count_indices(sd, f"down_blocks.{i}.attentions.0.transformer_blocks.") for i in range(levels)]
    to_k = next((t for key, t in sd.items() if key.endswith("attn2.to_k.weight")), None)
    if to_k is None:
        raise ModelFileError(f"{name}: its UNet has no cross-attention layers, so it is not a Stable Diffusion UNet")
    proj_in = next(t for key, t in sd.items() if key.endswith(".proj_in.weight"))
    mid_depth = _count_indices(sd, "mid_block.attentions.0.transformer_blocks.")
    config = {
        "sample_size": _IMAGE_SIZE[family] // _VAE_DOWNSCALE,
        "in_channels": sd["conv_in.weight"].shape[1],
        "out_channels": sd["conv_out.weight"].shape[0],
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)],
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "cross_attention_dim": to_k.shape[1],
        # Levels without attention ignore their depth (diffusers' SDXL config says 1), except that
        # diffusers gives the middle block the last level's.
        "transformer_layers_per_block": [d or 1 for d in depth[:-1]] + [depth[-1] or mid_depth],
        # SD 1.x projects in and out of attention with 1x1 convolutions, SD 2.x and XL with linear layers.
        "use_linear_projection": proj_in.ndim == 2,
        # The head count leaves no trace in the weights (to_q is channels x channels however it is split),
        # so it follows the family: SD 1.x has 8 heads at every level, SD 2.x and XL 64 channels per head.
        # (diffusers' `attention_head_dim` holds the number of heads for these UNets.)
        "attention_head_dim": 8 if family == "sd1" else [c // 64 for c in channels],
    }
    if "add_embedding.linear_1.weight" in sd:
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=sd["add_embedding.linear_1.weight"].shape[1],
        )
    return config


# --- loading: VAE ----------------------------------------------------------------------------


def _load_ldm_vae(
    state_dict: dict, *, scaling_factor: float, sample_size: int, name: str, dtype: torch.dtype
) -> AutoencoderKL:
    # 1. The VAE's ldm tensors, with or without the checkpoint's first_stage_model. prefix
    prefix = VAE_PREFIX if any(key.startswith(VAE_PREFIX) for key in state_dict) else ""
    ldm = {
        key[len(prefix) :]: tensor
        for key, tensor in state_dict.items()
        if key.startswith(prefix) and key[len(prefix) :].split(".")[0] in _VAE_PARTS
    }
    if "encoder.conv_in.weight" not in ldm:
        raise ModelFileError(f"{name} holds no VAE (no tensor encoder.conv_in.weight)")
    # 2. Rename; the converter needs only the number of resolution levels, and maps one to one
    levels = 1 + max((int(key.split(".")[2]) for key in ldm if key.startswith("encoder.down.")), default=0)
    converted = convert_ldm_vae_checkpoint(
        ldm, {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    )
    if len(converted) != len(ldm):
        raise ModelFileError(f"{name}: {len(ldm) - len(converted)} of its {len(ldm)} VAE tensors fit no VAE layer")
    # 3. Build and fill
    with init_empty_weights():
        vae = AutoencoderKL(**_vae_config(converted, scaling_factor, sample_size))
    return _assign_weights(vae, converted, "VAE", name, dtype)


def _vae_config(sd: dict, scaling_factor: float, sample_size: int) -> dict:
    """AutoencoderKL arguments read from diffusers-named VAE tensors."""
    levels = 1 + max((int(key.split(".")[2]) for key in sd if key.startswith("encoder.down_blocks.")), default=0)
    return {
        "in_channels": sd["encoder.conv_in.weight"].shape[1],
        "out_channels": sd["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(levels)],
        "layers_per_block": _count_indices(sd, "encoder.down_blocks.0.resnets."),
        "latent_channels": sd["decoder.conv_in.weight"].shape[1],
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
    }


# --- loading: text encoders ------------------------------------------------------------------


def _load_text_encoder(state_dict: dict, slot: _TextEncoderSlot, name: str, dtype: torch.dtype) -> nn.Module:
    ldm = {key: tensor for key, tensor in state_dict.items() if key.startswith(slot.prefix)}
    with_projection = slot.model_class is CLIPTextModelWithProjection
    if slot.open_clip:
        # SD 2.x reads OpenCLIP-H's penultimate layer, so diffusers drops its last block and projection.
        own = {
            key[len(slot.prefix) :]: tensor
            for key, tensor in ldm.items()
            if key not in SD_2_TEXT_ENCODER_KEYS_TO_IGNORE
        }
        known = set(DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].values()) | _OPEN_CLIP_UNUSED
        unused = [key for key in own if not key.startswith("transformer.") and key not in known]
        if unused:
            raise ModelFileError(f"{name}: text-encoder tensors fit no OpenCLIP layer: {_few(unused)}")
        projection_dim = own["text_projection"].shape[1] if with_projection else None
        config = _text_config(own, _OPEN_CLIP_NAMES, hidden_act="gelu", projection_dim=projection_dim)
        with init_empty_weights():
            encoder = slot.model_class(config)
        converted = convert_open_clip_checkpoint(encoder, ldm, prefix=slot.prefix)
    else:
        converted = convert_ldm_clip_checkpoint(ldm)
        # Files saved with transformers < 4.31 carry position_ids, a constant the model rebuilds itself
        # (and which some merged checkpoints stored damaged).
        converted.pop("text_model.embeddings.position_ids", None)
        with init_empty_weights():
            encoder = slot.model_class(_text_config(converted, _CLIP_NAMES, hidden_act="quick_gelu"))
    # transformers >= 5.6 flattened CLIPTextModel (no text_model. level); the projection model still nests it.
    if not hasattr(encoder, "text_model"):
        converted = {key.removeprefix("text_model."): tensor for key, tensor in converted.items()}
    return _assign_weights(encoder, converted, "text encoder", name, dtype)


def _text_config(sd: dict, names: dict, *, hidden_act: str, projection_dim: int | None = None) -> CLIPTextConfig:
    vocab_size, hidden_size = sd[names["token"]].shape
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=sd[names["fc1"]].shape[0],
        num_hidden_layers=_count_indices(sd, names["layers"]),
        # The head count leaves no trace in the weights; the CLIP and OpenCLIP text towers of SD 1.x/2.x/XL
        # all use 64 channels per head (768/12, 1024/16, 1280/20).
        num_attention_heads=hidden_size // 64,
        max_position_embeddings=sd[names["position"]].shape[0],
        hidden_act=hidden_act,
        projection_dim=projection_dim or hidden_size,
    )


# --- loading: shared -------------------------------------------------------------------------


def _assign_weights(model: nn.Module, state_dict: dict, what: str, name: str, dtype: torch.dtype) -> nn.Module:
    """Put a file's tensors into an empty (meta) model; every parameter must come from the file, every tensor be used.

    Every tensor is copied (and cast) into memory torch allocates. safetensors hands out views at
    unaligned offsets of the mapped file, and CPU kernels round differently on those: the same weights
    gave UNet outputs ~1e-6 apart, which breaks "same seed, same image". Casting here also avoids
    diffusers' ``.to(dtype)``, which warns on every call in diffusers 0.42.
    """
    state_dict = {
        key: t.to(dtype if t.is_floating_point() else t.dtype, copy=True) for key, t in state_dict.items()
    }
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise ModelFileError(f"{name}: the {what} tensors do not fit the layout read from the file ({detail})") from err
    if missing or unexpected:
        raise ModelFileError(
            f"{name}: the {what} tensors do not match the layout read from the file "
            f"(missing: {_few(missing)}; not used: {_few(unexpected)})"
        )
    return model.eval()


def _count_indices(sd: dict, prefix: str) -> int:
    """How many numbered children (layers, blocks) sit under ``prefix``."""
    return len({key[len(prefix) :].split(".")[0] for key in sd if key.startswith(prefix)})


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:3])
    return f"{shown} and {len(keys) - 3} more" if len(keys) > 3 else shown or "none"


def _resolve_prediction_type(path: Path, requested: str | None, family: str, state_dict: dict) -> tuple[str, str]:
    """(prediction type, where it came from): argument, sidecar YAML, metadata, v_pred marker, family default."""
    if requested is not None:
        return requested, "argument"
    sidecar = path.with_suffix(".yaml")
    if sidecar.is_file():
        return _sidecar_prediction_type(sidecar), sidecar.name
    if sniff(path) == "safetensors":
        declared = read_metadata(path).get("modelspec.prediction_type")
        if declared in _PREDICTION_ALIASES:
            return _PREDICTION_ALIASES[declared], "modelspec.prediction_type metadata"
        if declared is not None:
            logger.warning("%s: ignoring unknown modelspec.prediction_type %r", path.name, declared)
    # ComfyUI writes an empty "v_pred" tensor into the v-prediction checkpoints it saves.
    if "v_pred" in state_dict:
        return "v_prediction", "v_pred marker tensor"
    return _FAMILY_PREDICTION[family], f"{family} default"


_PARAMETERIZATION = re.compile(r"^\s*parameterization:\s*[\"']?(\w+)", re.MULTILINE)


def _sidecar_prediction_type(sidecar: Path) -> str:
    """AUTOMATIC1111's sidecar is the ldm model YAML; only its `parameterization` line matters here."""
    match = _PARAMETERIZATION.search(sidecar.read_text(encoding="utf-8", errors="replace"))
    # ldm's LatentDiffusion defaults to "eps" when the YAML does not say.
    value = match[1] if match else "eps"
    if value not in _PREDICTION_ALIASES:
        raise ModelFileError(f"{sidecar.name} sets parameterization {value!r}; lienzo supports 'eps' and 'v'")
    return _PREDICTION_ALIASES[value]
