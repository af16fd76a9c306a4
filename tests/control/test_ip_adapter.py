"""IP-Adapter units (image prompts): the files, the CLIP vision encoder, and pictures against diffusers' pipeline.

Tiny random adapters are written with the original repository's key names and shapes (the plain ``image_proj.proj``
+ ``norm`` layout as .safetensors, the plus ``Resampler`` layout as the original nested .bin) for the tiny SD 1.5
U-Net, and a tiny CLIP vision model is saved under ComfyUI's file name. diffusers' ``StableDiffusionPipeline`` loads
the same files with ``load_ip_adapter`` and is the reference.
"""

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from lienzo.control import ip_adapter as ip_module
from lienzo.control.ip_adapter import load_image_encoder, load_ip_adapter
from lienzo.control.models import control_models, find_control_model
from lienzo.control.prepare import prepare_resources
from lienzo.control.preprocessors import find_preprocessor, preprocess
from lienzo.errors import InvalidRequestError, ModelFileError
from lienzo.generation import engine
from lienzo.generation.control_unit import ControlUnit
from lienzo.generation.request import build_request
from lienzo.settings import Settings
from tiny_models import build_tiny

PROMPT = "a fox in a forest"
H_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
RUN = dict(negative_prompt="blurry", steps=4, cfg_scale=6.0, sampler="Euler", schedule="DDIM", seed=21, width=64, height=64)


def _encoder() -> CLIPVisionModelWithProjection:
    torch.manual_seed(5)
    config = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, projection_dim=48, num_hidden_layers=2, num_attention_heads=1,
        image_size=32, patch_size=8, hidden_act="gelu",
    )
    return CLIPVisionModelWithProjection(config).eval()


def _random(generator: torch.Generator, *shape: int, scale: float = 0.3, around: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * scale + around


def _attention_layers(unet, generator: torch.Generator) -> dict:
    """``ip_adapter.N.to_k_ip.weight`` / ``to_v_ip``: N = 1, 3, 5, ... over the U-Net's attention layers in order,
    as the original repository numbers its cross-attention processors."""
    cross = unet.config.cross_attention_dim
    tensors = {}
    for index, name in enumerate(n for n in unet.attn_processors if n.endswith("attn2.processor")):
        block = int(name.split(".")[1]) if not name.startswith("mid_block") else None
        channels = unet.config.block_out_channels
        hidden = channels[-1] if block is None else (channels[::-1][block] if name.startswith("up_blocks") else channels[block])
        for kv in "kv":
            tensors[f"{2 * index + 1}.to_{kv}_ip.weight"] = _random(generator, hidden, cross)
    return tensors


def plain_adapter(unet, clip_dim: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": _random(g, 4 * cross, clip_dim), "proj.bias": _random(g, 4 * cross),
        "norm.weight": _random(g, cross, scale=0.1, around=1.0), "norm.bias": _random(g, cross, scale=0.1),
    }
    return {"image_proj": image_proj, "ip_adapter": _attention_layers(unet, g)}


def plus_adapter(unet, clip_hidden: int, seed: int = 2, queries: int = 4) -> dict:
    """The original Resampler's names: layers.I.0 (norm1, norm2, to_q, to_kv, to_out), layers.I.1 (LayerNorm, Linear, GELU, Linear)."""
    g = torch.Generator().manual_seed(seed)
    dim, cross = 64, unet.config.cross_attention_dim  # one head of 64 channels, as diffusers reads heads
    image_proj = {
        "latents": _random(g, 1, queries, dim), "proj_in.weight": _random(g, dim, clip_hidden), "proj_in.bias": _random(g, dim),
        "proj_out.weight": _random(g, cross, dim), "proj_out.bias": _random(g, cross),
        "norm_out.weight": _random(g, cross, scale=0.1, around=1.0), "norm_out.bias": _random(g, cross, scale=0.1),
    }
    for i in range(4):
        for norm in ("0.norm1", "0.norm2", "1.0"):
            image_proj[f"layers.{i}.{norm}.weight"] = _random(g, dim, scale=0.1, around=1.0)
            image_proj[f"layers.{i}.{norm}.bias"] = _random(g, dim, scale=0.1)
        image_proj[f"layers.{i}.0.to_q.weight"] = _random(g, dim, dim, scale=0.1)
        image_proj[f"layers.{i}.0.to_kv.weight"] = _random(g, 2 * dim, dim, scale=0.1)
        image_proj[f"layers.{i}.0.to_out.weight"] = _random(g, dim, dim, scale=0.1)
        image_proj[f"layers.{i}.1.1.weight"] = _random(g, 4 * dim, dim, scale=0.1)
        image_proj[f"layers.{i}.1.3.weight"] = _random(g, dim, 4 * dim, scale=0.1)
    return {"image_proj": image_proj, "ip_adapter": _attention_layers(unet, g)}


def flat(parts: dict) -> dict:
    return {f"{part}.{key}": t.contiguous() for part, tensors in parts.items() for key, t in tensors.items()}


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1")


@pytest.fixture(scope="module")
def encoder():
    return _encoder()


@pytest.fixture(scope="module")
def models_dir(sd1, encoder, tmp_path_factory):
    """ComfyUI's models/ipadapter (plain, .safetensors) and A1111's models/ControlNet (plus, the original nested .bin),
    the encoder in models/clip_vision under ComfyUI's name."""
    root = tmp_path_factory.mktemp("models")
    for folder in ("ipadapter", "ControlNet", "clip_vision"):
        (root / folder).mkdir()
    save_file(flat(plain_adapter(sd1.unet, encoder.config.projection_dim)), root / "ipadapter" / "ip-adapter_sd15.safetensors")
    torch.save(plus_adapter(sd1.unet, encoder.config.hidden_size), root / "ControlNet" / "ip-adapter-plus_sd15.bin")
    save_file({k: t.contiguous() for k, t in encoder.state_dict().items()}, root / "clip_vision" / H_FILE)
    return root


@pytest.fixture(scope="module")
def settings(models_dir, tmp_path_factory):
    return Settings(models_dir=models_dir, data_dir=tmp_path_factory.mktemp("data"))


def picture(seed: int = 0) -> Image.Image:
    image = Image.new("RGB", (48, 40), (30, 90 + 40 * seed, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((5 + 6 * seed, 4, 30, 30), fill=(240, 200, 20))
    draw.rectangle((28, 18 - 4 * seed, 46, 38), fill=(200, 30, 60))
    return image


def unit(model: str = "ip-adapter_sd15", module: str = "ip-adapter_clip_sd15", seed: int = 0, **fields) -> ControlUnit:
    return ControlUnit(image=picture(seed), module=module, model=model, **fields)


def generate(sd1, settings, units: list[ControlUnit]):
    request = build_request(prompt=PROMPT, controlnets=units, **RUN)
    request, resources = prepare_resources(sd1, request, settings)
    return engine.generate(sd1, request, resources=resources).images[0]


def plain_picture(sd1):
    return engine.generate(sd1, build_request(prompt=PROMPT, **RUN)).images[0].pixels


def reference(models_dir, encoder, files: list[tuple[str, str]], scales: list[float], pictures: list[Image.Image]) -> np.ndarray:
    """diffusers' StableDiffusionPipeline on a fresh copy of the tiny model (load_ip_adapter changes its U-Net)."""
    tiny = build_tiny("sd1")
    pipe = StableDiffusionPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
        scheduler=EulerDiscreteScheduler.from_config(tiny.scheduler_config), safety_checker=None,
        feature_extractor=CLIPImageProcessor(size=32, crop_size=32), image_encoder=encoder, requires_safety_checker=False,
    )
    pipe.load_ip_adapter(
        [str(models_dir / folder) for folder, _ in files], subfolder=[""] * len(files), weight_name=[name for _, name in files],
        image_encoder_folder=None, local_files_only=True,
    )
    pipe.set_ip_adapter_scale(scales)
    return pipe(
        PROMPT, negative_prompt="blurry", ip_adapter_image=pictures, num_inference_steps=4, guidance_scale=6.0, height=64, width=64,
        generator=torch.Generator().manual_seed(21), output_type="np",
    ).images[0]


def test_ip_adapters_are_listed_from_both_folders_with_their_family(models_dir):
    entries = {e.name: e for e in control_models(models_dir)}
    assert {name: e.kind for name, e in entries.items()} == {"ip-adapter_sd15": "ip_adapter", "ip-adapter-plus_sd15": "ip_adapter"}
    # The tiny U-Net's 64-wide cross-attention is no released family's; a real SD 1.5 adapter's 768 is.
    assert entries["ip-adapter_sd15"].family is None
    assert ip_module.describe("x", {"image_proj.proj.weight": (3072, 1024), "image_proj.proj.bias": (3072,), "image_proj.norm.weight": (768,),
                                    "image_proj.norm.bias": (768,), "ip_adapter.1.to_k_ip.weight": (320, 768),
                                    "ip_adapter.1.to_v_ip.weight": (320, 768)}) == "sd1"
    title = entries["ip-adapter-plus_sd15"].title
    assert find_control_model(title, models_dir).path.name == "ip-adapter-plus_sd15.bin"


@pytest.mark.parametrize("model, folder, file", [
    ("ip-adapter_sd15", "ipadapter", "ip-adapter_sd15.safetensors"),
    ("ip-adapter-plus_sd15", "ControlNet", "ip-adapter-plus_sd15.bin"),
])
def test_one_unit_matches_diffusers_ip_adapter_pipeline(sd1, settings, models_dir, encoder, model, folder, file):
    ref = reference(models_dir, encoder, [(folder, file)], [0.8], [picture()])
    ours = generate(sd1, settings, [unit(model, weight=0.8)]).pixels
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.abs(ours - plain_picture(sd1)).max() > 1e-3  # the image prompt counts


def test_two_units_match_diffusers_with_a_list_of_adapters(sd1, settings, models_dir, encoder):
    files = [("ipadapter", "ip-adapter_sd15.safetensors"), ("ControlNet", "ip-adapter-plus_sd15.bin")]
    ref = reference(models_dir, encoder, files, [0.8, 0.5], [picture(0), picture(1)])
    ours = generate(sd1, settings, [unit(weight=0.8), unit("ip-adapter-plus_sd15", seed=1, weight=0.5)]).pixels
    assert np.abs(ours - ref).max() <= 1e-4


def _unet_state(unet) -> tuple:
    return (
        {name: type(p) for name, p in unet.attn_processors.items()}, sorted(unet.state_dict()), unet.encoder_hid_proj,
        unet.config.encoder_hid_dim_type, "encoder_hid_proj" in unet._modules,
    )


def test_weight_zero_a_window_outside_the_steps_and_after_a_job_equal_no_adapter(sd1, settings):
    before_state = _unet_state(sd1.unet)
    plain = plain_picture(sd1)
    assert np.array_equal(generate(sd1, settings, [unit(weight=0.0)]).pixels, plain)
    # 4 steps: shares done 0, 0.25, 0.5, 0.75; a window of [0.8, 1] holds none of them.
    assert np.array_equal(generate(sd1, settings, [unit(guidance_start=0.8)]).pixels, plain)
    full = generate(sd1, settings, [unit()]).pixels
    early = generate(sd1, settings, [unit(guidance_end=0.3)]).pixels
    assert np.abs(early - plain).max() > 1e-3 and np.abs(early - full).max() > 1e-3
    # The U-Net comes back exactly as it was: same processors, weights, projection and config.
    assert _unet_state(sd1.unet) == before_state
    assert np.array_equal(plain_picture(sd1), plain)


def test_the_u_net_is_put_back_when_a_call_fails(sd1, settings):
    from lienzo.generation.control import control_stack, image_prompts

    request, resources = prepare_resources(sd1, build_request(prompt=PROMPT, controlnets=[unit()], **RUN), settings)
    stack = control_stack(resources.controls, 64, 64, 4, "cpu", torch.float32)
    before = _unet_state(sd1.unet)
    with pytest.raises(RuntimeError, match="stop"):
        with image_prompts(stack, sd1.unet, 0, 2, 1, None) as added:
            assert added["image_embeds"][0].shape == (2, 1, 48)
            assert _unet_state(sd1.unet) != before
            raise RuntimeError("stop")
    assert _unet_state(sd1.unet) == before


def test_infotext_names_the_module_and_the_model_title(sd1, settings, models_dir):
    from lienzo.images.metadata import parse_infotext

    title = find_control_model("ip-adapter_sd15", models_dir).title
    params = parse_infotext(generate(sd1, settings, [unit(weight=0.7)]).infotext).params
    assert params["ControlNet 0"].startswith(f"Module: ip-adapter_clip_sd15, Model: {title}, Weight: 0.7, ")
    assert title.startswith("ip-adapter_sd15 [")


def test_a_second_job_reuses_the_loaded_adapter_and_encoder(sd1, settings, monkeypatch):
    request = build_request(prompt=PROMPT, controlnets=[unit()], **RUN)
    _, first = prepare_resources(sd1, request, settings)

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded again")

    monkeypatch.setattr("lienzo.control.prepare.load_ip_adapter", no_loading)
    monkeypatch.setattr("lienzo.control.prepare.load_image_encoder", no_loading)
    _, second = prepare_resources(sd1, request, settings)
    assert second.controls[0].model is first.controls[0].model
    torch.testing.assert_close(second.controls[0].image_embeds[0], first.controls[0].image_embeds[0])


def test_the_encoder_config_is_read_from_the_file(models_dir, encoder):
    loaded = load_image_encoder(models_dir / "clip_vision" / H_FILE)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(pixels).image_embeds, encoder(pixels).image_embeds)
    assert (loaded.config.image_size, loaded.config.num_hidden_layers, loaded.config.hidden_act) == (32, 2, "gelu")


def test_a_missing_encoder_names_the_files_to_put_in_clip_vision(sd1, tmp_path, models_dir):
    (tmp_path / "ipadapter").mkdir()
    (tmp_path / "ipadapter" / "ip-adapter_sd15.safetensors").write_bytes((models_dir / "ipadapter" / "ip-adapter_sd15.safetensors").read_bytes())
    (tmp_path / "ipadapter" / "ip-adapter_sdxl.safetensors").write_bytes((models_dir / "ipadapter" / "ip-adapter_sd15.safetensors").read_bytes())
    settings = Settings(models_dir=tmp_path, data_dir=tmp_path / "data")
    with pytest.raises(ModelFileError, match=f"{H_FILE}.*clip_vision"):
        prepare_resources(sd1, build_request(prompt=PROMPT, controlnets=[unit()], **RUN), settings)
    # ip-adapter-auto reads the name as the extension's presets do: a plain SDXL adapter takes bigG.
    with pytest.raises(ModelFileError, match="CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"):
        prepare_resources(sd1, build_request(prompt=PROMPT, controlnets=[unit("ip-adapter_sdxl", module="ip-adapter-auto")], **RUN), settings)


def test_module_and_model_must_go_together(sd1, settings):
    with pytest.raises(InvalidRequestError, match=r"controlnets\.0\.module.*is an IP-Adapter.*ip-adapter_clip_sd15"):
        prepare_resources(sd1, build_request(prompt=PROMPT, controlnets=[unit(module="canny")], **RUN), settings)
    # ip-adapter-auto picks the encoder by the model's name, as the extension's presets.
    assert ip_module.encoder_for("ip-adapter-auto", "ip-adapter-plus_sdxl_vit-h") == "ViT-H"
    assert ip_module.encoder_for("ip-adapter_clip_sdxl", "anything") == "ViT-bigG"


def test_faceid_and_other_family_adapters_are_refused_with_the_reason(sd1, encoder, tmp_path):
    faceid = plain_adapter(sd1.unet, 512)
    faceid["image_proj"] = {"proj.0.weight": torch.zeros(1024, 512), "proj.2.weight": torch.zeros(256, 1024), "norm.weight": torch.ones(64)}
    save_file(flat(faceid), tmp_path / "ip-adapter-faceid_sd15.safetensors")
    with pytest.raises(ModelFileError, match="FaceID.*insightface"):
        load_ip_adapter(tmp_path / "ip-adapter-faceid_sd15.safetensors", sd1.unet)
    save_file(flat(plain_adapter(build_tiny("sdxl").unet, 48)), tmp_path / "ip-adapter_sdxl.safetensors")
    with pytest.raises(ModelFileError, match="ip-adapter_sdxl.safetensors is an IP-Adapter .* does not fit"):
        load_ip_adapter(tmp_path / "ip-adapter_sdxl.safetensors", sd1.unet)
    broken = flat(plain_adapter(sd1.unet, 48))
    del broken["ip_adapter.3.to_v_ip.weight"]
    save_file(broken, tmp_path / "cut.safetensors")
    with pytest.raises(ModelFileError, match="cut.safetensors is an incomplete IP-Adapter: it lacks ip_adapter.3.to_v_ip.weight"):
        load_ip_adapter(tmp_path / "cut.safetensors", sd1.unet)


def test_ip_adapter_modules_are_known_and_make_no_map():
    assert find_preprocessor("ip-adapter_clip_h").name == "ip-adapter_clip_sd15"
    assert find_preprocessor("ip-adapter-auto").embeds
    with pytest.raises(InvalidRequestError, match="IP-Adapter.*no control map"):
        preprocess("ip-adapter_clip_sdxl", picture())


def test_an_sdxl_u_net_call_matches_diffusers_with_the_adapter_loaded(encoder, tmp_path):
    """SDXL's call carries its pooled text and size ids beside the image embeddings; diffusers' own loading of the
    same weights (``_load_ip_adapter_weights``) into an identical U-Net is the reference."""
    from lienzo.control.ip_adapter import encode_image
    from lienzo.generation.control import Control, control_stack, image_prompts

    xl, reference_unet = build_tiny("sdxl").unet, build_tiny("sdxl").unet
    parts = plain_adapter(xl, encoder.config.projection_dim, seed=3)
    save_file(flat(parts), tmp_path / "ip-adapter_sdxl_vit-h.safetensors")
    reference_unet._load_ip_adapter_weights([parts])
    for processor in reference_unet.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [0.6]
    cond, uncond = encode_image(encoder, picture(), hidden_states=False)
    adapter = load_ip_adapter(tmp_path / "ip-adapter_sdxl_vit-h.safetensors", xl)
    sdxl_unit = ControlUnit(image=picture(), module="ip-adapter_clip_sdxl_plus_vith", model="ip-adapter_sdxl_vit-h", weight=0.6)
    stack = control_stack((Control(sdxl_unit, adapter, picture(), image_embeds=(cond, uncond)),), 64, 64, 4, "cpu", torch.float32)
    torch.manual_seed(0)
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor(500), torch.randn(2, 77, xl.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        with image_prompts(stack, xl, 0, 2, 1, added) as kwargs:
            ours = xl(x, t, encoder_hidden_states=text, added_cond_kwargs=kwargs).sample
        image_embeds = [torch.cat([uncond, cond])[:, None]]
        ref = reference_unet(x, t, encoder_hidden_states=text, added_cond_kwargs={**added, "image_embeds": image_embeds}).sample
        plain = xl(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert (ours - plain).abs().max() > 1e-3


def test_encoders_are_found_as_transformers_folders_and_their_widths_checked(sd1, encoder, models_dir, tmp_path):
    from lienzo.control.ip_adapter import find_image_encoder

    (tmp_path / "ipadapter").mkdir()
    (tmp_path / "ipadapter" / "ip-adapter_sd15.safetensors").write_bytes((models_dir / "ipadapter" / "ip-adapter_sd15.safetensors").read_bytes())
    # A transformers folder named as ComfyUI names the file, holding config.json and model.safetensors.
    encoder.save_pretrained(tmp_path / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    found = find_image_encoder(tmp_path, "ViT-H")
    assert found == tmp_path / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_image_encoder(found)(pixels).image_embeds, encoder(pixels).image_embeds)
    # An encoder under bigG's name whose embedding is 40 wide cannot feed an adapter that reads 48.
    narrow = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**encoder.config.to_dict(), "projection_dim": 40}))
    save_file({k: t.contiguous() for k, t in narrow.state_dict().items()}, tmp_path / "clip_vision" / "clip_vision_g.safetensors")
    settings = Settings(models_dir=tmp_path, data_dir=tmp_path / "data")
    request = build_request(prompt=PROMPT, controlnets=[unit(module="ip-adapter_clip_sdxl")], **RUN)
    with pytest.raises(InvalidRequestError, match=r"controlnets\.0\.module.*reads 48-wide CLIP embeddings.*ViT-bigG.*gives 40"):
        prepare_resources(sd1, request, settings)
