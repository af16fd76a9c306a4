"""Saving components as ONE single-file Stable Diffusion checkpoint with ldm / AUTOMATIC1111 key names.

Loading (:mod:`lienzo.models.single_file_load`) uses diffusers' own converters; the way out (export) is
written here from the same tables, because diffusers ships that direction only as a script.
"""

import os
import re
import uuid
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextModel

from lienzo.errors import ModelFileError
from lienzo.models.components import Components
from lienzo.models.formats import UNET_PREFIX, VAE_PREFIX
from lienzo.models.single_file_layout import _TEXT_ENCODERS

# The SAI model spec writes "v" or "epsilon".
_MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v"}


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
