"""Single files of the transformer families (SD 3.x, Flux.1, Chroma, Z-Image, Flux.2 Klein, Qwen-Image) as people
keep them, read offline.

The network alone comes in Black Forest Labs' and Stability's original key names, with ComfyUI's
``model.diffusion_model.`` prefix, or in diffusers' names; in bf16/fp16/fp32, fp8 (``float8_e4m3fn``),
ComfyUI's "scaled fp8" or city96's GGUF quantizations. SD 3.5's "all-in-one" files add the VAE
(``first_stage_model.``) and text encoders (``text_encoders.clip_l.`` ...); ComfyUI's split layout keeps
each text encoder (``clip_l``, ``clip_g``, ``t5xxl``, ``qwen3``, Qwen-Image's ``qwen_2.5_vl_7b``) and the VAE (Flux's
``ae.safetensors``, Flux.2's ``flux2-vae.safetensors``, Qwen-Image's ``qwen_image_vae.safetensors``) in files of their own.

Every config is read from tensor shapes, as :mod:`lienzo.models.single_file_load` does for U-Net models,
so a tiny test model loads exactly like a real one. Renaming uses diffusers' converters where they fit
any size (SD 3.x, Z-Image, Flux.2, the VAE, OpenCLIP); diffusers' Flux and Chroma converters assume Flux.1's 3072
channels, so Flux's (and Chroma's, which are Flux's blocks without their modulation) names are mapped here
from a table. GGUF tensors stay quantized through diffusers' GGUF quantizer.
"""

import inspect
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    ChromaTransformer2DModel,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    ZImageTransformer2DModel,
)
from diffusers.loaders.single_file_utils import (
    convert_flux2_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    convert_sd3_transformer_checkpoint_to_diffusers,
    convert_wan_vae_to_diffusers,
    convert_z_image_transformer_checkpoint_to_diffusers,
    swap_scale_shift,
)
from diffusers.models.model_loading_utils import load_gguf_checkpoint, load_model_dict_into_meta
from diffusers.quantizers.gguf import GGUFQuantizer
from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter, dequantize_gguf_tensor
from diffusers.quantizers.quantization_config import GGUFQuantizationConfig
from safetensors import SafetensorError, safe_open
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
)

from lienzo.errors import LienzoError, ModelFileError
from lienzo.models import formats
from lienzo.models.families import FAMILIES
from lienzo.models.quiet import first_line, quiet_transformers
from lienzo.models.single_file_load import (
    _CLIP_NAMES,
    _OPEN_CLIP_NAMES,
    _assign_weights,
    _count_indices,
    _few,
    _text_config,
    _vae_config,
)

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
PREFIX = formats.UNET_PREFIX  # ComfyUI's (and SD 3.5 all-in-one files') prefix of the network's tensors
TEXT_ENCODER_KINDS = ("clip_l", "clip_g", "t5xxl", "qwen3", "qwen25vl")
# Where an all-in-one file keeps each text encoder, in transformers' names.
TEXT_ENCODER_PREFIX = "text_encoders.{kind}.transformer."

# Tensors that name a family, in its original names (BFL's, Stability's) and in diffusers' names,
# after the ComfyUI prefix is removed. Flux.1's time_in/vector_in tell it from Chroma and Flux.2, which
# share its block names, and Chroma's distilled_guidance_layer (its modulation approximator) tells Chroma;
# Flux.2's modulation shared by all blocks of a stream tells Flux.2 (diffusers' single-file code detects it so too);
# diffusers' SD 3 has no single-stream blocks and no plain x_embedder. Qwen-Image's original (ComfyUI's) names
# are diffusers' (diffusers' single-file loader maps them one to one); its text norm and per-stream modulation tell it.
_SIGNATURES = {
    "qwenimage": (
        ("transformer_blocks.0.img_mod.1.weight", "transformer_blocks.0.attn.to_q.weight", "img_in.weight", "txt_norm.weight"),
    ) * 2,
    "flux2": (
        (
            "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight",
            "double_stream_modulation_img.lin.weight", "single_stream_modulation.lin.weight",
        ),
        (
            "transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight",
            "x_embedder.weight", "double_stream_modulation_img.linear.weight", "single_stream_modulation.linear.weight",
        ),
    ),
    "chroma": (
        (
            "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight",
            "distilled_guidance_layer.in_proj.weight",
        ),
        (
            "transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.attn.to_q.weight", "x_embedder.weight",
            "distilled_guidance_layer.in_proj.weight",
        ),
    ),
    "zimage": (
        ("layers.0.attention.qkv.weight", "noise_refiner.0.attention.qkv.weight", "x_embedder.weight", "cap_embedder.1.weight"),
        (
            "layers.0.attention.to_q.weight", "noise_refiner.0.attention.to_q.weight", "all_x_embedder.2-1.weight",
            "cap_embedder.1.weight",
        ),
    ),
    "flux": (
        (
            "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight",
            "time_in.in_layer.weight", "vector_in.in_layer.weight",
        ),
        (
            "transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.attn.to_q.weight", "x_embedder.weight",
            "time_text_embed.text_embedder.linear_1.weight",
        ),
    ),
    "sd3": (
        ("joint_blocks.0.x_block.attn.qkv.weight", "x_embedder.proj.weight", "context_embedder.weight", "y_embedder.mlp.0.weight"),
        (
            "transformer_blocks.0.attn.to_q.weight", "pos_embed.proj.weight", "context_embedder.weight",
            "time_text_embed.text_embedder.linear_1.weight",
        ),
    ),
}
# The tensors a config is read from: (original name, diffusers name). Chroma keeps Flux.1's blocks.
_FLUX_BLOCKS = {
    "x_in": ("img_in.weight", "x_embedder.weight"),
    "text_in": ("txt_in.weight", "context_embedder.weight"),
    "q_norm": ("double_blocks.0.img_attn.norm.query_norm.scale", "transformer_blocks.0.attn.norm_q.weight"),
    "out": ("final_layer.linear.weight", "proj_out.weight"),
    "double": ("double_blocks.", "transformer_blocks."),
    "single": ("single_blocks.", "single_transformer_blocks."),
}
_CONFIG_NAMES = {
    "flux": {
        **_FLUX_BLOCKS,
        "pooled_in": ("vector_in.in_layer.weight", "time_text_embed.text_embedder.linear_1.weight"),
        "guidance_in": ("guidance_in.in_layer.weight", "time_text_embed.guidance_embedder.linear_1.weight"),
    },
    "chroma": {
        **_FLUX_BLOCKS,
        "approximator_in": ("distilled_guidance_layer.in_proj.weight",) * 2,
        "approximator_layers": ("distilled_guidance_layer.layers.",) * 2,
    },
    "flux2": {
        **_FLUX_BLOCKS,
        "time_in": ("time_in.in_layer.weight", "time_guidance_embed.timestep_embedder.linear_1.weight"),
        "guidance_in": ("guidance_in.in_layer.weight", "time_guidance_embed.guidance_embedder.linear_1.weight"),
        "mlp_in": ("double_blocks.0.img_mlp.0.weight", "transformer_blocks.0.ff.linear_in.weight"),
    },
    "qwenimage": {
        "x_in": ("img_in.weight",) * 2,
        "text_in": ("txt_in.weight",) * 2,
        "q_norm": ("transformer_blocks.0.attn.norm_q.weight",) * 2,
        "out": ("proj_out.weight",) * 2,
        "blocks": ("transformer_blocks.",) * 2,
        "guidance_in": ("time_text_embed.guidance_embedder.linear_1.weight",) * 2,
    },
    "zimage": {
        "x_in": ("x_embedder.weight", "all_x_embedder.2-1.weight"),
        "text_in": ("cap_embedder.1.weight",) * 2,
        "q_norm": ("layers.0.attention.q_norm.weight", "layers.0.attention.norm_q.weight"),
        "layers": ("layers.",) * 2,
        "refiner": ("noise_refiner.",) * 2,
    },
    "sd3": {
        "patch": ("x_embedder.proj.weight", "pos_embed.proj.weight"),
        "positions": ("pos_embed", "pos_embed.pos_embed"),
        "text_in": ("context_embedder.weight", "context_embedder.weight"),
        "pooled_in": ("y_embedder.mlp.0.weight", "time_text_embed.text_embedder.linear_1.weight"),
        "q_norm": ("joint_blocks.0.x_block.attn.ln_q.weight", "transformer_blocks.0.attn.norm_q.weight"),
        "out": ("final_layer.linear.weight", "proj_out.weight"),
        "blocks": ("joint_blocks.", "transformer_blocks."),
        "attn2": (".x_block.attn2.", ".attn2."),  # in the blocks with SD 3.5's second (dual) attention
    },
}
_NETWORKS = {
    "flux": FluxTransformer2DModel, "sd3": SD3Transformer2DModel, "chroma": ChromaTransformer2DModel,
    "zimage": ZImageTransformer2DModel, "flux2": Flux2Transformer2DModel, "qwenimage": QwenImageTransformer2DModel,
}
# SD 3 without QK norm (3.0 Medium) leaves its head width in no tensor; every SD 3.x has 64 per head.
_SD3_HEAD_DIM = 64
# The image size SD 3.x and Flux.1 were trained at, in latents (1024 px / 8); no tensor states it.
_SAMPLE_SIZE = 128

# BFL's Flux.1 names -> diffusers' (FluxTransformer2DModel) for the tensors renamed one to one, without
# the .weight/.bias ending. Block entries are relative to double_blocks.N. / single_blocks.N.
_FLUX_NAMES = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_FLUX_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_FLUX_SINGLE = {
    "modulation.lin": "norm.linear",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
    "linear2": "proj_out",
}
# BFL fuses projections that diffusers keeps apart; they are split by rows (the single blocks' linear1
# holds q, k, v and then the MLP's input, whatever is left).
_FLUX_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}
_FLUX_BLOCK = re.compile(r"(double|single)_blocks\.(\d+)\.(.+)")
# Chroma's approximator (what replaced Flux's modulation layers) in lodestones' names -> diffusers', relative
# to distilled_guidance_layer.; its RMSNorms' "scale" becomes "weight" as Flux's do.
_CHROMA_APPROXIMATOR = re.compile(
    r"distilled_guidance_layer\.(?:(in_proj|out_proj)|layers\.(\d+)\.(in_layer|out_layer)|norms\.(\d+))\.(\w+)"
)
_CHROMA_LAYER = {"in_layer": "linear_1", "out_layer": "linear_2"}
# Z-Image: what no tensor states. Its patches are 2x2 latents of one frame, and its rotary axes (frame, row,
# column) split each head as 1/4, 3/8, 3/8 (32, 48, 48 for 128); the axes' lengths only bound the positions
# the rotary table covers, so Z-Image's own (which cover 4096 px) serve every size.
_ZIMAGE_PATCH = 2
_ZIMAGE_AXES_LENS = (1536, 512, 512)
# Qwen-Image's network packs 2x2 latent patches (in_channels 64 = 16 latent channels x 4); no tensor says the 2.
_QWENIMAGE_PATCH = 2
# Some Z-Image files keep a final norm that the network does not use (diffusers' converter drops it too).
_ZIMAGE_UNUSED = "norm_final.weight"
# BFL and SD 3 keep the final modulation as (shift, scale); diffusers as (scale, shift).
_FLUX_FINAL_MODULATION = "final_layer.adaLN_modulation.1"

# ComfyUI's scaled fp8: a marker tensor, and beside each fp8 weight the factor it was divided by
# (and one for the activations, which only fp8 matmuls use). ComfyUI's newer mixed-precision files and BFL's
# fp8 releases (flux-2-klein-*-fp8) name them weight_scale / input_scale, ComfyUI's with a comfy_quant entry
# per layer describing the format.
_SCALED_FP8_MARKER = "scaled_fp8"
_SCALE_WEIGHT = (".scale_weight", ".weight_scale")
_SCALE_INPUT = (".scale_input", ".input_scale")
_QUANT_NOTE = ".comfy_quant"

# Text widths of CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, the two CLIPs SD 3.x and Flux.1 use.
_CLIP_WIDTHS = {768: "clip_l", 1280: "clip_g"}
# OpenAI's CLIP uses quick_gelu, OpenCLIP's bigG plain gelu; the weights do not say which.
_CLIP_ACTIVATIONS = {"clip_l": "quick_gelu", "clip_g": "gelu"}
_CLIP_TOKEN, _OPEN_CLIP_TOKEN = _CLIP_NAMES["token"], _OPEN_CLIP_NAMES["token"]
# transformers >= 5.6 saves CLIPTextModel without its text_model. level; ComfyUI's files have it.
_FLAT_CLIP_TOKEN = _CLIP_TOKEN.removeprefix("text_model.")
_CLIP_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")
# Tensors of a CLIP file that no text encoder uses: the contrastive temperature and a constant index.
_CLIP_UNUSED = ("logit_scale", "text_model.embeddings.position_ids")
_T5_BLOCK = "encoder.block."
_T5_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")  # the same (tied) table; files keep either or both
# llama.cpp's names for T5's encoder, as city96's T5 GGUF files have them.
_T5_GGUF = ("token_embd.weight", "enc.blk.0.attn_q.weight")
# Qwen3 (Z-Image's and Flux.2 Klein's text encoder) in transformers' Qwen3Model names; ComfyUI's qwen_3_4b.safetensors
# keeps Qwen3ForCausalLM's (under model., beside an lm_head that Z-Image's Qwen3Model does not use). Klein's
# pipeline holds the whole Qwen3ForCausalLM; a file without the lm_head (Qwen3-4B ties it to the embedding) gets
# the embedding there. The QK norms tell Qwen3 from Qwen2 and Llama, which share the other names.
_QWEN3_PREFIX = "model."
_QWEN3_SIGNATURE = ("embed_tokens.weight", "layers.0.self_attn.q_norm.weight")
_QWEN3_HEAD = "lm_head.weight"
# llama.cpp's names for Qwen3 (GGUF files of qwen_3_4b), mapped back through gguf's own table; its lm_head
# ("output.weight") is kept only for a Qwen3ForCausalLM. llama.cpp stores Qwen's q and k unpermuted (it permutes Llama's only).
_QWEN3_GGUF = ("token_embd.weight", "blk.0.attn_q_norm.weight")
_QWEN3_GGUF_HEAD = "output.weight"
# Qwen2.5-VL (Qwen-Image's text encoder) by its vision tower, under any prefix (transformers' old and new layouts),
# or, in a file without the tower, by its language model: Qwen2's names (no QK norms, unlike Qwen3), with the
# query's bias Qwen2 has and Llama lacks.
_QWEN25VL_MARK = "visual.patch_embed.proj.weight"
_QWEN25VL_TEXT_MARK = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias")
# ComfyUI's qwen_2.5_vl_7b.safetensors keeps transformers' names from before 4.52: the language model under model.,
# the vision tower under visual., lm_head beside them. transformers 5 nests both under model. (its own
# checkpoint conversion does this rename in from_pretrained only, which a single file does not go through).
_QWEN25VL_TEXT = "model.language_model."
_QWEN25VL_VISION = "model.visual."
_QWEN25VL_HEAD = "lm_head.weight"
# What no tensor of a Qwen2.5-VL states, by its text width: Qwen2.5-VL-7B-Instruct's config.json (the 7B is 3584
# wide). head_dim gives the head counts from the q and k projections.
_QWEN25VL_CONSTANTS = {
    3584: {
        "head_dim": 128,
        "text": {
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
            "rms_norm_eps": 1e-6, "max_position_embeddings": 128000, "bos_token_id": 151643, "eos_token_id": 151645,
        },
        "vision": {"num_heads": 16, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2},
        "tokens": {
            "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        },
    },
}
_QWEN3_LAYER = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
)
# What no tensor of Qwen3 states: its rotary base, norm epsilon and context length (Qwen3-4B's config).
_QWEN3_CONSTANTS = {"rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}, "rms_norm_eps": 1e-6,
                    "max_position_embeddings": 40960}

_VAE_PREFIX = formats.VAE_PREFIX
_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# Each family's latent space: (scaling_factor, shift_factor) as its VAE config states them.
# Chroma and Z-Image decode with Flux.1's VAE (ae.safetensors), so they share its latent scale and shift.
_VAE_LATENTS = {"flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609), "chroma": (0.3611, 0.1159), "zimage": (0.3611, 0.1159)}
_VAE_SAMPLE_SIZE = 1024
# Flux.2's VAE (flux2-vae.safetensors) in BFL's names: ldm's, except that its quant convs sit inside the
# encoder and decoder, plus the batch norm whose running statistics normalize the patched latents. BFL keeps
# only the statistics; torch's BatchNorm2d also counts the batches it saw, which nothing reads at inference.
_FLUX2_VAE_CONVS = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
_FLUX2_VAE_NORM = "bn."
_FLUX2_VAE_BATCHES = "bn.num_batches_tracked"
# Qwen-Image's latent statistics (mean, std per channel) by latent channels: AutoencoderKLQwenImage's defaults in
# diffusers (diffusers/models/autoencoders/autoencoder_kl_qwenimage.py), which are Qwen-Image's vae/config.json values.
_QWEN_IMAGE_LATENTS = {
    16: tuple(inspect.signature(AutoencoderKLQwenImage).parameters[name].default for name in ("latents_mean", "latents_std"))
}


# --- what a file holds ----------------------------------------------------------------------------


def detect_transformer_family(shapes: Mapping[str, Shape]) -> str | None:
    """"flux", "sd3", "chroma", "zimage", "flux2" or "qwenimage" when the tensor names are those of that family's transformer
    (original, ComfyUI-prefixed or diffusers names), else None. Only names are read; ``shapes`` may be a header's."""
    own = _network_part(shapes)
    for family, layouts in _SIGNATURES.items():
        if any(all(name in own for name in names) for names in layouts):
            return family
    return None


def transformer_config(family: str, shapes: Mapping[str, Shape], *, name: str = "this file") -> dict:
    """The diffusers config of a ``family`` transformer ("flux", "sd3", "chroma", "zimage", "flux2", "qwenimage"), read from its tensor shapes
    (original, ComfyUI-prefixed or diffusers names). ``name`` is the file, for the error message."""
    own = _network_part(shapes)
    diffusers_names = all(key in own for key in _SIGNATURES[family][1])
    names = {what: pair[diffusers_names] for what, pair in _CONFIG_NAMES[family].items()}
    try:
        return _CONFIGS[family](own, names)
    except KeyError as err:
        raise ModelFileError(f"{name} is missing the transformer tensor {err.args[0]!r}; the file is incomplete") from None


def _flux_blocks_config(own: Mapping[str, Shape], names: dict) -> dict:
    """What Flux.1, Chroma (which keeps Flux.1's blocks) and Flux.2 (which keeps their layout) read alike."""
    inner, in_channels = own[names["x_in"]]
    head_dim = own[names["q_norm"]][0]
    return {
        "patch_size": 1,  # Flux packs 2x2 latent patches into channels before the network (in_channels 64)
        "in_channels": in_channels,
        "out_channels": own[names["out"]][0],
        "num_layers": _count_indices(own, names["double"]),
        "num_single_layers": _count_indices(own, names["single"]),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": own[names["text_in"]][1],
        # The rotary axes (text index, row, column) split each head as 1/8, 7/16, 7/16: (16, 56, 56) for 128.
        "axes_dims_rope": (head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16),
    }


def _flux_config(own: Mapping[str, Shape], names: dict) -> dict:
    return {
        **_flux_blocks_config(own, names),
        "pooled_projection_dim": own[names["pooled_in"]][1],
        # Flux.1 dev takes a distilled guidance strength; schnell has no guidance_in.
        "guidance_embeds": names["guidance_in"] in own,
    }


def _chroma_config(own: Mapping[str, Shape], names: dict) -> dict:
    hidden, channels = own[names["approximator_in"]]
    return {
        **_flux_blocks_config(own, names),
        "approximator_num_channels": channels,
        "approximator_hidden_dim": hidden,
        "approximator_layers": _count_indices(own, names["approximator_layers"]),
    }


def _flux2_config(own: Mapping[str, Shape], names: dict) -> dict:
    inner = own[names["x_in"]][0]
    head_dim = own[names["q_norm"]][0]
    return {
        **_flux_blocks_config(own, names),
        "timestep_guidance_channels": own[names["time_in"]][1],
        # The feed-forward is gated (SwiGLU): its input projection holds the gate and the value, each inner * ratio.
        "mlp_ratio": own[names["mlp_in"]][0] / (2 * inner),
        # Four rotary axes (time, row, column, sequence) split each head evenly: (32, 32, 32, 32) for 128.
        "axes_dims_rope": (head_dim // 4,) * 4,
        # Klein takes no guidance strength; Flux.2 dev does.
        "guidance_embeds": names["guidance_in"] in own,
    }


def _qwenimage_config(own: Mapping[str, Shape], names: dict) -> dict:
    inner = own[names["x_in"]][0]
    head_dim = own[names["q_norm"]][0]
    return {
        "patch_size": _QWENIMAGE_PATCH,
        "in_channels": own[names["x_in"]][1],
        "out_channels": own[names["out"]][0] // _QWENIMAGE_PATCH**2,
        "num_layers": _count_indices(own, names["blocks"]),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": own[names["text_in"]][1],
        "guidance_embeds": names["guidance_in"] in own,
        # The rotary axes (frame, row, column) split each head as 1/8, 7/16, 7/16: (16, 56, 56) for 128.
        "axes_dims_rope": (head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16),
    }


def _zimage_config(own: Mapping[str, Shape], names: dict) -> dict:
    dim, patch_channels = own[names["x_in"]]
    head_dim = own[names["q_norm"]][0]
    return {
        "all_patch_size": (_ZIMAGE_PATCH,),
        "all_f_patch_size": (1,),
        "in_channels": patch_channels // (_ZIMAGE_PATCH * _ZIMAGE_PATCH),
        "dim": dim,
        "n_layers": _count_indices(own, names["layers"]),
        "n_refiner_layers": _count_indices(own, names["refiner"]),
        "n_heads": dim // head_dim,
        # The fused qkv of the original names is split in thirds (as diffusers' converter does): as many
        # key/value heads as query heads, which every Z-Image has.
        "n_kv_heads": dim // head_dim,
        "cap_feat_dim": own[names["text_in"]][1],
        "axes_dims": [head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8],
        "axes_lens": list(_ZIMAGE_AXES_LENS),
    }


def _sd3_config(own: Mapping[str, Shape], names: dict) -> dict:
    inner, in_channels, patch, _ = own[names["patch"]]
    head_dim = own[names["q_norm"]][0] if names["q_norm"] in own else _SD3_HEAD_DIM
    blocks = names["blocks"]
    dual = {int(key[len(blocks) :].split(".")[0]) for key in own if key.startswith(blocks) and names["attn2"] in key}
    caption_dim, text_dim = own[names["text_in"]]
    return {
        "sample_size": _SAMPLE_SIZE,
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": own[names["out"]][0] // (patch * patch),
        "num_layers": _count_indices(own, blocks),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": text_dim,
        "caption_projection_dim": caption_dim,
        "pooled_projection_dim": own[names["pooled_in"]][1],
        # The position table covers a square of pos_embed_max_size patches a side.
        "pos_embed_max_size": math.isqrt(own[names["positions"]][1]),
        "dual_attention_layers": tuple(sorted(dual)),
        "qk_norm": "rms_norm" if names["q_norm"] in own else None,
    }


_CONFIGS = {
    "flux": _flux_config, "sd3": _sd3_config, "chroma": _chroma_config, "zimage": _zimage_config, "flux2": _flux2_config,
    "qwenimage": _qwenimage_config,
}


def text_encoder_kind(shapes: Mapping[str, Shape]) -> str | None:
    """"clip_l", "clip_g", "t5xxl", "qwen3" or "qwen25vl" for a standalone text-encoder file (ComfyUI's split layout), else None.

    T5 by its encoder blocks and embedding (transformers' or llama.cpp's GGUF names); Qwen3 by its embedding
    and its attention's QK norms (transformers' names, with or without ``model.``). A CLIP (transformers'
    or OpenCLIP names) by its width alone: 768 is CLIP-L, 1280 bigG. Layer counts and text projections
    do not decide (SD 3's CLIP-L has a projection, Flux's none; bigG's layer count varies with how it was
    cut). A CLIP of any other width (a test-sized one) gives None: the caller's wanted kind decides then.
    """
    if any(key.startswith(_T5_BLOCK) for key in shapes) and any(key in shapes for key in _T5_EMBEDDINGS):
        return "t5xxl"
    if all(key in shapes for key in _T5_GGUF):
        return "t5xxl"
    if any(key.endswith(_QWEN25VL_MARK) for key in shapes) or all(key in shapes for key in _QWEN25VL_TEXT_MARK):
        return "qwen25vl"
    if any(all(prefix + key in shapes for key in _QWEN3_SIGNATURE) for prefix in ("", _QWEN3_PREFIX)):
        return "qwen3"
    if all(key in shapes for key in _QWEN3_GGUF):
        return "qwen3"
    token = shapes.get(_CLIP_TOKEN) or shapes.get(_FLAT_CLIP_TOKEN) or shapes.get(_OPEN_CLIP_TOKEN)
    return None if token is None or len(token) != 2 else _CLIP_WIDTHS.get(token[1])


# --- the network ----------------------------------------------------------------------------------


def load_transformer_file(path, *, dtype: torch.dtype = torch.float32) -> tuple[str, torch.nn.Module]:
    """(family, network) from one file holding an SD 3.x, Flux.1, Chroma, Z-Image, Flux.2 or Qwen-Image transformer,
    alone or in an all-in-one file.

    fp8 and scaled-fp8 weights are upcast to ``dtype``; GGUF weights stay quantized (diffusers'
    ``GGUFLinear`` dequantizes each layer's weight as it runs, computing in ``dtype``).
    """
    path = Path(path)
    kind = formats.sniff(path)
    if kind == "diffusers-folder":
        raise ModelFileError(f"{path.name} is a diffusers model folder; load it as a model, not as a transformer file")
    # Headers name the family before any tensor is read; a pickle has to be read whole (weights only).
    state_dict = None if kind in ("safetensors", "gguf") else formats.load_state_dict(path)
    shapes = _header_shapes(path, kind) if state_dict is None else _shapes(state_dict)
    family = detect_transformer_family(shapes)
    if family is None:
        raise ModelFileError(
            f"{path.name} is not a transformer lienzo knows (SD 3.x, Flux.1, Chroma, Z-Image, Flux.2 Klein, Qwen-Image): "
            f"{_what_it_is(shapes)}"
        )
    config = transformer_config(family, shapes, name=path.name)
    if state_dict is None:
        # Of an all-in-one file only the network is read, not its VAE and text encoders (T5-XXL alone is 9 GB).
        state_dict = _read_tensors(path, kind, _network_part(shapes, keep_prefix=True))
    own = _unscale_fp8(_network_part(state_dict), path.name)
    diffusers_names = all(key in own for key in _SIGNATURES[family][1])
    try:
        if diffusers_names:
            converted = own
        elif family == "flux":
            converted = _flux_to_diffusers(own, inner=config["num_attention_heads"] * config["attention_head_dim"])
        elif family == "chroma":
            converted = _chroma_approximator(own)
            converted.update(_flux_to_diffusers(own, inner=config["num_attention_heads"] * config["attention_head_dim"]))
        elif family == "flux2":
            # diffusers' converter moves every tensor (renamed where it knows the name), so one that fits no
            # layer is named by the load below.
            converted = convert_flux2_transformer_checkpoint_to_diffusers(own)
        elif family == "zimage":
            # diffusers' converter renames every tensor, so one that fits no layer is named by the load below.
            own.pop(_ZIMAGE_UNUSED, None)
            converted = convert_z_image_transformer_checkpoint_to_diffusers(own)
        else:
            # diffusers' converter pops what it uses, so what stays behind fits no layer.
            converted = convert_sd3_transformer_checkpoint_to_diffusers(own)
    except KeyError as err:
        raise ModelFileError(f"{path.name} is missing the transformer tensor {err.args[0]!r}; the file is incomplete") from None
    if own is not converted and own:
        label = FAMILIES[family].label
        raise ModelFileError(f"{path.name}: {len(own)} of its transformer tensors fit no {label} layer: {_few(sorted(own))}")
    with init_empty_weights():
        network = _NETWORKS[family](**config)
    if any(isinstance(tensor, GGUFParameter) for tensor in converted.values()):
        return family, _load_quantized(network, converted, path.name, dtype)
    return family, _assign_weights(network, converted, "transformer", path.name, dtype)


def _flux_to_diffusers(bfl: dict, *, inner: int) -> dict:
    """BFL's Flux.1 tensors in diffusers' names. What is renamed is popped from ``bfl``, so what is left fits no layer."""
    converted = {}
    for key in list(bfl):
        stem, _, ending = key.rpartition(".")
        ending = "weight" if ending == "scale" else ending  # BFL's RMSNorm calls its weight "scale"
        block = _FLUX_BLOCK.fullmatch(stem)
        if block is not None:
            double = block[1] == "double"
            target = f"transformer_blocks.{block[2]}." if double else f"single_transformer_blocks.{block[2]}."
            part = block[3]
            renamed = (_FLUX_DOUBLE if double else _FLUX_SINGLE).get(part)
            if renamed is not None:
                converted[f"{target}{renamed}.{ending}"] = bfl.pop(key)
            elif part in _FLUX_FUSED:
                tensor = bfl.pop(key)
                sizes = [inner] * 3 + ([tensor.shape[0] - 3 * inner] if part == "linear1" else [])
                # torch.split keeps diffusers' GGUFParameter (and its quantization type) for quantized rows.
                for name, piece in zip(_FLUX_FUSED[part], torch.split(tensor, sizes), strict=True):
                    converted[f"{target}{name}.{ending}"] = piece
        elif stem in _FLUX_NAMES:
            converted[f"{_FLUX_NAMES[stem]}.{ending}"] = bfl.pop(key)
        elif stem == _FLUX_FINAL_MODULATION:
            converted[f"norm_out.linear.{ending}"] = swap_scale_shift(bfl.pop(key), 0)
    return converted


def _chroma_approximator(tensors: dict) -> dict:
    """Chroma's approximator tensors in diffusers' names, popped from ``tensors`` (lodestones' names)."""
    converted = {}
    for key in [key for key in tensors if key.startswith("distilled_guidance_layer.")]:
        match = _CHROMA_APPROXIMATOR.fullmatch(key)
        if match is None:
            continue  # left in ``tensors``: named as fitting no layer
        projection, layer, part, norm, ending = match.groups()
        if projection:
            name = projection
        elif layer is not None:
            name = f"layers.{layer}.{_CHROMA_LAYER[part]}"
        else:
            name, ending = f"norms.{norm}", "weight" if ending == "scale" else ending
        converted[f"distilled_guidance_layer.{name}.{ending}"] = tensors.pop(key)
    return converted


def _load_quantized(network: torch.nn.Module, state_dict: dict, name: str, dtype: torch.dtype) -> torch.nn.Module:
    """Fill an empty network with GGUF tensors through diffusers' GGUF quantizer: its linear layers become
    ``GGUFLinear`` holding the quantized blocks; every other tensor is read (dequantized) into ``dtype``."""
    expected = set(network.state_dict())
    missing, unused = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unused:
        raise ModelFileError(
            f"{name}: the transformer tensors do not match the layout read from the file "
            f"(missing: {_few(missing)}; not used: {_few(unused)})"
        )
    quantizer = GGUFQuantizer(GGUFQuantizationConfig(compute_dtype=dtype))
    quantizer.preprocess_model(model=network, device_map=None, state_dict=state_dict, keep_in_fp32_modules=[])
    for key, tensor in state_dict.items():
        owner, _, attribute = key.rpartition(".")
        # Only linear layers compute from quantized blocks; a quantized norm or conv weight is expanded.
        in_linear = attribute == "weight" and isinstance(network.get_submodule(owner), GGUFLinear)
        if isinstance(tensor, GGUFParameter) and not in_linear:
            state_dict[key] = dequantize_gguf_tensor(tensor)
    try:
        load_model_dict_into_meta(network, state_dict, dtype=dtype, hf_quantizer=quantizer, device_map={"": torch.device("cpu")})
    except ValueError as err:  # a quantized tensor whose blocks decode to another shape
        detail = first_line(err)
        raise ModelFileError(f"{name}: the transformer tensors do not fit the layout read from the file ({detail})") from None
    quantizer.postprocess_model(network)
    network.hf_quantizer = quantizer
    return network.eval()


# --- text encoders --------------------------------------------------------------------------------


def load_text_encoder_file(
    source,
    kind: str,
    *,
    dtype: torch.dtype = torch.float32,
    projection: bool = False,
    causal_lm: bool = False,
    prefix: str = "",
) -> torch.nn.Module:
    """A ``kind`` ("clip_l", "clip_g", "t5xxl", "qwen3" or "qwen25vl") text encoder from a file, or from the tensors of an
    already read file (a state dict) under ``prefix``: CLIPTextModel, CLIPTextModelWithProjection
    (``projection``, as SD 3 uses both CLIPs), T5EncoderModel, Qwen3Model or Qwen3ForCausalLM (``causal_lm``,
    Flux.2 Klein's) or Qwen2_5_VLForConditionalGeneration (Qwen-Image's), its config read from the tensor shapes.
    A Qwen3 or Qwen2.5-VL may also be a transformers folder (a diffusers folder's ``text_encoder``), a Qwen3 a GGUF file.

    A CLIP's head count is its width / 64 (CLIP-L: 12, bigG: 20). A CLIP asked for with a projection whose
    file has none (Flux's CLIP-L used for SD 3) gets the identity, as ComfyUI gives it.
    """
    if kind not in TEXT_ENCODER_KINDS:
        raise LienzoError(f"text encoder kind must be one of {', '.join(TEXT_ENCODER_KINDS)}, got {kind!r}")
    if isinstance(source, Mapping):
        name, state_dict = prefix.rstrip(".") or "the state dict", source
    else:
        path = Path(source)
        if kind == "qwen3" and path.is_dir():
            return _load_qwen3_folder(path, dtype, causal_lm)
        if kind == "qwen25vl" and path.is_dir():
            return _load_qwen25vl_folder(path, dtype)
        name, file_kind = path.name, formats.sniff(path)
        if file_kind == "gguf" and kind == "qwen3":
            return _load_qwen3_gguf(path, dtype, causal_lm)
        if file_kind == "gguf":
            return _load_t5_gguf(path, kind, dtype)
        if file_kind == "safetensors":
            state_dict = _read_tensors(path, file_kind, [key for key in formats.read_header(path) if key.startswith(prefix)])
        else:
            state_dict = formats.load_state_dict(path)
    tensors = _unscale_fp8({key[len(prefix) :]: t for key, t in state_dict.items() if key.startswith(prefix)}, name)
    found = text_encoder_kind(_shapes(tensors))
    if found is not None and found != kind:
        raise ModelFileError(f"{name} holds a {found} text encoder, not the {kind} that was asked for")
    try:
        with quiet_transformers():
            if kind == "t5xxl":
                return _load_t5(tensors, name, dtype)
            if kind == "qwen3":
                return _load_qwen3(tensors, name, dtype, causal_lm)
            if kind == "qwen25vl":
                return _load_qwen25vl(tensors, name, dtype)
            return _load_clip(tensors, kind, name, dtype, projection)
    except KeyError as err:  # a tensor the config is read from
        raise ModelFileError(f"{name} is missing the text-encoder tensor {err.args[0]!r}; the file is incomplete") from None


def load_text_encoders_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], family: str, dtype: torch.dtype = torch.float32
) -> dict[str, torch.nn.Module]:
    """The text encoders an all-in-one file bundles (``text_encoders.clip_l.transformer.`` ...), by the
    family's component names ("text_encoder", ...); empty when it bundles none."""
    encoders = {}
    for slot in FAMILIES[family].text_encoders:
        prefix = TEXT_ENCODER_PREFIX.format(kind=slot.kind)
        if any(key.startswith(prefix) for key in state_dict):
            projection = slot.model_class == "CLIPTextModelWithProjection"
            causal_lm = slot.model_class == "Qwen3ForCausalLM"
            encoders[slot.component] = load_text_encoder_file(
                state_dict, slot.kind, dtype=dtype, projection=projection, causal_lm=causal_lm, prefix=prefix
            )
    return encoders


def _load_clip(tensors: dict, kind: str, name: str, dtype: torch.dtype, projection: bool) -> torch.nn.Module:
    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    activation = _CLIP_ACTIVATIONS[kind]
    if _OPEN_CLIP_TOKEN in tensors:
        # OpenCLIP keeps its projection as (width, projection); transformers the other way round.
        projection_dim = tensors["text_projection"].shape[1] if projection and "text_projection" in tensors else None
        config = _text_config(tensors, _OPEN_CLIP_NAMES, hidden_act=activation, projection_dim=projection_dim)
        with init_empty_weights():
            encoder = model_class(config)
        converted = convert_open_clip_checkpoint(encoder, tensors, prefix="")
    else:
        if _CLIP_TOKEN not in tensors and _FLAT_CLIP_TOKEN in tensors:
            tensors = {("text_model." + key if key.startswith(_CLIP_PARTS) else key): t for key, t in tensors.items()}
        if _CLIP_TOKEN not in tensors:
            raise ModelFileError(f"{name} holds no CLIP text encoder (no tensor {_CLIP_TOKEN})")
        converted = {key: t for key, t in tensors.items() if key not in _CLIP_UNUSED}
        has_projection = projection and "text_projection.weight" in converted
        projection_dim = converted["text_projection.weight"].shape[0] if has_projection else None
        config = _text_config(converted, _CLIP_NAMES, hidden_act=activation, projection_dim=projection_dim)
        with init_empty_weights():
            encoder = model_class(config)
    if not projection:
        converted.pop("text_projection.weight", None)
    elif "text_projection.weight" not in converted:
        log.warning("%s has no text projection; using the identity, as ComfyUI does", name)
        converted["text_projection.weight"] = torch.eye(config.hidden_size)
    # transformers >= 5.6 flattened CLIPTextModel (no text_model. level); the projection model still nests it.
    if not hasattr(encoder, "text_model"):
        converted = {key.removeprefix("text_model."): t for key, t in converted.items()}
    return _assign_weights(encoder, converted, "text encoder", name, dtype)


def _load_t5(tensors: dict, name: str, dtype: torch.dtype) -> T5EncoderModel:
    embedding = next((tensors[key] for key in _T5_EMBEDDINGS if key in tensors), None)
    if embedding is None or not any(key.startswith(_T5_BLOCK) for key in tensors):
        raise ModelFileError(f"{name} holds no T5 encoder (no tensors shared.weight and encoder.block.*)")
    attention, feed_forward = f"{_T5_BLOCK}0.layer.0.SelfAttention.", f"{_T5_BLOCK}0.layer.1.DenseReluDense."
    buckets, heads = tensors[attention + "relative_attention_bias.weight"].shape
    gated = feed_forward + "wi_0.weight" in tensors
    config = T5Config(
        vocab_size=embedding.shape[0],
        d_model=embedding.shape[1],
        d_kv=tensors[attention + "q.weight"].shape[0] // heads,
        d_ff=tensors[feed_forward + ("wi_0.weight" if gated else "wi.weight")].shape[0],
        num_layers=_count_indices(tensors, _T5_BLOCK),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        # T5 v1.1 (SD 3's and Flux's T5-XXL) gates its feed-forward with gelu; the original T5 has one relu layer.
        feed_forward_proj="gated-gelu" if gated else "relu",
    )
    # Files keep the shared embedding under either name or both; it goes in under both, and tying the
    # model's two copies back into one table frees the second.
    others = {key: t for key, t in tensors.items() if key not in _T5_EMBEDDINGS}
    tensors = others | dict.fromkeys(_T5_EMBEDDINGS, embedding)
    with init_empty_weights():
        encoder = T5EncoderModel(config)
    encoder = _assign_weights(encoder, tensors, "T5 encoder", name, dtype)
    encoder.tie_weights()
    return encoder


def _load_qwen3(tensors: dict, name: str, dtype: torch.dtype, causal_lm: bool = False) -> Qwen3Model | Qwen3ForCausalLM:
    if all(_QWEN3_PREFIX + key in tensors for key in _QWEN3_SIGNATURE):
        tensors = {key.removeprefix(_QWEN3_PREFIX): t for key, t in tensors.items()}
    if not all(key in tensors for key in _QWEN3_SIGNATURE):
        raise ModelFileError(f"{name} holds no Qwen3 encoder (no tensors embed_tokens.weight and layers.*.self_attn.q_norm)")
    head = tensors.pop(_QWEN3_HEAD, None)
    vocab, hidden = _shapes(tensors)["embed_tokens.weight"]
    attention = "layers.0.self_attn."
    head_dim = tensors[attention + "q_norm.weight"].shape[0]
    rows = {key: shape[0] for key, shape in _shapes(tensors).items()}
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=rows["layers.0.mlp.gate_proj.weight"],
        num_hidden_layers=_count_indices(tensors, "layers."),
        num_attention_heads=rows[attention + "q_proj.weight"] // head_dim,
        num_key_value_heads=rows[attention + "k_proj.weight"] // head_dim,
        head_dim=head_dim,
        tie_word_embeddings=causal_lm and head is None,
        **_QWEN3_CONSTANTS,
    )
    if not causal_lm:
        with init_empty_weights():
            encoder = Qwen3Model(config)
        return _assign_weights(encoder, tensors, "Qwen3 encoder", name, dtype)
    tensors = {_QWEN3_PREFIX + key: t for key, t in tensors.items()}
    tensors[_QWEN3_HEAD] = tensors[_QWEN3_PREFIX + "embed_tokens.weight"] if head is None else head
    with init_empty_weights():
        encoder = Qwen3ForCausalLM(config)
    encoder = _assign_weights(encoder, tensors, "Qwen3 encoder", name, dtype)
    encoder.tie_weights()  # a tied head shares the embedding's memory again (no-op when the file has its own)
    return encoder


def _load_qwen25vl(tensors: dict, name: str, dtype: torch.dtype) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL from ComfyUI's ``qwen_2.5_vl_7b*.safetensors`` (see _QWEN25VL_TEXT) or transformers 5's names.
    Sizes come from the shapes; the rest from _QWEN25VL_CONSTANTS by the text width. A file without the vision
    tower (some repacks drop ``visual.*``) gets none: its vision tower is removed from the model rather than left
    random, so text-to-image (Qwen-Image) works, and Qwen-Image-Edit, which reads images through the tower, cannot."""
    if _QWEN25VL_TEXT + "embed_tokens.weight" not in tensors:
        renames = (("visual.", _QWEN25VL_VISION), ("model.", _QWEN25VL_TEXT), ("", ""))  # lm_head stays
        tensors = {
            next(new + key[len(old) :] for old, new in renames if key.startswith(old)): tensor for key, tensor in tensors.items()
        }
    shapes = _shapes(tensors)
    embedding = _QWEN25VL_TEXT + "embed_tokens.weight"
    if embedding not in shapes:
        raise ModelFileError(f"{name} holds no Qwen2.5-VL text encoder (no tensor model.embed_tokens.weight)")
    vocab, hidden = shapes[embedding]
    constants = _QWEN25VL_CONSTANTS.get(hidden)
    if constants is None:
        known = ", ".join(str(width) for width in _QWEN25VL_CONSTANTS)
        raise ModelFileError(
            f"{name} is a Qwen2.5-VL {hidden} wide; lienzo knows the config of Qwen-Image's ({known} wide, Qwen2.5-VL 7B)"
        )
    layer, head_dim = _QWEN25VL_TEXT + "layers.0.", constants["head_dim"]
    text = dict(
        constants["text"], vocab_size=vocab, hidden_size=hidden,
        num_hidden_layers=_count_indices(tensors, _QWEN25VL_TEXT + "layers."),
        num_attention_heads=shapes[layer + "self_attn.q_proj.weight"][0] // head_dim,
        num_key_value_heads=shapes[layer + "self_attn.k_proj.weight"][0] // head_dim,
        intermediate_size=shapes[layer + "mlp.gate_proj.weight"][0],
    )
    vision = {}
    has_vision = _QWEN25VL_VISION + "patch_embed.proj.weight" in shapes
    if has_vision:
        width, channels, temporal, patch, _ = shapes[_QWEN25VL_VISION + "patch_embed.proj.weight"]
        merged = shapes[_QWEN25VL_VISION + "merger.mlp.0.weight"][1]  # the merger reads merge x merge patches at once
        vision = dict(
            constants["vision"], depth=_count_indices(tensors, _QWEN25VL_VISION + "blocks."), hidden_size=width,
            in_channels=channels, temporal_patch_size=temporal, patch_size=patch, spatial_merge_size=math.isqrt(merged // width),
            intermediate_size=shapes[_QWEN25VL_VISION + "blocks.0.mlp.gate_proj.weight"][0],
            out_hidden_size=shapes[_QWEN25VL_VISION + "merger.mlp.2.weight"][0],
        )
    # Without its own lm_head the head shares the embedding (Qwen-Image reads hidden states only, never the head).
    tied = _QWEN25VL_HEAD not in tensors
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, **constants["tokens"])
    with init_empty_weights():
        encoder = Qwen2_5_VLForConditionalGeneration(config)
    if tied:
        tensors = {**tensors, _QWEN25VL_HEAD: tensors[embedding]}
    if not has_vision:
        encoder.model.visual = None
    encoder = _assign_weights(encoder, tensors, "Qwen2.5-VL encoder", name, dtype)
    if tied:
        encoder.tie_weights()
    return encoder


def _load_qwen3_gguf(path: Path, dtype: torch.dtype, causal_lm: bool = False) -> Qwen3Model | Qwen3ForCausalLM:
    """A Qwen3 in llama.cpp's GGUF names, expanded to ``dtype`` (as a GGUF T5 is) and read like a safetensors
    file: the config from the shapes, the rest Qwen3's own (what the file's metadata says too)."""
    import gguf

    tensors = _read_tensors(path, "gguf", None)
    if text_encoder_kind(_shapes(tensors)) != "qwen3":
        raise ModelFileError(f"{path.name} is a GGUF file but not a Qwen3 encoder (no tensors {', '.join(_QWEN3_GGUF)})")
    layers = 1 + max(int(key.split(".")[1]) for key in tensors if key.startswith("blk."))
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, layers)
    names = ["embed_tokens.weight", "norm.weight"]
    names += [f"layers.{i}.{part}.weight" for i in range(layers) for part in _QWEN3_LAYER]
    renamed = {}
    for name in names:
        stored = table.get_name(_QWEN3_PREFIX + name, try_suffixes=(".weight",))
        if stored in tensors:
            tensor = tensors.pop(stored)
            renamed[name] = dequantize_gguf_tensor(tensor) if isinstance(tensor, GGUFParameter) else tensor
    head = tensors.pop(_QWEN3_GGUF_HEAD, None)
    if causal_lm and head is not None:
        renamed[_QWEN3_HEAD] = dequantize_gguf_tensor(head) if isinstance(head, GGUFParameter) else head
    if tensors:
        raise ModelFileError(f"{path.name}: {len(tensors)} of its tensors fit no Qwen3 layer: {_few(sorted(tensors))}")
    with quiet_transformers():
        return _load_qwen3(renamed, path.name, dtype, causal_lm)


def _load_qwen3_folder(folder: Path, dtype: torch.dtype, causal_lm: bool = False) -> Qwen3Model | Qwen3ForCausalLM:
    """A Qwen3 saved by transformers (config.json and weights), as a diffusers folder's ``text_encoder`` is."""
    model_class = Qwen3ForCausalLM if causal_lm else Qwen3Model
    try:
        with quiet_transformers():
            return model_class.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as err:
        raise ModelFileError(f"cannot read {folder.name} as a Qwen3 encoder folder: {first_line(err)}") from None


def _load_qwen25vl_folder(folder: Path, dtype: torch.dtype) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen-Image's Qwen2.5-VL saved by transformers (a Qwen-Image diffusers folder's ``text_encoder``)."""
    try:
        with quiet_transformers():
            return Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as err:
        raise ModelFileError(f"cannot read {folder.name} as a Qwen2.5-VL folder: {first_line(err)}") from None


def _load_t5_gguf(path: Path, kind: str, dtype: torch.dtype) -> T5EncoderModel:
    """A T5 encoder in llama.cpp's GGUF names (city96's T5-XXL files), read by transformers with the config
    the file's metadata states. transformers expands the quantized weights to ``dtype`` as it reads them,
    so this T5 takes the memory of an unquantized one."""
    if kind != "t5xxl" or text_encoder_kind(_header_shapes(path, "gguf")) != "t5xxl":
        raise ModelFileError(
            f"{path.name} is a GGUF file but not a T5 encoder; lienzo reads GGUF text encoders only as t5xxl"
        )
    local = {"gguf_file": path.name, "local_files_only": True}
    try:
        with quiet_transformers():
            config = T5Config.from_pretrained(path.parent, **local)
            # transformers reads a gated GGUF T5 as gated relu; llama.cpp runs it (T5 v1.1, SD 3's and Flux's
            # T5-XXL) as gated gelu, and the file does not say more.
            if config.is_gated_act:
                config.feed_forward_proj, config.dense_act_fn = "gated-gelu", "gelu_new"
            encoder = T5EncoderModel.from_pretrained(path.parent, config=config, torch_dtype=dtype, **local)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelFileError(f"cannot read {path.name} as a T5 encoder: {first_line(err)}") from None
    return encoder.eval()


# --- the VAE --------------------------------------------------------------------------------------


def load_flow_vae(
    state_dict_or_path, family: str, *, dtype: torch.dtype = torch.float32
) -> AutoencoderKL | AutoencoderKLFlux2 | AutoencoderKLQwenImage:
    """The VAE of a transformer family: the 16-channel one of SD 3.x or Flux.1 ("sd3", "flux"; "chroma" and
    "zimage" use Flux's): Flux's ``ae.safetensors`` (ldm names without prefix), SD 3's own file, the
    ``first_stage_model.`` part of an all-in-one file, or a diffusers VAE's tensors; or Flux.2's ("flux2":
    see :func:`_load_flux2_vae`) or Qwen-Image's ("qwenimage", also Krea 2's: see :func:`_load_qwen_image_vae`). Its
    config comes from the shapes, its latent scale and shift from the family."""
    vae_class = FAMILIES[family].vae_class
    if isinstance(state_dict_or_path, Mapping):
        name, state_dict = "the checkpoint's VAE", state_dict_or_path
    else:
        path = Path(state_dict_or_path)
        name, state_dict = path.name, formats.load_state_dict(path)
    if vae_class == "AutoencoderKLFlux2":
        return _load_flux2_vae(state_dict, family, name, dtype)
    if vae_class == "AutoencoderKLQwenImage":
        return _load_qwen_image_vae(state_dict, name, dtype)
    prefix = _VAE_PREFIX if any(key.startswith(_VAE_PREFIX) for key in state_dict) else ""
    tensors = {
        key[len(prefix) :]: t for key, t in state_dict.items() if key.startswith(prefix) and key[len(prefix) :].startswith(_VAE_PARTS)
    }
    if "encoder.conv_in.weight" not in tensors:
        raise ModelFileError(f"{name} holds no VAE (no tensor {prefix}encoder.conv_in.weight)")
    if any(key.startswith("encoder.down_blocks.") for key in tensors):
        converted = tensors
    else:
        # diffusers' converter needs only the number of resolution levels, and maps one to one.
        levels = 1 + max((int(key.split(".")[2]) for key in tensors if key.startswith("encoder.down.")), default=0)
        converted = convert_ldm_vae_checkpoint(tensors, {"down_block_types": [None] * levels, "up_block_types": [None] * levels})
        if len(converted) != len(tensors):
            unused = len(tensors) - len(converted)
            raise ModelFileError(f"{name}: {unused} of its {len(tensors)} VAE tensors fit no VAE layer")
    scaling, shift = _VAE_LATENTS[family]
    try:
        config = _vae_config(converted, scaling, _VAE_SAMPLE_SIZE)
    except KeyError as err:
        raise ModelFileError(f"{name} is missing the VAE tensor {err.args[0]!r}") from None
    spec = FAMILIES[family]
    if config["latent_channels"] != spec.latent_channels:
        raise ModelFileError(
            f"{name} is a VAE with {config['latent_channels']} latent channels; {spec.label} needs one with {spec.latent_channels}"
        )
    with init_empty_weights():
        vae = AutoencoderKL(
            **config,
            shift_factor=shift,
            use_quant_conv="quant_conv.weight" in converted,
            use_post_quant_conv="post_quant_conv.weight" in converted,
        )
    return _assign_weights(vae, converted, "VAE", name, dtype)


def _load_flux2_vae(state_dict: Mapping, family: str, name: str, dtype: torch.dtype) -> AutoencoderKLFlux2:
    """Flux.2's VAE (AutoencoderKLFlux2) in BFL's names (ComfyUI's ``flux2-vae.safetensors``) or diffusers'.
    diffusers has no single-file loader for it; its names are ldm's but for the quant convs (see _FLUX2_VAE_CONVS),
    so they are moved and diffusers' ldm converter does the rest. The batch norm passes through unchanged."""
    tensors = dict(_unscale_fp8(dict(state_dict), name))
    if "encoder.conv_in.weight" not in tensors:
        raise ModelFileError(f"{name} holds no VAE (no tensor encoder.conv_in.weight)")
    norm = {key: tensors.pop(key) for key in [key for key in tensors if key.startswith(_FLUX2_VAE_NORM)]}
    if not {"bn.running_mean", "bn.running_var"} <= norm.keys():
        raise ModelFileError(
            f"{name} is not Flux.2's VAE: it has no batch-norm statistics (bn.running_mean, bn.running_var); "
            f"{FAMILIES[family].label} needs flux2-vae.safetensors"
        )
    norm.setdefault(_FLUX2_VAE_BATCHES, torch.tensor(0))
    if any(key.startswith("encoder.down_blocks.") for key in tensors):
        converted = tensors
    else:
        for old, new in _FLUX2_VAE_CONVS.items():
            tensors = {(new + key[len(old) :] if key.startswith(old) else key): t for key, t in tensors.items()}
        levels = 1 + max((int(key.split(".")[2]) for key in tensors if key.startswith("encoder.down.")), default=0)
        converted = convert_ldm_vae_checkpoint(tensors, {"down_block_types": [None] * levels, "up_block_types": [None] * levels})
        if len(converted) != len(tensors):
            unused = len(tensors) - len(converted)
            raise ModelFileError(f"{name}: {unused} of its {len(tensors)} VAE tensors fit no VAE layer")
    try:
        config = _vae_config(converted, 1.0, _VAE_SAMPLE_SIZE)
    except KeyError as err:
        raise ModelFileError(f"{name} is missing the VAE tensor {err.args[0]!r}") from None
    del config["scaling_factor"]  # the batch norm normalizes Flux.2's latents; its VAE has no scale
    latents = config["latent_channels"]
    patch = math.isqrt(norm["bn.running_mean"].shape[0] // latents)  # the norm covers the 2x2-patched latents
    with init_empty_weights():
        vae = AutoencoderKLFlux2(
            **config,
            patch_size=(patch, patch),
            use_quant_conv="quant_conv.weight" in converted,
            use_post_quant_conv="post_quant_conv.weight" in converted,
            mid_block_add_attention=any(key.startswith("encoder.mid_block.attentions.") for key in converted),
        )
    return _assign_weights(vae, {**converted, **norm}, "VAE", name, dtype)


def _load_qwen_image_vae(state_dict: Mapping, name: str, dtype: torch.dtype) -> AutoencoderKLQwenImage:
    """Qwen-Image's VAE (Wan 2.1's) in Wan's names (ComfyUI's ``qwen_image_vae.safetensors``) or diffusers', renamed
    by diffusers' Wan converter; its sizes from the shapes, its latent statistics (which no tensor holds) from
    _QWEN_IMAGE_LATENTS by its latent channels. diffusers' converter knows Wan 2.1's layout only (four levels of two
    residual blocks), so a VAE laid out otherwise is refused by the load below."""
    tensors = dict(_unscale_fp8(dict(state_dict), name))
    if "encoder.conv1.weight" in tensors:
        tensors = convert_wan_vae_to_diffusers(tensors)
    if "encoder.conv_in.weight" not in tensors:
        raise ModelFileError(
            f"{name} holds no Qwen-Image (Wan 2.1) VAE (no tensor encoder.conv1.weight or encoder.conv_in.weight)"
        )
    shapes = _shapes(tensors)
    # diffusers keeps the encoder flat: each level's residual blocks, then (but for the last level) a resample, whose
    # time conv, where there is one, also halves the frames. A level's width is its last block's output.
    downsamplers = sorted(
        int(key.split(".")[2]) for key in shapes if key.startswith("encoder.down_blocks.") and key.endswith(".resample.1.weight")
    )
    if not downsamplers:
        raise ModelFileError(
            f"{name} is not a Qwen-Image (Wan 2.1) VAE: its encoder has no downsampling (encoder.down_blocks.*.resample)"
        )
    try:
        base_dim, z_dim = shapes["encoder.conv_in.weight"][0], shapes["post_quant_conv.weight"][0]
        widths = [shapes[f"encoder.down_blocks.{index - 1}.conv2.weight"][0] for index in downsamplers]
        widths.append(shapes["encoder.mid_block.resnets.0.conv1.weight"][0])
    except KeyError as err:
        raise ModelFileError(f"{name} is missing the VAE tensor {err.args[0]!r}") from None
    if z_dim not in _QWEN_IMAGE_LATENTS:
        known = ", ".join(str(channels) for channels in _QWEN_IMAGE_LATENTS)
        raise ModelFileError(f"{name} is a VAE with {z_dim} latent channels; Qwen-Image's has {known}")
    mean, std = _QWEN_IMAGE_LATENTS[z_dim]
    config = dict(
        base_dim=base_dim, z_dim=z_dim, dim_mult=[width // base_dim for width in widths], num_res_blocks=downsamplers[0],
        temperal_downsample=[f"encoder.down_blocks.{index}.time_conv.weight" in shapes for index in downsamplers],
        latents_mean=list(mean), latents_std=list(std),
    )
    with init_empty_weights():
        vae = AutoencoderKLQwenImage(**config)
    return _assign_weights(vae, tensors, "VAE", name, dtype)


# --- shared ---------------------------------------------------------------------------------------


def _network_part(tensors: Mapping, *, keep_prefix: bool = False) -> dict:
    """The network's tensors (or shapes), without ComfyUI's prefix unless ``keep_prefix``: those under it
    when there are any (an all-in-one file also holds a VAE and text encoders), else all of them."""
    if any(key.startswith(PREFIX) for key in tensors):
        cut = 0 if keep_prefix else len(PREFIX)
        return {key[cut:]: value for key, value in tensors.items() if key.startswith(PREFIX)}
    return dict(tensors)


def _unscale_fp8(tensors: dict, name: str) -> dict:
    """Scaled fp8 made plain: each weight times its ``scale_weight`` / ``weight_scale`` (in fp32; the loaders cast
    to the wanted dtype), the scales, markers and format notes dropped. Other tensors pass unchanged. A scale
    that is not one number per tensor (block-scaled formats such as NVFP4) is refused."""
    if not any(key.endswith(_SCALE_WEIGHT) or key == _SCALED_FP8_MARKER for key in tensors):
        return tensors
    plain = {}
    for key, tensor in tensors.items():
        if key == _SCALED_FP8_MARKER or key.endswith((*_SCALE_WEIGHT, *_SCALE_INPUT, _QUANT_NOTE)):
            continue
        stem = key.removesuffix(".weight")
        scale = next((tensors[stem + end] for end in _SCALE_WEIGHT if stem + end in tensors), None) if key.endswith(".weight") else None
        if scale is not None and scale.numel() != 1:
            raise ModelFileError(
                f"{name}: tensor {key} has a scale of shape {tuple(scale.shape)}; lienzo reads fp8 with one scale per tensor "
                "(ComfyUI's scaled fp8, BFL's fp8), not block-scaled formats such as NVFP4: use the bf16, fp8 or GGUF file"
            )
        plain[key] = tensor if scale is None else tensor.to(torch.float32) * scale.to(torch.float32)
    return plain


def _read_tensors(path: Path, kind: str, keys) -> dict:
    """The tensors ``keys`` of a safetensors file, or all of a GGUF file: quantized ones as diffusers'
    GGUFParameter (the raw blocks), F16/F32 ones as tensors."""
    try:
        if kind == "gguf":
            return load_gguf_checkpoint(str(path))
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in keys}
    # A quantization type diffusers cannot decode, a damaged file.
    except (ValueError, OSError, SafetensorError) as err:
        raise ModelFileError(f"cannot read {path.name}: {first_line(err)}") from None


def _header_shapes(path: Path, kind: str) -> dict[str, Shape]:
    header = formats.read_header(path) if kind == "safetensors" else formats.read_gguf_header(path)
    return {key: shape for key, (shape, _) in header.items()}


def _shapes(tensors: Mapping) -> dict[str, Shape]:
    # A GGUFParameter's own shape is its bytes'; quant_shape is the weight's.
    return {key: tuple(getattr(t, "quant_shape", t.shape)) for key, t in tensors.items() if isinstance(t, torch.Tensor)}


def _what_it_is(shapes: Mapping[str, Shape]) -> str:
    """A hint for the common mix-ups: a LoRA, VAE, text encoder or whole SD 1.x/2.x/XL checkpoint given as a transformer."""
    keys = list(shapes)
    if any("lora_" in key or ".lora_down." in key or ".lora_A." in key for key in keys):
        return "it looks like a LoRA; put it in the LoRA folder"
    has_network = any(key.startswith(PREFIX) for key in keys)
    if not has_network and any(key.startswith(("encoder.conv_in.", _VAE_PREFIX + "encoder.conv_in.")) for key in keys):
        return "it looks like a VAE alone; put it in the VAE folder"
    kind = text_encoder_kind(shapes)
    if kind is not None:
        return f"it looks like a {kind} text encoder; put it in the text encoder folder"
    try:
        arch = formats.detect_architecture(shapes)
    except ModelFileError:
        return f"none of its {len(keys)} tensors is a Flux.1 or SD 3.x block (double_blocks.*, joint_blocks.*)"
    return f"it is a whole {arch.label} checkpoint; load it as a checkpoint"
