"""LoRAs on the transformer families (SD 3.x, Flux.1), in the formats people download.

Each test writes a small LoRA for the tiny model (tests/tiny_models.py) in one format's names, applies it
through lienzo's ``apply_loras`` and checks the changed layers against the LoRA's matrices worked by hand
(W + weight * alpha / rank * B @ A, a fused qkv's B split by rows), so the converter's renaming, splitting
and alpha scaling are all checked, not only that something changed.
"""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from lienzo.cli import app
from lienzo.errors import ModelFileError
from lienzo.generation import engine
from lienzo.generation.lora_tags import extract_lora_tags
from lienzo.generation.request import GenerationRequest
from lienzo.images.metadata import parse_infotext, read_parameters
from lienzo.models.lora import ActiveLora, apply_loras
from lienzo.models.registry import lora_hash
from tiny_models import build_tiny, save_diffusers_folder


@dataclass(frozen=True)
class Layer:
    """One LoRA module of a file: its name there, the part of the model it changes, the diffusers modules
    it becomes (a fused qkv becomes three, its up matrix split by rows), its rank and alpha (None: none)."""

    name: str
    part: str
    targets: tuple[str, ...]
    rank: int
    alpha: float | None = None


# The down / up matrix names of each naming scheme.
SUFFIXES = {
    "kohya": ("lora_down.weight", "lora_up.weight"),
    "peft": ("lora_A.weight", "lora_B.weight"),
    "xlabs": ("down.weight", "up.weight"),
}


def _qkv(prefix: str, names=("to_q", "to_k", "to_v")) -> tuple[str, ...]:
    return tuple(f"{prefix}.{n}" for n in names)


DOUBLE = "transformer_blocks.0"
# The module names files use for CLIP-L; transformers 5's CLIPTextModel (Flux's) holds the encoder at its
# top level, CLIPTextModelWithProjection (SD 3's) under text_model.
CLIP_Q = "text_model.encoder.layers.0.self_attn.q_proj"
FLUX_CLIP_Q = CLIP_Q.removeprefix("text_model.")
FORMATS = {
    # kohya sd-scripts: underscores, lora_down/lora_up, an alpha per module; lora_te1_ is CLIP-L.
    "flux-kohya": ("flux", "kohya", [
        Layer("lora_unet_double_blocks_0_img_attn_qkv", "transformer", _qkv(f"{DOUBLE}.attn"), 4, 2.0),
        Layer("lora_unet_double_blocks_0_txt_mlp_0", "transformer", (f"{DOUBLE}.ff_context.net.0.proj",), 2, 8.0),
        Layer("lora_unet_single_blocks_1_linear2", "transformer", ("single_transformer_blocks.1.proj_out",), 4, 4.0),
        Layer("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder", (FLUX_CLIP_Q,), 4, 1.0),
    ]),
    # ComfyUI / BFL: the original checkpoint's module names under diffusion_model., peft's matrix names.
    "flux-comfyui": ("flux", "peft", [
        Layer("diffusion_model.double_blocks.0.img_attn.proj", "transformer", (f"{DOUBLE}.attn.to_out.0",), 4),
        Layer("diffusion_model.double_blocks.0.txt_attn.qkv", "transformer",
              _qkv(f"{DOUBLE}.attn", ("add_q_proj", "add_k_proj", "add_v_proj")), 2, 1.0),
        Layer("diffusion_model.single_blocks.0.linear2", "transformer", ("single_transformer_blocks.0.proj_out",), 4),
        Layer("text_encoders.clip_l.transformer.text_model.encoder.layers.1.self_attn.v_proj", "text_encoder",
              ("encoder.layers.1.self_attn.v_proj",), 2),
    ]),
    # XLabs: attention processors' LoRAs, lora1 on the image stream, lora2 on the text stream; no alpha.
    "flux-xlabs": ("flux", "xlabs", [
        Layer("double_blocks.0.processor.qkv_lora1", "transformer", _qkv(f"{DOUBLE}.attn"), 4),
        Layer("double_blocks.0.processor.proj_lora2", "transformer", (f"{DOUBLE}.attn.to_add_out",), 2),
    ]),
    # diffusers/peft: the diffusers modules' own names under the part's name; a peft-style alpha on one.
    "flux-diffusers": ("flux", "peft", [
        Layer(f"transformer.{DOUBLE}.attn.to_k", "transformer", (f"{DOUBLE}.attn.to_k",), 4),
        Layer("transformer.single_transformer_blocks.0.proj_mlp", "transformer", ("single_transformer_blocks.0.proj_mlp",), 2, 4.0),
        Layer("text_encoder.text_model.encoder.layers.0.self_attn.out_proj", "text_encoder",
              ("encoder.layers.0.self_attn.out_proj",), 4),
    ]),
    "sd3-diffusers": ("sd3", "peft", [
        Layer(f"transformer.{DOUBLE}.attn.to_q", "transformer", (f"{DOUBLE}.attn.to_q",), 4),
        Layer(f"transformer.{DOUBLE}.attn2.to_v", "transformer", (f"{DOUBLE}.attn2.to_v",), 2),  # SD 3.5's dual attention
        Layer("transformer.transformer_blocks.1.ff.net.2", "transformer", ("transformer_blocks.1.ff.net.2",), 4, 2.0),
        Layer(f"text_encoder.{CLIP_Q}", "text_encoder", (CLIP_Q,), 4),
        Layer("text_encoder_2.text_model.encoder.layers.1.mlp.fc1", "text_encoder_2",
              ("text_model.encoder.layers.1.mlp.fc1",), 2),
    ]),
}
# A Flux.1 and an SD 1.x LoRA by their kohya names, for the refusals.
FLUX_KOHYA = FORMATS["flux-kohya"][2]
SD1_NAMES = [
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
]


def _write(path, components, layers, naming, seed=0) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """A LoRA file with random matrices for ``layers`` in ``naming``'s names; returns, for each diffusers
    module it changes, (A, the rows of B that module gets, alpha / rank)."""
    g = torch.Generator().manual_seed(seed)
    down_name, up_name = SUFFIXES[naming]
    tensors, expected = {}, {}
    for layer in layers:
        modules = [getattr(components, layer.part).get_submodule(t) for t in layer.targets]
        outs = [m.out_features for m in modules]
        down = torch.randn(layer.rank, modules[0].in_features, generator=g) * 0.3
        up = torch.randn(sum(outs), layer.rank, generator=g) * 0.3
        tensors[f"{layer.name}.{down_name}"], tensors[f"{layer.name}.{up_name}"] = down, up
        if layer.alpha is not None:
            tensors[f"{layer.name}.alpha"] = torch.tensor(layer.alpha)
        scale = (layer.rank if layer.alpha is None else layer.alpha) / layer.rank
        for target, rows in zip(layer.targets, up.split(outs)):
            expected[(layer.part, target)] = (down, rows, scale)
    save_file(tensors, path)
    return expected


def _outputs(components) -> torch.Tensor:
    """The network's prediction for fixed inputs and every CLIP encoder's hidden states, as one vector."""
    g = torch.Generator().manual_seed(11)
    network = components.transformer
    if components.family == "flux":
        side = 4  # packed latents: one token per 2x2 patch
        ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
        inputs = dict(
            hidden_states=torch.randn(1, side * side, network.config.in_channels, generator=g),
            encoder_hidden_states=torch.randn(1, 8, network.config.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(1, network.config.pooled_projection_dim, generator=g),
            timestep=torch.tensor([0.6]), img_ids=torch.cat([torch.zeros(side * side, 1), ids.float()], 1),
            txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]) if network.config.guidance_embeds else None,
        )
    else:
        inputs = dict(
            hidden_states=torch.randn(1, 16, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(1, 8, network.config.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(1, network.config.pooled_projection_dim, generator=g),
            timestep=torch.tensor([600.0]),
        )
    tokens = torch.randint(0, 49000, (1, 77), generator=g)
    encoders = [components.text_encoder] + ([components.text_encoder_2] if components.family == "sd3" else [])
    with torch.no_grad():
        parts = [network(**inputs).sample] + [encoder(tokens).last_hidden_state for encoder in encoders]
    return torch.cat([p.flatten() for p in parts])


def _probe(components, expected) -> dict:
    """For each changed module: an input, and the module's own weight and bias (copies, before any LoRA)."""
    g = torch.Generator().manual_seed(3)
    probes = {}
    for part, target in expected:
        linear = getattr(components, part).get_submodule(target)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        probes[(part, target)] = (torch.randn(3, linear.in_features, generator=g), linear.weight.detach().clone(), bias)
    return probes


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_adds_weight_times_alpha_over_rank_times_b_a_and_comes_off_exactly(tmp_path, fmt):
    family, naming, layers = FORMATS[fmt]
    components = build_tiny(family)
    path, original = adds_and_comes_off(tmp_path / f"{fmt}.safetensors", components, naming, layers, _outputs)
    apply_loras(components, [(path, "style", 0.0)])
    assert torch.equal(_outputs(components), original)


def adds_and_comes_off(path, components, naming: str, layers, outputs_of) -> tuple:
    """A LoRA of ``layers`` written to ``path`` in ``naming``: each layer gets W + weight * alpha / rank * B A at
    weights 1 and 0.5 (the change halving), the network's ``outputs_of`` change, and taken off they are the
    original's exactly. Returns (path, the original outputs)."""
    expected = _write(path, components, layers, naming)
    probes = _probe(components, expected)
    original = outputs_of(components)

    deltas, outputs = {}, {}
    for weight in (1.0, 0.5):
        apply_loras(components, [(path, "style", weight)])
        outputs[weight] = outputs_of(components)
        for key, (down, up, scale) in expected.items():
            x, base_weight, bias = probes[key]
            with torch.no_grad():
                got = getattr(components, key[0]).get_submodule(key[1])(x)
            # The LoRA applied by hand to this one layer's weights.
            by_hand = torch.nn.functional.linear(x, base_weight + weight * scale * up @ down, bias)
            torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5, msg=lambda m: f"{key} at {weight}: {m}")
            deltas[(key, weight)] = got - torch.nn.functional.linear(x, base_weight, bias)

    (entry,) = components.loras.adapters.values()
    assert set(entry.parts) == {layer.part for layer in layers}
    assert components.loras.active == [ActiveLora("style", 0.5, lora_hash(path)[:12])]
    assert (outputs[1.0] - original).abs().max() > 1e-4
    assert not torch.allclose(outputs[0.5], outputs[1.0])
    for key in expected:
        torch.testing.assert_close(deltas[(key, 0.5)], deltas[(key, 1.0)] / 2, atol=1e-6, rtol=1e-5)

    apply_loras(components, [])
    assert torch.equal(outputs_of(components), original)
    return path, original


def test_several_loras_add_up_and_switching_equals_loading_the_second_alone(tmp_path):
    components = build_tiny("flux")
    kohya, xlabs = tmp_path / "kohya.safetensors", tmp_path / "xlabs.safetensors"
    from_kohya = _write(kohya, components, FLUX_KOHYA, "kohya", seed=1)
    from_xlabs = _write(xlabs, components, FORMATS["flux-xlabs"][2], "xlabs", seed=2)
    original = _outputs(components)
    q = ("transformer", f"{DOUBLE}.attn.to_q")  # both change it
    (x, base_weight, bias), = _probe(components, [q]).values()

    apply_loras(components, [(kohya, "a", 1.0), (xlabs, "b", -0.5)])
    (down_a, up_a, scale_a), (down_b, up_b, _) = from_kohya[q], from_xlabs[q]
    with torch.no_grad():
        got = components.transformer.get_submodule(q[1])(x)
    by_hand = torch.nn.functional.linear(x, base_weight + scale_a * up_a @ down_a - 0.5 * up_b @ down_b, bias)
    torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5)

    apply_loras(components, [(xlabs, "b", 0.7)])
    fresh = build_tiny("flux")
    apply_loras(fresh, [(xlabs, "b", 0.7)])
    assert torch.equal(_outputs(components), _outputs(fresh))
    apply_loras(components, [])
    assert torch.equal(_outputs(components), original)
    assert len(components.loras.adapters) == 2  # both stay loaded, for the next request


def test_flux_t5_layers_are_ignored_with_a_warning(tmp_path, caplog):
    components, reference = build_tiny("flux"), build_tiny("flux")
    t5_q_name = "encoder.block.0.layer.0.SelfAttention.q"
    t5_q = components.text_encoder_2.get_submodule(t5_q_name)
    t5_layer = Layer("lora_te2_encoder_block_0_layer_0_SelfAttention_q", "text_encoder_2", (t5_q_name,), 2, 1.0)
    _write(tmp_path / "with-t5.safetensors", components, [*FLUX_KOHYA, t5_layer], "kohya")
    _write(tmp_path / "without.safetensors", components, FLUX_KOHYA, "kohya")
    x = torch.randn(2, t5_q.in_features)
    with torch.no_grad():
        before = t5_q(x)
    apply_loras(components, [(tmp_path / "with-t5.safetensors", "t5", 1.0)])
    apply_loras(reference, [(tmp_path / "without.safetensors", "plain", 1.0)])
    assert torch.equal(_outputs(components), _outputs(reference))
    with torch.no_grad():
        assert torch.equal(components.text_encoder_2.get_submodule(t5_q_name)(x), before)
    assert "with-t5.safetensors: its 1 T5 layers are ignored" in caplog.text


def assert_tag_remakes(components, path) -> None:
    """``<lora:style:0.8>`` in the prompt writes "Lora hashes" and changes the picture; the tags the infotext
    keeps apply the same LoRA again and remake the same pixels."""

    def generate(prompt):
        request = GenerationRequest(
            prompt=prompt, width=64, height=64, steps=2, seed=7, cfg_scale=1.0, sampler="Euler", schedule="Simple"
        )
        return engine.generate(components, request).images[0]

    apply_loras(components, [(path, "style", 0.8)])  # what studio.prepare_loras does for the tag
    tagged = generate("a watercolor fox <lora:style:0.8>")
    info = parse_infotext(tagged.infotext)
    assert info.params["Lora hashes"] == f"style: {lora_hash(path)[:12]}"
    assert info.prompt == "a watercolor fox <lora:style:0.8>"

    apply_loras(components, [])
    plain = generate("a watercolor fox")
    assert not np.array_equal(plain.pixels, tagged.pixels)
    assert "Lora hashes" not in parse_infotext(plain.infotext).params

    # Remake from the infotext: its tags name the LoRA and weight again.
    assert extract_lora_tags(info.prompt)[1] == [("style", 0.8)]
    apply_loras(components, [(path, name, weight) for name, weight in extract_lora_tags(info.prompt)[1]])
    assert np.array_equal(generate(info.prompt).pixels, tagged.pixels)


@pytest.mark.parametrize(("family", "fmt"), [("flux", "flux-kohya"), ("sd3", "sd3-diffusers")])
def test_prompt_tag_generation_writes_lora_hashes_and_remakes_the_same_pixels(tmp_path, family, fmt):
    components = build_tiny(family)
    path = tmp_path / "style.safetensors"
    _write(path, components, FORMATS[fmt][2], FORMATS[fmt][1])

    assert_tag_remakes(components, path)


def _names_only(path, names, shape=(2, 8)):
    save_file({f"{n}.{s}": torch.zeros(shape) for n in names for s in SUFFIXES["kohya"]}, path)


@pytest.mark.parametrize(
    ("family", "names", "theirs", "ours"),
    [
        ("flux", SD1_NAMES, "SD 1.x, 2.x or XL", "Flux.1"),
        ("sd3", [layer.name for layer in FLUX_KOHYA], "Flux.1", "SD 3.x"),
        ("sd1", ["diffusion_model.double_blocks.0.img_attn.qkv"], "Flux.1", "SD 1.x"),
        ("flux", ["lora_unet_joint_blocks_0_x_block_attn_qkv"], "SD 3.x", "Flux.1"),
    ],
    ids=["sd1-on-flux", "flux-on-sd3", "flux-on-sd1", "sd3-on-flux"],
)
def test_a_lora_for_another_family_is_refused_in_one_line(tmp_path, family, names, theirs, ours):
    refused_in_one_line(tmp_path, family, names, theirs, ours)


def refused_in_one_line(tmp_path, family: str, names: list[str], theirs: str, ours: str) -> None:
    """A LoRA whose layer ``names`` are another family's (``theirs``) is refused on a tiny ``family`` model (``ours``)
    in one line, and nothing of it stays. The families' test files share this check."""
    components = build_tiny(family)
    path = tmp_path / "other.safetensors"
    _names_only(path, names)
    with pytest.raises(ModelFileError) as err:
        apply_loras(components, [(path, "x", 1.0)])
    assert str(err.value) == f"lora: other.safetensors is a LoRA for {theirs}, but this model (tiny-{family}) is {ours}"
    assert not components.loras.adapters and not getattr(components.network, "peft_config", {})


def test_sd3_lora_in_kohya_or_comfyui_naming_is_refused_clearly(tmp_path):
    # diffusers (0.42) has no converter for SD 3.x LoRAs named after SAI's checkpoint; see lienzo.models.lora.
    components = build_tiny("sd3")
    for name in ("lora_unet_joint_blocks_0_x_block_attn_qkv", "diffusion_model.joint_blocks.0.x_block.attn.qkv"):
        path = tmp_path / "sd3-kohya.safetensors"
        _names_only(path, [name])
        with pytest.raises(ModelFileError, match=r"sd3-kohya\.safetensors is an SD 3\.x LoRA in kohya/ComfyUI naming"):
            apply_loras(components, [(path, "x", 1.0)])
    assert not components.loras.adapters


def test_cli_tag_flag_and_remake_on_flux(tmp_path):
    """`lienzo generate` with a tag, with --lora, without, and --from the tagged PNG, on a Flux.1 folder."""
    models = tmp_path / "models"
    components = build_tiny("flux")
    save_diffusers_folder(components, models / "tiny-flux")
    (models / "Lora").mkdir()
    lora = models / "Lora" / "style.safetensors"
    _write(lora, components, FLUX_KOHYA, "kohya")

    def run(*args) -> str:
        base = ["--models-dir", str(models), "--data-dir", str(tmp_path / "data"), "--outputs-dir", str(tmp_path / "out")]
        result = CliRunner().invoke(app, [*base, "generate", *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output + result.stderr
        return next(line for line in result.stdout.splitlines() if line.endswith(".png"))

    fast = ["--steps", "2", "--width", "64", "--height", "64", "--seed", "5"]
    tagged = run("a red apple <lora:style:0.8>", *fast)
    flagged = run("a red apple", "--lora", "style:0.8", *fast)
    plain = run("a red apple", *fast)
    remade = run("--from", tagged)

    pixels = {path: np.asarray(Image.open(path)) for path in (tagged, flagged, plain, remade)}
    assert np.array_equal(pixels[tagged], pixels[flagged]) and np.array_equal(pixels[tagged], pixels[remade])
    assert not np.array_equal(pixels[tagged], pixels[plain])
    info = parse_infotext(read_parameters(tagged))
    assert info.prompt == "a red apple <lora:style:0.8>"
    assert info.params["Lora hashes"] == f"style: {lora_hash(lora)[:12]}"
    assert read_parameters(remade) == read_parameters(tagged)
