"""Single files of Chroma and Z-Image: the network in lodestones' / Alibaba's original names (with or without
ComfyUI's prefix) and diffusers' names, in fp32, bf16, fp8, scaled fp8 and GGUF; Qwen3 text encoder files;
and the split layout assembled around them, which must draw what the same model's diffusers folder draws.

The exactness bar is test_transformer_files' own: the weights are rounded (in diffusers' names) to what the
format stores, the file holds them without loss, and the loaded network matches that rounded model to float
rounding (GGUF: diffusers' fp16 expansion of the blocks); the distance from the unrounded model is bounded
by FORMAT_BOUNDS, which only a working load meets.
"""

import re
import shutil

import gguf
import numpy as np
import pytest
import torch
from diffusers import ChromaTransformer2DModel, ZImageTransformer2DModel
from diffusers.quantizers.gguf.utils import GGUFLinear
from gguf import GGMLQuantizationType
from safetensors.torch import save_file
from test_assembly import save_text_encoder, save_vae
from test_transformer_files import (
    EXACT,
    FORMAT_BOUNDS,
    GGUF_DECODE,
    GGUF_QUANTS,
    encode,
    gguf_type,
    max_diff,
    network_output,
    original_names,
    relative_diff,
    rounded,
    write_gguf,
    write_safetensors,
)
from tiny_models import build_tiny, save_diffusers_folder
from transformers import Qwen3Config, Qwen3Model

from lienzo.errors import ModelFileError
from lienzo.models.formats import read_gguf_header
from lienzo.models.assembly import assemble, plan_assembly
from lienzo.models.transformer_files import (
    detect_transformer_family,
    load_text_encoder_file,
    load_transformer_file,
    text_encoder_kind,
    transformer_config,
)

FAMILIES = ("chroma", "zimage")
PREFIX = "model.diffusion_model."

# diffusers' Chroma approximator -> lodestones' names, written out independently of the loader's table.
CHROMA_APPROXIMATOR = (
    (r"distilled_guidance_layer\.layers\.(\d+)\.linear_1\.", r"distilled_guidance_layer.layers.\1.in_layer."),
    (r"distilled_guidance_layer\.layers\.(\d+)\.linear_2\.", r"distilled_guidance_layer.layers.\1.out_layer."),
    (r"distilled_guidance_layer\.norms\.(\d+)\.weight", r"distilled_guidance_layer.norms.\1.scale"),
)
# diffusers' Z-Image -> the original names (ComfyUI's); q, k and v are fused into qkv.
ZIMAGE_NAMES = (
    ("all_x_embedder.2-1.", "x_embedder."),
    ("all_final_layer.2-1.", "final_layer."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)


def chroma_original_names(state_dict: dict) -> dict:
    approximator = {}
    for key, tensor in state_dict.items():
        if key.startswith("distilled_guidance_layer."):
            for pattern, replacement in CHROMA_APPROXIMATOR:
                key = re.sub(pattern, replacement, key)
            approximator[key] = tensor
    # The rest is Flux.1's blocks without their modulation: BFL's names.
    rest = {key: t for key, t in state_dict.items() if not key.startswith("distilled_guidance_layer.")}
    return approximator | original_names("flux", rest)


def zimage_original_names(state_dict: dict) -> dict:
    renamed, fused = {}, {}
    for key, tensor in state_dict.items():
        for old, new in ZIMAGE_NAMES:
            key = key.replace(old, new)
        part = re.fullmatch(r"(.+\.attention\.)to_([qkv])\.weight", key)
        if part:
            fused.setdefault(part[1] + "qkv.weight", {})["qkv".index(part[2])] = tensor
        else:
            renamed[key] = tensor
    return renamed | {key: torch.cat([parts[i] for i in range(3)]) for key, parts in fused.items()}


def family_original_names(family: str, state_dict: dict) -> dict:
    return chroma_original_names(state_dict) if family == "chroma" else zimage_original_names(state_dict)


@pytest.fixture(scope="module")
def built():
    return {family: build_tiny(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def outputs(built):
    return {family: network_output(components.transformer) for family, components in built.items()}


def network_file(tmp_path, components, family: str, layout: str, names: str = "original"):
    """Write ``components.transformer`` in one layout; returns (path, the model the file holds)."""
    reference = rounded(components.transformer, layout)
    tensors = reference.state_dict()
    if names != "diffusers":
        tensors = family_original_names(family, tensors)
    if names == "comfyui":
        tensors = {PREFIX + key: t for key, t in tensors.items()}
    if layout in GGUF_QUANTS:
        return write_gguf(tmp_path / f"{family}-{layout}.gguf", tensors, GGUF_QUANTS[layout], family), reference
    return write_safetensors(tmp_path / f"{family}-{names}-{layout}.safetensors", encode(tensors, layout)), reference


# --- detection and configs ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("names", ["original", "comfyui", "diffusers"])
def test_each_family_is_detected_and_its_config_read_from_shapes(built, family, names):
    tensors = built[family].transformer.state_dict()
    if names != "diffusers":
        tensors = family_original_names(family, tensors)
    if names == "comfyui":
        tensors = {PREFIX + key: t for key, t in tensors.items()}
    shapes = {key: tuple(t.shape) for key, t in tensors.items()}
    assert detect_transformer_family(shapes) == family
    config = transformer_config(family, shapes)
    built_config = dict(built[family].transformer.config)
    for key, value in config.items():
        if key in ("axes_lens", "out_channels"):  # not in the shapes: Z-Image's table length; Chroma's default
            continue
        assert (list(value) if isinstance(value, tuple) else value) == (
            list(built_config[key]) if isinstance(built_config[key], tuple) else built_config[key]
        ), key


# Chroma1 (lodestones) and Z-Image Turbo at full size, built on the meta device.
REAL = {
    "chroma": (ChromaTransformer2DModel, dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=4096, axes_dims_rope=(16, 56, 56), approximator_num_channels=64, approximator_hidden_dim=5120,
        approximator_layers=5,
    )),
    "zimage": (ZImageTransformer2DModel, dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30,
        n_kv_heads=30, cap_feat_dim=2560, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
    )),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("names", ["original", "comfyui", "diffusers"])
def test_configs_of_real_sizes_come_out_right(family, names):
    network_class, config = REAL[family]
    with torch.device("meta"):
        network = network_class(**config)
    tensors = network.state_dict()
    if names != "diffusers":
        tensors = family_original_names(family, tensors)
    prefix = PREFIX if names == "comfyui" else ""
    shapes = {prefix + key: tuple(t.shape) for key, t in tensors.items()}
    assert detect_transformer_family(shapes) == family
    inferred = transformer_config(family, shapes)
    wanted = {**config, "out_channels": 64} if family == "chroma" else config
    assert {key: list(v) if isinstance(v, tuple) else v for key, v in inferred.items()} == {
        key: list(v) if isinstance(v, tuple) else v for key, v in wanted.items()
    }


def test_flux_stays_flux_and_chroma_is_not_flux():
    flux = build_tiny("flux").transformer.state_dict()
    shapes = {key: tuple(t.shape) for key, t in original_names("flux", flux).items()}
    assert detect_transformer_family(shapes) == "flux"
    assert detect_transformer_family({key: tuple(t.shape) for key, t in flux.items()}) == "flux"


# --- the network, in each layout ------------------------------------------------------------------


# FORMAT_BOUNDS (test_transformer_files') hold here too; measured on these models (largest outputs about 2.4
# and 2.0), from the unrounded model: bf16 <= 5.3e-3, fp8 and scaled fp8 <= 9.2e-2, Q8_0 <= 1.5e-2, Q4_0 <= 0.26;
# from the rounded one: 0 for every safetensors layout, GGUF <= 3.5e-4 relative (diffusers' fp16 expansion).
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "layout, names",
    [("fp32", "original"), ("fp32", "comfyui"), ("fp32", "diffusers"), ("bf16", "comfyui"), ("fp8", "original"),
     ("scaled-fp8", "comfyui"), ("gguf-q8_0", "original"), ("gguf-q4_0", "comfyui")],
)
def test_network_files_load_and_run_like_the_model_they_hold(tmp_path, built, outputs, family, layout, names):
    path, reference = network_file(tmp_path, built[family], family, layout, names)
    loaded_family, network = load_transformer_file(path)
    assert loaded_family == family
    got = network_output(network)
    if layout in GGUF_QUANTS:
        assert relative_diff(got, network_output(reference)) <= GGUF_DECODE
    else:
        assert max_diff(got, network_output(reference)) <= EXACT
    assert max_diff(got, outputs[family]) <= FORMAT_BOUNDS[layout]


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_weights_stay_quantized(tmp_path, built, family):
    path, _ = network_file(tmp_path, built[family], family, "gguf-q8_0")
    _, network = load_transformer_file(path)
    to_q = network.transformer_blocks[0].attn.to_q if family == "chroma" else network.layers[0].attention.to_q
    assert isinstance(to_q, GGUFLinear) and to_q.weight.quant_type == GGMLQuantizationType.Q8_0
    assert to_q.weight.dtype == torch.uint8  # the blocks, not an expanded copy


def test_a_tensor_that_fits_no_chroma_layer_is_named(tmp_path, built):
    tensors = chroma_original_names(built["chroma"].transformer.state_dict())
    tensors["distilled_guidance_layer.extra.weight"] = torch.zeros(2, 2)
    path = write_safetensors(tmp_path / "chroma.safetensors", tensors)
    with pytest.raises(ModelFileError) as err:
        load_transformer_file(path)
    assert "distilled_guidance_layer.extra.weight" in str(err.value) and "\n" not in str(err.value)


# --- Qwen3 text encoder files ---------------------------------------------------------------------


def qwen3_like_the_real_one(encoder: Qwen3Model) -> Qwen3Model:
    """The tiny Qwen3 with Qwen3-4B's rotary base, norm epsilon and context length, which no tensor states
    and a single file therefore gets; the weights are the same."""
    config = encoder.config.to_dict() | {
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 40960,
    }
    real = Qwen3Model(Qwen3Config(**config))
    real.load_state_dict(encoder.state_dict())
    return real.eval()


@torch.no_grad()
def qwen_output(encoder: torch.nn.Module) -> torch.Tensor:
    return encoder(input_ids=torch.tensor([[1, 40, 70, 100, 2]])).last_hidden_state


def save_qwen3(encoder: Qwen3Model, path, *, comfyui: bool = True):
    """A Qwen3 as ComfyUI's qwen_3_4b.safetensors keeps it: Qwen3ForCausalLM's names (``model.``, an lm_head)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {("model." if comfyui else "") + key: t.contiguous() for key, t in encoder.state_dict().items()}
    if comfyui:
        tensors["lm_head.weight"] = encoder.embed_tokens.weight.detach().clone()
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("comfyui", [True, False])
def test_qwen3_files_load_with_the_config_their_shapes_give(tmp_path, built, comfyui):
    encoder = qwen3_like_the_real_one(built["zimage"].text_encoder)
    path = save_qwen3(encoder, tmp_path / "qwen_3_4b.safetensors", comfyui=comfyui)
    shapes = {key: tuple(t.shape) for key, t in encoder.state_dict().items()}
    assert text_encoder_kind(shapes) == "qwen3"
    assert text_encoder_kind({"model." + key: s for key, s in shapes.items()}) == "qwen3"
    loaded = load_text_encoder_file(path, "qwen3")
    assert isinstance(loaded, Qwen3Model)
    assert max_diff(qwen_output(loaded), qwen_output(encoder)) == 0.0


def test_a_qwen3_file_asked_for_as_t5_is_refused_in_one_line(tmp_path, built):
    path = save_qwen3(built["zimage"].text_encoder, tmp_path / "qwen.safetensors")
    with pytest.raises(ModelFileError) as err:
        load_text_encoder_file(path, "t5xxl")
    assert str(err.value) == "qwen.safetensors holds a qwen3 text encoder, not the t5xxl that was asked for"


# --- the split layout, assembled ------------------------------------------------------------------


REQUEST = dict(prompt="a red apple on a table", width=64, height=64, steps=2, seed=1, sampler="Euler", schedule="Simple")


def pixels(components) -> np.ndarray:
    from lienzo.generation.engine import generate
    from lienzo.generation.request import GenerationRequest

    return generate(components, GenerationRequest(**REQUEST)).images[0].pixels


@pytest.fixture(scope="module")
def tiny_zimage():
    components = build_tiny("zimage")
    components.text_encoder = qwen3_like_the_real_one(components.text_encoder)
    return components


def comfyui_tree(root, components, family: str) -> tuple:
    """ComfyUI's models dir around ``components``: the transformer (original names, ComfyUI's prefix) in
    diffusion_models, its text encoder in text_encoders, Flux's VAE as vae/ae.safetensors; and the same
    model as a diffusers folder. Returns (transformer file, diffusers folder)."""
    folder = save_diffusers_folder(components, root / f"{family}-diffusers")
    models = root / "models"
    tensors = {PREFIX + key: t for key, t in family_original_names(family, components.transformer.state_dict()).items()}
    transformer = write_safetensors(mkdir(models / "diffusion_models") / f"{family}.safetensors", tensors)
    if family == "chroma":
        save_text_encoder(components.text_encoder, models / "text_encoders" / "t5xxl_fp16.safetensors")
    else:
        save_qwen3(components.text_encoder, models / "text_encoders" / "qwen_3_4b.safetensors")
    save_vae(components.vae, models / "vae" / "ae.safetensors")
    return transformer, folder


def mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_an_assembled_chroma_draws_what_its_diffusers_folder_draws(tmp_path, built):
    from lienzo.models.loading import load_components

    transformer, folder = comfyui_tree(tmp_path, built["chroma"], "chroma")
    assembled = assemble(transformer)
    assert assembled.family == "chroma" and assembled.text_encoder_files == {"text_encoder": "t5xxl_fp16.safetensors"}
    assert np.array_equal(pixels(assembled), pixels(load_components(folder)))


@pytest.mark.parametrize("where", ["beside", "given"])
def test_an_assembled_zimage_draws_what_its_diffusers_folder_draws(tmp_path, tiny_zimage, where):
    from lienzo.models.loading import load_components

    transformer, folder = comfyui_tree(tmp_path, tiny_zimage, "zimage")
    given = []
    if where == "beside":  # the Z-Image folder's tokenizer files copied beside qwen_3_4b.safetensors
        for file in (folder / "tokenizer").iterdir():
            shutil.copy(file, tmp_path / "models" / "text_encoders" / file.name)
    else:
        given = [folder / "tokenizer"]
    assembled = assemble(transformer, text_encoders=given)
    assert assembled.family == "zimage" and isinstance(assembled.text_encoder, Qwen3Model)
    assert np.array_equal(pixels(assembled), pixels(load_components(folder)))


def test_a_qwen3_folder_brings_its_tokenizer(tmp_path, tiny_zimage):
    transformer, folder = comfyui_tree(tmp_path, tiny_zimage, "zimage")
    (tmp_path / "models" / "text_encoders" / "qwen_3_4b.safetensors").unlink()
    plan = plan_assembly(transformer, text_encoders=[folder / "text_encoder"])
    assert plan.text_encoders["qwen3"].path == folder / "text_encoder" and plan.tokenizer == folder / "tokenizer"


def test_a_missing_text_encoder_or_tokenizer_is_one_line(tmp_path, built, tiny_zimage):
    chroma, _ = comfyui_tree(tmp_path / "c", built["chroma"], "chroma")
    (tmp_path / "c" / "models" / "text_encoders" / "t5xxl_fp16.safetensors").unlink()
    with pytest.raises(ModelFileError) as err:
        plan_assembly(chroma)
    message = str(err.value)
    assert message.startswith("model chroma.safetensors (Chroma) needs a T5-XXL text encoder (t5xxl): none in ")
    assert "t5xxl_fp16.safetensors" in message and "\n" not in message

    zimage, _ = comfyui_tree(tmp_path / "z", tiny_zimage, "zimage")
    with pytest.raises(ModelFileError) as err:  # without its tokenizer, a Qwen3 whose vocabulary is not Qwen's
        assemble(zimage)
    message = str(err.value)
    assert message.startswith("text encoder qwen_3_4b.safetensors embeds 259 tokens, fewer than Qwen's 151,669: put its own")
    assert "\n" not in message

    (tmp_path / "z" / "models" / "text_encoders" / "qwen_3_4b.safetensors").unlink()
    with pytest.raises(ModelFileError) as err:
        plan_assembly(zimage)
    message = str(err.value)
    assert message.startswith("model zimage.safetensors (Z-Image) needs a Qwen3 text encoder (qwen3): none in ")
    assert "qwen_3_4b.safetensors" in message and "\n" not in message


def test_a_qwen3_file_alone_reads_prompts_with_the_bundled_tokenizer(tmp_path, tiny_zimage):
    """qwen_3_4b.safetensors as ComfyUI's guide has it, no tokenizer anywhere: lienzo's Qwen tokenizer reads the
    prompt, and its ids reach the encoder (one as wide as Qwen3's vocabulary)."""
    zimage, _ = comfyui_tree(tmp_path, tiny_zimage, "zimage")
    config = tiny_zimage.text_encoder.config.to_dict() | {"vocab_size": 151936}  # Qwen3-4B's embedding rows
    torch.manual_seed(3)
    save_qwen3(Qwen3Model(Qwen3Config(**config)).eval(), tmp_path / "models" / "text_encoders" / "qwen_3_4b.safetensors")
    assembled = assemble(zimage)
    assert len(assembled.tokenizer) == 151669 and assembled.tokenizer("Hello world").input_ids == [9707, 1879]
    seen = []
    assembled.text_encoder.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    assert pixels(assembled).shape == (64, 64, 3)
    assert int(seen[0].max()) >= 151644  # the chat template's <|im_start|>, Qwen's own id


def test_a_folder_is_refused_as_a_text_encoder_of_a_family_without_qwen3(tmp_path, built):
    chroma, folder = comfyui_tree(tmp_path, built["chroma"], "chroma")
    with pytest.raises(ModelFileError, match=r"^--text-encoder tokenizer: a folder, which lienzo reads only for"):
        plan_assembly(chroma, text_encoders=[folder / "tokenizer"])


def write_qwen3_gguf(path, encoder: Qwen3Model, quant):
    """A Qwen3 as llama.cpp's converter writes it: gguf's own tensor names, Qwen3's config as metadata."""
    config = encoder.config
    writer = gguf.GGUFWriter(str(path), arch="qwen3")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, config.num_hidden_layers)
    for key, tensor in encoder.state_dict().items():
        name = names.get_name("model." + key, try_suffixes=(".weight",))
        kind, array = gguf_type(tensor, quant), tensor.numpy()
        if kind == quant:
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array.astype(np.float16 if kind == GGMLQuantizationType.F16 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_qwen3_gguf_files_load_and_match(tmp_path, tiny_zimage):
    original = tiny_zimage.text_encoder
    reference = rounded(original, "gguf-q8_0")
    path = write_qwen3_gguf(tmp_path / "Qwen3-4B-Q8_0.gguf", original, GGMLQuantizationType.Q8_0)
    assert text_encoder_kind({key: shape for key, (shape, _) in read_gguf_header(path).items()}) == "qwen3"
    encoder = load_text_encoder_file(path, "qwen3")
    # diffusers expands the blocks in fp16 (see GGUF_DECODE); bf16-level bound against the unrounded model.
    assert relative_diff(qwen_output(encoder), qwen_output(reference)) <= GGUF_DECODE
    assert relative_diff(qwen_output(encoder), qwen_output(original)) <= 0.02


def test_a_zimage_finds_a_qwen3_gguf_in_text_encoders(tmp_path, tiny_zimage):
    transformer, folder = comfyui_tree(tmp_path, tiny_zimage, "zimage")
    text_encoders = tmp_path / "models" / "text_encoders"
    (text_encoders / "qwen_3_4b.safetensors").unlink()
    gguf_file = write_qwen3_gguf(text_encoders / "Qwen3-4B-Q8_0.gguf", tiny_zimage.text_encoder, GGMLQuantizationType.Q8_0)
    assembled = assemble(transformer, text_encoders=[folder / "tokenizer"])
    assert assembled.text_encoder_files == {"text_encoder": gguf_file.name}
    assert pixels(assembled).shape == (64, 64, 3)


def test_the_registry_and_the_loader_know_the_files(tmp_path, built, tiny_zimage):
    from lienzo.models.loading import load_components
    from lienzo.models.registry import examine

    chroma, _ = comfyui_tree(tmp_path / "c", built["chroma"], "chroma")
    zimage, folder = comfyui_tree(tmp_path / "z", tiny_zimage, "zimage")
    assert examine(chroma) == ("Chroma", "fp32") and examine(zimage) == ("Z-Image", "fp32")
    assert examine(tmp_path / "z" / "models" / "text_encoders" / "qwen_3_4b.safetensors") == ("text encoder (Qwen3)", "fp32")
    assert load_components(chroma).family == "chroma"
    assert load_components(zimage, text_encoders=[folder / "tokenizer"]).family == "zimage"
