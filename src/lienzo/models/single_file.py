"""Single-file Stable Diffusion checkpoints (original ldm / AUTOMATIC1111 key names), read and written offline.

Diffusers' ``from_single_file`` fetches model configs from the hub. Here every config is read from the
tensor shapes instead, so a tiny test model loads exactly like a real one. Key renaming on the way in
uses diffusers' own converters (``diffusers.loaders.single_file_utils``); the way out (export) is
written here from the same tables, because diffusers ships that direction only as a script.
"""

import json
import logging
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
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
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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

logger = logging.getLogger(__name__)

_CONFIGS = Path(__file__).parent / "configs"

PREDICTION_TYPES = ("epsilon", "v_prediction")
# Spellings seen in sidecar YAMLs (ldm's `parameterization`) and in `modelspec.prediction_type` metadata.
_PREDICTION_ALIASES = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
# The SAI model spec writes "v" or "epsilon".
_MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v"}
# SD 2.x defaults to v: the SD2 checkpoints people use (2.0-v, 2.1-768) are v models. SD 2.x base
# (512 px, epsilon) users put a sidecar .yaml next to the file or pass prediction_type="epsilon".
_FAMILY_PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}
_IMAGE_SIZE = {"sd1": 512, "sd2": 768, "sdxl": 1024}
_VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
# Every SD VAE downsamples 8x; the UNet's sample_size is the native image size in latents.
_VAE_DOWNSCALE = 8
# SDXL embeds each of its 6 size/crop conditioning numbers with 256 sinusoidal channels.
_SDXL_TIME_EMBED_DIM = 256
# OpenCLIP's contrastive temperature; a text encoder on its own never uses it.
_OPEN_CLIP_UNUSED = {"logit_scale"}

_CLIP_PAD = "<|endoftext|>"
# OpenCLIP pads with token id 0, which is "!" in the CLIP vocabulary.
_OPEN_CLIP_PAD = "!"


@dataclass(frozen=True)
class _TextEncoderSlot:
    """Where one text encoder lives in an ldm checkpoint and in :class:`Components`."""

    prefix: str
    open_clip: bool  # OpenCLIP naming (resblocks, fused in_proj) rather than transformers' CLIP naming
    model_class: type
    encoder_attr: str
    tokenizer_attr: str


_TEXT_ENCODERS = {
    "sd1": (_TextEncoderSlot("cond_stage_model.transformer.", False, CLIPTextModel, "text_encoder", "tokenizer"),),
    "sd2": (_TextEncoderSlot("cond_stage_model.model.", True, CLIPTextModel, "text_encoder", "tokenizer"),),
    "sdxl": (
        _TextEncoderSlot("conditioner.embedders.0.transformer.", False, CLIPTextModel, "text_encoder", "tokenizer"),
        _TextEncoderSlot(
            "conditioner.embedders.1.model.", True, CLIPTextModelWithProjection, "text_encoder_2", "tokenizer_2"
        ),
    ),
}

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


def bundled_tokenizer(pad_token: str = _CLIP_PAD) -> CLIPTokenizer:
    """CLIP's BPE tokenizer from the bundled files; pad with "!" for OpenCLIP encoders (SD2, SDXL's second)."""
    folder = _CONFIGS / "tokenizer"
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), pad_token=pad_token, model_max_length=77
    )


def scheduler_config_for(prediction_type: str) -> dict:
    """The noise schedule SD 1.x/2.x/XL were trained with (bundled scheduler_sd.json), for one prediction type."""
    config = json.loads((_CONFIGS / "scheduler_sd.json").read_text())
    config.pop("_comment")
    config["prediction_type"] = prediction_type
    return config


def load_single_file(
    path,
    *,
    prediction_type: str | None = None,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Components:
    """Load an SD 1.x / 2.x / XL checkpoint with ldm key names; every config is read from its tensors.

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


def save_single_file(components: Components, path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``components`` as ONE .safetensors with ldm / AUTOMATIC1111 key names, atomically.

    Tensors keep their dtype unless ``dtype`` is given. The prediction type goes into the
    ``modelspec.prediction_type`` metadata so that :func:`load_single_file` finds it again.
    """
    path = Path(path)
    # 1. Rename every tensor to its ldm key
    tensors = _with_prefix(UNET_PREFIX, _unet_to_ldm(components.unet))
    tensors.update(_with_prefix(VAE_PREFIX, _vae_to_ldm(components.vae)))
    for slot in _TEXT_ENCODERS[components.family]:
        encoder = getattr(components, slot.encoder_attr)
        renamed = _open_clip_to_ldm(encoder) if slot.open_clip else _clip_to_ldm(encoder)
        tensors.update(_with_prefix(slot.prefix, renamed))
    # 2. safetensors stores contiguous CPU tensors
    tensors = {
        key: t.detach().to("cpu", dtype if dtype and t.is_floating_point() else t.dtype).contiguous()
        for key, t in tensors.items()
    }
    metadata = {
        "modelspec.prediction_type": _MODELSPEC_PREDICTION.get(components.prediction_type, components.prediction_type)
    }
    # 3. Write beside the target and rename: a crash never leaves half a checkpoint under the real name
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_file(tensors, temp, metadata=metadata)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


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


# --- export ----------------------------------------------------------------------------------

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_UNET_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_VAE_BLOCK = re.compile(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_QKV = re.compile(r"(.+\.attn)\.([qkv])_proj\.(weight|bias)")


def _with_prefix(prefix: str, tensors: dict) -> dict:
    return {prefix + key: tensor for key, tensor in tensors.items()}


def _unet_to_ldm(unet: UNet2DConditionModel) -> dict:
    """Diffusers UNet names -> ldm names, the inverse of diffusers' convert_ldm_unet_checkpoint."""
    direct = {
        diffusers: ldm
        for table in ("layers", "addition_embed_type")
        for diffusers, ldm in DIFFUSERS_TO_LDM_MAPPING["unet"][table].items()
    }
    # ldm numbers each level's resnets (+ attentions) and then its resampler as consecutive blocks.
    per_level = unet.config.layers_per_block + 1
    # An ldm output block holds resnet, attention, upsampler in that order, so the upsampler is at
    # index 2 after attention and 1 without.
    upsampler_slot = [2 if kind.startswith("CrossAttn") else 1 for kind in unet.config.up_block_types]
    renamed = {}
    for key, tensor in unet.state_dict().items():
        if key in direct:
            renamed[direct[key]] = tensor
        elif match := _UNET_MID.fullmatch(key):
            kind, index, rest = match[1], int(match[2]), match[3]
            ldm = f"middle_block.{2 * index}.{_resnet_to_ldm(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
            renamed[ldm] = tensor
        elif match := _UNET_BLOCK.fullmatch(key):
            direction, level, kind, index, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
            if kind == "downsamplers":
                ldm = f"input_blocks.{(level + 1) * per_level}.0.op.{rest.removeprefix('conv.')}"
            elif kind == "upsamplers":
                ldm = f"output_blocks.{(level + 1) * per_level - 1}.{upsampler_slot[level]}.{rest}"
            else:
                block = (
                    f"input_blocks.{1 + level * per_level + index}"
                    if direction == "down"
                    else f"output_blocks.{level * per_level + index}"
                )
                ldm = f"{block}.0.{_resnet_to_ldm(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
            renamed[ldm] = tensor
        else:
            raise ModelFileError(f"cannot export the UNet tensor {key!r}: it has no ldm name")
    return renamed


def _resnet_to_ldm(rest: str) -> str:
    layer, _, param = rest.partition(".")
    return f"{_RESNET_TO_LDM[layer]}.{param}"


def _vae_to_ldm(vae: AutoencoderKL) -> dict:
    """Diffusers VAE names -> ldm names, the inverse of diffusers' convert_ldm_vae_checkpoint."""
    direct = DIFFUSERS_TO_LDM_MAPPING["vae"]
    levels = len(vae.config.block_out_channels)
    renamed = {}
    for key, tensor in vae.state_dict().items():
        if key in direct:
            renamed[direct[key]] = tensor
        elif match := _VAE_MID.fullmatch(key):
            part, kind, index, rest = match[1], match[2], int(match[3]), match[4]
            if kind == "resnets":
                renamed[f"{part}.mid.block_{index + 1}.{rest}"] = tensor
            else:
                layer, _, param = rest.rpartition(".")
                # ldm's VAE attention projects with 1x1 convolutions where diffusers uses linear layers.
                renamed[f"{part}.mid.attn_{index + 1}.{_VAE_ATTENTION_TO_LDM[layer]}.{param}"] = (
                    tensor[:, :, None, None] if tensor.ndim == 2 else tensor
                )
        elif match := _VAE_BLOCK.fullmatch(key):
            part, direction, level, kind, index, rest = match.groups()
            # ldm numbers decoder levels from the highest resolution, diffusers in the order they run.
            ldm_level = int(level) if part == "encoder" else levels - 1 - int(level)
            if kind == "resnets":
                layer = f"block.{index}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                layer = f"{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}"
            renamed[f"{part}.{direction}.{ldm_level}.{layer}"] = tensor
        else:
            raise ModelFileError(f"cannot export the VAE tensor {key!r}: it has no ldm name")
    return renamed


def _nested_text_model(encoder: nn.Module) -> dict:
    """The encoder's tensors named as diffusers' tables expect: transformers < 5.6 layout, under text_model."""
    state_dict = encoder.state_dict()
    if hasattr(encoder, "text_model"):
        return state_dict
    return {f"text_model.{key}": tensor for key, tensor in state_dict.items()}


def _clip_to_ldm(encoder: CLIPTextModel) -> dict:
    # ldm wrapped transformers' CLIPTextModel, so its names are transformers' (nested) names.
    return _nested_text_model(encoder)


def _open_clip_to_ldm(encoder: nn.Module) -> dict:
    """transformers CLIP names -> OpenCLIP names, the inverse of diffusers' convert_open_clip_checkpoint.

    For SD 2.x the export has the blocks the diffusers model has (23 of OpenCLIP-H's 24); AUTOMATIC1111
    and ComfyUI load it, as they stop at the penultimate block anyway.
    """
    top_level = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    renamed, fused = {}, {}
    for key, tensor in _nested_text_model(encoder).items():
        if key in top_level:
            # OpenCLIP multiplies by text_projection (width x dim); a Linear layer stores it transposed.
            renamed[top_level[key]] = tensor.T if key == "text_projection.weight" else tensor
            continue
        ldm = key
        for diffusers_part, ldm_part in DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"].items():
            ldm = ldm.replace(diffusers_part, ldm_part)
        if not ldm.startswith("resblocks."):
            raise ModelFileError(f"cannot export the text-encoder tensor {key!r}: it has no OpenCLIP name")
        if match := _QKV.fullmatch(ldm):
            fused.setdefault(f"transformer.{match[1]}.in_proj_{match[3]}", {})[match[2]] = tensor
        else:
            renamed[f"transformer.{ldm}"] = tensor
    # OpenCLIP's nn.MultiheadAttention keeps q, k and v stacked, in that order, in one in_proj tensor.
    for key, parts in fused.items():
        renamed[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return renamed
