"""LyCORIS files (LoHa, LoKr, (IA)³, full diffs, LoCon in CP form) on the tiny SD 1.x, 2.x and XL models, beside LoRAs.

Each test writes a file in kohya naming with random factors, applies it through ``apply_loras`` and checks the
changed modules against the original weight plus ``weight * delta``, the delta worked by hand from the file with
LyCORIS's formulas (written out again here, independently of peft's), then that it comes off exactly.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lienzo.errors import ModelFileError
from lienzo.generation import engine
from lienzo.generation.lora_tags import extract_lora_tags
from lienzo.generation.request import build_request
from lienzo.images.metadata import parse_infotext
from lienzo.models.lora import apply_loras
from lienzo.models.lycoris import LycorisDeltaLayer
from lienzo.models.registry import lora_hash
from tiny_models import build_tiny

BLOCK = "down_blocks.1.attentions.0.transformer_blocks.0"
# kohya name -> (part, diffusers module): a Linear, a 3x3 Conv2d, a text-encoder Linear (SD 1.x)
LINEAR = ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "unet", f"{BLOCK}.attn1.to_q")
CONV = ("lora_unet_down_blocks_0_resnets_0_conv1", "unet", "down_blocks.0.resnets.0.conv1")
TEXT = ("lora_te_text_model_encoder_layers_0_self_attn_v_proj", "text_encoder", "encoder.layers.0.self_attn.v_proj")
# SDXL as kohya writes it: sgm block names for the U-Net (input_blocks.1.0 is the first resnet, .1 its attention).
SDXL = [
    ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_k", "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"),
    ("lora_unet_input_blocks_1_0_in_layers_2", "unet", "down_blocks.0.resnets.0.conv1"),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "text_encoder", "encoder.layers.0.mlp.fc1"),
    ("lora_te2_text_model_encoder_layers_1_self_attn_q_proj", "text_encoder_2", "text_model.encoder.layers.1.self_attn.q_proj"),
]
# SD 2.x: diffusers' names, as for SD 1.x; its attention sits in the first down block, with linear projections.
SD2 = [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "unet", "down_blocks.0.attentions.0.proj_in"),
    ("lora_unet_down_blocks_0_resnets_0_conv2", "unet", "down_blocks.0.resnets.0.conv2"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc2", "text_encoder", "encoder.layers.0.mlp.fc2"),
]


def _randn(g, *shape):
    return torch.randn(*shape, generator=g) * 0.3


def _loha(g, weight: torch.Tensor, cp: bool = False) -> tuple[dict, torch.Tensor]:
    """LoHa factors of rank 4, alpha 2, and their delta: (w1_a w1_b) ⊙ (w2_a w2_b) * alpha / rank."""
    out, rest = weight.shape[0], weight[0].numel()
    rank, alpha = 4, 2.0
    if cp:  # LyCORIS's CP form of a conv: a core per product, w*_a on the output channels, w*_b on the input
        t = {f"hada_t{i}": _randn(g, rank, rank, *weight.shape[2:]) for i in (1, 2)}
        w = {f"hada_w{i}_{s}": _randn(g, rank, out if s == "a" else weight.shape[1]) for i in (1, 2) for s in "ab"}
        # product[p, q] = sum over i, j of w_a[i, p] core[i, j] w_b[j, q], at each kernel position
        products = [(w[f"hada_w{i}_a"].T @ t[f"hada_t{i}"].permute(2, 3, 0, 1) @ w[f"hada_w{i}_b"]).permute(2, 3, 0, 1) for i in (1, 2)]
        factors = {**t, **w}
    else:
        factors = {"hada_w1_a": _randn(g, out, rank), "hada_w1_b": _randn(g, rank, rest),
                   "hada_w2_a": _randn(g, out, rank), "hada_w2_b": _randn(g, rank, rest)}
        products = [factors[f"hada_w{i}_a"] @ factors[f"hada_w{i}_b"] for i in (1, 2)]
    delta = (products[0] * products[1]).reshape(weight.shape) * alpha / rank
    return {**factors, "alpha": torch.tensor(alpha)}, delta


def _lokr(g, weight: torch.Tensor, form: str) -> tuple[dict, torch.Tensor]:
    """LoKr factors and their delta kron(w1, w2) * scale. The split (w1 2 x 4, unbalanced) is not the one peft's
    config would choose. ``whole-w1``: w1 whole, w2 = w2_a w2_b of rank 3 (scale alpha / 3); ``factorised``: both
    products, w2's rank 3 setting the scale; ``whole``: both whole, so the alpha is not applied; ``cp``: w1 whole, a
    conv's w2 in CP form."""
    out, inp, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    a, c = 2, 4
    b, d = out // a, inp // c
    alpha, rank = 1.5, 3
    factors = {"alpha": torch.tensor(alpha)}
    if form == "factorised":
        factors |= {"lokr_w1_a": _randn(g, a, 2), "lokr_w1_b": _randn(g, 2, c)}
        w1 = factors["lokr_w1_a"] @ factors["lokr_w1_b"]
    else:
        w1 = factors["lokr_w1"] = _randn(g, a, c)
    if form == "whole":
        w2 = factors["lokr_w2"] = _randn(g, b, d, *kernel)
        scale = 1.0
    elif form == "cp":  # a conv's w2 as a k x k core between w2_a (output channels) and w2_b (input channels)
        factors |= {"lokr_t2": _randn(g, rank, rank, *kernel), "lokr_w2_a": _randn(g, rank, b), "lokr_w2_b": _randn(g, rank, d)}
        core = factors["lokr_t2"].permute(2, 3, 0, 1)  # k, k, rank, rank
        w2 = (factors["lokr_w2_a"].T @ core @ factors["lokr_w2_b"]).permute(2, 3, 0, 1).contiguous()
        scale = alpha / rank
    else:
        factors |= {"lokr_w2_a": _randn(g, b, rank), "lokr_w2_b": _randn(g, rank, d * kernel.numel())}
        w2 = (factors["lokr_w2_a"] @ factors["lokr_w2_b"]).reshape(b, d, *kernel)
        scale = alpha / rank
    delta = torch.kron(w1.reshape(a, c, *[1] * len(kernel)), w2) * scale
    return factors, delta.reshape(weight.shape)


def _ia3(g, weight: torch.Tensor, on_input: bool) -> tuple[dict, torch.Tensor]:
    """An (IA)³ vector and its delta: the weight scaled per output channel (per input channel ``on_input``)."""
    axis = 1 if on_input else 0
    vector = _randn(g, weight.shape[axis])
    shape = [1] * weight.dim()
    shape[axis] = -1
    stored = vector.reshape(1, -1, *[1] * (weight.dim() - 2)) if weight.dim() == 4 else vector  # LyCORIS's shapes
    return {"weight": stored, "on_input": torch.tensor(int(on_input))}, weight * vector.reshape(shape)


KINDS = {
    "loha": lambda g, w: _loha(g, w),
    "loha-cp": lambda g, w: _loha(g, w, cp=w.dim() == 4),
    "lokr-whole-w1": lambda g, w: _lokr(g, w, "whole-w1"),
    "lokr-factorised": lambda g, w: _lokr(g, w, "factorised"),
    "lokr-whole": lambda g, w: _lokr(g, w, "whole"),
    "lokr-cp": lambda g, w: _lokr(g, w, "cp" if w.dim() == 4 else "whole-w1"),
    "ia3": lambda g, w: _ia3(g, w, on_input=False),
    "ia3-on-input": lambda g, w: _ia3(g, w, on_input=True),
}


def _write(path, components, layers, kind, seed=0) -> dict[tuple[str, str], torch.Tensor]:
    """A LyCORIS file of ``kind`` for ``layers``; returns each changed module's delta at weight 1."""
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for name, part, module in layers:
        factors, delta = KINDS[kind](g, getattr(components, part).get_submodule(module).weight.detach())
        tensors |= {f"{name}.{k}": v.contiguous() for k, v in factors.items()}
        deltas[(part, module)] = delta
    save_file(tensors, path)
    return deltas


def _call(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    if weight.dim() == 4:
        return F.conv2d(x, weight, bias, padding=1)
    return F.linear(x, weight, bias)


def _probes(components, keys) -> dict:
    """For each module: an input and copies of its weight and bias before any file is applied."""
    g = torch.Generator().manual_seed(3)
    probes = {}
    for part, name in keys:
        module = getattr(components, part).get_submodule(name)
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module  # a file applied before
        shape = (2, module.in_channels, 6, 6) if isinstance(module, torch.nn.Conv2d) else (3, module.in_features)
        x = torch.randn(*shape, generator=g)
        bias = None if module.bias is None else module.bias.detach().clone()
        probes[(part, name)] = x, module.weight.detach().clone(), bias
    return probes


def _out(components, key, x) -> torch.Tensor:
    with torch.no_grad():
        return getattr(components, key[0]).get_submodule(key[1])(x)


def adds_weight_times_delta_and_comes_off(components, path, deltas) -> None:
    """At weights 1 and 0.5 each module computes with W + weight * delta (its bias unchanged), the change at 0.5 is
    half the change at 1, and once a request asks for no LoRA each computes exactly what it did before."""
    probes = _probes(components, deltas)
    original = {key: _out(components, key, x) for key, (x, _, _) in probes.items()}
    changes = {}
    for weight in (1.0, 0.5):
        apply_loras(components, [(path, "style", weight)])
        for key, delta in deltas.items():
            x, base, bias = probes[key]
            got = _out(components, key, x)
            by_hand = _call(x, base + weight * delta, bias)
            torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5, msg=lambda m: f"{key} at {weight}: {m}")
            changes[(key, weight)] = got - original[key]
    for key in deltas:
        assert changes[(key, 1.0)].abs().max() > 1e-3
        torch.testing.assert_close(changes[(key, 0.5)], changes[(key, 1.0)] / 2, atol=1e-6, rtol=1e-5)
    apply_loras(components, [])
    for key, (x, _, _) in probes.items():
        assert torch.equal(_out(components, key, x), original[key]), key


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_adds_weight_times_its_delta_on_linear_conv_and_text_encoder_and_comes_off(tmp_path, kind):
    components = build_tiny("sd1")
    path = tmp_path / f"{kind}.safetensors"
    deltas = _write(path, components, [LINEAR, CONV, TEXT], kind)
    adds_weight_times_delta_and_comes_off(components, path, deltas)
    (entry,) = components.loras.adapters.values()
    assert entry.parts == ("unet", "text_encoder")


@pytest.mark.parametrize(("family", "layers", "kind"), [
    ("sdxl", SDXL, "loha"), ("sdxl", SDXL, "lokr-factorised"), ("sdxl", SDXL, "ia3"), ("sd2", SD2, "loha-cp"),
])
def test_sdxl_sgm_names_and_sd2_names_land_on_the_right_modules(tmp_path, family, layers, kind):
    components = build_tiny(family)
    path = tmp_path / f"{family}.safetensors"
    deltas = _write(path, components, layers, kind)
    adds_weight_times_delta_and_comes_off(components, path, deltas)
    (entry,) = components.loras.adapters.values()
    assert entry.parts == tuple(dict.fromkeys(part for _, part, _ in layers))


def test_a_file_mixing_lora_and_loha_layers_loads_both_under_one_adapter(tmp_path):
    components = build_tiny("sd1")
    path = tmp_path / "mixed.safetensors"
    g = torch.Generator().manual_seed(5)
    loha, loha_delta = _loha(g, components.unet.get_submodule(LINEAR[2]).weight.detach())
    lora_module = f"{BLOCK}.attn1.to_k"
    down, up = _randn(g, 4, 64), _randn(g, 64, 4)
    # A kohya LoCon layer on a conv too: lora_down a 3x3 conv, lora_up a 1x1 one (diffusers reads these).
    conv = components.unet.get_submodule(CONV[2])
    conv_down, conv_up = _randn(g, 2, conv.in_channels, 3, 3), _randn(g, conv.out_channels, 2, 1, 1)
    tensors = {
        **{f"{LINEAR[0]}.{k}": v for k, v in loha.items()},
        f"{LINEAR[0].replace('to_q', 'to_k')}.lora_down.weight": down,
        f"{LINEAR[0].replace('to_q', 'to_k')}.lora_up.weight": up,
        f"{LINEAR[0].replace('to_q', 'to_k')}.alpha": torch.tensor(2.0),
        f"{CONV[0]}.lora_down.weight": conv_down,
        f"{CONV[0]}.lora_up.weight": conv_up,
    }
    save_file(tensors, path)
    deltas = {
        ("unet", LINEAR[2]): loha_delta,
        ("unet", lora_module): 2.0 / 4 * up @ down,
        ("unet", CONV[2]): (conv_up.flatten(1) @ conv_down.flatten(1)).reshape(conv.weight.shape),
    }
    adds_weight_times_delta_and_comes_off(components, path, deltas)
    assert set(components.unet.peft_config) == {"lora_0"}


def test_two_lycoris_files_add_up_and_switch_per_request(tmp_path):
    components = build_tiny("sd1")
    loha_path, ia3_path = tmp_path / "loha.safetensors", tmp_path / "ia3.safetensors"
    loha = _write(loha_path, components, [LINEAR, CONV], "loha", seed=1)
    ia3 = _write(ia3_path, components, [LINEAR, CONV], "ia3", seed=2)
    probes = _probes(components, loha)
    original = {key: _out(components, key, x) for key, (x, _, _) in probes.items()}

    apply_loras(components, [(loha_path, "loha", 0.5), (ia3_path, "ia3", 1.0)])
    for key, (x, base, bias) in probes.items():
        torch.testing.assert_close(_out(components, key, x), _call(x, base + 0.5 * loha[key] + ia3[key], bias), atol=1e-5, rtol=1e-5)
    apply_loras(components, [(ia3_path, "ia3", 0.25)])
    for key, (x, base, bias) in probes.items():
        torch.testing.assert_close(_out(components, key, x), _call(x, base + 0.25 * ia3[key], bias), atol=1e-5, rtol=1e-5)
    apply_loras(components, [(loha_path, "loha", 0.0)])
    for key, (x, _, _) in probes.items():
        assert torch.equal(_out(components, key, x), original[key])


def test_full_diff_layers_add_weight_times_diff_and_diff_b_and_come_off(tmp_path):
    components = build_tiny("sd1")
    path = tmp_path / "full.safetensors"
    g = torch.Generator().manual_seed(4)
    conv, linear = (components.unet.get_submodule(m) for m in (CONV[2], LINEAR[2]))
    diffs = {CONV: (_randn(g, *conv.weight.shape), _randn(g, conv.out_channels)), LINEAR: (_randn(g, *linear.weight.shape), None)}
    tensors = {f"{name}.diff": diff for (name, _, _), (diff, _) in diffs.items()}
    save_file({**tensors, f"{CONV[0]}.diff_b": diffs[CONV][1]}, path)
    probes = _probes(components, [(part, module) for _, part, module in diffs])
    original = {key: _out(components, key, x) for key, (x, _, _) in probes.items()}

    apply_loras(components, [(path, "full", 0.7)])
    for (_, part, module), (diff, diff_b) in diffs.items():
        x, base, bias = probes[(part, module)]
        expected_bias = None if bias is None else bias + 0.7 * diff_b
        torch.testing.assert_close(_out(components, (part, module), x), _call(x, base + 0.7 * diff, expected_bias), atol=1e-5, rtol=1e-5)
    apply_loras(components, [])
    for key, (x, _, _) in probes.items():
        assert torch.equal(_out(components, key, x), original[key])


def test_locon_in_cp_form_adds_its_three_convolutions_in_sequence(tmp_path):
    components = build_tiny("sd1")
    path = tmp_path / "locon.safetensors"
    g = torch.Generator().manual_seed(6)
    conv = components.unet.get_submodule(CONV[2])
    down, mid, up = _randn(g, 4, conv.in_channels, 1, 1), _randn(g, 4, 4, 3, 3), _randn(g, conv.out_channels, 4, 1, 1)
    save_file({f"{CONV[0]}.lora_down.weight": down, f"{CONV[0]}.lora_mid.weight": mid, f"{CONV[0]}.lora_up.weight": up,
               f"{CONV[0]}.alpha": torch.tensor(2.0)}, path)
    x = torch.randn(2, conv.in_channels, 6, 6, generator=g)
    original = _out(components, ("unet", CONV[2]), x)
    # LyCORIS's own forward: down, then the core (the module's padding), then up.
    sequence = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)

    apply_loras(components, [(path, "locon", 0.5)])
    torch.testing.assert_close(_out(components, ("unet", CONV[2]), x), original + 0.5 * 2.0 / 4 * sequence, atol=1e-5, rtol=1e-5)
    apply_loras(components, [])
    assert torch.equal(_out(components, ("unet", CONV[2]), x), original)


def test_a_file_changed_on_disk_replaces_its_lycoris_layers(tmp_path):
    components = build_tiny("sd1")
    path = tmp_path / "style.safetensors"
    _write(path, components, [LINEAR, CONV], "ia3", seed=1)
    apply_loras(components, [(path, "style", 1.0)])
    apply_loras(components, [])
    deltas = _write(path, components, [LINEAR, CONV], "lokr-whole-w1", seed=2)
    adds_weight_times_delta_and_comes_off(components, path, deltas)
    # The (IA)³ layers of the first version are gone, not only switched off; the name is free again.
    assert set(components.unet.peft_config) == {"lora_0"}
    assert all(not m.lycoris_tensors for m in components.unet.modules() if isinstance(m, LycorisDeltaLayer))


@pytest.mark.parametrize(("tensor", "kind"), [("oft_blocks", "OFT"), ("hada_w1_a", "unknown LyCORIS")])
def test_a_layer_of_a_kind_lienzo_cannot_apply_is_refused_naming_file_and_kind(tmp_path, tensor, kind):
    components = build_tiny("sd1")
    path = tmp_path / "odd.safetensors"
    extra = {"oft_blocks": torch.zeros(4, 16, 16), "hada_w1_a": torch.zeros(64, 4), "lokr_w1": torch.zeros(2, 2)}
    tensors = {f"{LINEAR[0]}.{tensor}": extra[tensor], f"{TEXT[0]}.lora_down.weight": torch.zeros(4, 64), f"{TEXT[0]}.lora_up.weight": torch.zeros(64, 4)}
    if tensor == "hada_w1_a":  # LoHa and LoKr tensors in one layer: no kind
        tensors[f"{LINEAR[0]}.lokr_w1"] = extra["lokr_w1"]
    save_file(tensors, path)
    with pytest.raises(ModelFileError, match=rf"odd.safetensors holds {kind}.*{LINEAR[0]}"):
        apply_loras(components, [(path, "odd", 1.0)])
    assert not getattr(components.unet, "peft_config", {}) and not components.loras.adapters


def test_a_layer_missing_factors_or_not_fitting_its_module_is_refused_and_nothing_stays(tmp_path):
    components = build_tiny("sd1")
    g = torch.Generator().manual_seed(0)
    save_file({f"{LINEAR[0]}.hada_w1_a": _randn(g, 64, 4)}, tmp_path / "half.safetensors")
    with pytest.raises(ModelFileError, match=r"half.safetensors: its LoHa layer .* lacks hada_w1_a\+hada_w1_b\+hada_w2_a\+hada_w2_b"):
        apply_loras(components, [(tmp_path / "half.safetensors", "half", 1.0)])
    # LoKr factors for a 64x64 layer put on a 3x3 conv of 32 channels, beside a LoRA layer that fits.
    factors, _ = _lokr(g, torch.zeros(64, 64), "whole-w1")
    tensors = {f"{CONV[0]}.{k}": v for k, v in factors.items()}
    tensors |= {f"{TEXT[0]}.lora_down.weight": _randn(g, 4, 64), f"{TEXT[0]}.lora_up.weight": _randn(g, 64, 4)}
    save_file(tensors, tmp_path / "wrong.safetensors")
    original = _out(components, ("text_encoder", TEXT[2]), torch.ones(1, 64))
    with pytest.raises(ModelFileError, match=rf"wrong.safetensors: its LoKr layer {CONV[0]} does not fit {CONV[2]}"):
        apply_loras(components, [(tmp_path / "wrong.safetensors", "wrong", 1.0)])
    assert not getattr(components.unet, "peft_config", {}) and not getattr(components.text_encoder, "peft_config", {})
    assert torch.equal(_out(components, ("text_encoder", TEXT[2]), torch.ones(1, 64)), original)


def test_generation_with_a_lyco_tag_changes_records_the_hash_and_without_it_is_identical(tmp_path):
    components = build_tiny("sd1")
    path = tmp_path / "style.safetensors"
    _write(path, components, [LINEAR, CONV, TEXT], "lokr-factorised")

    def generate(prompt):
        request = build_request(prompt=prompt, steps=2, width=64, height=64, seed=7, sampler="Euler")
        return engine.generate(components, request).images[0]

    original = generate("a fox").pixels
    apply_loras(components, [(path, "style", 0.8)])  # what studio.prepare_loras does for the tag
    tagged = generate("a fox <lyco:style:0.8>")
    assert np.abs(tagged.pixels - original).max() > 1e-3
    assert parse_infotext(tagged.infotext).params["Lora hashes"] == f"style: {lora_hash(path)[:12]}"
    apply_loras(components, [])
    assert np.array_equal(generate("a fox").pixels, original)


def test_lyco_prompt_tags_read_as_lora_tags():
    prompt, loras = extract_lora_tags("a fox <lyco:paint:0.6>, <lora:ink>")
    assert prompt == "a fox , " and loras == [("paint", 0.6), ("ink", 1.0)]
