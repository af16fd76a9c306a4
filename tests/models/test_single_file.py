"""Single-file checkpoints: format sniffing, architecture detection, exact round trips, refusals."""

import json
import pickle
import random
import struct

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file
from tiny_models import build_tiny, main, save_diffusers_folder

from lienzo.errors import LienzoError, ModelFileError
from lienzo.models.components import Components
from lienzo.models.formats import detect_architecture, load_state_dict, read_header, read_metadata, sniff
from lienzo.models.single_file_load import load_single_file, load_vae_file
from lienzo.models.single_file_save import save_single_file

CASES = {
    "sd1": dict(family="sd1"),
    "sd2": dict(family="sd2"),
    "sdxl": dict(family="sdxl"),
    "sd1-inpainting": dict(family="sd1", inpainting=True),
}
MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def built() -> dict[str, Components]:
    return {case: build_tiny(**kwargs) for case, kwargs in CASES.items()}


@pytest.fixture(scope="module")
def files(built, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    return {case: save_single_file(components, folder / f"{case}.safetensors") for case, components in built.items()}


def assert_same_weights(expected: Components, actual: Components):
    for attr in MODULES:
        want, got = getattr(expected, attr), getattr(actual, attr)
        assert (want is None) == (got is None), attr
        if want is None:
            continue
        want_sd, got_sd = want.state_dict(), got.state_dict()
        assert want_sd.keys() == got_sd.keys(), attr
        different = [key for key in want_sd if not torch.equal(want_sd[key], got_sd[key])]
        assert not different, f"{attr}: {different[:5]}"


@torch.no_grad()
def unet_output(components: Components) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    config = components.unet.config
    sample = torch.randn(1, config.in_channels, 8, 8, generator=generator)
    context = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    extra = {}
    if components.family == "sdxl":
        pooled = components.text_encoder_2.config.projection_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    return components.unet(sample, 10, encoder_hidden_states=context, **extra).sample


@torch.no_grad()
def text_outputs(components: Components) -> list[torch.Tensor]:
    outputs = []
    for encoder, tokenizer in (
        (components.text_encoder, components.tokenizer),
        (components.text_encoder_2, components.tokenizer_2),
    ):
        if encoder is not None:
            ids = tokenizer("a photo of a cat", padding="max_length", return_tensors="pt").input_ids
            outputs.append(encoder(ids).last_hidden_state)
    return outputs


def shapes_of(path) -> dict:
    return {key: shape for key, (shape, _) in read_header(path).items()}


def write_safetensors_without_metadata(source, target, extra: dict | None = None):
    save_file({**load_file(source), **(extra or {})}, target)
    return target


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_round_trip_is_exact(case, built, files):
    original, path = built[case], files[case]

    assert sniff(path) == "safetensors"
    arch = detect_architecture(shapes_of(path), name=path.name)
    assert arch.family == original.family
    assert arch.inpainting == (case == "sd1-inpainting")

    loaded = load_single_file(path)
    assert (loaded.family, loaded.name, loaded.source) == (original.family, case, path)
    assert loaded.is_inpainting == original.is_inpainting
    assert loaded.prediction_type == original.prediction_type
    assert loaded.vae.config.scaling_factor == original.vae.config.scaling_factor
    assert loaded.tokenizer.pad_token == original.tokenizer.pad_token
    assert_same_weights(original, loaded)
    assert torch.equal(unet_output(original), unet_output(loaded))
    for want, got in zip(text_outputs(original), text_outputs(loaded), strict=True):
        assert torch.equal(want, got)


def test_saved_file_has_ldm_names_and_prediction_metadata(files):
    sd1, sd2, sdxl = shapes_of(files["sd1"]), shapes_of(files["sd2"]), shapes_of(files["sdxl"])
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in sd1  # downsampler after 2 resnets
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in sd1  # upsampler after resnet + attention
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in sd2  # upsampler after a plain resnet
    assert sd1["first_stage_model.decoder.mid.attn_1.q.weight"] == (64, 64, 1, 1)  # 1x1 conv, not linear
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in sd1
    assert sdxl["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"] == (3 * 64, 64)
    assert sdxl["conditioner.embedders.1.model.text_projection"] == (64, 32)  # width x projection, as OpenCLIP
    assert "model.diffusion_model.label_emb.0.0.weight" in sdxl
    assert read_metadata(files["sd1"])["modelspec.prediction_type"] == "epsilon"
    assert read_metadata(files["sd2"])["modelspec.prediction_type"] == "v"


def test_dtype_on_save_and_load(built, tmp_path):
    path = save_single_file(built["sd1"], tmp_path / "half.safetensors", dtype=torch.float16)
    assert {dtype for _, dtype in read_header(path).values()} == {"F16"}
    loaded = load_single_file(path, dtype=torch.float16, vae_dtype=torch.float16)
    assert loaded.unet.dtype == loaded.vae.dtype == loaded.text_encoder.dtype == torch.float16
    assert load_single_file(path, dtype=torch.float16).vae.dtype == torch.float32  # SD's VAEs overflow in fp16


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_folder_to_single_file_round_trip(family, built, tmp_path):
    folder = save_diffusers_folder(built[family], tmp_path / "pipeline")
    assert sniff(folder) == "diffusers-folder"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == (
        "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    )
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipeline = pipeline_class.from_pretrained(folder, local_files_only=True)
    from_folder = Components(
        unet=pipeline.unet,
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        text_encoder_2=getattr(pipeline, "text_encoder_2", None),
        tokenizer_2=getattr(pipeline, "tokenizer_2", None),
        scheduler_config=dict(pipeline.scheduler.config),
        family=family,
    )
    loaded = load_single_file(save_single_file(from_folder, tmp_path / "one.safetensors"))
    assert_same_weights(from_folder, loaded)
    assert_same_weights(built[family], loaded)


def test_cli_writes_a_loadable_stand_in_checkpoint(tmp_path):
    main(["sd1", str(tmp_path / "stand-in.safetensors"), "--inpainting"])
    loaded = load_single_file(tmp_path / "stand-in.safetensors")
    assert loaded.family == "sd1" and loaded.is_inpainting
    main(["sd2", str(tmp_path / "stand-in"), "--diffusers"])
    assert sniff(tmp_path / "stand-in") == "diffusers-folder"


# --- prediction type -------------------------------------------------------------------------


def test_prediction_type_family_defaults_without_any_hint(files, tmp_path):
    sd1 = write_safetensors_without_metadata(files["sd1"], tmp_path / "plain-sd1.safetensors")
    sd2 = write_safetensors_without_metadata(files["sd2"], tmp_path / "plain-sd2.safetensors")
    assert load_single_file(sd1).prediction_type == "epsilon"
    assert load_single_file(sd2).prediction_type == "v_prediction"


def test_prediction_type_metadata_beats_family_default(tmp_path):
    path = save_single_file(build_tiny("sd2", prediction_type="epsilon"), tmp_path / "sd2-base.safetensors")
    assert load_single_file(path).prediction_type == "epsilon"


def test_prediction_type_v_pred_marker(files, tmp_path):
    path = write_safetensors_without_metadata(
        files["sd1"], tmp_path / "comfy.safetensors", extra={"v_pred": torch.tensor([])}
    )
    assert load_single_file(path).prediction_type == "v_prediction"


def test_prediction_type_sidecar_beats_metadata_and_argument_beats_sidecar(files, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(files["sd1"].read_bytes())  # metadata says epsilon
    (tmp_path / "model.yaml").write_text(
        'model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: "v"\n'
    )
    assert load_single_file(path).prediction_type == "v_prediction"
    assert load_single_file(path, prediction_type="epsilon").prediction_type == "epsilon"


def test_prediction_type_sidecar_without_parameterization_means_eps(files, tmp_path):
    path = tmp_path / "sd2-base.safetensors"
    path.write_bytes(files["sd2"].read_bytes())  # metadata says v
    (tmp_path / "sd2-base.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert load_single_file(path).prediction_type == "epsilon"


def test_prediction_type_argument_is_validated(files):
    with pytest.raises(LienzoError, match="prediction_type must be one of epsilon, v_prediction"):
        load_single_file(files["sd1"], prediction_type="v")


# --- VAE files -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["ldm", "ldm-prefixed", "diffusers", "diffusers-old-attention-names"])
def test_vae_file_loads(layout, built, files, tmp_path):
    vae = built["sd1"].vae
    everything = load_file(files["sd1"])
    prefix = "first_stage_model."
    if layout == "ldm":
        tensors = {k.removeprefix(prefix): t for k, t in everything.items() if k.startswith(prefix)}
    elif layout == "ldm-prefixed":
        tensors = {k: t for k, t in everything.items() if k.startswith(prefix)}
    else:
        tensors = {k: t.contiguous() for k, t in vae.state_dict().items()}
        if layout == "diffusers-old-attention-names":
            old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
            for new, older in old.items():
                tensors = {k.replace(f"attentions.0.{new}.", f"attentions.0.{older}."): t for k, t in tensors.items()}
    path = tmp_path / "vae.safetensors"
    save_file(tensors, path)

    loaded = load_vae_file(path, scaling_factor=0.13025)
    assert loaded.config.scaling_factor == 0.13025
    assert list(loaded.config.block_out_channels) == list(vae.config.block_out_channels)
    want, got = vae.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[key], got[key]) for key in want)


def test_vae_file_refuses_a_non_vae(files, tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8)}, path)
    with pytest.raises(ModelFileError, match="lora.safetensors holds no VAE"):
        load_vae_file(path)


# --- formats are judged by content -----------------------------------------------------------


def test_safetensors_named_ckpt_loads(built, files, tmp_path):
    path = tmp_path / "renamed.ckpt"
    path.write_bytes(files["sd1"].read_bytes())
    assert sniff(path) == "safetensors"
    assert_same_weights(built["sd1"], load_single_file(path))


def test_torch_zip_named_safetensors_loads_weights_only(built, files, tmp_path):
    path = tmp_path / "actually-torch.safetensors"
    torch.save({"state_dict": load_file(files["sd1"]), "global_step": 1000}, path)
    assert sniff(path) == "torch-zip"
    assert_same_weights(built["sd1"], load_single_file(path))


def test_legacy_pickle_checkpoint_loads(tmp_path):
    path = tmp_path / "old.pt"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    assert sniff(path) == "pickle"
    loaded = load_state_dict(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


class _Payload:
    """Unpickling this creates a file: the stand-in for code hidden in a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _write_payload(writer: str, path, marker):
    content = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "x": _Payload(marker)}
    if writer == "pickle":
        with open(path, "wb") as f:
            pickle.dump(content, f)
    else:
        torch.save(content, path)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_payload_is_live_when_unpickled_unsafely(writer, tmp_path):
    """Proves the payload below would run: an unsafe load creates the marker."""
    marker = tmp_path / "ran"
    _write_payload(writer, tmp_path / "x.ckpt", marker)
    if writer == "pickle":
        with open(tmp_path / "x.ckpt", "rb") as f:
            pickle.load(f)
    else:
        torch.load(tmp_path / "x.ckpt", weights_only=False)
    assert marker.exists()


# torch warns that it reads protocol-4 pickles (what pickle.dump writes) with less confidence.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name", ["x.ckpt", "x.safetensors"])
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused_and_never_runs(writer, name, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    _write_payload(writer, path, marker)
    assert sniff(path) == ("pickle" if writer == "pickle" else "torch-zip")
    for load in (load_state_dict, load_single_file):
        with pytest.raises(ModelFileError, match=f"lienzo refuses to load {name}") as caught:
            load(path)
        assert "\n" not in str(caught.value) and ".safetensors" in str(caught.value)
    assert not marker.exists()


def test_diffusers_folder_and_plain_folder(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    assert sniff(tmp_path) == "diffusers-folder"
    with pytest.raises(ModelFileError, match="folder without model_index.json"):
        sniff(tmp_path.parent)


# --- damaged and wrong files -----------------------------------------------------------------


def _damaged_files(folder, valid):
    """name -> (path, words the error must contain)."""
    data = valid.read_bytes()
    cases = {}

    def add(name, content, words):
        path = folder / name
        path.write_bytes(content)
        cases[name] = (path, words)

    add("empty.safetensors", b"", "is empty")
    add("half.safetensors", data[: len(data) // 2], "truncated")
    add("random.ckpt", bytes([0x13]) + random.Random(0).randbytes(4095), "not a model file lienzo knows")
    add("tiny.safetensors", b"abc", "not a model file lienzo knows")
    add("bad-json.safetensors", struct.pack("<Q", 10) + b"{not json}", "damaged safetensors header")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    add("short-data.safetensors", struct.pack("<Q", len(header)) + header + bytes(16), "truncated")
    add("huge-header.safetensors", struct.pack("<Q", 10**12) + b"{}", "truncated or damaged")
    add("broken-zip.ckpt", b"PK\x03\x04" + bytes(100), "cannot read broken-zip.ckpt")
    return cases


def test_damaged_files_give_clear_errors(files, tmp_path):
    for name, (path, words) in _damaged_files(tmp_path, files["sd1"]).items():
        with pytest.raises(ModelFileError) as caught:
            load_single_file(path)
        message = str(caught.value)
        assert words in message and name in message and "\n" not in message, (name, message)


def test_missing_path(tmp_path):
    with pytest.raises(ModelFileError, match="no such file or folder"):
        load_single_file(tmp_path / "nope.safetensors")


@pytest.mark.parametrize(
    ("tensors", "words"),
    [
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64)}, "looks like a LoRA"),
        ({"encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)}, "looks like a VAE alone"),
        ({"emb_params": torch.zeros(2, 768)}, "textual-inversion embedding"),
        ({"weight": torch.zeros(3)}, "none of its 1 tensors is a UNet input layer"),
    ],
)
def test_not_a_checkpoint(tensors, words, tmp_path):
    path = tmp_path / "thing.safetensors"
    save_file(tensors, path)
    expected = "thing.safetensors is not a Stable Diffusion 1.x/2.x/XL checkpoint"
    with pytest.raises(ModelFileError, match=expected) as caught:
        load_single_file(path)
    assert words in str(caught.value)


def test_missing_tensor_is_an_error(files, tmp_path):
    tensors = load_file(files["sd2"])
    del tensors["model.diffusion_model.output_blocks.0.0.in_layers.2.weight"]
    path = tmp_path / "incomplete.safetensors"
    save_file(tensors, path)
    expected = r"incomplete.safetensors: the UNet tensors .*\(missing: up_blocks.0.resnets.0.conv1.weight"
    with pytest.raises(ModelFileError, match=expected):
        load_single_file(path)


def test_extra_tensor_in_a_component_is_an_error(files, tmp_path):
    tensors = load_file(files["sdxl"])
    tensors["conditioner.embedders.1.model.mystery"] = torch.zeros(3)
    path = tmp_path / "extra.safetensors"
    save_file(tensors, path)
    with pytest.raises(ModelFileError, match="extra.safetensors: text-encoder tensors fit no OpenCLIP layer: mystery"):
        load_single_file(path)


# --- full-size layouts, on the meta device (shapes only, no memory) --------------------------

_SD1_UNET = dict(
    cross_attention_dim=768,
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    layers_per_block=2,
)
_FULL_SIZE = {
    "sd1": (_SD1_UNET, [dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, hidden_act="quick_gelu")]),
    "sd2": (
        dict(_SD1_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
        [dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, hidden_act="gelu")],
    ),
    "sdxl": (
        dict(
            cross_attention_dim=2048,
            attention_head_dim=[5, 10, 20],
            block_out_channels=[320, 640, 1280],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            layers_per_block=2,
            transformer_layers_per_block=[1, 2, 10],
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        [
            dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, hidden_act="quick_gelu"),
            dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, hidden_act="gelu", projection_dim=1280),
        ],
    ),
}


@pytest.mark.parametrize("family", _FULL_SIZE)
def test_full_size_layouts_infer_the_published_configs(family):
    """The published SD 1.5 / 2.1 / XL configs survive export naming and config inference."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    from lienzo.models import single_file_layout, single_file_load, single_file_save

    unet_config, text_configs = _FULL_SIZE[family]
    slots = single_file_layout._TEXT_ENCODERS[family]
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_config)
        encoders = [
            slot.model_class(CLIPTextConfig(**config, num_attention_heads=config["hidden_size"] // 64))
            for slot, config in zip(slots, text_configs, strict=True)
        ]
    ldm = single_file_save._with_prefix("model.diffusion_model.", single_file_save._unet_to_ldm(unet))
    for slot, encoder in zip(slots, encoders, strict=True):
        renamed = (
            single_file_save._open_clip_to_ldm(encoder) if slot.open_clip else single_file_save._clip_to_ldm(encoder)
        )
        ldm.update(single_file_save._with_prefix(slot.prefix, renamed))
    # What real files carry besides: SD 1.x position_ids, OpenCLIP's logit_scale, SD 2.x's unused last block.
    meta = torch.device("meta")
    if family == "sd1":
        ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.empty(1, 77, device=meta)
    if family == "sd2":
        block_22 = "cond_stage_model.model.transformer.resblocks.22."
        ldm.update({k.replace(".22.", ".23."): t for k, t in ldm.items() if k.startswith(block_22)})
        ldm["cond_stage_model.model.text_projection"] = torch.empty(1024, 1024, device=meta)
        ldm["cond_stage_model.model.logit_scale"] = torch.empty((), device=meta)

    loaded = single_file_load._load_unet(ldm, family, "full", torch.float16)
    for key, value in unet_config.items():
        got = loaded.config[key]
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    for slot, config in zip(slots, text_configs, strict=True):
        text_config = single_file_load._load_text_encoder(ldm, slot, "full", torch.float16).config
        assert {key: getattr(text_config, key) for key in config} == config
        assert text_config.num_attention_heads == config["hidden_size"] // 64
