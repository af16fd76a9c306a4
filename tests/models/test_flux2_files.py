"""Flux.2 Klein from the files people download: the transformer in BFL's original names (with or without
ComfyUI's prefix) and diffusers' names, in fp32, bf16, fp8, scaled fp8 and GGUF; its Qwen3 (read as the
Qwen3ForCausalLM Klein's pipeline holds) as a safetensors or GGUF file; Flux.2's VAE file with its batch-norm
statistics; ComfyUI's split layout assembled around them, which must draw what the same weights draw as a
diffusers folder; base vs step-distilled defaults; and what ``lienzo models`` lists.

The exactness bar is test_transformer_files' own (see its FORMAT_BOUNDS and GGUF_DECODE).
"""

import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.quantizers.gguf.utils import GGUFLinear
from gguf import GGMLQuantizationType
from safetensors.torch import save_file
from test_transformer_files import (
    EXACT,
    FORMAT_BOUNDS,
    GGUF_DECODE,
    GGUF_QUANTS,
    encode,
    max_diff,
    relative_diff,
    rounded,
    write_gguf,
    write_safetensors,
)
from test_transformer_files_2 import write_qwen3_gguf
from tiny_models import build_tiny, save_diffusers_folder
from transformers import Qwen3ForCausalLM

from lienzo.errors import ModelFileError
from lienzo.models.assembly import assemble, plan_assembly
from lienzo.models.single_file_save import _vae_to_ldm
from lienzo.models.transformer_files import (
    detect_transformer_family,
    load_flow_vae,
    load_text_encoder_file,
    load_transformer_file,
    transformer_config,
)

PREFIX = "model.diffusion_model."

# diffusers' Flux.2 names -> BFL's, written out independently of diffusers' converter. "[i]" marks row slice i
# of a fused tensor; "!" a modulation BFL stores as (shift, scale).
TOP = {
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1!",
}
DOUBLE = {
    "attn.to_q": "img_attn.qkv[0]", "attn.to_k": "img_attn.qkv[1]", "attn.to_v": "img_attn.qkv[2]",
    "attn.add_q_proj": "txt_attn.qkv[0]", "attn.add_k_proj": "txt_attn.qkv[1]", "attn.add_v_proj": "txt_attn.qkv[2]",
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
}
SINGLE = {
    "attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm",
}


def bfl_names(state_dict: dict) -> dict:
    """A diffusers Flux2Transformer2DModel state dict in BFL's names (flux-2-klein-4b.safetensors)."""
    renamed, fused = {}, {}
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        block = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
        if block:
            double = block[1] == "transformer_blocks"
            name = f"{'double' if double else 'single'}_blocks.{block[2]}.{(DOUBLE if double else SINGLE)[block[3]]}"
        else:
            name = TOP[module]
        if name.endswith("!"):
            name, tensor = name[:-1], torch.cat(list(tensor.chunk(2))[::-1])
        if name.endswith("_norm"):
            param = "scale"  # BFL's RMSNorm names its weight "scale"
        if part := re.fullmatch(r"(.+)\[(\d)\]", name):
            fused.setdefault(f"{part[1]}.{param}", {})[int(part[2])] = tensor
        else:
            renamed[f"{name}.{param}"] = tensor
    return renamed | {key: torch.cat([parts[i] for i in sorted(parts)]) for key, parts in fused.items()}


@torch.no_grad()
def klein_output(network: torch.nn.Module) -> torch.Tensor:
    """One call of the network on fixed noise: 4x4 packed latents, 8 text tokens, four-axis positions."""
    generator = torch.Generator().manual_seed(0)
    config = network.config
    rows = cols = 4
    image_ids = torch.zeros(rows * cols, 4)
    image_ids[:, 1] = torch.arange(rows).repeat_interleave(cols)
    image_ids[:, 2] = torch.arange(cols).repeat(rows)
    text_ids = torch.zeros(8, 4)
    text_ids[:, 3] = torch.arange(8)
    return network(
        hidden_states=torch.randn(1, rows * cols, config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=generator),
        timestep=torch.tensor([0.7]), img_ids=image_ids, txt_ids=text_ids, return_dict=False,
    )[0]


@pytest.fixture(scope="module")
def klein():
    return build_tiny("flux2")


@pytest.fixture(scope="module")
def reference_output(klein):
    return klein_output(klein.transformer)


def network_file(tmp_path, transformer, layout: str, names: str = "original", stem: str = "flux-2-klein-4b"):
    """Write ``transformer`` in one layout; returns (path, the model the file holds)."""
    reference = rounded(transformer, layout)
    tensors = reference.state_dict()
    if names != "diffusers":
        tensors = bfl_names(tensors)
    if names == "comfyui":
        tensors = {PREFIX + key: t for key, t in tensors.items()}
    if layout in GGUF_QUANTS:
        return write_gguf(tmp_path / f"{stem}-{layout}.gguf", tensors, GGUF_QUANTS[layout], "flux"), reference
    return write_safetensors(tmp_path / f"{stem}-{names}-{layout}.safetensors", encode(tensors, layout)), reference


# --- the transformer ------------------------------------------------------------------------------


@pytest.mark.parametrize("names", ["original", "comfyui", "diffusers"])
def test_klein_is_detected_and_its_config_read_from_shapes(klein, names):
    tensors = klein.transformer.state_dict()
    if names != "diffusers":
        tensors = bfl_names(tensors)
    if names == "comfyui":
        tensors = {PREFIX + key: t for key, t in tensors.items()}
    shapes = {key: tuple(t.shape) for key, t in tensors.items()}
    assert detect_transformer_family(shapes) == "flux2"
    config = transformer_config("flux2", shapes)
    built = dict(klein.transformer.config)
    built["out_channels"] = built["out_channels"] or built["in_channels"]  # None there: as many as go in
    for key, value in config.items():
        same = tuple(built[key]) == tuple(value) if isinstance(value, (list, tuple)) else built[key] == value
        assert same, key


def test_the_real_klein_configs_come_out_right():
    """Klein 4B's and 9B's transformer configs (their diffusers folders'), read back from the shapes of their BFL files."""
    klein_4b = dict(
        in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=7680, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False,
    )
    klein_9b = klein_4b | dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288)
    for real in (klein_4b, klein_9b):
        with torch.device("meta"):
            network = Flux2Transformer2DModel(**real)
        shapes = {key: tuple(t.shape) for key, t in bfl_names(network.state_dict()).items()}
        config = transformer_config("flux2", shapes)
        assert {key: config[key] for key in real} == real
        assert config["out_channels"] == 128 and config["timestep_guidance_channels"] == 256


def test_flux1_chroma_and_klein_are_told_apart():
    flux = build_tiny("flux")
    shapes = {key: tuple(t.shape) for key, t in flux.transformer.state_dict().items()}
    assert detect_transformer_family(shapes) == "flux"


@pytest.mark.parametrize(
    "layout, names",
    [("fp32", "original"), ("fp32", "comfyui"), ("fp32", "diffusers"), ("bf16", "comfyui"), ("fp8", "original"),
     ("scaled-fp8", "comfyui"), ("gguf-q8_0", "original"), ("gguf-q4_0", "comfyui")],
)
def test_klein_files_load_and_run_like_the_model_they_hold(tmp_path, klein, reference_output, layout, names):
    path, reference = network_file(tmp_path, klein.transformer, layout, names)
    family, network = load_transformer_file(path)
    assert family == "flux2" and isinstance(network, Flux2Transformer2DModel)
    got = klein_output(network)
    if layout in GGUF_QUANTS:
        assert relative_diff(got, klein_output(reference)) <= GGUF_DECODE
    else:
        assert max_diff(got, klein_output(reference)) <= EXACT
    assert max_diff(got, reference_output) <= FORMAT_BOUNDS[layout]


def test_klein_gguf_weights_stay_quantized(tmp_path, klein):
    path, _ = network_file(tmp_path, klein.transformer, "gguf-q8_0")
    _, network = load_transformer_file(path)
    to_q = network.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, GGUFLinear) and to_q.weight.quant_type == GGMLQuantizationType.Q8_0
    assert to_q.weight.dtype == torch.uint8  # the blocks, not an expanded copy


def test_bfl_fp8_files_with_weight_scales_load(tmp_path, klein, reference_output):
    """BFL's fp8 releases and ComfyUI's mixed-precision files: fp8 weights with weight_scale / input_scale beside
    (ComfyUI's also with a comfy_quant note per layer); a block-scaled (NVFP4-like) scale is refused in one line."""
    reference = rounded(klein.transformer, "scaled-fp8")
    tensors = {}
    for key, t in encode(bfl_names(reference.state_dict()), "scaled-fp8").items():
        if key == "scaled_fp8":
            continue
        key = key.replace(".scale_weight", ".weight_scale").replace(".scale_input", ".input_scale")
        tensors[key] = t
        if key.endswith(".weight_scale"):
            tensors[key.replace(".weight_scale", ".comfy_quant")] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    path = write_safetensors(tmp_path / "flux-2-klein-4b-fp8.safetensors", {PREFIX + key: t for key, t in tensors.items()})
    _, network = load_transformer_file(path)
    assert max_diff(klein_output(network), klein_output(reference)) <= EXACT
    assert max_diff(klein_output(network), reference_output) <= FORMAT_BOUNDS["scaled-fp8"]
    scale = next(key for key in tensors if key.endswith(".weight_scale"))
    tensors[scale] = torch.ones(4, 1)
    path = write_safetensors(tmp_path / "flux-2-klein-4b-nvfp4.safetensors", tensors)
    with pytest.raises(ModelFileError) as err:
        load_transformer_file(path)
    message = str(err.value)
    assert message.startswith("flux-2-klein-4b-nvfp4.safetensors: tensor ") and "not block-scaled formats" in message


def test_a_tensor_that_fits_no_klein_layer_is_named(tmp_path, klein):
    tensors = bfl_names(klein.transformer.state_dict())
    tensors["extra_layer.weight"] = torch.zeros(2, 2)
    path = write_safetensors(tmp_path / "klein.safetensors", tensors)
    with pytest.raises(ModelFileError) as err:
        load_transformer_file(path)
    assert "extra_layer.weight" in str(err.value) and "\n" not in str(err.value)


# --- Qwen3 and the VAE ----------------------------------------------------------------------------


def qwen3_like_the_real_one(encoder: Qwen3ForCausalLM) -> Qwen3ForCausalLM:
    """The tiny Qwen3 with Qwen3-4B's rotary base, norm epsilon and context length, which no tensor states
    and a single file therefore gets; the weights are the same."""
    config = encoder.config.to_dict() | {
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 40960,
    }
    real = Qwen3ForCausalLM(type(encoder.config)(**config))
    real.load_state_dict(encoder.state_dict())
    return real.eval()


@torch.no_grad()
def hidden_states(encoder: torch.nn.Module) -> torch.Tensor:
    """What Klein's pipeline reads: the hidden states of every layer."""
    out = encoder(input_ids=torch.tensor([[1, 40, 70, 100, 2]]), output_hidden_states=True)
    return torch.stack(out.hidden_states)


def save_qwen3(encoder: Qwen3ForCausalLM, path, *, head: bool = True):
    """Qwen3ForCausalLM's tensors, as ComfyUI's qwen_3_4b.safetensors keeps them (``head`` False: without lm_head)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: t.contiguous() for key, t in encoder.state_dict().items() if head or key != "lm_head.weight"}, path)
    return path


@pytest.fixture(scope="module")
def tiny_klein():
    components = build_tiny("flux2")
    components.text_encoder = qwen3_like_the_real_one(components.text_encoder)
    return components


@pytest.mark.parametrize("head", [True, False])
def test_klein_reads_its_qwen3_file_as_a_causal_lm(tmp_path, tiny_klein, head):
    encoder = tiny_klein.text_encoder
    path = save_qwen3(encoder, tmp_path / "qwen_3_4b.safetensors", head=head)
    loaded = load_text_encoder_file(path, "qwen3", causal_lm=True)
    assert isinstance(loaded, Qwen3ForCausalLM)
    assert max_diff(hidden_states(loaded), hidden_states(encoder)) == 0.0
    if head:
        assert torch.equal(loaded.lm_head.weight, encoder.lm_head.weight)
    else:  # tied to the embedding, as Qwen3-4B's is
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert type(load_text_encoder_file(path, "qwen3")).__name__ == "Qwen3Model"  # Z-Image's class from the same file


def test_klein_reads_a_qwen3_gguf_as_a_causal_lm(tmp_path, tiny_klein):
    original = tiny_klein.text_encoder
    path = write_qwen3_gguf(tmp_path / "Qwen3-4B-Q8_0.gguf", original.model, GGMLQuantizationType.Q8_0)
    encoder = load_text_encoder_file(path, "qwen3", causal_lm=True)
    assert isinstance(encoder, Qwen3ForCausalLM)
    reference = rounded(original, "gguf-q8_0")
    assert relative_diff(hidden_states(encoder), hidden_states(reference)) <= GGUF_DECODE


def bfl_vae(vae) -> dict:
    """Flux.2's VAE in BFL's names (flux2-vae.safetensors): ldm's, its quant convs inside the encoder and
    decoder, the batch norm's statistics without the batch count."""
    state = vae.state_dict()
    plain = {key: t for key, t in state.items() if not key.startswith("bn.")}
    ldm = _vae_to_ldm(SimpleNamespace(config=vae.config, state_dict=lambda: plain))
    moved = {("encoder." + key if key.startswith("quant_conv.") else "decoder." + key if key.startswith("post_quant_conv.") else key): t
             for key, t in ldm.items()}
    return moved | {"bn.running_mean": state["bn.running_mean"], "bn.running_var": state["bn.running_var"]}


def save_vae(vae, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: t.contiguous() for key, t in bfl_vae(vae).items()}, path)
    return path


@torch.no_grad()
def decoded(vae) -> torch.Tensor:
    latents = torch.randn(1, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    return vae.decode(latents).sample


@pytest.mark.parametrize("names", ["bfl", "diffusers"])
def test_flux2s_vae_file_loads_with_its_batch_norm(tmp_path, klein, names):
    vae = klein.vae
    path = tmp_path / "flux2-vae.safetensors"
    if names == "bfl":
        save_vae(vae, path)
    else:
        save_file({key: t.contiguous() for key, t in vae.state_dict().items()}, path)
    loaded = load_flow_vae(path, "flux2")
    assert type(loaded).__name__ == "AutoencoderKLFlux2"
    assert torch.equal(loaded.bn.running_mean, vae.bn.running_mean) and torch.equal(loaded.bn.running_var, vae.bn.running_var)
    assert tuple(loaded.config.patch_size) == (2, 2)
    assert max_diff(decoded(loaded), decoded(vae)) == 0.0


def test_flux1s_vae_is_refused_for_klein_in_one_line(tmp_path):
    from test_assembly import save_vae as save_flux_vae

    path = save_flux_vae(build_tiny("flux").vae, tmp_path / "ae.safetensors")
    with pytest.raises(ModelFileError) as err:
        load_flow_vae(path, "flux2")
    assert str(err.value).startswith("ae.safetensors is not Flux.2's VAE: it has no batch-norm statistics")


# --- the split layout, assembled ------------------------------------------------------------------


REQUEST = dict(prompt="a red apple on a table", width=64, height=64, steps=2, seed=1, sampler="Euler", schedule="Simple")


def generated(components, **fields):
    from lienzo.generation.engine import generate
    from lienzo.generation.request import GenerationRequest

    return generate(components, GenerationRequest(**(REQUEST | fields)))


def comfyui_tree(root, components, *, stem: str = "flux-2-klein-4b", tokenizer: bool = True) -> tuple:
    """ComfyUI's models dir around ``components``: the transformer (BFL's names, ComfyUI's prefix) in
    diffusion_models, Qwen3 in text_encoders (with the tokenizer files beside it), Flux.2's VAE in vae; and the
    same model as a diffusers folder. Returns (transformer file, diffusers folder)."""
    folder = save_diffusers_folder(components, root / "klein-diffusers")
    models = root / "models"
    (models / "diffusion_models").mkdir(parents=True)
    tensors = {PREFIX + key: t for key, t in bfl_names(components.transformer.state_dict()).items()}
    transformer = write_safetensors(models / "diffusion_models" / f"{stem}.safetensors", tensors)
    save_qwen3(components.text_encoder, models / "text_encoders" / "qwen_3_4b.safetensors", head=False)
    if tokenizer:
        for file in (folder / "tokenizer").iterdir():
            shutil.copy(file, models / "text_encoders" / file.name)
    save_vae(components.vae, models / "vae" / "flux2-vae.safetensors")
    return transformer, folder


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_an_assembled_klein_draws_what_its_diffusers_folder_draws(tmp_path, tiny_klein, cfg):
    from lienzo.models.loading import load_components

    transformer, folder = comfyui_tree(tmp_path, tiny_klein)
    assembled = load_components(transformer)
    assert assembled.family == "flux2" and isinstance(assembled.text_encoder, Qwen3ForCausalLM)
    assert type(assembled.vae).__name__ == "AutoencoderKLFlux2"
    assert assembled.text_encoder_files == {"text_encoder": "qwen_3_4b.safetensors"}
    ours = generated(assembled, cfg_scale=cfg).images[0].pixels
    theirs = generated(load_components(folder), cfg_scale=cfg).images[0].pixels
    assert np.array_equal(ours, theirs)


def test_a_gguf_klein_with_a_gguf_qwen3_draws(tmp_path, tiny_klein):
    transformer, folder = comfyui_tree(tmp_path, tiny_klein)
    models = tmp_path / "models"
    transformer.unlink()
    (models / "text_encoders" / "qwen_3_4b.safetensors").unlink()
    gguf_file, _ = network_file(models / "diffusion_models", tiny_klein.transformer, "gguf-q8_0")
    write_qwen3_gguf(models / "text_encoders" / "Qwen3-4B-Q8_0.gguf", tiny_klein.text_encoder.model, GGMLQuantizationType.Q8_0)
    assembled = assemble(gguf_file)
    assert isinstance(assembled.text_encoder, Qwen3ForCausalLM)
    assert assembled.text_encoder_files == {"text_encoder": "Qwen3-4B-Q8_0.gguf"}
    assert generated(assembled).images[0].pixels.shape == (64, 64, 3)


def test_klein_takes_the_qwen3_as_wide_as_it_reads(tmp_path, tiny_klein):
    """Qwen3-4B (Z-Image's, Klein 4B's) beside a wider Qwen3: Klein takes the one its txt_in reads, whichever is more precise."""
    transformer, _ = comfyui_tree(tmp_path, tiny_klein)
    text_encoders = tmp_path / "models" / "text_encoders"
    tensors = {key: t for key, t in tiny_klein.text_encoder.state_dict().items() if key != "lm_head.weight"}
    tensors["model.embed_tokens.weight"] = torch.zeros(tensors["model.embed_tokens.weight"].shape[0], 48)
    save_file({key: t.to(torch.float16).contiguous() for key, t in tensors.items()}, text_encoders / "qwen_3_8b_fp16.safetensors")
    plan = plan_assembly(transformer)
    assert plan.text_encoders["qwen3"].path.name == "qwen_3_4b.safetensors"
    (text_encoders / "qwen_3_4b.safetensors").unlink()
    with pytest.raises(ModelFileError) as err:
        plan_assembly(transformer)
    message = str(err.value)
    assert message.startswith("model flux-2-klein-4b.safetensors (Flux.2 Klein) reads a Qwen3 32 wide, but the Qwen3 files found")
    assert "qwen_3_8b_fp16.safetensors (48)" in message and "\n" not in message


def test_a_missing_klein_piece_is_named_in_one_line(tmp_path, tiny_klein):
    transformer, _ = comfyui_tree(tmp_path, tiny_klein)
    models = tmp_path / "models"
    (models / "vae" / "flux2-vae.safetensors").unlink()
    with pytest.raises(ModelFileError) as err:
        plan_assembly(transformer)
    message = str(err.value)
    assert message.startswith("model flux-2-klein-4b.safetensors (Flux.2 Klein) needs a VAE: none with 4 latent channels in ")
    assert "put flux2-vae.safetensors there" in message and "\n" not in message
    # Flux.1's 16-channel VAE in vae/ is not taken for Klein.
    from test_assembly import save_vae as save_flux_vae

    save_flux_vae(build_tiny("flux").vae, models / "vae" / "ae.safetensors")
    with pytest.raises(ModelFileError, match="needs a VAE: none with 4 latent channels"):
        plan_assembly(transformer)

    (models / "text_encoders" / "qwen_3_4b.safetensors").unlink()
    with pytest.raises(ModelFileError) as err:
        plan_assembly(transformer)
    message = str(err.value)
    assert message.startswith("model flux-2-klein-4b.safetensors (Flux.2 Klein) needs a Qwen3 text encoder (qwen3): none in ")
    assert "\n" not in message


def test_klein_finds_its_tokenizer_in_a_given_folder(tmp_path, tiny_klein):
    transformer, folder = comfyui_tree(tmp_path, tiny_klein, tokenizer=False)
    assert plan_assembly(transformer).tokenizer is None  # none beside it: lienzo's would read the prompts
    assert plan_assembly(transformer, text_encoders=[folder / "tokenizer"]).tokenizer == folder / "tokenizer"


# --- base vs step-distilled -----------------------------------------------------------------------


def test_a_base_klein_file_gets_the_base_defaults(tmp_path, tiny_klein):
    from lienzo.models.loading import load_components

    distilled, _ = comfyui_tree(tmp_path / "d", tiny_klein)
    base, _ = comfyui_tree(tmp_path / "b", tiny_klein, stem="flux-2-klein-base-4b")
    got = load_components(distilled)
    assert got.is_distilled is True
    request = generated(got, steps=None).request
    assert (request.steps, request.cfg_scale) == (4, 1.0)
    got = load_components(base)
    assert got.is_distilled is False
    request = generated(got, steps=None).request
    assert (request.steps, request.cfg_scale) == (50, 4.0)
    # What the request names wins over either.
    request = generated(got, steps=2, cfg_scale=1.5).request
    assert (request.steps, request.cfg_scale) == (2, 1.5)


def test_lienzo_models_and_the_studio_show_a_base_kleins_defaults(tmp_path, tiny_klein):
    from lienzo.models.registry import examine
    from lienzo.server.routes.native import family_view

    distilled, folder = comfyui_tree(tmp_path / "d", tiny_klein)
    base, _ = comfyui_tree(tmp_path / "b", tiny_klein, stem="flux-2-klein-base-4b")
    assert examine(distilled)[0] == "Flux.2 Klein" and examine(base)[0] == "Flux.2 Klein base"
    assert examine(folder)[0] == "Flux.2 Klein (diffusers)"  # saved with is_distilled true, as the released Klein
    views = {label: family_view(label) for label in ("Flux.2 Klein", "Flux.2 Klein base (diffusers)")}
    assert [(v.name, v.steps, v.cfg_scale, v.negative_prompt) for v in views.values()] == [("flux2", 4, 1.0, False), ("flux2", 50, 4.0, True)]


@pytest.mark.parametrize("is_distilled", [True, False])
def test_a_klein_folder_says_whether_it_is_distilled(tmp_path, klein, is_distilled):
    from lienzo.generation.engine import family_defaults
    from lienzo.generation.request import GenerationRequest
    from lienzo.models.loading import load_components

    folder = save_diffusers_folder(klein, tmp_path / "klein")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"is_distilled": is_distilled}))
    components = load_components(folder)
    assert components.is_distilled is is_distilled
    request = family_defaults(components, GenerationRequest(prompt="a cat"))
    assert (request.steps, request.cfg_scale) == ((4, 1.0) if is_distilled else (50, 4.0))


def test_families_with_one_kind_keep_their_defaults():
    from lienzo.generation.engine import family_defaults
    from lienzo.generation.request import GenerationRequest

    zimage = build_tiny("zimage")
    assert zimage.is_distilled is None
    request = family_defaults(zimage, GenerationRequest(prompt="a cat"))
    assert (request.steps, request.cfg_scale) == (8, 1.0)


# --- lienzo models --------------------------------------------------------------------------------


def test_lienzo_models_lists_klein_files_with_format_and_size(tmp_path, tiny_klein):
    from lienzo.models.registry import Registry, examine

    transformer, _ = comfyui_tree(tmp_path, tiny_klein)
    models = tmp_path / "models"
    network_file(models / "diffusion_models", tiny_klein.transformer, "gguf-q8_0")
    network_file(models / "diffusion_models", tiny_klein.transformer, "bf16", "comfyui")
    entries = {e.name: e for e in Registry(models, tmp_path / "cache").scan()}
    klein = entries["diffusion_models/flux-2-klein-4b"]
    assert (klein.architecture, klein.quantization, klein.is_checkpoint) == ("Flux.2 Klein", "fp32", True)
    assert klein.size_bytes == transformer.stat().st_size
    assert (entries["diffusion_models/flux-2-klein-4b-gguf-q8_0"].architecture,
            entries["diffusion_models/flux-2-klein-4b-gguf-q8_0"].quantization) == ("Flux.2 Klein", "GGUF Q8_0")
    assert entries["diffusion_models/flux-2-klein-4b-comfyui-bf16"].quantization == "bf16"
    assert examine(models / "text_encoders" / "qwen_3_4b.safetensors") == ("text encoder (Qwen3)", "fp32")
    assert entries["vae/flux2-vae"].architecture == "VAE"
