"""The speed paths keep the image: bf16 agrees with fp32, compiled with eager, sliced attention, offload
and channels_last with the plain model, tiles with a whole decode; a VAE that overflows decodes again in
fp32. No timings are asserted here (benchmarks/ measures them)."""

import logging
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, PngImagePlugin

import lienzo.api
import lienzo.studio
from lienzo import devices
from lienzo.cli import app
from lienzo.devices import configure_threads, cpuinfo_has_bf16, execution_device, pick_dtype
from lienzo.errors import LienzoError
from lienzo.generation import engine, vae_decode
from lienzo.generation.request import build_request
from lienzo.generation.vae_decode import AUTO_TILE_PIXELS, decode_latents, wants_tiling
from lienzo.models import speed
from lienzo.models.loading import load_components
from lienzo.models.single_file_save import save_single_file
from lienzo.models.speed import SpeedOptions, apply_speed, enable_attention_slicing, enable_sequential_offload
from lienzo.settings import Settings
from tiny_models import build_tiny

FAST = dict(prompt="a watercolor fox", negative_prompt="blurry", steps=4, width=64, height=64, seed=3, cfg_scale=7.0)


def _pixels(components, **fields) -> np.ndarray:
    return engine.generate(components, build_request(**{**FAST, **fields})).images[0].pixels


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def _processors(components) -> set[str]:
    return {type(p).__name__ for p in components.unet.attn_processors.values()}


@pytest.fixture(scope="module")
def reference():
    """The tiny SD 1.x model's image in fp32 with every switch off."""
    return _pixels(build_tiny("sd1"))


@pytest.fixture
def tiny_file(tmp_path):
    path = tmp_path / "models" / "tiny.safetensors"
    save_single_file(build_tiny("sd1"), path)
    return path


# --- dtype: bf16 where the CPU computes it natively ---------------------------------------------


@pytest.mark.parametrize(
    ("cpuinfo", "native"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n", True),  # Cooper Lake, Zen 4
        ("flags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n", True),  # Sapphire Rapids
        ("flags\t\t: fpu sse2 avx avx2 fma\nbugs\t\t: spectre_v1\n", False),  # AVX2 only: bf16 is emulated
        ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # ARMv8.6 (Graviton 3)
        ("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n", False),  # Graviton 2
        ("", False),
    ],
)
def test_cpuinfo_flags_tell_native_bf16(cpuinfo, native):
    assert cpuinfo_has_bf16(cpuinfo) is native


@pytest.mark.parametrize(("isa", "allowed"), [("", True), ("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True), ("ALL", True)])
def test_a_capped_onednn_isa_tells_bf16_off(monkeypatch, isa, allowed):
    assert devices.onednn_isa_has_bf16(isa) is allowed
    # Capped below bf16, auto precision picks fp32 whatever /proc/cpuinfo says (an AVX2 machine, emulated).
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    monkeypatch.setattr(devices, "cpuinfo_has_bf16", lambda _text: True)
    devices.cpu_has_native_bf16.cache_clear()  # read once per process, as oneDNN reads its cap
    try:
        assert devices.cpu_has_native_bf16() is allowed  # Linux: read from /proc/cpuinfo
    finally:
        devices.cpu_has_native_bf16.cache_clear()


def test_auto_dtype_is_bf16_only_on_cpus_that_compute_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert pick_dtype("auto", cpu) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cuda")) == torch.float16  # GPUs keep fp16; bf16 when asked
    assert pick_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("float32", cpu) == torch.float32
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert pick_dtype("auto", cpu) == torch.float32


def test_load_model_auto_dtype_on_a_bf16_cpu(monkeypatch, tiny_file, tmp_path, reference):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    settings = Settings(data_dir=tmp_path / "data", models_dir=tiny_file.parent)
    components = lienzo.api.load_model("tiny", device="cpu", settings=settings)
    assert components.unet.dtype == components.text_encoder.dtype == components.vae.dtype == torch.bfloat16
    pixels = _pixels(components)
    assert np.isfinite(pixels).all()
    # The bar for every speed path: at least 30 dB PSNR against fp32 (this tiny model: about 50).
    assert _psnr(pixels, reference) >= 30
    assert not np.array_equal(pixels, reference)  # it did run in bf16
    kept = lienzo.api.load_model("tiny", device="cpu", vae_dtype="float32", settings=settings)
    assert kept.unet.dtype == torch.bfloat16 and kept.vae.dtype == torch.float32


def test_vae_dtype_beside_fp16_follows_the_vaes_force_upcast(tiny_file):
    assert load_components(tiny_file, dtype=torch.float16).vae.dtype == torch.float32  # SD's VAEs overflow in fp16
    assert load_components(tiny_file, dtype=torch.float16, vae_dtype=torch.float16).vae.dtype == torch.float16
    assert load_components(tiny_file, dtype=torch.bfloat16).vae.dtype == torch.bfloat16  # bf16 has fp32's range
    assert load_components(tiny_file).vae.dtype == torch.float32


# --- the VAE decode: NaN fallback and tiles ------------------------------------------------------


def _nan_when_half(module, _inputs, output):
    """A forward hook that overflows like an fp16 VAE: NaN out of any half-precision call."""
    if output.dtype in (torch.float16, torch.bfloat16):
        return torch.full_like(output, float("nan"))
    return None


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_a_vae_that_overflows_decodes_again_in_fp32(half, caplog):
    vae = build_tiny("sd1").vae.to(half)
    exact = build_tiny("sd1").vae.to(half).to(torch.float32)  # the same rounded weights, in fp32 from the start
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    vae.decoder.up_blocks[0].register_forward_hook(_nan_when_half)
    with torch.no_grad():
        assert torch.isnan(vae.decode(latents.to(half)).sample).all()  # the hook does overflow
    with caplog.at_level(logging.WARNING, logger="lienzo.generation.vae_decode"):
        decoded = decode_latents(vae, latents)
    assert torch.isfinite(decoded).all() and decoded.dtype == torch.float32
    assert vae.dtype == torch.float32  # kept in fp32 for the rest of the session
    assert torch.allclose(decoded, decode_latents(exact, latents), atol=1e-6)
    assert "decoding again in float32" in caplog.text


def test_nan_fallback_through_the_engine_gives_the_fp32_image(reference):
    components = build_tiny("sd1")
    components.vae.to(torch.bfloat16)
    hook = components.vae.decoder.up_blocks[0].register_forward_hook(_nan_when_half)
    pixels = _pixels(components)
    hook.remove()
    rounded = build_tiny("sd1")
    rounded.vae.to(torch.bfloat16).to(torch.float32)
    assert components.vae.dtype == torch.float32
    assert np.isfinite(pixels).all() and pixels.max() > 0  # not a black image
    assert np.abs(pixels - _pixels(rounded)).max() <= 1e-5


def test_nan_latents_are_not_blamed_on_the_vae(caplog):
    vae = build_tiny("sd1").vae.to(torch.bfloat16)
    latents = torch.full((1, 4, 8, 8), float("nan"))
    with caplog.at_level(logging.WARNING, logger="lienzo.generation.vae_decode"):
        decode_latents(vae, latents)
    assert vae.dtype == torch.bfloat16 and "U-Net overflowed" in caplog.text


def test_tiling_choice():
    vae = build_tiny("sd1").vae  # 2x downsampling
    side = int(AUTO_TILE_PIXELS**0.5)
    assert not wants_tiling(vae, torch.zeros(1, 4, side // 2, side // 2))  # exactly the threshold: whole
    assert wants_tiling(vae, torch.zeros(1, 4, side // 2, side // 2 + 4))
    assert wants_tiling(vae, torch.zeros(1, 4, 8, 8), "on") and not wants_tiling(vae, torch.zeros(1, 4, 4096, 4096), "off")
    with pytest.raises(ValueError, match="vae_tiling: choose one of auto, on, off; got 'yes'"):
        wants_tiling(vae, torch.zeros(1, 4, 8, 8), "yes")


def test_tiled_decode_agrees_with_a_whole_decode(monkeypatch):
    vae = build_tiny("sd1").vae
    # Tiles of 64 pixels (32 latents, blended over a quarter) on a 96 x 96 picture: 2 x 2 tiles.
    vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 32
    latents = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(1))
    calls = []
    monkeypatch.setattr(vae, "tiled_decode", lambda *a, **k: calls.append(1) or type(vae).tiled_decode(vae, *a, **k))
    whole = decode_latents(vae, latents, tiling="off")
    tiled = decode_latents(vae, latents, tiling="on")
    assert calls == [1] and not vae.use_tiling  # tiled this once; the VAE's own setting is back
    assert not torch.equal(tiled, whole)
    assert _psnr((tiled + 1) / 2, (whole + 1) / 2) >= 30  # seams blended: this random VAE gives about 40 dB
    monkeypatch.setattr(vae_decode, "AUTO_TILE_PIXELS", 64 * 64)
    decode_latents(vae, latents)  # auto, 96 x 96 > 64 x 64
    assert calls == [1, 1]


# --- low VRAM: sliced attention, offload -------------------------------------------------------


def test_sliced_attention_gives_the_same_image(reference):
    components = build_tiny("sd1")
    enable_attention_slicing(components.unet)
    assert _processors(components) == {"SlicedAttnProcessor"}
    assert np.abs(_pixels(components) - reference).max() <= 1e-5


def test_low_vram_on_cpu_tiles_and_keeps_fused_attention():
    components = apply_speed(build_tiny("sd1"), SpeedOptions(low_vram=True), "cpu")
    assert components.vae_tiling == "on" and components.vae.use_tiling and components.vae.use_slicing
    assert _processors(components) == {"AttnProcessor2_0"}  # fused SDPA needs less memory than slices on a CPU
    assert next(components.unet.parameters()).device.type == "cpu"  # no offload off CUDA
    assert apply_speed(build_tiny("sd1"), SpeedOptions(low_vram=True, vae_tiling="off"), "cpu").vae_tiling == "off"
    sliced = apply_speed(build_tiny("sd1"), SpeedOptions(low_vram=True, attention_slicing=True), "cpu")
    assert _processors(sliced) == {"SlicedAttnProcessor"}
    # Elsewhere (Apple GPUs) low_vram slices unless told not to; nothing is moved to the device here.
    assert _processors(apply_speed(build_tiny("sd1"), SpeedOptions(low_vram=True), torch.device("mps"))) == {"SlicedAttnProcessor"}
    assert _processors(apply_speed(build_tiny("sd1"), SpeedOptions(), torch.device("mps"))) == {"AttnProcessor2_0"}


def test_sequential_offload_gives_the_same_image(reference, tmp_path):
    """accelerate's hooks on the CPU (on CUDA the weights would stream to the GPU the same way)."""
    components = build_tiny("sd1")
    enable_sequential_offload(components, "cpu")
    assert next(components.unet.parameters()).device.type == "meta"  # weights live in the hooks
    assert execution_device(components.text_encoder) == components.execution_device == torch.device("cpu")
    assert np.array_equal(_pixels(components), reference)
    assert np.isfinite(_pixels(components, fast=True)).all()  # DeepCache calls the U-Net's blocks one by one


def test_lora_applies_to_an_offloaded_model(tmp_path):
    from lienzo.models.lora import apply_loras
    from test_lora import SD1_LAYERS, _write_kohya

    path = tmp_path / "style.safetensors"
    plain = build_tiny("sd1")
    _write_kohya(path, plain, SD1_LAYERS)
    apply_loras(plain, [(path, "style", 0.8)])
    offloaded = build_tiny("sd1")
    enable_sequential_offload(offloaded, "cpu")
    apply_loras(offloaded, [(path, "style", 0.8)])  # read into the model after it was offloaded
    assert next(offloaded.unet.parameters()).device.type == "meta"
    loras = [("style", 0.8)]
    assert np.array_equal(_pixels(offloaded, loras=loras), _pixels(plain, loras=loras))


# --- memory layout, compile, threads -----------------------------------------------------------


def test_channels_last_gives_the_same_image(reference):
    components = apply_speed(build_tiny("sd1"), SpeedOptions(channels_last=True), "cpu")
    weight = components.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert components.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(_pixels(components) - reference).max() <= 1e-4
    # Auto: on for CUDA and the CPU (measured faster there), off elsewhere (MPS).
    assert build_tiny("sd1").unet.conv_in.weight.is_contiguous()
    assert apply_speed(build_tiny("sd1"), SpeedOptions(), "cpu").unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert apply_speed(build_tiny("sd1"), SpeedOptions(channels_last=False), "cpu").unet.conv_in.weight.is_contiguous()
    assert speed.CHANNELS_LAST_DEVICES == ("cuda", "cpu")


@pytest.fixture
def compile_cache(tmp_path, monkeypatch):
    """Inductor's cache directory is the settings' one for the test, and put back after it."""
    monkeypatch.setattr(speed, "_USER_COMPILE_CACHE", None)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before")))
    return tmp_path / "cache" / "torch-compile"


def test_compiled_model_equals_eager(reference, compile_cache):
    """apply_speed compiles the U-Net and VAE decoder in place; dynamo's graphs (run by the eager backend,
    without code generation) give the eager image, and the first call's time is kept."""
    components = build_tiny("sd1")
    apply_speed(components, SpeedOptions(compile=True, compile_backend="eager", compile_cache=compile_cache), "cpu")
    assert components.unet._compiled_call_impl is not None and components.vae.decoder._compiled_call_impl is not None
    assert np.abs(_pixels(components) - reference).max() <= 1e-5
    assert set(components.speed.compile_seconds) == {"unet", "vae decoder"}  # timed on the first call
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(compile_cache) and compile_cache.is_dir()
    assert np.abs(_pixels(components, seed=4, steps=2) - _pixels(build_tiny("sd1"), seed=4, steps=2)).max() <= 1e-5
    assert "_orig_mod" not in next(iter(components.unet.state_dict()))  # in place: LoRAs still find their layers


def _unet_call(unet):
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=text).sample


def test_aot_compiled_unet_equals_eager():
    """The U-Net through AOTAutograd (functionalised, decomposed: the graph inductor would get), run eagerly."""
    components = build_tiny("sd1")
    eager = _unet_call(components.unet)
    speed.compile_module(components, "unet", components.unet, backend="aot_eager")
    torch.testing.assert_close(_unet_call(components.unet), eager, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_unet_and_vae_equal_eager(compile_cache):
    """Inductor's own kernels (minutes on a 2-core CPU: gcc builds some 60 of them for the tiny model)."""
    components, plain = build_tiny("sd1"), build_tiny("sd1")
    speed.set_compile_cache(compile_cache)
    speed.compile_module(components, "unet", components.unet)
    speed.compile_module(components, "vae decoder", components.vae.decoder)
    torch.testing.assert_close(_unet_call(components.unet), _unet_call(plain.unet), atol=1e-4, rtol=1e-4)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(decode_latents(components.vae, latents), decode_latents(plain.vae, latents), atol=1e-4, rtol=1e-4)
    assert any(compile_cache.rglob("*.so"))  # the kernels were cached in the settings' folder


def test_threads():
    before = torch.get_num_threads()
    try:
        configure_threads(1)
        assert torch.get_num_threads() == 1 and torch.get_num_interop_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(LienzoError, match="threads: give 1 or more; got 0"):
        configure_threads(0)


# --- int8 ----------------------------------------------------------------------------------------


def test_int8_quantizes_the_unets_linear_layers_and_stays_close(reference):
    components = apply_speed(build_tiny("sd1"), SpeedOptions(int8=True), "cpu")
    quantized = [m for m in components.unet.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert quantized and not any(type(m) is torch.nn.Linear for m in components.unet.modules())
    assert all(type(m) is torch.nn.Linear for m in components.text_encoder.modules() if isinstance(m, torch.nn.Linear))
    assert components.speed.int8 is True
    image = engine.generate(components, build_request(**FAST)).images[0]
    pixels = image.pixels
    assert "Int8: U-Net linear layers" in image.infotext
    assert not np.array_equal(pixels, reference)  # the layers really compute in int8
    assert _psnr(pixels, reference) > 30
    assert np.isfinite(_pixels(components, fast=True)).all()


def test_int8_is_left_off_where_it_cannot_run(caplog):
    components = build_tiny("sd1").to("cpu", torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="lienzo.models.speed"):
        apply_speed(components, SpeedOptions(int8=True), "cpu")
    assert "int8: only float32 models on the CPU are quantized" in caplog.text
    assert not components.speed.int8
    assert any(type(m) is torch.nn.Linear for m in components.unet.modules())


def test_lora_on_an_int8_model_is_refused(tmp_path):
    from lienzo.models.lora import apply_loras
    from test_lora import SD1_LAYERS, _write_kohya

    path = tmp_path / "style.safetensors"
    components = build_tiny("sd1")
    _write_kohya(path, components, SD1_LAYERS)
    apply_speed(components, SpeedOptions(int8=True), "cpu")
    with pytest.raises(LienzoError, match="lora: style.safetensors cannot be added to a model whose linear layers are int8"):
        apply_loras(components, [(path, "style", 0.8)])


# --- settings and front doors ------------------------------------------------------------------


def test_settings_from_environment(monkeypatch, tmp_path):
    env = {"THREADS": "3", "CHANNELS_LAST": "true", "COMPILE": "1", "VAE_TILING": "on", "LOW_VRAM": "yes", "VAE_DTYPE": "float32"}
    env["ATTENTION_SLICING"] = "false"
    env["INT8"] = "1"
    for name, value in env.items():
        monkeypatch.setenv(f"LIENZO_{name}", value)
    settings = Settings(data_dir=tmp_path)
    got = (settings.threads, settings.channels_last, settings.compile, settings.vae_tiling, settings.low_vram, settings.vae_dtype)
    assert got == (3, True, True, "on", True, "float32")
    options = SpeedOptions.from_settings(settings, low_vram=False, channels_last=None)
    cache = tmp_path / "cache" / "torch-compile"
    assert options == SpeedOptions(
        channels_last=True, compile=True, vae_tiling="on", low_vram=False, attention_slicing=False, compile_cache=cache, int8=True
    )
    monkeypatch.setenv("LIENZO_VAE_TILING", "sometimes")
    with pytest.raises(ValueError, match="vae_tiling"):
        Settings(data_dir=tmp_path)
    with pytest.raises(LienzoError, match="vae_tiling: choose one of auto, on, off; got 'sometimes'"):
        SpeedOptions(vae_tiling="sometimes")


def test_cli_speed_flags_reach_load_model(home, tmp_path, monkeypatch):
    seen = {}
    real = lienzo.studio.load_model

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(lienzo.studio, "load_model", spy)
    base = ["--models-dir", str(home / "models"), "--data-dir", str(tmp_path / "data"), "--outputs-dir", str(tmp_path / "out")]
    flags = ["--low-vram", "--vae-tiling", "on", "--no-channels-last", "--threads", "1", "--vae-dtype", "float32", "--attention-slicing", "--int8"]
    threads = torch.get_num_threads()
    try:
        args = [*base, "generate", "a fox", "--steps", "2", "-W", "64", "-H", "64", *flags]
        result = CliRunner().invoke(app, args, catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert Image.open(result.stdout.strip()).size == (64, 64)
    want = {"low_vram": True, "vae_tiling": "on", "channels_last": False, "threads": 1, "vae_dtype": "float32", "compile": None}
    want["attention_slicing"] = want["int8"] = True
    assert {k: seen[k] for k in want} == want


# --- start-up ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["info", "IMAGE"]])
def test_cli_help_and_info_do_not_import_torch(args, tmp_path):
    """`lienzo --help` and `lienzo info` answer without loading torch, diffusers or transformers."""
    import subprocess
    import sys

    image = tmp_path / "made.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a fox\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64")
    Image.new("RGB", (64, 64)).save(image, pnginfo=info)
    args = [str(image) if a == "IMAGE" else a for a in args]
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom lienzo.cli import app\n"
        f"result = CliRunner().invoke(app, {args!r})\n"
        "print(result.exit_code, sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
        "print(result.output)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, _, output = done.stdout.partition("\n")
    assert first == "0 []", done.stdout + done.stderr
    assert ("Seed: 3" in output) if args[0] == "info" else ("Usage: " in output)
