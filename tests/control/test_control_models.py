"""ControlNet and T2I-Adapter files: listing, lookup, and loading every layout back to the same weights.

Tiny random ControlNets are made from the project's tiny U-Nets (``ControlNetModel.from_unet``, then every
weight nudged so that the zero convolutions are not zero) and saved as the files people have: a diffusers
folder, a diffusers-named single file, an ldm-named file (.safetensors and .pth), fp16, SDXL. The ldm names
are made by inverting diffusers' conversion here (see :func:`controlnet_to_ldm`), so loading checks the
converter, the config read from shapes and the key tables together.
"""

import hashlib
import logging
import re
from dataclasses import dataclass

import pytest
import torch
from diffusers import ControlNetModel, T2IAdapter, UNet2DConditionModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file
from tiny_models import build_tiny

from lienzo.control import models as control_models_module
from lienzo.control.models import ControlEntry, control_models, find_control_model, load_control_model
from lienzo.errors import InvalidRequestError, ModelFileError
from lienzo.models.registry import Registry

_RESNET_TO_LDM = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}


@dataclass
class NotATensor:
    """A custom class: a weights-only reader must refuse a pickle holding one."""

    value: int = 1


def nudged(model, seed: int):
    """Every weight moved by a little seeded noise, so that no zero convolution stays zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


def controlnet_to_ldm(model: ControlNetModel) -> dict:
    """diffusers ControlNet names -> ldm names: diffusers' tables (DIFFUSERS_TO_LDM_MAPPING["controlnet"])
    read backwards for the single layers, and for the numbered blocks the inverse of the numbering
    convert_controlnet_checkpoint undoes (input_blocks: conv_in, then per level layers_per_block resnets with
    their attention and a downsampler; middle_block: resnet, attention, resnet; input_hint_block: convs
    at even indices, conv_out at 14; zero_convs.N.0 for controlnet_down_blocks.N)."""
    direct = {
        diffusers: ldm
        for table in ("layers", "addition_embed_type")
        for diffusers, ldm in DIFFUSERS_TO_LDM_MAPPING["controlnet"][table].items()
    }
    per_level = model.config.layers_per_block + 1
    renamed = {}
    for key, tensor in model.state_dict().items():
        if key in direct:
            ldm = direct[key]
        elif match := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
            ldm = f"zero_convs.{match[1]}.0.{match[2]}"
        elif match := re.fullmatch(r"controlnet_mid_block\.(.+)", key):
            ldm = f"middle_block_out.0.{match[1]}"
        elif match := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", key):
            ldm = f"input_hint_block.{2 * int(match[1]) + 2}.{match[2]}"
        elif match := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
            kind, index, rest = match[1], int(match[2]), match[3]
            ldm = f"middle_block.{2 * index}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key):
            level, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
            block = 1 + level * per_level + index
            if kind == "downsamplers":
                ldm = f"input_blocks.{(level + 1) * per_level}.0.op.{rest.removeprefix('conv.')}"
            elif kind == "resnets":
                ldm = f"input_blocks.{block}.0.{_resnet(rest)}"
            else:
                ldm = f"input_blocks.{block}.1.{rest}"
        else:
            raise AssertionError(f"no ldm name for {key}")
        renamed[ldm] = tensor
    assert len(renamed) == len(model.state_dict())
    return renamed


def _resnet(rest: str) -> str:
    layer, _, parameter = rest.partition(".")
    return f"{_RESNET_TO_LDM[layer]}.{parameter}"


def adapter_to_original(model: T2IAdapter) -> dict:
    """diffusers T2I-Adapter names -> TencentARC's (ComfyUI's prefix table, as it reads diffusers adapters)."""
    renamed = {}
    for key, tensor in model.state_dict().items():
        key = re.sub(r"adapter\.body\.(\d+)\.resnets\.(\d+)\.", lambda m: f"body.{2 * int(m[1]) + int(m[2])}.", key)
        key = re.sub(r"adapter\.body\.(\d+)\.in_conv\.", lambda m: f"body.{2 * int(m[1])}.in_conv.", key)
        renamed[key.removeprefix("adapter.")] = tensor
    return renamed


def legacy_hash(path) -> str:
    """AUTOMATIC1111's sd_models.model_hash, written out: sha256 of the 64 KiB at 1 MiB, 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def contiguous(tensors: dict) -> dict:
    return {key: t.detach().contiguous().clone() for key, t in tensors.items()}


@pytest.fixture(scope="module")
def unets():
    unets = {family: build_tiny(family).unet.eval() for family in ("sd1", "sd2", "sdxl")}
    # SD 1.5's real layout at a tiny width: 4 levels of 2 layers, attention in the first three, so that
    # ldm numbers 12 input blocks (input_blocks.10 and .11 must not be read as input_blocks.1).
    torch.manual_seed(0)
    unets["sd1-levels"] = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=64, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    return unets


@pytest.fixture(scope="module")
def nets(unets):
    small_xl = dict(unets["sdxl"].config)
    # Like SDXL's "mid"/"small" ControlNets: fewer transformer layers than the U-Net it controls.
    small_xl.update(transformer_layers_per_block=(1, 1))
    keep = set(ControlNetModel.extract_init_dict(small_xl)[0])
    return {
        "sd1": nudged(ControlNetModel.from_unet(unets["sd1"]), 1),
        "sd1-narrow-hint": nudged(ControlNetModel.from_unet(unets["sd1"], conditioning_embedding_out_channels=(8, 16, 24)), 2),
        "sd1-levels": nudged(ControlNetModel.from_unet(unets["sd1-levels"]), 8),
        "sd2": nudged(ControlNetModel.from_unet(unets["sd2"]), 3),
        "sdxl": nudged(ControlNetModel.from_unet(unets["sdxl"]), 4),
        "sdxl-small": nudged(ControlNetModel(**{k: v for k, v in small_xl.items() if k in keep}), 5),
        "adapter": nudged(T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=2, downscale_factor=8), 6),
        "adapter-xl": nudged(
            T2IAdapter(in_channels=3, channels=[64, 128, 128, 128], num_res_blocks=2, downscale_factor=16, adapter_type="full_adapter_xl"),
            7,
        ),
    }


@pytest.fixture(scope="module")
def models_dir(nets, tmp_path_factory):
    """A1111's models/ControlNet (with a sub-folder) and ComfyUI's models/t2i_adapter, in every layout."""
    root = tmp_path_factory.mktemp("models")
    cn = root / "ControlNet"
    (cn / "xl").mkdir(parents=True)
    nets["sd1"].save_pretrained(cn / "cn_sd15_folder")
    save_file(contiguous(controlnet_to_ldm(nets["sd1"])), cn / "control_sd15_ldm.safetensors")
    torch.save({"state_dict": contiguous(controlnet_to_ldm(nets["sd1"]))}, cn / "control_sd15_ldm_pth.pth")
    save_file(contiguous(controlnet_to_ldm(nets["sd1-levels"])), cn / "control_sd15_levels.safetensors")
    prefixed = {f"control_model.{k}": t for k, t in contiguous(controlnet_to_ldm(nets["sd2"])).items()}
    save_file(prefixed, cn / "control_sd21_prefixed.safetensors")
    save_file(contiguous(nets["sd1-narrow-hint"].state_dict()), cn / "diffusers_sd15_narrow.safetensors")
    half = {k: t.half() for k, t in contiguous(nets["sd1"].state_dict()).items()}
    save_file(half, cn / "diffusers_sd15_fp16.safetensors")
    save_file(contiguous(nets["sdxl"].state_dict()), cn / "xl" / "diffusers_xl_tiny.safetensors")
    save_file(contiguous(controlnet_to_ldm(nets["sdxl-small"])), cn / "xl" / "control_xl_small_ldm.safetensors")
    save_file({"ip_adapter.1.to_k_ip.weight": torch.zeros(4, 4), "image_proj.proj.weight": torch.zeros(4, 4)}, cn / "ip-adapter_sd15.safetensors")
    torch.save({"weight": torch.zeros(2), "config": NotATensor()}, cn / "evil.pth")
    t2i = root / "t2i_adapter"
    t2i.mkdir()
    nets["adapter"].save_pretrained(t2i / "t2i_sd15_folder")
    torch.save(contiguous(adapter_to_original(nets["adapter"])), t2i / "t2iadapter_tiny_sd15v2.pth")
    save_file(contiguous(nets["adapter"].state_dict()), t2i / "t2i_diffusers_named.safetensors")
    save_file(contiguous(adapter_to_original(nets["adapter-xl"])), t2i / "t2i_xl_original.safetensors")
    return root


EXPECTED = {  # name -> (kind, family, which tiny model it holds)
    "cn_sd15_folder": ("controlnet", "sd1", "sd1"),
    "control_sd15_ldm": ("controlnet", "sd1", "sd1"),
    "control_sd15_ldm_pth": ("controlnet", "sd1", "sd1"),
    "control_sd15_levels": ("controlnet", "sd1", "sd1-levels"),
    "control_sd21_prefixed": ("controlnet", "sd2", "sd2"),
    "control_xl_small_ldm": ("controlnet", "sdxl", "sdxl-small"),
    "diffusers_sd15_fp16": ("controlnet", "sd1", "sd1"),
    "diffusers_sd15_narrow": ("controlnet", "sd1", "sd1-narrow-hint"),
    "diffusers_xl_tiny": ("controlnet", "sdxl", "sdxl"),
    "t2i_diffusers_named": ("t2i_adapter", "sd1", "adapter"),
    "t2i_sd15_folder": ("t2i_adapter", "sd1", "adapter"),
    "t2i_xl_original": ("t2i_adapter", "sdxl", "adapter-xl"),
    "t2iadapter_tiny_sd15v2": ("t2i_adapter", "sd1", "adapter"),
}
UNET_OF = {"sd1": "sd1", "sd1-levels": "sd1-levels", "sd1-narrow-hint": "sd1", "sd2": "sd2", "sdxl": "sdxl", "sdxl-small": "sdxl", "adapter": "sd1", "adapter-xl": "sdxl"}


def by_name(models_dir) -> dict[str, ControlEntry]:
    return {entry.name: entry for entry in control_models(models_dir)}


def test_listing_names_kinds_families_in_name_order(models_dir, caplog, monkeypatch):
    # Each file is described (and warned about) once per change; start from nothing described.
    monkeypatch.setattr(control_models_module, "_described", {})
    with caplog.at_level(logging.WARNING):
        entries = control_models(models_dir)
    assert [e.name for e in entries] == sorted(EXPECTED)
    for entry in entries:
        assert (entry.kind, entry.family) == EXPECTED[entry.name][:2], entry.name
    # The IP-Adapter and the pickle with code are no control models: left out, and said why.
    assert "ip-adapter_sd15" in caplog.text and "IP-Adapter" in caplog.text
    assert "evil.pth" in caplog.text and "refuses" in caplog.text
    # The next listing remembers them: no file is read again, nothing said twice.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert [e.name for e in control_models(models_dir)] == sorted(EXPECTED)
    assert "evil.pth" not in caplog.text


def test_titles_carry_a1111_hashes(models_dir, tmp_path):
    entries = by_name(models_dir)
    ldm = entries["control_sd15_ldm"]
    assert re.fullmatch(r"control_sd15_ldm \[[0-9a-f]{8}\]", ldm.title)
    for entry in entries.values():
        if entry.path.is_file():
            assert entry.short_hash == legacy_hash(entry.path), entry.name
    # Files over 1 MiB differ where A1111 hashes them.
    assert entries["control_sd15_ldm"].short_hash != entries["diffusers_xl_tiny"].short_hash
    # A folder: the first 8 digits of the folder hash the checkpoint registry gives it.
    folder = entries["cn_sd15_folder"]
    assert folder.short_hash == Registry(models_dir, tmp_path).entry(folder.path).sha256[:8]


def test_folders_are_found_in_any_case_and_other_folders_ignored(nets, tmp_path):
    (tmp_path / "CONTROLNET").mkdir()
    (tmp_path / "Lora").mkdir()
    save_file(contiguous(nets["sd1"].state_dict()), tmp_path / "CONTROLNET" / "a.safetensors")
    save_file(contiguous(nets["sd1"].state_dict()), tmp_path / "Lora" / "b.safetensors")
    save_file(contiguous(nets["sd1"].state_dict()), tmp_path / "c.safetensors")
    assert [e.name for e in control_models(tmp_path)] == ["a"]
    assert control_models(tmp_path / "missing") == []


def test_lookup_by_name_title_file_name_and_path(models_dir):
    entry = by_name(models_dir)["control_sd15_ldm"]
    for name in ("control_sd15_ldm", "CONTROL_SD15_LDM", entry.title, "control_sd15_ldm.safetensors", "Control_SD15_ldm [00000000]"):
        assert find_control_model(name, models_dir).path == entry.path, name
    xl = by_name(models_dir)["diffusers_xl_tiny"]
    assert find_control_model("xl/diffusers_xl_tiny", models_dir).path == xl.path
    assert find_control_model("cn_sd15_folder", models_dir).path.is_dir()


@pytest.mark.parametrize("name", ["control_sd15_canny", "None", ""])
def test_unknown_name_names_the_field_and_the_choices(models_dir, name):
    with pytest.raises(InvalidRequestError) as err:
        find_control_model(name, models_dir, field="controlnet[0].model")
    assert err.value.field == "controlnet[0].model"
    assert f"no ControlNet model named {name!r}" in str(err.value)
    assert by_name(models_dir)["control_sd15_ldm"].title in str(err.value)


def test_unknown_name_in_an_empty_models_dir_says_where_models_go(tmp_path):
    with pytest.raises(InvalidRequestError, match="none: put ControlNet models in"):
        find_control_model("canny", tmp_path)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_layout_loads_the_same_weights(models_dir, nets, unets, name):
    kind, _, source = EXPECTED[name]
    expected = nets[source]
    loaded = load_control_model(by_name(models_dir)[name], unets[UNET_OF[source]], dtype=torch.float32)
    assert isinstance(loaded, ControlNetModel if kind == "controlnet" else T2IAdapter)
    assert not loaded.training
    want, got = expected.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    if "fp16" in name:
        want = {k: t.half().float() for k, t in want.items()}
    different = [key for key in want if not torch.equal(want[key], got[key])]
    assert not different, different[:5]
    assert all(t.dtype == torch.float32 for t in got.values())


@torch.no_grad()
def controlnet_outputs(model: ControlNetModel, unet) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 7, config.cross_attention_dim, generator=generator)
    hint = torch.rand(1, 3, 64, 64, generator=generator)
    extra = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=generator), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    down, mid = model(sample, 10, context, hint, return_dict=False, **extra)
    return [*down, mid]


@pytest.mark.parametrize("name", ["control_sd15_ldm", "control_sd15_levels", "control_sd21_prefixed", "diffusers_xl_tiny", "control_xl_small_ldm"])
def test_loaded_controlnets_compute_what_the_originals_do(models_dir, nets, unets, name):
    """The config read from shapes (levels, depths, heads from the U-Net) rebuilds the same network."""
    source = EXPECTED[name][2]
    unet = unets[UNET_OF[source]]
    loaded = load_control_model(by_name(models_dir)[name], unet)
    for want, got in zip(controlnet_outputs(nets[source], unet), controlnet_outputs(loaded, unet), strict=True):
        assert want.abs().max() > 0  # the zero convolutions were nudged: the residuals are not all zero
        torch.testing.assert_close(got, want)


def test_small_sdxl_controlnet_keeps_its_fewer_layers(models_dir, unets):
    loaded = load_control_model(by_name(models_dir)["control_xl_small_ldm"], unets["sdxl"])
    assert list(loaded.config.transformer_layers_per_block) == [1, 1]
    assert list(unets["sdxl"].config.transformer_layers_per_block) == [2, 1]


def test_hint_embedding_widths_are_read_from_the_file(models_dir, unets):
    loaded = load_control_model(by_name(models_dir)["diffusers_sd15_narrow"], unets["sd1"])
    assert list(loaded.config.conditioning_embedding_out_channels) == [8, 16, 24]


def test_fp16_file_loads_in_the_dtype_asked_for(models_dir, unets):
    entry = by_name(models_dir)["diffusers_sd15_fp16"]
    assert load_control_model(entry, unets["sd1"], dtype=torch.float16).dtype == torch.float16
    assert load_control_model(entry, unets["sd1"]).dtype == unets["sd1"].dtype == torch.float32


def test_a_path_loads_too(models_dir, unets):
    path = models_dir / "ControlNet" / "control_sd15_ldm_pth.pth"
    assert isinstance(load_control_model(path, unets["sd1"]), ControlNetModel)


@pytest.mark.parametrize(
    "name, unet, what, model",
    [
        ("diffusers_xl_tiny", "sd1", "an SDXL ControlNet", "SD 1.x"),
        ("control_sd15_ldm", "sdxl", "an SD 1.x ControlNet", "SDXL"),
        ("cn_sd15_folder", "sd2", "an SD 1.x ControlNet", "SD 2.x"),
        ("control_sd21_prefixed", "sd1", "an SD 2.x ControlNet", "SD 1.x"),
        ("t2i_xl_original", "sd1", "an SDXL T2I-Adapter", "SD 1.x"),
        ("t2i_sd15_folder", "sdxl", "an SD 1.x T2I-Adapter", "SDXL"),
    ],
)
def test_a_model_for_another_family_is_refused(models_dir, unets, name, unet, what, model):
    entry = by_name(models_dir)[name]
    with pytest.raises(ModelFileError) as err:
        load_control_model(entry, unets[unet])
    message = str(err.value)
    assert message.startswith(entry.path.name) and what in message and f"loaded {model} model" in message


def test_sdxl_on_sd15_names_the_widths(models_dir, unets):
    with pytest.raises(ModelFileError, match="cross-attention width 128, the model's 64"):
        load_control_model(by_name(models_dir)["diffusers_xl_tiny"], unets["sd1"])


def test_pickle_with_code_is_refused(models_dir, unets):
    with pytest.raises(ModelFileError, match="refuses to load evil.pth"):
        load_control_model(models_dir / "ControlNet" / "evil.pth", unets["sd1"])


def test_diff_controlnet_adds_the_models_unet(nets, unets, tmp_path):
    """A "diff" ControlNet stores its encoder minus the U-Net's; loading adds the loaded U-Net back."""
    net, unet = nets["sd1"], unets["sd1"]
    base = unet.state_dict()
    minus = {k: t - base[k] if k in base else t for k, t in net.state_dict().items()}
    assert any(k in base for k in minus)
    diff = ControlNetModel.from_config(net.config)
    diff.load_state_dict(minus)
    state = {**controlnet_to_ldm(diff), "difference": torch.tensor([])}
    save_file(contiguous(state), tmp_path / "diff_control_sd15_tiny.safetensors")
    loaded = load_control_model(tmp_path / "diff_control_sd15_tiny.safetensors", unet)
    for key, want in net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], want, msg=key)


def test_shuffle_controlnet_pools_its_control(nets, unets, tmp_path):
    save_file(contiguous(controlnet_to_ldm(nets["sd1"])), tmp_path / "control_v11e_sd15_shuffle.safetensors")
    save_file(contiguous(controlnet_to_ldm(nets["sd1"])), tmp_path / "control_v11p_sd15_canny.safetensors")
    assert load_control_model(tmp_path / "control_v11e_sd15_shuffle.safetensors", unets["sd1"]).config.global_pool_conditions
    assert not load_control_model(tmp_path / "control_v11p_sd15_canny.safetensors", unets["sd1"]).config.global_pool_conditions


def test_control_lora_is_listed_but_refused_with_a_reason(nets, unets, tmp_path):
    (tmp_path / "controlnet").mkdir()
    state = {**contiguous(controlnet_to_ldm(nets["sd1"])), "lora_controlnet": torch.tensor([])}
    save_file(state, tmp_path / "controlnet" / "control-lora-canny-rank128.safetensors")
    (entry,) = control_models(tmp_path)
    assert entry.kind == "controlnet"
    with pytest.raises(ModelFileError, match="is a Control-LoRA"):
        load_control_model(entry, unets["sd1"])


def test_file_with_unused_tensors_is_refused(nets, unets, tmp_path):
    state = {**contiguous(controlnet_to_ldm(nets["sd1"])), "input_blocks.1.9.weight": torch.zeros(3)}
    save_file(state, tmp_path / "odd.safetensors")
    with pytest.raises(ModelFileError, match=r"odd.safetensors: 1 of its tensors fit no ControlNet layer \(input_blocks.1.9.weight\)"):
        load_control_model(tmp_path / "odd.safetensors", unets["sd1"])


def test_file_missing_a_zero_conv_is_refused(nets, unets, tmp_path):
    state = contiguous(controlnet_to_ldm(nets["sd1"]))
    del state["zero_convs.2.0.weight"]
    save_file(state, tmp_path / "cut.safetensors")
    with pytest.raises(ModelFileError, match="cut.safetensors is incomplete: it lacks the ControlNet tensors controlnet_down_blocks.2.weight"):
        load_control_model(tmp_path / "cut.safetensors", unets["sd1"])


def test_ip_adapter_file_is_refused_with_what_it_is(models_dir, unets):
    with pytest.raises(ModelFileError, match="is an IP-Adapter"):
        load_control_model(models_dir / "ControlNet" / "ip-adapter_sd15.safetensors", unets["sd1"])


def test_folder_with_only_fp16_weights_loads(nets, unets, tmp_path):
    half = ControlNetModel.from_config(nets["sd1"].config)
    half.load_state_dict(nets["sd1"].state_dict())
    half.to(torch.float16).save_pretrained(tmp_path / "controlnet" / "canny-fp16", variant="fp16")
    assert not (tmp_path / "controlnet" / "canny-fp16" / "diffusion_pytorch_model.safetensors").exists()
    (entry,) = control_models(tmp_path)
    loaded = load_control_model(entry, unets["sd1"], dtype=torch.float32)
    for key, want in nets["sd1"].state_dict().items():
        assert torch.equal(loaded.state_dict()[key], want.half().float()), key


@pytest.mark.parametrize(
    "tensors, reason",
    [
        ({"body.0.in_conv.weight": torch.zeros(8, 192, 1, 1)}, "is a light T2I-Adapter as a single file"),
        ({"style_embedding": torch.zeros(1, 8, 16)}, "is a T2I style adapter"),
        ({"conv_in.weight": torch.zeros(8, 192, 3, 3), "body.0.block1.weight": torch.zeros(8, 8, 3, 3),
          "body.2.down_opt.op.weight": torch.zeros(8, 8, 3, 3)}, "is a T2I-Adapter that downsamples with convolutions"),
    ],
)
def test_adapters_diffusers_cannot_hold_are_refused_with_a_reason(unets, tmp_path, tensors, reason):
    save_file(tensors, tmp_path / "adapter.safetensors")
    with pytest.raises(ModelFileError, match=f"adapter.safetensors {reason}"):
        load_control_model(tmp_path / "adapter.safetensors", unets["sd1"])
