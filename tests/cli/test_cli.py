"""The CLI as a user runs it: a single-file checkpoint in, PNGs with parameters out, clear errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lienzo.cli import app
from lienzo.images.metadata import parse_infotext, pnginfo, read_parameters
from lienzo.models import registry as registry_module

FAST = ["--steps", "2", "--width", "64", "--height", "64", "--seed", "5"]


def _paths(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.endswith(".png")]


def test_help_lists_the_commands():
    result = CliRunner().invoke(app, ["--help"])
    for command in ("generate", "img2img", "inpaint", "outpaint", "models", "samplers", "info"):
        assert command in result.stdout


def test_help_says_where_the_images_go(tmp_path, monkeypatch):
    monkeypatch.setenv("LIENZO_OUTPUTS_DIR", str(tmp_path / "my-pictures"))
    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert f"outputs  {tmp_path / 'my-pictures'}" in result.stdout


def test_generate_prints_one_path_per_image_with_infotext(lienzo):
    result = lienzo("generate", "a red apple", "--negative", "blurry", "--batch-size", "2", "--batch-count", "2", *FAST)
    paths = _paths(result)
    assert result.stdout.splitlines() == paths and len(paths) == 4
    info = parse_infotext(read_parameters(paths[3]))
    assert info.prompt == "a red apple" and info.negative_prompt == "blurry"
    assert info.params["Seed"] == "8" and info.params["Steps"] == "2" and info.model == "tiny-sd15" and len(info.model_hash) == 10
    assert "seeds: 5, 6, 7, 8" in result.stderr


def test_remake_from_png_gives_the_same_pixels(lienzo):
    first = _paths(lienzo("generate", "a lighthouse, (oil painting:1.2)", "--sampler", "Euler a", "--cfg", "5", *FAST))[0]
    again = _paths(lienzo("generate", "--from", first))[0]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert read_parameters(first) == read_parameters(again)


def test_tiling_is_written_and_remade_and_a_flag_wins_over_the_image(lienzo):
    tiled = _paths(lienzo("generate", "a brick wall", "--tiling", *FAST))[0]
    assert parse_infotext(read_parameters(tiled)).params["Tiling"] == "True"
    again = _paths(lienzo("generate", "--from", tiled))[0]
    assert np.array_equal(np.asarray(Image.open(tiled)), np.asarray(Image.open(again)))
    plain = _paths(lienzo("generate", "--from", tiled, "--no-tiling"))[0]
    assert "Tiling" not in parse_infotext(read_parameters(plain)).params
    assert not np.array_equal(np.asarray(Image.open(tiled)), np.asarray(Image.open(plain)))


def test_info_reads_parameters(lienzo):
    path = _paths(lienzo("generate", "a red apple", *FAST))[0]
    out = lienzo("info", path).stdout
    assert "Prompt: a red apple" in out and "Seed: 5" in out and "Sampler: DPM++ 2M" in out


@pytest.fixture
def picture(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "picture.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 40, 40))
    mask.save(tmp_path / "mask.png")
    return path


def test_img2img_inpaint_outpaint(lienzo, picture):
    steps = ["--steps", "2", "--seed", "1"]
    (one,) = _paths(lienzo("img2img", str(picture), "a fox", "--strength", "0.5", *steps))
    assert "Denoising strength: 0.5" in read_parameters(one)
    mask = str(picture.parent / "mask.png")
    (two,) = _paths(lienzo("inpaint", str(picture), mask, "a fox", "--fill", "latent noise", "--only-masked", *steps))
    assert Image.open(two).size == (64, 64)
    (three,) = _paths(lienzo("outpaint", str(picture), "a fox", "--left", "16", "--down", "32", *steps))
    assert Image.open(three).size == (80, 96)


def test_models_lists_architecture_size_and_cached_hash(lienzo, monkeypatch):
    out = lienzo("models").stdout
    assert "tiny-sd15" in out and "SD 1.x" in out and "MiB" in out

    def no_rehash(path, chunk=0):
        raise AssertionError("hash was recomputed")

    monkeypatch.setattr(registry_module, "sha256_file", no_rehash)
    assert lienzo("models").stdout == out
    details = lienzo("models", "--details").stdout
    assert "training data" in details and "provenance unknown" in details


def test_samplers_lists_every_sampler(lienzo):
    out = lienzo("samplers").stdout
    for name in ("Euler a", "DPM++ 2M SDE", "UniPC", "LCM", "Karras"):
        assert name in out
    for a1111_id in ("polyexponential", "sgm_uniform", "kl_optimal", "align_your_steps", "simple", "normal", "ddim", "beta"):
        assert a1111_id in out


def test_a_schedule_the_sampler_cannot_run_still_generates(lienzo):
    path = _paths(lienzo("generate", "a fox", "--sampler", "DDIM", "--schedule", "karras", *FAST))[0]
    assert parse_infotext(read_parameters(path)).params["Schedule type"] == "Karras"


def test_an_empty_prompt_is_noted_on_one_line_and_still_generates(lienzo):
    result = lienzo("generate", *FAST)
    assert len(_paths(result)) == 1
    notes = [line for line in result.stderr.splitlines() if "prompt" in line]
    assert notes == ["note: the prompt is empty; generating without one"]
    assert "prompt" not in lienzo("generate", "a fox", *FAST).stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "1001"], "width must be a multiple of 8 between 64 and 4096, got 1001"),
        (["--width", "8192"], "width must be a multiple of 8 between 64 and 4096, got 8192"),
        (["--height", "32"], "height must be a multiple of 8 between 64 and 4096, got 32"),
        (["--steps", "0"], "steps must be between 1 and 150, got 0"),
        (["--steps", "1000"], "steps must be between 1 and 150, got 1000"),
        (["--cfg", "nan"], "cfg_scale must be between 0 and 30, got nan"),
        (["--sampler", "Eulr a"], "unknown sampler 'Eulr a'; choose one of: Euler a, Euler"),
        (["--schedule", "karas"], "unknown schedule type 'karas'; choose one of: Automatic, Uniform, Karras"),
        (["--seed", "-5"], "seed must be -1 (random)"),
        (["--model", "nothing-here"], "no model named 'nothing-here'"),
    ],
)
def test_bad_generate_input_is_one_clear_line(lienzo, args, message):
    result = lienzo("generate", "a fox", "--steps", "1", *args, code=2)
    assert message in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_bad_images_and_strength(lienzo, picture, tmp_path):
    small_mask = tmp_path / "small.png"
    Image.new("L", (32, 32), 255).save(small_mask)
    result = lienzo("inpaint", str(picture), str(small_mask), "a fox", code=2)
    assert "mask is 32x32 but the image is 64x64" in result.stderr
    result = lienzo("img2img", str(picture), "a fox", "--strength", "1.5", code=2)
    assert "denoising_strength must be between 0 and 1, got 1.5" in result.stderr
    broken = tmp_path / "broken.png"
    broken.write_bytes(picture.read_bytes()[:100])
    assert "image" in lienzo("img2img", str(broken), "a fox", code=2).stderr
    assert "image" in lienzo("img2img", str(tmp_path / "missing.png"), "a fox", code=2).stderr


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, "half"])
def test_bad_model_files(lienzo, home, tmp_path, content):
    bad = tmp_path / "bad.safetensors"
    good = (home / "models" / "tiny-sd15.safetensors").read_bytes()
    bad.write_bytes(good[: len(good) // 2] if content == "half" else content)
    result = lienzo("generate", "a fox", "--model", str(bad), *FAST, code=2)
    assert "Traceback" not in result.output and bad.name in result.stderr


# Runs the CLI in a fresh interpreter, then reports its exit code and which heavy libraries it imported.
_REPORT_IMPORTS = """
import json, sys
from lienzo.cli import main
sys.argv = ["lienzo", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "imported": [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]}))
"""


def _fresh_cli(home, tmp_path, *args: str) -> tuple[dict, str]:
    base = ["--models-dir", str(home / "models"), "--data-dir", str(tmp_path / "data"), "--outputs-dir", str(tmp_path / "out")]
    run = subprocess.run(
        [sys.executable, "-c", _REPORT_IMPORTS, json.dumps([*base, *args])], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(run.stdout.splitlines()[-1]), run.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sampler", "Eulr a"], "sampler: unknown sampler 'Eulr a'; choose one of: Euler a, Euler, LMS, Heun"),
        (["--width", "100"], "width: width must be a multiple of 8 between 64 and 4096, got 100"),
        (["--schedule", "karas"], "schedule: unknown schedule type 'karas'; choose one of: Automatic, Uniform"),
    ],
)
def test_a_bad_request_fails_before_torch_is_imported(home, tmp_path, args, message):
    report, stderr = _fresh_cli(home, tmp_path, "generate", "x", *args)
    assert report == {"code": 2, "imported": []}
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}")


def test_inputs_fail_before_the_heavy_imports(home, tmp_path, picture):
    report, stderr = _fresh_cli(home, tmp_path, "img2img", str(tmp_path / "missing.png"), "a fox")
    assert report == {"code": 2, "imported": []} and "no such file" in stderr
    report, stderr = _fresh_cli(home, tmp_path, "inpaint", str(picture), str(picture), "a fox", "--sampler", "bogus")
    assert report == {"code": 2, "imported": []} and "unknown sampler 'bogus'" in stderr
    report, stderr = _fresh_cli(home, tmp_path, "outpaint", str(picture), "a fox", "--left", "12")
    assert report == {"code": 2, "imported": []} and "outpaint_left must be a multiple of 8" in stderr
    # A model name is looked up by the registry, which reads model files with torch; diffusers still waits.
    report, stderr = _fresh_cli(home, tmp_path, "generate", "x", "--model", "nothing-here")
    assert report["code"] == 2 and "diffusers" not in report["imported"] and "no model named 'nothing-here'" in stderr


def test_remaking_from_an_image_validates_before_torch(home, tmp_path):
    image = tmp_path / "old.png"
    infotext = "a fox\nSteps: 2, Sampler: DPM++ 2M SGMUniform, CFG scale: 5, Seed: 1, Size: 64x64, Model hash: 0123456789"
    Image.new("RGB", (64, 64)).save(image, pnginfo=pnginfo(infotext))
    report, stderr = _fresh_cli(home, tmp_path, "generate", "--from", str(image), "--steps", "0")
    assert report == {"code": 2, "imported": []} and "steps must be between 1 and 150, got 0" in stderr


def test_importing_the_request_imports_no_torch():
    code = "import sys, lienzo.generation.request; print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_ctrl_c_stops_between_steps_and_leaves_no_partial_file(home, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "lienzo.cli", "--models-dir", str(home / "models"), "--data-dir", str(home / "data")]
    args += ["generate", "a fox", "--out", str(out), "--batch-count", "2", "--steps", "60", "--width", "64", "--height", "64"]
    env = {**os.environ, "LIENZO_DEFAULT_MODEL": "tiny-sd15"}  # not the shipped model
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        first = proc.stdout.readline().strip()  # the first batch is saved before the signal is sent
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "cancelled" in stderr and "Traceback" not in stderr and stdout == ""
    assert sorted(p.name for p in out.iterdir()) == [Path(first).name]
