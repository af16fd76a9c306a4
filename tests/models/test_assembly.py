"""ComfyUI's split layout: a transformer file completed with text encoders and a VAE from the models dir's
folders or the user's paths, SD 3.5 all-in-one files, the one-line errors for missing pieces, memory
planning, and what ``lienzo models`` and the A1111 door say about these files."""

import shutil

import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType
from safetensors.torch import save_file
from test_transformer_files import original_names, write_gguf
from tiny_models import build_tiny

from lienzo.errors import ModelFileError
from lienzo.models import assembly
from lienzo.models.assembly import Piece, plan_memory
from lienzo.models.loading import load_components
from lienzo.models.registry import Registry, examine
from lienzo.models.single_file_save import _vae_to_ldm

TRANSFORMER_PREFIX = "model.diffusion_model."


def _tensors(module: torch.nn.Module, prefix: str = "", dtype: torch.dtype | None = None) -> dict:
    return {prefix + k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in module.state_dict().items()}


def save_transformer(network, path, family):
    """The transformer alone in its makers' names (BFL's, Stability's), as Flux.1's releases ship it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in original_names(family, network.state_dict()).items()}, path)
    return path


def save_text_encoder(encoder, path, dtype=None):
    """A text encoder as ComfyUI's files hold one: transformers' names (``text_model.*``; T5's ``shared.weight``
    and ``encoder.block.*``, its tied embedding once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.ndim >= 2 else v)
        for k, v in _tensors(encoder).items()
        if k != "encoder.embed_tokens.weight"
    }
    save_file(tensors, path)
    return path


def save_vae(vae, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in _vae_to_ldm(vae).items()}, path)
    return path


def save_all_in_one(components, path, *, t5=True):
    """SD 3.5's release layout: transformer, text encoders under ``text_encoders.<kind>.transformer.``, ldm VAE."""
    tensors = {TRANSFORMER_PREFIX + k: v for k, v in original_names("sd3", components.transformer.state_dict()).items()}
    encoders = {"clip_l": components.text_encoder, "clip_g": components.text_encoder_2}
    if t5:
        encoders["t5xxl"] = components.text_encoder_3
    for kind, encoder in encoders.items():
        tensors.update({k: v for k, v in _tensors(encoder, f"text_encoders.{kind}.transformer.").items() if "embed_tokens" not in k})
    tensors.update({f"first_stage_model.{k}": v.contiguous() for k, v in _vae_to_ldm(components.vae).items()})
    save_file(tensors, path)
    return path


def fp8_rounded(module: torch.nn.Module) -> dict:
    return {k: (v.to(torch.float8_e4m3fn).float() if v.ndim >= 2 else v) for k, v in module.state_dict().items()}


def assert_same(module: torch.nn.Module, expected) -> None:
    expected = expected if isinstance(expected, dict) else expected.state_dict()
    got = module.state_dict()
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key].float(), tensor.float()), key


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A ComfyUI Flux.1 schnell guide's models dir: diffusion_models/, text_encoders/ (CLIP-L, fp8 T5), vae/ae."""
    root = tmp_path_factory.mktemp("comfy") / "models"
    original = build_tiny("flux", guidance=False)
    save_transformer(original.transformer, root / "diffusion_models" / "flux1-schnell-tiny.safetensors", "flux")
    save_text_encoder(original.text_encoder, root / "text_encoders" / "clip_l.safetensors")
    save_text_encoder(original.text_encoder_2, root / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors", torch.float8_e4m3fn)
    save_vae(original.vae, root / "vae" / "ae.safetensors")
    return original, root


@pytest.fixture(scope="module")
def flux_gguf(flux):
    """City96's GGUF of the same transformer, Q8_0, beside the other files."""
    original, root = flux
    tensors = original_names("flux", original.transformer.state_dict())
    path = root / "diffusion_models" / "flux1-schnell-tiny-Q8_0.gguf"
    return original, write_gguf(path, tensors, GGMLQuantizationType.Q8_0, "flux")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd35")
    original = build_tiny("sd3")
    return original, save_all_in_one(original, folder / "sd35-tiny.safetensors"), save_all_in_one(
        original, folder / "sd35-tiny-no-t5.safetensors", t5=False
    )


def _copy(root, tmp_path, *skip):
    copy = tmp_path / "models"
    shutil.copytree(root, copy, ignore=lambda _, names: [n for n in names if n in skip])
    return copy


# -- Flux.1: a transformer file and ComfyUI's folders -------------------------------------------------------


def test_flux_transformer_file_is_assembled_from_comfyuis_folders(flux):
    original, root = flux
    path = root / "diffusion_models" / "flux1-schnell-tiny.safetensors"
    for models_dir in (root, None):  # None: the folder above diffusion_models/
        loaded = load_components(path, models_dir=models_dir)
        assert loaded.family == "flux" and loaded.unet is None and loaded.name == "flux1-schnell-tiny" and loaded.source == path
        assert_same(loaded.transformer, original.transformer)
        assert_same(loaded.text_encoder, original.text_encoder)
        assert_same(loaded.text_encoder_2, fp8_rounded(original.text_encoder_2))
        assert_same(loaded.vae, original.vae)
        assert loaded.text_encoder_files == {"text_encoder": "clip_l.safetensors", "text_encoder_2": "t5xxl_fp8_e4m3fn.safetensors"}
        assert loaded.vae_name == "ae"
        assert type(loaded.tokenizer).__name__.startswith("CLIPTokenizer") and "T5" in type(loaded.tokenizer_2).__name__
        # schnell: no guidance input, and its scheduler's fixed shift
        assert not loaded.guidance_embeds
        assert loaded.scheduler_config["shift"] == 1.0 and not loaded.scheduler_config["use_dynamic_shifting"]


def test_a_gguf_transformer_is_assembled_and_stays_quantized(flux, flux_gguf):
    from diffusers.quantizers.gguf.utils import GGUFLinear

    original, path = flux_gguf
    root = flux[1]
    plan = assembly.plan_assembly(path)
    fp32 = assembly.plan_assembly(root / "diffusion_models" / "flux1-schnell-tiny.safetensors")
    assert plan.transformer.size < fp32.transformer.size / 2  # planned at its quantized size
    loaded = load_components(path)
    assert isinstance(loaded.transformer.transformer_blocks[0].attn.to_q, GGUFLinear)
    assert_same(loaded.text_encoder, original.text_encoder)
    assert loaded.text_encoder_files == {"text_encoder": "clip_l.safetensors", "text_encoder_2": "t5xxl_fp8_e4m3fn.safetensors"}


def test_the_most_precise_text_encoder_file_is_taken(flux, tmp_path):
    original, root = flux
    models = _copy(root, tmp_path)
    save_text_encoder(original.text_encoder_2, models / "clip" / "t5xxl_fp16.safetensors", torch.float16)
    path = models / "diffusion_models" / "flux1-schnell-tiny.safetensors"
    plan = assembly.plan_assembly(path, models_dir=models)
    assert plan.text_encoders["t5xxl"].path.name == "t5xxl_fp16.safetensors"
    assert [p.name for p in assembly.find_text_encoders(models)["t5xxl"]] == ["t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors"]
    # What each piece takes once read, in the dtype asked for: fp8 and fp16 files alike.
    t5_params = sum(p.numel() for p in original.text_encoder_2.parameters())  # the tied embedding once, as saved
    assert plan.text_encoders["t5xxl"].size == 4 * t5_params
    assert assembly.plan_assembly(path, models_dir=models, dtype=torch.bfloat16).text_encoders["t5xxl"].size == 2 * t5_params


def test_text_encoder_and_vae_paths_override_the_folders(flux, tmp_path):
    original, root = flux
    torch.manual_seed(5)
    other = build_tiny("flux", guidance=False)
    for module in (other.text_encoder_2, other.vae):
        for p in module.parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
    t5 = save_text_encoder(other.text_encoder_2, tmp_path / "elsewhere" / "my-t5xxl-v2.safetensors")
    vae = save_vae(other.vae, tmp_path / "elsewhere" / "my-vae.safetensors")
    loaded = load_components(root / "diffusion_models" / "flux1-schnell-tiny.safetensors", models_dir=root, text_encoders=[t5], vae=vae)
    assert_same(loaded.text_encoder_2, other.text_encoder_2)
    assert_same(loaded.text_encoder, original.text_encoder)  # the one not given still comes from the folder
    assert_same(loaded.vae, other.vae)
    assert loaded.text_encoder_files["text_encoder_2"] == "my-t5xxl-v2.safetensors" and loaded.vae_name == "my-vae"


def test_each_missing_piece_is_one_line_naming_it_where_it_was_looked_for_and_how_to_give_it(flux, tmp_path):
    original, root = flux
    name = "flux1-schnell-tiny.safetensors"
    models = _copy(root, tmp_path / "a", "text_encoders")
    with pytest.raises(ModelFileError) as err:
        load_components(models / "diffusion_models" / name)
    assert str(err.value) == (
        f"model {name} (Flux.1) needs a CLIP-L text encoder (clip_l) and a T5-XXL text encoder (t5xxl): "
        f"none in {models / 'text_encoders'} or {models / 'clip'}; put clip_l.safetensors and t5xxl_fp16.safetensors "
        "there or pass --text-encoder PATH"
    )
    models = _copy(root, tmp_path / "b", "t5xxl_fp8_e4m3fn.safetensors")
    with pytest.raises(ModelFileError, match=r"needs a T5-XXL text encoder \(t5xxl\): none in "):
        load_components(models / "diffusion_models" / name)
    models = _copy(root, tmp_path / "c", "vae")
    with pytest.raises(ModelFileError) as err:
        load_components(models / "diffusion_models" / name)
    assert str(err.value) == (
        f"model {name} (Flux.1) needs a VAE: none with 16 latent channels in {models / 'vae'}; "
        "put ae.safetensors there or pass --vae PATH"
    )
    with pytest.raises(ModelFileError, match=r"^--no-t5: model .* \(Flux.1\) needs its T5-XXL text encoder; only SD 3.x"):
        load_components(root / "diffusion_models" / name, t5=False)
    clip_g = save_text_encoder(build_tiny("sd3").text_encoder_2, tmp_path / "clip_g.safetensors")
    with pytest.raises(ModelFileError, match=r"^--text-encoder clip_g.safetensors: a CLIP-G text encoder, which Flux.1 does not use"):
        load_components(root / "diffusion_models" / name, text_encoders=[clip_g])
    with pytest.raises(ModelFileError, match="^--text-encoder: model tiny.safetensors has its own text encoders"):
        from lienzo.models.single_file_save import save_single_file

        load_components(save_single_file(build_tiny("sd1"), tmp_path / "tiny.safetensors"), text_encoders=[clip_g])


# -- SD 3.5: all-in-one files, with or without T5 ---------------------------------------------------------------


def test_sd35_all_in_one_file_uses_its_bundled_text_encoders_and_vae(sd3, tmp_path):
    original, whole, _ = sd3
    loaded = load_components(whole, models_dir=tmp_path)
    assert loaded.family == "sd3" and loaded.text_encoder_files == {} and loaded.vae_name == ""
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        assert_same(getattr(loaded, name), getattr(original, name))
    assert loaded.tokenizer_3 is not None
    without = load_components(whole, models_dir=tmp_path, t5=False)
    assert without.text_encoder_3 is None and without.tokenizer_3 is None
    # A given file replaces the bundled one of its kind; the others stay.
    torch.manual_seed(7)
    other = build_tiny("sd3").text_encoder
    for p in other.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    given = load_components(whole, text_encoders=[save_text_encoder(other, tmp_path / "clip_l-finetune.safetensors")])
    assert_same(given.text_encoder, other)
    assert_same(given.text_encoder_2, original.text_encoder_2)
    assert given.text_encoder_files == {"text_encoder": "clip_l-finetune.safetensors"}


def test_sd35_file_without_t5_runs_without_it_or_with_one_from_the_folder(sd3, tmp_path, caplog):
    original, _, no_t5 = sd3
    caplog.set_level("INFO", logger="lienzo.models.assembly")
    loaded = load_components(no_t5, models_dir=tmp_path)
    assert loaded.text_encoder_3 is None and loaded.tokenizer_3 is None
    assert_same(loaded.text_encoder_2, original.text_encoder_2)
    assert "no T5-XXL text encoder (t5xxl) given or found; running without it" in caplog.text
    save_text_encoder(original.text_encoder_3, tmp_path / "text_encoders" / "t5xxl_fp16.safetensors", torch.float16)
    filled = load_components(no_t5, models_dir=tmp_path)
    assert filled.text_encoder_files == {"text_encoder_3": "t5xxl_fp16.safetensors"}
    assert_same(filled.text_encoder_3, {k: v.half().float() if v.ndim >= 2 else v for k, v in original.text_encoder_3.state_dict().items()})
    assert load_components(no_t5, models_dir=tmp_path, t5=False).text_encoder_3 is None


# -- memory ------------------------------------------------------------------------------------------------------


def _pieces(tmp_path, optional_t5=False):
    gib = 2**30
    return [
        Piece("transformer", tmp_path / "flux1-dev.safetensors", 22 * gib, "given"),
        Piece("t5xxl", tmp_path / "t5xxl_fp16.safetensors", 9 * gib, "found", optional_t5),
        Piece("vae", tmp_path / "ae.safetensors", gib // 4, "found"),
    ]


def test_a_model_that_cannot_fit_fails_before_loading_with_sizes_and_ways_out(tmp_path, monkeypatch):
    monkeypatch.setattr(assembly, "available_memory", lambda device: 16 * 2**30)
    with pytest.raises(ModelFileError) as err:
        plan_memory(_pieces(tmp_path), "cpu", name="model flux1-dev.safetensors (Flux.1)", dtype=torch.bfloat16)
    assert str(err.value) == (
        "model flux1-dev.safetensors (Flux.1) needs 31.2 GiB to load (transformer 22.0 GiB, T5-XXL 9.0 GiB, vae 0.2 GiB) "
        "but the CPU has 16.0 GiB of RAM available; try a GGUF file of the transformer (it stays quantized in memory)"
    )
    with pytest.raises(ModelFileError, match=r"^the model needs .*; try a GGUF file .*, --dtype bfloat16 or --no-t5$"):
        plan_memory(_pieces(tmp_path, optional_t5=True), "cpu", dtype=torch.float32)
    plan_memory(_pieces(tmp_path)[2:], "cpu")  # the VAE alone fits

    monkeypatch.setattr(assembly, "available_memory", lambda device: (64 if device.type == "cpu" else 12) * 2**30)
    with pytest.raises(ModelFileError, match=r"but cuda:0 has 12.0 GiB free; try --low-vram or a GGUF file"):
        plan_memory(_pieces(tmp_path), torch.device("cuda:0"))
    with pytest.raises(ModelFileError, match=r"needs 22.0 GiB to load .* cuda:0 has 12.0 GiB free; try a GGUF"):
        plan_memory(_pieces(tmp_path), torch.device("cuda:0"), low_vram=True)  # one part at a time: the largest must fit
    monkeypatch.setattr(assembly, "available_memory", lambda device: None)  # unknown: no check
    plan_memory(_pieces(tmp_path), "cpu")


def test_loading_checks_memory_before_reading_any_tensor(flux, monkeypatch):
    _, root = flux
    monkeypatch.setattr(assembly, "available_memory", lambda device: 2**20)
    monkeypatch.setattr(assembly, "load_assembly", lambda *a, **k: pytest.fail("tensors were read"))
    with pytest.raises(ModelFileError, match=r"^model flux1-schnell-tiny.safetensors \(Flux.1\) needs .* GiB to load \(transformer"):
        load_components(root / "diffusion_models" / "flux1-schnell-tiny.safetensors")


def test_this_machines_memory_is_read():
    free = assembly.available_memory("cpu")
    assert free is None or 0 < free < 2**50


# -- what the models dir lists ---------------------------------------------------------------------------------


@pytest.fixture
def listed(flux, flux_gguf, sd3, tmp_path):
    _, root = flux
    models = _copy(root, tmp_path)
    shutil.copy(sd3[1], models / "sd35-tiny.safetensors")
    return models, Registry(models, tmp_path / "cache")


def test_registry_names_family_and_weight_format_and_lists_only_models_as_checkpoints(listed):
    models, registry = listed
    assert examine(models / "diffusion_models" / "flux1-schnell-tiny.safetensors") == ("Flux.1 schnell", "fp32")
    assert examine(models / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors") == ("text encoder (T5-XXL)", "fp8")
    assert examine(models / "text_encoders" / "clip_l.safetensors") == ("text encoder (CLIP-L)", "fp32")
    assert examine(models / "vae" / "ae.safetensors") == ("VAE", "fp32")
    assert examine(models / "sd35-tiny.safetensors") == ("SD 3.x", "fp32")
    assert examine(models / "diffusion_models" / "flux1-schnell-tiny-Q8_0.gguf") == ("Flux.1 schnell", "GGUF Q8_0")
    names = {e.name for e in registry.checkpoints()}
    assert names == {"diffusion_models/flux1-schnell-tiny", "diffusion_models/flux1-schnell-tiny-Q8_0", "sd35-tiny"}
    entry = registry.entry(models / "diffusion_models" / "flux1-schnell-tiny.safetensors")
    assert entry.is_checkpoint and entry.quantization == "fp32"


def test_diffusers_folders_of_transformer_families_are_named_and_planned(tmp_path, monkeypatch):
    from tiny_models import save_diffusers_folder

    schnell = save_diffusers_folder(build_tiny("flux", guidance=False), tmp_path / "schnell")
    sd35 = save_diffusers_folder(build_tiny("sd3"), tmp_path / "sd35")
    assert examine(schnell) == ("Flux.1 schnell (diffusers)", "fp32")
    assert examine(sd35) == ("SD 3.x (diffusers)", "fp32")
    assert load_components(sd35, t5=False).text_encoder_3 is None
    with pytest.raises(ModelFileError, match=r"^--no-t5: model schnell \(Flux.1\) needs its T5-XXL text encoder"):
        load_components(schnell, t5=False)
    monkeypatch.setattr(assembly, "available_memory", lambda device: 2**20)
    with pytest.raises(ModelFileError, match=r"^model schnell \(Flux.1\) needs 0.0 GiB to load \(transformer 0.0 GiB, vae"):
        load_components(schnell)


def test_weight_format_reads_fp8_scales(tmp_path):
    from lienzo.models.registry import header_tensors, weight_format

    scaled = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file({"encoder.block.0.w.weight": torch.zeros(8, 8, dtype=torch.float8_e4m3fn), "scaled_fp8": torch.zeros(1)}, scaled)
    assert weight_format(header_tensors(scaled)) == "scaled fp8"


def test_lienzo_models_lists_family_weight_format_and_size(listed, tmp_path, monkeypatch):
    from lienzo.cli import app

    models, _ = listed
    monkeypatch.setenv("COLUMNS", "200")  # one table row a line
    result = CliRunner().invoke(app, ["--models-dir", str(models), "--data-dir", str(tmp_path / "data"), "models"])
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 3}
    flux_row = lines["diffusion_models/flux1-schnell-tiny"]
    assert "Flux.1 schnell" in flux_row and "fp32" in flux_row and "MiB" in flux_row
    assert "text encoder (T5-XXL)" in lines["text_encoders/t5xxl_fp8_e4m3fn"] and "fp8" in lines["text_encoders/t5xxl_fp8_e4m3fn"]
    assert "SD 3.x" in lines["sd35-tiny"] and "VAE" in lines["vae/ae"]
    assert "GGUF Q8_0" in lines["diffusion_models/flux1-schnell-tiny-Q8_0"]


def test_a1111_lists_transformer_models_and_modules_and_takes_forge_additional_modules(listed, tmp_path):
    from fastapi.testclient import TestClient

    from lienzo.server.app import create_app
    from lienzo.settings import Settings

    models, _ = listed
    settings = Settings(models_dir=models, data_dir=tmp_path / "data", outputs_dir=tmp_path / "out")
    with TestClient(create_app(settings, loader=lambda name, cancel: None)) as client:
        titles = {m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()}
        assert titles == {"diffusion_models_flux1-schnell-tiny", "diffusion_models_flux1-schnell-tiny-Q8_0", "sd35-tiny"}
        modules = {m["model_name"]: m["filename"] for m in client.get("/sdapi/v1/sd-modules").json()}
        assert set(modules) == {"clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "ae.safetensors"}
        assert client.get("/sdapi/v1/options").json()["forge_additional_modules"] == []

        chosen = [modules["clip_l.safetensors"], modules["t5xxl_fp8_e4m3fn.safetensors"], modules["ae.safetensors"]]
        assert client.post("/sdapi/v1/options", json={"forge_additional_modules": chosen}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["forge_additional_modules"] == chosen
        queue = client.app.state.queue
        assert queue.modules == {"vae": chosen[2], "text_encoders": chosen[:2]}

        bad = client.post("/sdapi/v1/options", json={"forge_additional_modules": [str(models / "sd35-tiny.safetensors")]})
        assert bad.status_code == 422 and "sd35-tiny.safetensors is SD 3.x, not a text encoder or VAE" in bad.json()["detail"]
        outside = client.post("/sdapi/v1/options", json={"forge_additional_modules": ["/etc/passwd"]})
        assert outside.status_code == 422 and outside.json()["field"] == "forge_additional_modules"
        assert client.get("/sdapi/v1/options").json()["forge_additional_modules"] == chosen  # refused: nothing changed
        assert client.post("/sdapi/v1/options", json={"forge_additional_modules": []}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["forge_additional_modules"] == [] and queue.modules == {}


def test_text_encoders_and_no_t5_reach_the_loader_from_the_cli_by_name(listed, tmp_path, monkeypatch):
    from lienzo import studio
    from lienzo.cli import app
    from lienzo.errors import LienzoError

    models, _ = listed
    seen = {}

    def loader(path, **options):
        seen.update(options, path=path)
        raise LienzoError("stop here")

    monkeypatch.setattr(studio, "load_components", loader)
    args = ["--models-dir", str(models), "--data-dir", str(tmp_path / "data"), "generate", "a fox", "--model", "sd35-tiny"]
    result = CliRunner().invoke(app, [*args, "--text-encoder", "clip_l", "--text-encoder", "text_encoders/t5xxl_fp8_e4m3fn", "--no-t5"])
    assert result.exit_code == 2 and "stop here" in result.stderr
    assert seen["path"] == models / "sd35-tiny.safetensors" and seen["t5"] is False and seen["models_dir"] == models
    assert seen["text_encoders"] == [models / "text_encoders" / "clip_l.safetensors", models / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors"]
    CliRunner().invoke(app, args)
    assert seen["text_encoders"] == [] and seen["t5"] is True
