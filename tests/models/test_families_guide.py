"""Issue 20's "done when": for each family of 2026's releases, tiny random stand-ins in each file layout its
users download (the diffusers folder; ComfyUI's split files: the network in diffusion_models/, its text
encoder in text_encoders/, its VAE in vae/) make txt2img and img2img pictures through the CLI, the A1111 API
and the studio's API, each remade exactly from its PNG; ``lienzo models`` lists family, quantization and size
of every file."""

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from gguf import GGMLQuantizationType
from PIL import Image
from test_assembly import save_text_encoder, save_vae
from test_comfyui_guide import b64, cli, remade_exactly, saved
from test_transformer_files import write_gguf, write_safetensors
from test_transformer_files_2 import PREFIX, family_original_names, qwen3_like_the_real_one, save_qwen3
from tiny_models import build_tiny, save_diffusers_folder

from lienzo.cli import app
from lienzo.images.metadata import parse_infotext, read_parameters
from lienzo.server.app import create_app
from lienzo.settings import Settings

SMALL = ("--steps", "2", "-W", "64", "-H", "64")


def _chroma(models):
    """Chroma as its users download it: lodestones' GGUF, T5-XXL fp16 and Flux's ae."""
    components = build_tiny("chroma")
    tensors = family_original_names("chroma", components.transformer.state_dict())
    write_gguf(models / "diffusion_models" / "chroma-unlocked-v50-Q8_0.gguf", tensors, GGMLQuantizationType.Q8_0, "chroma")
    save_text_encoder(components.text_encoder, models / "text_encoders" / "t5xxl_fp16.safetensors")
    save_vae(components.vae, models / "vae" / "ae.safetensors")
    return components, {"diffusion_models/chroma-unlocked-v50-Q8_0": ("Chroma", "GGUF Q8_0")}


def _zimage(models):
    """Z-Image Turbo as ComfyUI's guide has it: the bf16 network, qwen_3_4b and ae (with the tiny model's
    tokenizer beside its encoder: the bundled Qwen tokenizer's ids are beyond the tiny vocabulary)."""
    components = build_tiny("zimage")
    components.text_encoder = qwen3_like_the_real_one(components.text_encoder)
    tensors = {PREFIX + k: t.bfloat16() for k, t in family_original_names("zimage", components.transformer.state_dict()).items()}
    write_safetensors(models / "diffusion_models" / "z_image_turbo_bf16.safetensors", tensors)
    encoder = save_qwen3(components.text_encoder, models / "text_encoders" / "qwen_3_4b.safetensors")
    components.tokenizer.save_pretrained(encoder.parent)
    save_vae(components.vae, models / "vae" / "ae.safetensors")
    return components, {"diffusion_models/z_image_turbo_bf16": ("Z-Image", "bf16")}


def _flux2(models):
    """Flux.2 Klein 4B (step-distilled) as city96-style GGUF in BFL's names, Qwen3 4B without its lm_head (with
    the tiny tokenizer beside it) and BFL's flux2-vae."""
    from test_flux2_files import bfl_names, qwen3_like_the_real_one as klein_qwen3, save_qwen3 as save_klein_qwen3, save_vae as save_flux2_vae

    components = build_tiny("flux2")
    components.text_encoder = klein_qwen3(components.text_encoder)
    write_gguf(models / "diffusion_models" / "flux-2-klein-4b-Q8_0.gguf", bfl_names(components.transformer.state_dict()), GGMLQuantizationType.Q8_0, "flux")
    save_klein_qwen3(components.text_encoder, models / "text_encoders" / "qwen_3_4b.safetensors", head=False)
    components.tokenizer.save_pretrained(models / "text_encoders")
    save_flux2_vae(components.vae, models / "vae" / "flux2-vae.safetensors")
    return components, {"diffusion_models/flux-2-klein-4b-Q8_0": ("Flux.2 Klein", "GGUF Q8_0")}


def _qwenimage(models):
    """Qwen-Image as ComfyUI's guide has it: the network, qwen_2.5_vl_7b (its tokenizer beside it) and
    qwen_image_vae in their original names (the tiny model's unstated values patched in by :func:`home`)."""
    from test_qwen_image_split_files import comfyui_text_encoder, tiny_qwen_image, wan_vae

    components = tiny_qwen_image()
    write_safetensors(models / "diffusion_models" / "qwen_image_fp32.safetensors", {PREFIX + k: t for k, t in components.transformer.state_dict().items()})
    write_safetensors(models / "text_encoders" / "qwen_2.5_vl_7b.safetensors", comfyui_text_encoder(components.text_encoder))
    components.tokenizer.save_pretrained(models / "text_encoders")
    write_safetensors(models / "vae" / "qwen_image_vae.safetensors", wan_vae(components.vae))
    return components, {"diffusion_models/qwen_image_fp32": ("Qwen-Image", "fp32")}


def _folder_only(family: str, label: str):
    """A family lienzo reads from its diffusers folder only (Krea 2: its single files are not read yet)."""

    def layout(models):
        return build_tiny(family), {f"tiny-{family}": (f"{label} (diffusers)", "fp32")}

    return layout


LAYOUTS = {
    "chroma": _chroma, "zimage": _zimage, "flux2": _flux2, "qwenimage": _qwenimage,
    "krea2": _folder_only("krea2", "Krea 2 base"),  # the tiny Krea 2 is the base model (is_distilled false)
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def home(request, tmp_path_factory):
    """A models dir holding one family in every layout; (root, family, {model name: (family label, format)})."""
    family = request.param
    root = tmp_path_factory.mktemp(f"guide-{family}")
    models = root / "models"
    for folder in ("diffusion_models", "text_encoders", "vae"):
        (models / folder).mkdir(parents=True)
    components, files = LAYOUTS[family](models)
    save_diffusers_folder(components, models / f"tiny-{family}")
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "photo.png")
    label = next(iter(files.values()))[0].removesuffix(" (diffusers)")
    with pytest.MonkeyPatch.context() as patches:
        if family == "qwenimage":
            from test_qwen_image_split_files import patch_tiny_constants

            patch_tiny_constants(patches, components)
        yield root, family, {f"tiny-{family}": (f"{label} (diffusers)", "fp32"), **files}


def test_cli_makes_and_remakes_txt2img_and_img2img_in_every_layout(home):
    root, _, models = home
    for model in models:
        made = {
            "txt2img": cli(root, "generate", "a (red:1.2) apple", "--model", model, *SMALL, "--seed", "1"),
            "img2img": cli(root, "img2img", str(root / "photo.png"), "a red apple", "--model", model, *SMALL, "--seed", "2", "--strength", "0.6"),
        }
        for mode, path in made.items():
            assert parse_infotext(read_parameters(path)).params["Model"] == model.split("/")[-1]  # the stem, as A1111 writes it
            remade_exactly(root, path, mode)


@pytest.fixture(scope="module")
def client(home):
    root, family, _ = home
    settings = Settings(data_dir=root / "data", models_dir=root / "models", outputs_dir=root / "out")
    with TestClient(create_app(settings, model=f"tiny-{family}")) as c:
        yield c


def test_a1111_api_makes_pictures_that_remake_exactly(home, client):
    root, _, models = home
    for model in models:
        base = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64, "override_settings": {"sd_model_checkpoint": model}}
        bodies = {
            "txt2img": ("/sdapi/v1/txt2img", {**base, "seed": 11}),
            "img2img": ("/sdapi/v1/img2img", {**base, "seed": 12, "init_images": [b64(root / "photo.png")], "denoising_strength": 0.6}),
        }
        for mode, (url, body) in bodies.items():
            r = client.post(url, json=body)
            assert r.status_code == 200, r.text
            remade_exactly(root, saved(root, f"a1111-{model.replace('/', '-')}-{mode}.png", r.json()["images"][0]), mode)


def test_studio_api_makes_pictures_that_remake_exactly(home, client):
    root, _, models = home
    for model in models:
        assert client.put("/api/v1/models/current", json={"name": model}).status_code == 200
        base = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64}
        for mode, body in {"txt2img": {**base, "seed": 21}, "img2img": {**base, "seed": 22, "init_image": b64(root / "photo.png"), "denoising_strength": 0.6}}.items():
            job = client.post(f"/api/v1/{mode}?wait=true", json=body).json()
            assert job["status"] == "done", job
            path = root / f"studio-{model.replace('/', '-')}-{mode}.png"
            path.write_bytes(client.get(job["images"][0]["url"]).content)
            remade_exactly(root, path, mode)


def test_lienzo_models_lists_family_format_and_size_of_every_file(home, monkeypatch):
    root, _, models = home
    monkeypatch.setenv("COLUMNS", "240")  # one table row a line
    result = CliRunner().invoke(app, ["--models-dir", str(root / "models"), "--data-dir", str(root / "data"), "models"])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 3}
    for model, (label, weight_format) in models.items():
        assert label in rows[model] and weight_format in rows[model] and ("KiB" in rows[model] or "MiB" in rows[model]), rows[model]
