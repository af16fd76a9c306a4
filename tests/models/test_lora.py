"""LoRAs: kohya files applied to tiny models exactly, switching, trained adapters saved and read back,
prompt tags, infotext, remaking from a PNG, the CLI and the registry's Lora folder."""

import hashlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from lienzo.cli import app
from lienzo.errors import InvalidRequestError, LienzoError, ModelFileError
from lienzo.generation import engine
from lienzo.generation.lora_tags import extract_lora_tags, lora_tag
from lienzo.generation.infotext import fields_from_image
from lienzo.generation.request import LoraRef, build_request
from lienzo.images.metadata import parse_infotext, read_parameters
from lienzo.models.lora import ActiveLora, apply_loras
from lienzo.models.registry import Registry, lora_hash
from lienzo.models.single_file_save import save_single_file
from lienzo.training.lora import add_lora, save_kohya_lora
from tiny_models import build_tiny

BLOCK = "down_blocks.1.attentions.0.transformer_blocks.0"
# kohya module name -> (part, module path, rank, alpha); ranks and alphas differ on purpose.
SD1_LAYERS = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": ("unet", f"{BLOCK}.attn1.to_q", 4, 2.0),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0": ("unet", f"{BLOCK}.attn2.to_out.0", 2, 8.0),
    **{
        f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj": ("text_encoder", f"encoder.layers.0.self_attn.{p}_proj", 4, 1.0)
        for p in ("q", "k", "v", "out")
    },
}
# SDXL as kohya writes it: sgm block names for the UNet, lora_te1_ / lora_te2_ for the two encoders.
SDXL_LAYERS = {
    "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": (
        "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4, 4.0),
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v": (
        "unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_v", 2, 1.0),
    **{
        f"lora_te1_text_model_encoder_layers_0_self_attn_{p}_proj": ("text_encoder", f"encoder.layers.0.self_attn.{p}_proj", 4, 2.0)
        for p in ("q", "k", "v", "out")
    },
    **{
        f"lora_te2_text_model_encoder_layers_1_self_attn_{p}_proj": (
            "text_encoder_2", f"text_model.encoder.layers.1.self_attn.{p}_proj", 2, 2.0)
        for p in ("q", "k", "v", "out")
    },
}


def _write_kohya(path, components, layers, seed=0) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA with random weights for ``layers``; returns its tensors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (part, module, rank, alpha) in layers.items():
        linear = getattr(components, part).get_submodule(module)
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, linear.in_features, generator=g) * 0.3
        tensors[f"{name}.lora_up.weight"] = torch.randn(linear.out_features, rank, generator=g) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path)
    return tensors


def _request(**fields):
    return build_request(**{"prompt": "a watercolor fox", "steps": 2, "width": 64, "height": 64, "seed": 7, "sampler": "Euler", **fields})


def _pixels(components, **fields) -> np.ndarray:
    return engine.generate(components, _request(**fields)).images[0].pixels


def _unet_out(components) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, components.unet.config.cross_attention_dim, generator=g)
    ids = torch.randint(0, 49000, (1, 77), generator=g)
    with torch.no_grad():
        text = components.text_encoder(ids).last_hidden_state
        return torch.cat([components.unet(latents, 10, encoder_hidden_states=context).sample.flatten(), text.flatten()])


@pytest.mark.parametrize(("family", "layers"), [("sd1", SD1_LAYERS), ("sdxl", SDXL_LAYERS)])
def test_kohya_lora_adds_weight_times_alpha_over_rank_times_up_down(tmp_path, family, layers):
    components = build_tiny(family)
    tensors = _write_kohya(tmp_path / "style.safetensors", components, layers)
    g = torch.Generator().manual_seed(1)
    before = {}
    for name, (part, module, _, _) in layers.items():
        linear = getattr(components, part).get_submodule(module)
        x = torch.randn(3, linear.in_features, generator=g)
        before[name] = x, linear(x).detach()

    active = apply_loras(components, [(tmp_path / "style.safetensors", "style", 0.7)])

    assert active == [ActiveLora("style", 0.7, lora_hash(tmp_path / "style.safetensors")[:12])]
    assert components.loras.active == active
    for name, (part, module, rank, alpha) in layers.items():
        x, base = before[name]
        up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
        with torch.no_grad():
            got = getattr(components, part).get_submodule(module)(x)
        torch.testing.assert_close(got - base, 0.7 * (alpha / rank) * x @ (up @ down).T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("family", "layers"), [("sd1", SD1_LAYERS), ("sdxl", SDXL_LAYERS)])
def test_generation_changes_with_a_lora_and_weight_zero_or_none_is_identical(tmp_path, family, layers):
    components = build_tiny(family)
    path = tmp_path / "style.safetensors"
    _write_kohya(path, components, layers)
    original = _pixels(components)

    apply_loras(components, [(path, "style", 1.0)])
    assert np.abs(_pixels(components, loras=[("style", 1.0)]) - original).max() > 1e-3
    apply_loras(components, [(path, "style", 0.0)])
    assert np.array_equal(_pixels(components, loras=[("style", 0.0)]), original)
    apply_loras(components, [])
    assert np.array_equal(_pixels(components), original)


def test_switching_loras_equals_applying_the_second_alone(tmp_path):
    first = build_tiny("sd1")
    _write_kohya(tmp_path / "a.safetensors", first, SD1_LAYERS, seed=1)
    _write_kohya(tmp_path / "b.safetensors", first, SD1_LAYERS, seed=2)
    original = _unet_out(first)
    apply_loras(first, [(tmp_path / "a.safetensors", "a", 1.0)])
    with_a = _unet_out(first)
    apply_loras(first, [(tmp_path / "b.safetensors", "b", 0.5)])

    second = build_tiny("sd1")
    apply_loras(second, [(tmp_path / "b.safetensors", "b", 0.5)])
    assert torch.equal(_unet_out(first), _unet_out(second))
    assert not torch.allclose(with_a, _unet_out(second))
    apply_loras(first, [])
    assert torch.equal(_unet_out(first), original)


def test_a_file_changed_on_disk_is_read_again(tmp_path):
    components, fresh = build_tiny("sd1"), build_tiny("sd1")
    path = tmp_path / "style.safetensors"
    _write_kohya(path, components, SD1_LAYERS, seed=1)
    apply_loras(components, [(path, "style", 1.0)])
    _write_kohya(path, components, SD1_LAYERS, seed=2)
    apply_loras(components, [(path, "style", 1.0)])
    apply_loras(fresh, [(path, "style", 1.0)])
    assert torch.equal(_unet_out(components), _unet_out(fresh))
    assert len(components.loras.adapters) == 1 and set(components.unet.peft_config) == {"lora_0"}


def test_files_that_are_not_loras_for_this_model_are_refused(tmp_path):
    components = build_tiny("sd1")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4)}, tmp_path / "checkpoint.safetensors")
    with pytest.raises(ModelFileError, match=r"checkpoint.safetensors is not a LoRA"):
        apply_loras(components, [(tmp_path / "checkpoint.safetensors", "checkpoint", 1.0)])

    sd2 = build_tiny("sd2")  # attention sits in down_blocks.0 there, so the SD 1.x layers do not exist
    _write_kohya(tmp_path / "sd1-only.safetensors", components, {k: v for k, v in SD1_LAYERS.items() if v[0] == "unet"})
    with pytest.raises(ModelFileError, match=r"sd1-only.safetensors .*another model family"):
        apply_loras(sd2, [(tmp_path / "sd1-only.safetensors", "sd1-only", 1.0)])
    assert not getattr(sd2.unet, "peft_config", {})
    assert np.isfinite(_pixels(sd2)).all()


def test_trained_lora_round_trips_through_a_kohya_file(tmp_path):
    trained = build_tiny("sd1")
    parameters = add_lora(trained.unet, rank=4, alpha=3.0, text_encoder=trained.text_encoder)
    assert parameters and all(p.requires_grad for p in parameters)
    assert all("lora_" in n for n, p in [*trained.unet.named_parameters(), *trained.text_encoder.named_parameters()] if p.requires_grad)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in parameters:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    expected = _unet_out(trained)
    path = save_kohya_lora(tmp_path / "out" / "mine.safetensors", trained.unet, trained.text_encoder, family="sd1", metadata={"ss_epoch": 3})

    with safe_open(path, "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        alpha = f.get_tensor(f"lora_unet_{BLOCK.replace('.', '_')}_attn1_to_q.alpha")
    assert f"lora_unet_{BLOCK.replace('.', '_')}_attn1_to_out_0.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert all(k.startswith(("lora_unet_", "lora_te_")) and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert alpha.item() == 3.0 and metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "3"
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_epoch"] == "3" and not list(path.parent.glob("*.tmp"))

    # diffusers' reader (what A1111-compatible loaders follow) sees UNet and text-encoder layers and the alpha.
    state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
    assert any(k.startswith("unet.") for k in state_dict) and any(k.startswith("text_encoder.") for k in state_dict)
    assert set(alphas.values()) == {3.0}

    fresh = build_tiny("sd1")
    apply_loras(fresh, [(path, "mine", 1.0)])
    torch.testing.assert_close(_unet_out(fresh), expected, atol=1e-5, rtol=1e-5)


def test_save_refuses_an_alpha_the_adapter_was_not_trained_with(tmp_path):
    components = build_tiny("sd1")
    add_lora(components.unet, rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="alpha is 4.0 but the adapter was made with alpha 2.0"):
        save_kohya_lora(tmp_path / "x.safetensors", components.unet, family="sd1", alpha=4.0)


def test_prompt_tags():
    clean, loras = extract_lora_tags("a <lora:film-grain:0.5> cat <lora:Style v2>, <lora:c:0.8:0.2> <lora a>")
    assert clean == "a  cat ,  <lora a>"
    assert loras == [("film-grain", 0.5), ("Style v2", 1.0), ("c", 0.8)]
    assert extract_lora_tags("<lora:a:1> <lora:a:-0.5>")[1] == [("a", -0.5)]
    for bad, message in [("<lora::1>", "names no LoRA"), ("<lora:a:heavy>", "must be a number"), ("<lora:a:11>", "between -10 and 10")]:
        with pytest.raises(InvalidRequestError, match=message) as err:
            build_request(prompt=f"a cat {bad}")
        assert err.value.field == "prompt"
    assert lora_tag("a", 0.5) == "<lora:a:0.5>" and lora_tag("a", 1.0) == "<lora:a:1>" and lora_tag("a", 0.1234567) == "<lora:a:0.1234567>"


def test_request_loras_field_and_tags_merge():
    request = build_request(prompt="a <lora:a:0.5> cat", loras=[("b", 2), "a", {"name": "c", "weight": -1}])
    assert request.requested_loras() == [LoraRef(name="a", weight=0.5), LoraRef(name="b", weight=2), LoraRef(name="c", weight=-1)]
    with pytest.raises(InvalidRequestError, match="loras.0.weight: a LoRA weight must be between -10 and 10, got 11"):
        build_request(loras=[("a", 11)])
    with pytest.raises(InvalidRequestError, match="loras.0.name"):
        build_request(loras=[("a:b", 1)])


def test_engine_refuses_loras_that_were_not_applied():
    with pytest.raises(LienzoError, match=r"asks for <lora:a:1> but the model has none applied; .*prepare_loras"):
        engine.generate(build_tiny("sd1"), _request(prompt="a fox <lora:a>"))


def test_infotext_keeps_tags_adds_field_loras_and_hashes_and_tags_are_not_encoded(tmp_path):
    components = build_tiny("sd1")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _write_kohya(a, components, SD1_LAYERS, seed=1)
    _write_kohya(b, components, SD1_LAYERS, seed=2)
    apply_loras(components, [(a, "a", 0.5), (b, "b", 0.25)])
    image = engine.generate(components, _request(prompt="a fox <lora:a:0.5>", loras=[("b", 0.25)])).images[0]

    info = parse_infotext(image.infotext)
    assert info.prompt == "a fox <lora:a:0.5> <lora:b:0.25>"
    assert info.params["Lora hashes"] == f"a: {lora_hash(a)[:12]}, b: {lora_hash(b)[:12]}"
    assert f'Lora hashes: "a: {lora_hash(a)[:12]}, b: {lora_hash(b)[:12]}", Version: ' in image.infotext
    # The same LoRAs given as fields only: the tags were never text for the encoder.
    assert np.array_equal(_pixels(components, prompt="a fox ", loras=[("a", 0.5), ("b", 0.25)]), image.pixels)


def test_lora_hash_is_a1111s_addnet_hash(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.ones(2, 3)}, path, metadata={"ss_network_dim": "2"})
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert lora_hash(path) == hashlib.sha256(data[8 + header :]).hexdigest()
    save_file({"lora_unet_a.lora_down.weight": torch.ones(2, 3)}, path, metadata={"sshs_model_hash": "abc123"})
    assert lora_hash(path) == "abc123"


def test_registry_finds_loras_apart_from_checkpoints(tmp_path):
    models = tmp_path / "models"
    (models / "Lora" / "styles").mkdir(parents=True)
    (models / "loras").mkdir()
    save_file({"lora_unet_a.lora_down.weight": torch.ones(2, 3)}, models / "Lora" / "styles" / "film.safetensors")
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 3)}, models / "loras" / "ink.safetensors")
    registry = Registry(models, tmp_path / "cache")
    assert registry.candidates() == []
    assert [(e.name, e.short_hash) for e in registry.loras()] == [
        ("film", lora_hash(models / "Lora" / "styles" / "film.safetensors")[:12]),
        ("ink", lora_hash(models / "loras" / "ink.safetensors")[:12]),
    ]
    assert registry.resolve_lora("Film") == registry.resolve_lora("styles/film") == models / "Lora" / "styles" / "film.safetensors"
    with pytest.raises(ModelFileError, match=r"lora: no LoRA named 'oil'; available: film, ink"):
        registry.resolve_lora("oil")


FAST = ["--steps", "2", "--width", "64", "--height", "64", "--seed", "5"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A models dir with a tiny SD 1.x checkpoint and a LoRA for it in Lora/."""
    root = tmp_path_factory.mktemp("lienzo-home")
    (root / "models" / "Lora").mkdir(parents=True)
    components = build_tiny("sd1")
    save_single_file(components, root / "models" / "tiny-sd15.safetensors")
    _write_kohya(root / "models" / "Lora" / "style.safetensors", components, SD1_LAYERS)
    return root


@pytest.fixture
def lienzo(home, tmp_path):
    def run(*args, code=0):
        base = ["--models-dir", str(home / "models"), "--data-dir", str(home / "data"), "--outputs-dir", str(tmp_path / "out")]
        result = CliRunner().invoke(app, [*base, *args], catch_exceptions=False)
        assert result.exit_code == code, result.output + result.stderr
        return result

    return run


def _image(result) -> str:
    return next(line for line in result.stdout.splitlines() if line.endswith(".png"))


def test_cli_lora_tag_flag_and_remake(lienzo, home):
    tagged = _image(lienzo("generate", "a red apple <lora:style:0.8>", *FAST))
    flagged = _image(lienzo("generate", "a red apple", "--lora", "style:0.8", *FAST))
    plain = _image(lienzo("generate", "a red apple", *FAST))
    remade = _image(lienzo("generate", "--from", tagged))

    pixels = {name: np.asarray(Image.open(path)) for name, path in [("tagged", tagged), ("flagged", flagged), ("plain", plain), ("remade", remade)]}
    assert np.array_equal(pixels["tagged"], pixels["flagged"]) and np.array_equal(pixels["tagged"], pixels["remade"])
    assert not np.array_equal(pixels["tagged"], pixels["plain"])
    info = parse_infotext(read_parameters(tagged))
    assert info.prompt == "a red apple <lora:style:0.8>"
    assert info.params["Lora hashes"] == f"style: {lora_hash(home / 'models' / 'Lora' / 'style.safetensors')[:12]}"
    assert read_parameters(flagged) == read_parameters(tagged) == read_parameters(remade)
    assert fields_from_image(tagged)["prompt"] == "a red apple <lora:style:0.8>"
    assert "Lora hashes" not in parse_infotext(read_parameters(plain)).params


def test_cli_unknown_lora_and_bad_flag(lienzo):
    result = lienzo("generate", "a cat <lora:nope:1>", *FAST, code=2)
    assert result.stderr.strip() == "error: lora: no LoRA named 'nope'; available: style"
    result = lienzo("generate", "a cat", "--lora", "style:strong", *FAST, code=2)
    assert "expected NAME or NAME:WEIGHT" in result.stderr


def test_cli_models_lists_loras_apart_from_checkpoints(lienzo):
    out = lienzo("models").stdout
    checkpoints, loras = out.split("LoRAs")
    assert "tiny-sd15" in checkpoints and "style" not in checkpoints and "style" in loras
