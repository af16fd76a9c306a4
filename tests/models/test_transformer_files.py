"""Single files of the transformer families (SD 3.x, Flux.1): the network in every layout people keep it in,
standalone text encoders and VAEs, SD 3.5's all-in-one file, and the refusals.

Each tiny model is written the way real files are (original / ComfyUI / diffusers names; bf16, fp8, scaled
fp8, GGUF) and read back. The exactness bar: before writing, the model's weights are rounded in diffusers'
names to what the format stores (bf16, fp8, a GGUF quantization's blocks), so that the file holds them
without loss; the loaded network must then match that rounded model to float rounding (1e-5), whatever
the renaming, splitting and scaling on the way. How far each format lands from the unrounded model is
measured too, against bounds that only a working load meets.
"""

import copy
import math
import re

import gguf
import numpy as np
import pytest
import torch
from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel, ZImageTransformer2DModel
from diffusers.quantizers.gguf.utils import GGUFLinear
from gguf import GGMLQuantizationType
from safetensors.torch import save_file
from tiny_models import build_tiny
from transformers import T5EncoderModel

from lienzo.errors import ModelFileError
from lienzo.models.formats import read_gguf_header, sniff
from lienzo.models.single_file_save import _clip_to_ldm, _open_clip_to_ldm, _vae_to_ldm, save_single_file
from lienzo.models.transformer_files import (
    detect_transformer_family,
    load_flow_vae,
    load_text_encoder_file,
    load_text_encoders_from_state_dict,
    load_transformer_file,
    text_encoder_kind,
    transformer_config,
)

CASES = {"flux-dev": ("flux", {"guidance": True}), "flux-schnell": ("flux", {"guidance": False}), "sd3": ("sd3", {})}
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest float8_e4m3fn
EXACT = 1e-5

# --- diffusers names -> the original names (BFL's Flux.1, Stability's SD 3), written out independently of
# the loader's tables. "[i]" marks row slice i of a fused tensor; "!" a modulation stored (shift, scale).
FLUX_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1!",
}
FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_q": "img_attn.qkv[0]",
    "attn.to_k": "img_attn.qkv[1]",
    "attn.to_v": "img_attn.qkv[2]",
    "attn.add_q_proj": "txt_attn.qkv[0]",
    "attn.add_k_proj": "txt_attn.qkv[1]",
    "attn.add_v_proj": "txt_attn.qkv[2]",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
FLUX_SINGLE = {
    "norm.linear": "modulation.lin",
    "attn.to_q": "linear1[0]",
    "attn.to_k": "linear1[1]",
    "attn.to_v": "linear1[2]",
    "proj_mlp": "linear1[3]",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
    "proj_out": "linear2",
}
SD3_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1!",
}
SD3_BLOCK = {
    "attn.to_q": "x_block.attn.qkv[0]",
    "attn.to_k": "x_block.attn.qkv[1]",
    "attn.to_v": "x_block.attn.qkv[2]",
    "attn.add_q_proj": "context_block.attn.qkv[0]",
    "attn.add_k_proj": "context_block.attn.qkv[1]",
    "attn.add_v_proj": "context_block.attn.qkv[2]",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_q": "x_block.attn2.qkv[0]",
    "attn2.to_k": "x_block.attn2.qkv[1]",
    "attn2.to_v": "x_block.attn2.qkv[2]",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}


def original_names(family: str, state_dict: dict) -> dict:
    """A diffusers transformer state dict in BFL's (flux) or Stability's (sd3) names."""
    if family == "flux":
        top = FLUX_TOP
        blocks = {"transformer_blocks": ("double_blocks", FLUX_DOUBLE), "single_transformer_blocks": ("single_blocks", FLUX_SINGLE)}
    else:
        top, blocks = SD3_TOP, {"transformer_blocks": ("joint_blocks", SD3_BLOCK)}
    last_sd3_block = max((int(key.split(".")[1]) for key in state_dict if key.startswith("transformer_blocks.")), default=0)
    renamed, fused = {}, {}
    for key, tensor in state_dict.items():
        if key == "pos_embed.pos_embed":
            renamed["pos_embed"] = tensor
            continue
        module, _, param = key.rpartition(".")
        block = re.fullmatch(r"(\w+)\.(\d+)\.(.+)", module)
        if block and block[1] in blocks:
            prefix, table = blocks[block[1]]
            name = f"{prefix}.{block[2]}.{table[block[3]]}"
            # SD 3's last block ends the text stream with a (shift, scale) modulation, like the final layer.
            if family == "sd3" and int(block[2]) == last_sd3_block and block[3] == "norm1_context.linear":
                name += "!"
        else:
            name = top[module]
        if name.endswith("!"):
            name, tensor = name[:-1], torch.cat(list(tensor.chunk(2))[::-1])
        if family == "flux" and name.endswith("_norm"):
            param = "scale"  # BFL's RMSNorm names its weight "scale"
        if part := re.fullmatch(r"(.+)\[(\d)\]", name):
            fused.setdefault(f"{part[1]}.{param}", {})[int(part[2])] = tensor
        else:
            renamed[f"{name}.{param}"] = tensor
    for key, parts in fused.items():
        renamed[key] = torch.cat([parts[i] for i in sorted(parts)])
    return renamed


# --- how each format stores a tensor --------------------------------------------------------------


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
GGUF_QUANTS = {"gguf-q8_0": GGMLQuantizationType.Q8_0, "gguf-q4_0": GGMLQuantizationType.Q4_0}


def gguf_type(tensor: torch.Tensor, quant: GGMLQuantizationType) -> GGMLQuantizationType:
    """What city96's converter does, by shape alone (so that fused and split tensors agree): quantize
    matrices whose rows fill whole blocks, keep other matrices and convolutions F16, vectors F32."""
    if tensor.ndim == 2 and tensor.shape[1] % gguf.GGML_QUANT_SIZES[quant][0] == 0:
        return quant
    return GGMLQuantizationType.F16 if tensor.ndim > 1 else GGMLQuantizationType.F32


def stored(tensor: torch.Tensor, layout: str, key: str) -> torch.Tensor:
    """The tensor as ``layout`` stores it, back in fp32: the model every load of that layout must match."""
    if layout in HALF:
        return tensor.to(HALF[layout]).float()
    if layout == "fp8":
        return tensor.to(FP8).float()
    if layout == "scaled-fp8":
        return tensor.to(FP8).float() if is_matrix(key, tensor) else tensor.to(torch.bfloat16).float()
    if layout in GGUF_QUANTS:
        kind = gguf_type(tensor, GGUF_QUANTS[layout])
        if kind == GGMLQuantizationType.F16:
            return tensor.half().float()
        if kind == GGMLQuantizationType.F32:
            return tensor
        # Quantization works row by row, so the rows of a fused tensor decode to the same values.
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(tensor.numpy(), kind), kind)).reshape(tensor.shape)
    return tensor


def is_matrix(key: str, tensor: torch.Tensor) -> bool:
    return key.endswith(".weight") and tensor.ndim == 2


def rounded(module: torch.nn.Module, layout: str) -> torch.nn.Module:
    copied = copy.deepcopy(module)
    copied.load_state_dict({key: stored(t, layout, key) for key, t in module.state_dict().items()})
    return copied.eval()


def encode(tensors: dict, layout: str) -> dict:
    """Already-rounded fp32 tensors in the file's dtypes; every conversion here is lossless."""
    if layout in HALF:
        return {key: t.to(HALF[layout]) for key, t in tensors.items()}
    if layout == "fp8":
        return {key: t.to(FP8) for key, t in tensors.items()}
    if layout == "scaled-fp8":
        # ComfyUI's scaled fp8: weight / scale in fp8 beside the scale. Powers of two keep it lossless.
        out = {"scaled_fp8": torch.zeros(0, dtype=FP8)}
        for key, t in tensors.items():
            if is_matrix(key, t):
                scale = 2.0 ** math.ceil(math.log2(t.abs().max().item() / FP8_MAX))
                out[key] = (t / scale).to(FP8)
                out[key.removesuffix("weight") + "scale_weight"] = torch.tensor(scale)
                out[key.removesuffix("weight") + "scale_input"] = torch.tensor(1.0)
            else:
                out[key] = t.to(torch.bfloat16)
        return out
    return tensors


def write_safetensors(path, tensors: dict):
    save_file({key: t.contiguous() for key, t in tensors.items()}, str(path))
    return path


def write_gguf(path, tensors: dict, quant: GGMLQuantizationType, arch: str, blocks: dict | None = None):
    """A GGUF file as city96's tools write them; ``blocks`` gives raw quantized blocks for some tensors."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for key, tensor in tensors.items():
        if blocks and key in blocks:
            writer.add_tensor(key, blocks[key][0], raw_dtype=blocks[key][1])
            continue
        kind = gguf_type(tensor, quant)
        array = tensor.float().numpy()
        if kind in (GGMLQuantizationType.F16, GGMLQuantizationType.F32):
            writer.add_tensor(key, array.astype(np.float16 if kind == GGMLQuantizationType.F16 else np.float32))
        else:
            writer.add_tensor(key, gguf.quants.quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- running the networks -------------------------------------------------------------------------


@torch.no_grad()
def network_output(network: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    config = network.config

    def noise(*shape):
        return torch.randn(*shape, generator=generator)

    if isinstance(network, (FluxTransformer2DModel, ChromaTransformer2DModel)):  # Chroma keeps Flux.1's packing
        rows = cols = 4
        image_ids = torch.zeros(rows * cols, 3)
        image_ids[:, 1] = torch.arange(rows).repeat_interleave(cols)
        image_ids[:, 2] = torch.arange(cols).repeat(rows)
        inputs = {
            "hidden_states": noise(1, rows * cols, config.in_channels),
            "encoder_hidden_states": noise(1, 8, config.joint_attention_dim),
        }
        if isinstance(network, FluxTransformer2DModel):
            inputs["pooled_projections"] = noise(1, config.pooled_projection_dim)
            inputs["guidance"] = torch.tensor([3.5]) if config.guidance_embeds else None
        return network(**inputs, timestep=torch.tensor([0.7]), img_ids=image_ids, txt_ids=torch.zeros(8, 3), return_dict=False)[0]
    if isinstance(network, ZImageTransformer2DModel):
        latents = noise(config.in_channels, 1, 8, 8)
        return network([latents], torch.tensor([0.3]), [noise(8, config.cap_feat_dim)], return_dict=False)[0][0]
    return network(
        hidden_states=noise(1, config.in_channels, 8, 8),
        encoder_hidden_states=noise(1, 8, config.joint_attention_dim),
        pooled_projections=noise(1, config.pooled_projection_dim),
        timestep=torch.tensor([500.0]),
        return_dict=False,
    )[0]


CLIP_IDS = [[49406, 320, 1125, 539, 320, 2368, 49407]]  # "a photo of a cat", as CLIP's tokenizer gives it
T5_IDS = [[37, 1712, 13, 3, 9, 1]]


@torch.no_grad()
def text_output(encoder: torch.nn.Module) -> torch.Tensor:
    """Every token's hidden state, and the pooled (projected) embedding where the encoder has one."""
    out = encoder(input_ids=torch.tensor(CLIP_IDS if encoder.config.model_type == "clip_text_model" else T5_IDS))
    pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        pooled = getattr(out, "pooler_output", None)
    return torch.cat([out.last_hidden_state.flatten()] + ([] if pooled is None else [pooled.flatten()]))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return max_diff(a, b) / b.abs().max().item()


# diffusers expands GGUF blocks in fp16 (scale x quant, rounded to 11 bits) where gguf-py's reference
# does it in fp32: the weights differ by up to 2^-11 relative, the outputs by about as much.
GGUF_DECODE = 2e-3


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built():
    return {case: build_tiny(family, **options) for case, (family, options) in CASES.items()}


@pytest.fixture(scope="module")
def outputs(built):
    return {case: network_output(components.transformer) for case, components in built.items()}


# --- detection and configs ------------------------------------------------------------------------


def meta_network(network_class, **config):
    """A full-size network built on the meta device: its shapes and config at no memory or time cost
    (SD 3's position table is computed there too: accelerate's init_empty_weights would compute it)."""
    with torch.device("meta"):
        return network_class(**config)


FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
)
SD35_LARGE = {**SD3_MEDIUM, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432, "qk_norm": "rms_norm"}
SD35_MEDIUM = {**SD3_MEDIUM, "pos_embed_max_size": 384, "qk_norm": "rms_norm", "dual_attention_layers": tuple(range(13))}
REAL = {
    "flux-dev": (FluxTransformer2DModel, FLUX_DEV),
    "flux-schnell": (FluxTransformer2DModel, {**FLUX_DEV, "guidance_embeds": False}),
    "sd3-medium": (SD3Transformer2DModel, SD3_MEDIUM),
    "sd3.5-medium": (SD3Transformer2DModel, SD35_MEDIUM),
    "sd3.5-large": (SD3Transformer2DModel, SD35_LARGE),
}


def same_config(inferred: dict, config) -> None:
    """Every key that shapes the network agrees (Flux's out_channels None means in_channels). Not compared:
    sample_size, the default image size, which no tensor states (the loader says 128, 1024 px)."""
    wanted = {**config, "out_channels": config.get("out_channels") or config["in_channels"]}
    for key in ("sample_size", "_use_default_values", "_class_name", "_diffusers_version"):
        wanted.pop(key, None)
    wanted = {key: tuple(value) if isinstance(value, list) else value for key, value in wanted.items()}
    mismatched = {key: (inferred.get(key), value) for key, value in wanted.items() if inferred.get(key) != value}
    assert not mismatched, mismatched


@pytest.mark.parametrize("case", sorted(REAL))
@pytest.mark.parametrize("names", ["diffusers", "original", "comfyui"])
def test_configs_of_real_sizes_come_out_right(case, names):
    """Flux.1 dev/schnell and SD 3 Medium / 3.5 Medium / 3.5 Large at full size, on the meta device."""
    network_class, config = REAL[case]
    family = "flux" if network_class is FluxTransformer2DModel else "sd3"
    network = meta_network(network_class, **config)
    tensors = network.state_dict()
    if names != "diffusers":
        tensors = original_names(family, tensors)
    prefix = "model.diffusion_model." if names == "comfyui" else ""
    shapes = {prefix + key: tuple(t.shape) for key, t in tensors.items()}
    assert detect_transformer_family(shapes) == family
    same_config(transformer_config(family, shapes), dict(network.config))


@pytest.mark.parametrize("case", sorted(CASES))
def test_configs_of_tiny_models_equal_what_they_were_built_with(built, case):
    network = built[case].transformer
    family = CASES[case][0]
    diffusers_shapes = {key: tuple(t.shape) for key, t in network.state_dict().items()}
    original_shapes = {key: tuple(t.shape) for key, t in original_names(family, network.state_dict()).items()}
    for shapes in (diffusers_shapes, original_shapes):
        assert detect_transformer_family(shapes) == family
        same_config(transformer_config(family, shapes), dict(network.config))


def test_detection_says_none_for_other_models(built):
    unet = {key: tuple(t.shape) for key, t in build_tiny("sd1").unet.state_dict().items()}
    vae = {key: tuple(t.shape) for key, t in built["sd3"].vae.state_dict().items()}
    assert detect_transformer_family(unet) is None
    assert detect_transformer_family(vae) is None
    assert detect_transformer_family({}) is None


# --- the network, in each layout ------------------------------------------------------------------


def network_file(tmp_path, components, family: str, layout: str, names: str = "original"):
    """Write ``components.transformer`` in one layout; returns (path, the model the file holds)."""
    reference = rounded(components.transformer, layout)
    tensors = reference.state_dict()
    if names != "diffusers":
        tensors = original_names(family, tensors)
    if names == "comfyui":
        tensors = {"model.diffusion_model." + key: t for key, t in tensors.items()}
    if layout in GGUF_QUANTS:
        return write_gguf(tmp_path / f"{family}-{layout}.gguf", tensors, GGUF_QUANTS[layout], family), reference
    return write_safetensors(tmp_path / f"{family}-{names}-{layout}.safetensors", encode(tensors, layout)), reference


# Bounds on the distance from the unrounded model's output, whose largest values are about 2; a wrong
# tensor anywhere moves it by about as much. Measured on these models: bf16 <= 4.4e-3, fp8 <= 8.9e-2,
# Q8_0 <= 1.1e-2, Q4_0 <= 1.7e-1 (SD 3's tiny layers are mostly too narrow for a block, and stay F16).
FORMAT_BOUNDS = {"fp32": EXACT, "bf16": 0.02, "fp8": 0.3, "scaled-fp8": 0.3, "gguf-q8_0": 0.05, "gguf-q4_0": 0.5}
# The same for the text encoders' outputs (largest values about 3.5): fp16 <= 2.2e-3, scaled fp8 <= 0.22.
TEXT_BOUNDS = {"fp16": 0.01, "scaled-fp8": 0.5}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(
    "layout, names",
    [("fp32", "original"), ("fp32", "comfyui"), ("fp32", "diffusers"), ("bf16", "original"), ("fp8", "comfyui"),
     ("scaled-fp8", "original"), ("gguf-q8_0", "original"), ("gguf-q4_0", "original")],
)
def test_network_files_load_and_run_like_the_model_they_hold(tmp_path, built, outputs, case, layout, names):
    family = CASES[case][0]
    path, reference = network_file(tmp_path, built[case], family, layout, names)
    loaded_family, network = load_transformer_file(path)
    assert loaded_family == family
    same_config(dict(network.config), dict(built[case].transformer.config))
    got = network_output(network)
    if layout in GGUF_QUANTS:
        assert relative_diff(got, network_output(reference)) <= GGUF_DECODE
    else:
        assert max_diff(got, network_output(reference)) <= EXACT
    assert max_diff(got, outputs[case]) <= FORMAT_BOUNDS[layout]


@pytest.mark.parametrize("layout", sorted(GGUF_QUANTS))
def test_gguf_weights_stay_quantized(tmp_path, built, layout):
    path, _ = network_file(tmp_path, built["flux-dev"], "flux", layout)
    _, network = load_transformer_file(path)
    to_q = network.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, GGUFLinear) and to_q.weight.quant_type == GGUF_QUANTS[layout]
    assert to_q.weight.dtype == torch.uint8  # the blocks, not an expanded copy


def random_k_blocks(rows: int, cols: int, kind: GGMLQuantizationType, seed: int) -> np.ndarray:
    """Valid random blocks of a K-quant (which gguf-py can read but not write): random bits with each
    super-block's two fp16 scales (its first 4 bytes) set to small numbers."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    data = np.random.default_rng(seed).integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    data[..., 0:4] = np.array([0.002, 0.001], dtype=np.float16).view(np.uint8)
    return data.reshape(rows, cols // block * size)


@pytest.mark.parametrize("kind", [GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q4_K])
def test_gguf_k_quants_decode_like_ggufs_reference(tmp_path, built, kind):
    """K-quant blocks (Q5_K, Q4_K as in city96's Q5_K_M / Q4_K_M files) in the layers wide enough for them."""
    components = built["flux-dev"]
    reference = rounded(components.transformer, "gguf-q8_0")
    state_dict = reference.state_dict()
    blocks = {}
    wide = ["transformer_blocks.0.ff.net.2.weight", "transformer_blocks.0.ff_context.net.2.weight", "time_text_embed.timestep_embedder.linear_1.weight"]
    for index, key in enumerate(wide):
        rows, cols = state_dict[key].shape
        raw = random_k_blocks(rows, cols, kind, seed=index)
        state_dict[key] = torch.from_numpy(gguf.quants.dequantize(raw, kind)).reshape(rows, cols)
        blocks[original_names("flux", {key: state_dict[key]}).popitem()[0]] = (raw, kind)
    reference.load_state_dict(state_dict)
    path = write_gguf(tmp_path / "flux-k.gguf", original_names("flux", state_dict), GGMLQuantizationType.Q8_0, "flux", blocks)
    assert read_gguf_header(path)["double_blocks.0.img_mlp.2.weight"] == ((64, 256), kind.name)
    _, network = load_transformer_file(path)
    assert network.transformer_blocks[0].ff.net[2].weight.quant_type == kind
    assert relative_diff(network_output(network), network_output(reference)) <= GGUF_DECODE


def test_a_quantized_tensor_outside_a_linear_layer_is_expanded(tmp_path, built):
    """GGUF may quantize any tensor whose rows fill blocks, such as a 32-wide norm scale; only linear
    layers compute from blocks, so the loader expands the others."""
    reference = rounded(built["flux-dev"].transformer, "gguf-q8_0")
    key = "transformer_blocks.0.attn.norm_q.weight"
    state_dict = reference.state_dict()
    quant = GGMLQuantizationType.Q8_0
    raw = gguf.quants.quantize(state_dict[key].numpy(), quant)
    state_dict[key] = torch.from_numpy(gguf.quants.dequantize(raw, quant))
    reference.load_state_dict(state_dict)
    blocks = {"double_blocks.0.img_attn.norm.query_norm.scale": (raw, quant)}
    path = write_gguf(tmp_path / "flux-norm.gguf", original_names("flux", state_dict), quant, "flux", blocks)
    assert read_gguf_header(path)["double_blocks.0.img_attn.norm.query_norm.scale"] == ((32,), "Q8_0")
    _, network = load_transformer_file(path)
    assert network.transformer_blocks[0].attn.norm_q.weight.dtype == torch.float32
    assert relative_diff(network_output(network), network_output(reference)) <= GGUF_DECODE


def test_a_pickled_network_loads_weights_only(tmp_path, built, outputs):
    path = tmp_path / "flux1-schnell.ckpt"
    torch.save(original_names("flux", built["flux-schnell"].transformer.state_dict()), path)
    family, network = load_transformer_file(path)
    assert family == "flux" and max_diff(network_output(network), outputs["flux-schnell"]) <= EXACT


def test_a_network_loads_in_the_dtype_asked_for(tmp_path, built):
    path, _ = network_file(tmp_path, built["flux-schnell"], "flux", "fp8")
    _, network = load_transformer_file(path, dtype=torch.bfloat16)
    assert {p.dtype for p in network.parameters()} == {torch.bfloat16}


# --- SD 3.5's all-in-one file ---------------------------------------------------------------------


def text_encoder_tensors(encoder: torch.nn.Module, kind: str, open_clip: bool = False) -> dict:
    """A text encoder's tensors as ComfyUI's files hold them: CLIP under text_model. (or OpenCLIP names),
    T5 with only the shared embedding."""
    if kind == "t5xxl":
        return {key: t for key, t in encoder.state_dict().items() if key != "encoder.embed_tokens.weight"}
    return _open_clip_to_ldm(encoder) if open_clip else _clip_to_ldm(encoder)


def test_all_in_one_file_gives_network_text_encoders_and_vae(tmp_path, built, outputs):
    components = built["sd3"]
    tensors = {"model.diffusion_model." + key: t for key, t in original_names("sd3", components.transformer.state_dict()).items()}
    tensors |= {"first_stage_model." + key: t for key, t in _vae_to_ldm(components.vae).items()}
    for attr, kind in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl")):
        encoder = getattr(components, attr)
        tensors |= {f"text_encoders.{kind}.transformer.{key}": t for key, t in text_encoder_tensors(encoder, kind).items()}
    path = write_safetensors(tmp_path / "sd3.5-all-in-one.safetensors", tensors)

    family, network = load_transformer_file(path)
    assert family == "sd3" and max_diff(network_output(network), outputs["sd3"]) <= EXACT

    from safetensors.torch import load_file

    state_dict = load_file(path)
    encoders = load_text_encoders_from_state_dict(state_dict, "sd3")
    assert sorted(encoders) == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    for attr, encoder in encoders.items():
        assert type(encoder) is type(getattr(components, attr))
        assert max_diff(text_output(encoder), text_output(getattr(components, attr))) <= EXACT
    vae = load_flow_vae(state_dict, "sd3")
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (1.5305, 0.0609)
    assert max_diff(decoded(vae), decoded(components.vae)) <= EXACT
    assert load_text_encoders_from_state_dict({"model.diffusion_model.x": torch.zeros(1)}, "sd3") == {}


# --- text encoders --------------------------------------------------------------------------------


TEXT_CASES = {
    # case: (tiny model, attribute, kind, projection, OpenCLIP names)
    "sd3 clip_l": ("sd3", "text_encoder", "clip_l", True, False),
    "flux clip_l": ("flux-dev", "text_encoder", "clip_l", False, False),
    "sd3 clip_g (transformers names)": ("sd3", "text_encoder_2", "clip_g", True, False),
    "sd3 clip_g (OpenCLIP names)": ("sd3", "text_encoder_2", "clip_g", True, True),
    "sd3 t5xxl": ("sd3", "text_encoder_3", "t5xxl", False, False),
    "flux t5xxl": ("flux-dev", "text_encoder_2", "t5xxl", False, False),
}


@pytest.mark.parametrize("layout", ["fp16", "scaled-fp8"])
@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_text_encoder_files_load_and_match(tmp_path, built, case, layout):
    model, attr, kind, projection, open_clip = TEXT_CASES[case]
    original = getattr(built[model], attr)
    reference = rounded(original, layout)
    path = write_safetensors(tmp_path / f"{kind}.safetensors", encode(text_encoder_tensors(reference, kind, open_clip), layout))
    encoder = load_text_encoder_file(path, kind, projection=projection)
    assert type(encoder) is type(original)
    assert max_diff(text_output(encoder), text_output(reference)) <= EXACT
    assert max_diff(text_output(encoder), text_output(original)) <= TEXT_BOUNDS[layout]


def write_t5_gguf(path, encoder, quant: GGMLQuantizationType):
    """A T5 encoder as llama.cpp's converter writes it (city96's T5 GGUF files): llama.cpp's tensor
    names (gguf's own table) and the config as metadata."""
    config = encoder.config
    writer = gguf.GGUFWriter(str(path), arch="t5encoder")
    writer.add_context_length(512)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.num_heads)
    writer.add_key_length(config.d_kv)
    writer.add_value_length(config.d_kv)
    writer.add_relative_attn_buckets_count(config.relative_attention_num_buckets)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, config.num_layers)
    for key, tensor in text_encoder_tensors(encoder, "t5xxl").items():
        name = names.get_name(key, try_suffixes=(".weight",))
        kind = gguf_type(tensor, quant)
        array = tensor.numpy()
        if kind == quant:
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array.astype(np.float16 if kind == GGMLQuantizationType.F16 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_t5_gguf_files_load_and_match(tmp_path, built):
    original = built["flux-dev"].text_encoder_2
    reference = rounded(original, "gguf-q8_0")
    path = write_t5_gguf(tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf", original, GGMLQuantizationType.Q8_0)
    encoder = load_text_encoder_file(path, "t5xxl")
    assert type(encoder) is T5EncoderModel and encoder.config.dense_act_fn == "gelu_new"
    assert max_diff(text_output(encoder), text_output(reference)) <= EXACT
    assert relative_diff(text_output(encoder), text_output(original)) <= 0.05
    message = r"^t5-v1_1-xxl-encoder-Q8_0\.gguf is a GGUF file but not a T5 encoder; lienzo reads GGUF text encoders only as t5xxl$"
    with pytest.raises(ModelFileError, match=message):
        load_text_encoder_file(path, "clip_l")


def test_text_encoder_files_saved_by_transformers_load(tmp_path, built):
    """transformers >= 5.6 saves CLIPTextModel without the text_model. level."""
    original = built["flux-dev"].text_encoder
    path = write_safetensors(tmp_path / "clip_l.safetensors", original.state_dict())
    assert max_diff(text_output(load_text_encoder_file(path, "clip_l")), text_output(original)) <= EXACT


def test_a_clip_without_projection_gets_the_identity_when_one_is_asked_for(tmp_path, built):
    original = built["flux-dev"].text_encoder
    path = write_safetensors(tmp_path / "clip_l.safetensors", _clip_to_ldm(original))
    encoder = load_text_encoder_file(path, "clip_l", projection=True)
    with torch.no_grad():
        ids = torch.tensor([[49406, 320, 49407]])
        assert max_diff(encoder(input_ids=ids).text_embeds, original(input_ids=ids).pooler_output) <= EXACT


def test_text_encoder_kinds_by_shape():
    def clip(width, names="text_model.embeddings.token_embedding.weight"):
        return {names: (49408, width), "text_model.encoder.layers.0.mlp.fc1.weight": (4 * width, width)}

    assert text_encoder_kind(clip(768)) == "clip_l"
    assert text_encoder_kind(clip(1280)) == "clip_g"
    assert text_encoder_kind(clip(1280, "token_embedding.weight")) == "clip_g"
    assert text_encoder_kind(clip(64)) is None  # a test-sized CLIP: the caller's kind decides
    t5 = {"shared.weight": (32128, 4096), "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096)}
    assert text_encoder_kind(t5) == "t5xxl"
    assert text_encoder_kind({"token_embd.weight": (4096, 32128), "enc.blk.0.attn_q.weight": (4096, 4096)}) == "t5xxl"
    assert text_encoder_kind({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}) is None


def test_a_text_encoder_of_the_wrong_kind_is_refused_in_one_line(tmp_path, built):
    t5 = write_safetensors(tmp_path / "t5xxl_fp16.safetensors", text_encoder_tensors(built["sd3"].text_encoder_3, "t5xxl"))
    message = r"^t5xxl_fp16\.safetensors holds a t5xxl text encoder, not the clip_l that was asked for$"
    with pytest.raises(ModelFileError, match=message):
        load_text_encoder_file(t5, "clip_l")
    clip = write_safetensors(tmp_path / "clip_l.safetensors", _clip_to_ldm(built["sd3"].text_encoder))
    with pytest.raises(ModelFileError, match=r"^clip_l\.safetensors holds no T5 encoder") as err:
        load_text_encoder_file(clip, "t5xxl")
    assert "\n" not in str(err.value)


# --- VAEs -----------------------------------------------------------------------------------------


@torch.no_grad()
def decoded(vae) -> torch.Tensor:
    latents = torch.randn(1, vae.config.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    return vae.decode(latents).sample


@pytest.mark.parametrize("case", ["flux-dev", "sd3"])
def test_vae_files_load_and_decode_like_the_original(tmp_path, built, case):
    family = CASES[case][0]
    original = built[case].vae
    # Flux's ae.safetensors: ldm names without prefix; SD 3's own file the same, here in fp16 as shipped.
    path = write_safetensors(tmp_path / "ae.safetensors", _vae_to_ldm(original))
    vae = load_flow_vae(path, family)
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (original.config.scaling_factor, original.config.shift_factor)
    assert not vae.config.use_quant_conv and vae.config.latent_channels == 16
    assert max_diff(decoded(vae), decoded(original)) <= EXACT
    diffusers_named = load_flow_vae(original.state_dict(), family)
    assert max_diff(decoded(diffusers_named), decoded(original)) <= EXACT


def test_a_four_channel_vae_is_refused_for_a_flow_family(tmp_path):
    path = write_safetensors(tmp_path / "sdxl_vae.safetensors", _vae_to_ldm(build_tiny("sd1").vae))
    with pytest.raises(ModelFileError, match=r"^sdxl_vae\.safetensors is a VAE with 4 latent channels; Flux\.1 needs one with 16$"):
        load_flow_vae(path, "flux")


# --- refusals -------------------------------------------------------------------------------------


def test_files_that_hold_no_transformer_are_refused_in_one_line(tmp_path, built):
    lora = write_safetensors(
        tmp_path / "lora.safetensors",
        {
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 64),
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(192, 4),
        },
    )
    vae = write_safetensors(tmp_path / "ae.safetensors", _vae_to_ldm(built["flux-dev"].vae))
    sd15 = save_single_file(build_tiny("sd1"), tmp_path / "sd15.safetensors")
    t5 = write_safetensors(tmp_path / "t5.safetensors", text_encoder_tensors(built["sd3"].text_encoder_3, "t5xxl"))
    expected = {
        lora: "it looks like a LoRA; put it in the LoRA folder",
        vae: "it looks like a VAE alone; put it in the VAE folder",
        sd15: "it is a whole SD 1.x checkpoint; load it as a checkpoint",
        t5: "it looks like a t5xxl text encoder; put it in the text encoder folder",
    }
    for path, hint in expected.items():
        with pytest.raises(ModelFileError) as err:
            load_transformer_file(path)
        assert str(err.value) == f"{path.name} is not a transformer lienzo knows (SD 3.x, Flux.1, Chroma, Z-Image, Flux.2 Klein, Qwen-Image): {hint}"


def test_an_incomplete_network_is_refused_in_one_line(tmp_path, built):
    tensors = original_names("flux", built["flux-dev"].transformer.state_dict())
    del tensors["double_blocks.0.txt_mlp.2.weight"]
    path = write_safetensors(tmp_path / "cut.safetensors", tensors)
    with pytest.raises(ModelFileError, match=r"^cut\.safetensors: the transformer tensors do not match .*ff_context\.net\.2\.weight") as err:
        load_transformer_file(path)
    assert "\n" not in str(err.value)


def test_gguf_files_are_sniffed_and_damaged_ones_refused(tmp_path, built):
    path, _ = network_file(tmp_path, built["flux-schnell"], "flux", "gguf-q8_0")
    assert sniff(path) == "gguf"
    header = read_gguf_header(path)
    assert header["double_blocks.0.img_attn.qkv.weight"] == ((192, 64), "Q8_0")
    assert header["double_blocks.0.img_attn.norm.query_norm.scale"] == ((32,), "F32")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError, match=r"^cut\.gguf is truncated or damaged") as err:
        load_transformer_file(cut)
    assert "\n" not in str(err.value)
