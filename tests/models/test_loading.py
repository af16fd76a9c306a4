"""The one loading path: diffusers folders and single files give the same model; VAE override; registry."""

import logging

import numpy as np
import pytest
import torch
from tiny_models import build_tiny, save_diffusers_folder

from lienzo.api import load_model
from lienzo.errors import ModelFileError
from lienzo.generation import engine
from lienzo.generation.request import build_request
from lienzo.models.loading import load_components
from lienzo.models import registry as registry_module
from lienzo.models.registry import Registry
from lienzo.models.single_file_save import save_single_file
from lienzo.settings import Settings

REQUEST = dict(prompt="a fox", steps=3, sampler="Euler", seed=3, width=64, height=64)


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def saved(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    components = build_tiny(request.param)
    return components, save_diffusers_folder(components, folder / "diffusers"), save_single_file(components, folder / "model.safetensors")


def _pixels(components) -> np.ndarray:
    return engine.generate(components, build_request(**REQUEST)).images[0].pixels


def test_diffusers_folder_and_single_file_make_the_same_image(saved):
    original, folder, single = saved
    from_folder, from_file = load_components(folder), load_components(single)
    assert from_folder.family == from_file.family == original.family
    assert from_folder.prediction_type == from_file.prediction_type == original.prediction_type
    # CPU kernels may round differently on differently aligned buffers: ~1e-7, far below 8-bit pixels.
    assert np.abs(_pixels(from_folder) - _pixels(from_file)).max() <= 1e-4


def test_v_prediction_model_generates_with_v_prediction_schedule(tmp_path):
    components = build_tiny("sd2")
    path = save_single_file(components, tmp_path / "sd2-v.safetensors")
    loaded = load_components(path)
    assert loaded.prediction_type == "v_prediction"
    as_eps = load_components(path, prediction_type="epsilon")
    assert np.abs(_pixels(loaded) - _pixels(as_eps)).max() > 1e-3


def test_separate_vae_replaces_the_checkpoints_vae(tmp_path):
    base = build_tiny("sd1")
    path = save_single_file(base, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    other = build_tiny("sd1")
    for p in other.vae.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    vae_path = save_single_file(other, tmp_path / "full-other.safetensors")
    with_vae = load_components(path, vae=vae_path)
    assert with_vae.vae_name == "full-other"
    for a, b in zip(with_vae.vae.state_dict().values(), other.vae.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    image = engine.generate(with_vae, build_request(**REQUEST)).images[0]
    assert "VAE: full-other" in image.infotext


def test_registry_lists_resolves_and_caches(tmp_path):
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    save_single_file(build_tiny("sd1"), models / "sub" / "tiny.safetensors")
    save_diffusers_folder(build_tiny("sd1"), models / "folder-model")
    (models / "notes.safetensors").write_bytes(b"")
    registry = Registry(models, tmp_path / "cache")
    entries = {e.name: e for e in registry.scan()}
    assert entries["sub/tiny"].architecture == "SD 1.x" and len(entries["sub/tiny"].short_hash) == 10
    assert entries["folder-model"].architecture == "SD (diffusers)"
    assert entries["notes"].architecture.startswith("unreadable")
    assert registry.resolve("tiny") == models / "sub" / "tiny.safetensors"
    assert registry.resolve(entries["sub/tiny"].short_hash) == models / "sub" / "tiny.safetensors"
    with pytest.raises(ModelFileError, match="no model named 'nope'; available: "):
        registry.resolve("nope")
    assert (tmp_path / "cache" / "models.json").is_file()


def test_load_model_by_name_sets_name_and_hash(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models")
    save_single_file(build_tiny("sd1"), tmp_path / "models" / "apple.safetensors")
    components = load_model("apple", settings=settings, device="cpu")
    assert components.name == "apple" and len(components.short_hash) == 10
    assert load_model(settings=settings, device="cpu").short_hash == components.short_hash


def test_no_model_anywhere_is_a_clear_error(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    with pytest.raises(ModelFileError, match="no model given and none found"):
        load_model(settings=settings, device="cpu")


def test_settings_come_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LIENZO_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("LIENZO_MODELS_DIR", str(tmp_path / "m"))
    settings = Settings()
    assert settings.models_dir == tmp_path / "m" and settings.outputs_dir == tmp_path / "d" / "outputs"
    assert Settings(models_dir=tmp_path / "flag").models_dir == tmp_path / "flag"


def test_default_model_is_the_shipped_one_unless_settings_name_another(monkeypatch, tmp_path):
    shipped = save_diffusers_folder(build_tiny("sd1"), tmp_path / "weights" / "lienzo-mini")
    monkeypatch.setattr(registry_module, "EMBEDDED", shipped)
    save_single_file(build_tiny("sd1"), tmp_path / "models" / "apple.safetensors")
    settings = Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models")
    assert load_model(settings=settings, device="cpu").source == shipped
    assert Registry(settings.models_dir, settings.cache_dir).resolve("lienzo-mini") == shipped
    chosen = Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models", default_model="apple")
    assert load_model(settings=chosen, device="cpu").name == "apple"


@pytest.fixture
def diffusers_log(caplog):
    """diffusers logs through its own stderr handler and does not propagate: listen on its logger too."""
    logger = logging.getLogger("diffusers")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_load_and_move_say_nothing_about_float32_modules(dtype, diffusers_log, tmp_path):
    """diffusers 0.42 logs "There are modules in AutoencoderKL that should be kept in float32: []" on every
    .to() that names a dtype, None included; an fp16 load (every GPU command) used to print it three times."""
    components = build_tiny("sd1")
    sources = save_diffusers_folder(components, tmp_path / "folder"), save_single_file(components, tmp_path / "one.safetensors")
    for source in sources:
        loaded = load_components(source, dtype=dtype)
        assert loaded.unet.dtype == dtype and loaded.vae.dtype == (torch.float32 if dtype == torch.float16 else dtype)
        loaded.to("meta")  # another device, as a GPU command moves the model to CUDA after loading
    assert not [r for r in diffusers_log.records if "kept in float32" in r.getMessage()]


def test_fp32_vae_stays_exact_beside_an_fp16_model(tmp_path):
    """The VAE is read in float32 rather than read in fp16 and cast up, which would round its weights."""
    components = build_tiny("sd1")
    folder = save_diffusers_folder(components, tmp_path / "folder")
    loaded = load_components(folder, dtype=torch.float16)
    for a, b in zip(loaded.vae.state_dict().values(), components.vae.state_dict().values(), strict=True):
        assert torch.equal(a, b)
