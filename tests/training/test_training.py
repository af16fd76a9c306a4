"""The trainer on the tiny preset: it trains, checkpoints, resumes bit for bit, and its result generates."""

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from lienzo.cli import app
from lienzo.errors import ModelFileError
from lienzo.generation.engine import generate
from lienzo.generation.request import build_request
from lienzo.models.loading import load_components
from lienzo.training.config import ConfigError, build_config, parse_override, read_toml, to_toml, validate_config
from lienzo.training.loop import lr_factor
from lienzo.training.models import build_models
from lienzo.training.stream import SampleStream
from lienzo.training.trainer import Trainer

# A few steps of each stage, small batches, one prompt in the sample grid: seconds on a CPU.
QUICK = [
    {
        "vae": {"steps": 3, "batch_size": 2},
        "unet": {"steps": 3, "batch_size": 4, "grad_accum": 2},
        "samples": {"every": 2, "per_prompt": 2, "steps": 2, "prompts": ["a cat"]},
        "checkpoint_every": 2,
        "log_every": 1,
    }
]


def _art(root: Path) -> Path:
    """Ten captioned images in two labelled folders, plus a corrupt file, a truncated file and a non-image."""
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(5):
            colour = rng.integers(0, 256, 3)
            array = np.clip(rng.normal(colour, 30, (72, 80, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(array).save(root / label / f"{i}.png")
            (root / label / f"{i}.txt").write_text(f"a {label[:-1]}, picture {i}")
    (root / "broken.png").write_bytes(rng.bytes(200))
    whole = (root / "cats" / "0.png").read_bytes()
    (root / "cut.png").write_bytes(whole[: len(whole) // 2])
    (root / "notes.pdf").write_bytes(b"%PDF-1.4")
    (root / "LICENSE").write_text("CC0 1.0\nPhotos by the lienzo test suite.\n")
    return root


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    return _art(tmp_path_factory.mktemp("art") / "data")


@pytest.fixture(scope="module")
def straight(art, tmp_path_factory) -> Path:
    """One uninterrupted tiny run, shared by the tests that only read its results."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    result = Trainer(build_config("tiny", overrides=QUICK), data=art, out=out, device="cpu").run()
    assert result.status == "finished" and result.steps == {"vae": 3, "unet": 3}
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return {
        f"{part}.{k}": v
        for part in ("unet", "vae", "text_encoder")
        for f in (run / part).glob("*.safetensors")
        for k, v in load_file(f).items()
    }


# -- config ---------------------------------------------------------------------------------------


def test_presets_validate_and_round_trip_through_toml(tmp_path):
    for preset in ("tiny", "mini", "base"):
        config = build_config(preset)
        path = tmp_path / f"{preset}.toml"
        path.write_text(to_toml(config))
        assert validate_config(read_toml(path)) == config


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"config: unet\.stepz: unknown key"):
        build_config("tiny", overrides=[parse_override("unet.stepz=3")])
    with pytest.raises(ConfigError, match=r"config: unet\.lr: Input should be greater than 0"):
        build_config("tiny", overrides=[parse_override("unet.lr=0")])
    with pytest.raises(ConfigError, match=r"resolution must be a multiple of 16 for this VAE and UNet"):
        build_config("mini", overrides=[{"resolution": 136}])
    with pytest.raises(ConfigError, match="model.unet.attention needs one entry per level"):
        build_config("tiny", overrides=[parse_override("model.unet.attention=[true]")])
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = = 3")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        build_config(file=bad)
    with pytest.raises(ConfigError, match="preset: choose one of tiny, mini, base"):
        build_config("huge")


def test_learning_rate_schedules():
    config = build_config("tiny", overrides=[{"unet": {"steps": 110, "warmup": 10, "schedule": "cosine"}}])
    f = lr_factor(config.unet)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == 1.0 and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    step = lr_factor(build_config("tiny", overrides=[{"unet": {"schedule": "step", "step_size": 5, "gamma": 0.5}}]).unet)
    assert [step(s) for s in (0, 4, 5, 10)] == [1.0, 1.0, 0.5, 0.25]


def test_sample_stream_is_a_sequence_of_shuffled_epochs():
    stream = SampleStream(5, seed=3, stage=1, flip=True)
    first = stream.take(0, 12)
    assert sorted(i for _, i, _ in first[:5]) == list(range(5)) == sorted(i for _, i, _ in first[5:10])
    assert [i for _, i, _ in first[:5]] != [i for _, i, _ in first[5:10]]  # each epoch reshuffled
    assert SampleStream(5, seed=3, stage=1, flip=True).take(7, 3) == first[7:10]  # any position, same answer


# -- a run ---------------------------------------------------------------------------------------------


def test_run_leaves_model_card_samples_logs_and_checkpoints(straight, art):
    training = straight / "training"
    samples = sorted(p.name for p in (training / "samples").iterdir())
    assert samples == ["unet-000002.png", "unet-000003.png", "vae-000002.png", "vae-000003.png"]
    grid = Image.open(training / "samples" / "unet-000003.png")
    assert grid.width > 2 * 64 and grid.height > 64  # two seeds side by side, a label band above
    rows = (training / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("stage,step,loss") and len(rows) == 1 + 3 + 3
    assert all(np.isfinite(float(r.split(",")[2])) for r in rows[1:])
    assert Image.open(training / "loss.png").size[0] > 100
    memorised = list(csv.DictReader((training / "memorisation.csv").open()))
    assert [(r["step"], r["prompt"], r["sample"]) for r in memorised] == [(s, "a cat", i) for s in ("2", "3") for i in ("0", "1")]
    files = {f"{label}/{i}.png" for label in ("cats", "dogs") for i in range(5)}
    assert all(r["nearest_training_file"] in files and 0 <= float(r["distance"]) <= 2 for r in memorised)
    assert sorted(p.name for p in (training / "checkpoints").iterdir()) == ["unet-000002", "unet-000003"]
    manifest = json.loads((straight / "dataset_manifest.json").read_text())
    assert len(manifest["images"]) == 10 and {p["path"] for p in manifest["problems"]} == {"broken.png", "cut.png", "notes.pdf"}
    card = (straight / "README.md").read_text()
    assert "Images: 10 (10 with captions); labels: cats (5), dogs (5)" in card
    assert "Licence: CC0 1.0" in card and "Notice: Photos by the lienzo test suite." in card
    assert "Steps: vae: 3, unet: 3" in card and "[unet]" in card


def test_result_loads_like_any_model_and_generates(straight):
    components = load_components(straight)
    assert components.family == "sd1" and components.unet.config.sample_size == 16
    assert components.vae.config.scaling_factor != pytest.approx(0.18215)  # measured on the data
    request = build_request(prompt="a cat", steps=3, seed=5, cfg_scale=5)
    image = generate(components, request).images[0].image
    assert image.size == (64, 64)
    again = generate(load_components(straight), request).images[0].image
    assert np.array_equal(np.asarray(image), np.asarray(again))


def test_stopped_and_resumed_run_equals_straight_run(straight, art, tmp_path):
    config = build_config("tiny", overrides=QUICK)
    out = tmp_path / "resumed"
    # Stop inside the VAE stage, then inside the UNet stage, then finish.
    first = Trainer(config, data=art, out=out, device="cpu", stop_after=2).run()
    assert first.status == "stopped" and first.steps == {"vae": 2}
    second = Trainer(config, data=None, out=out, resume=True, device="cpu", stop_after=2).run()
    assert second.status == "stopped" and second.steps == {"vae": 3, "unet": 1}
    assert (out / "model_index.json").is_file()  # a stopped run can already be tried out
    third = Trainer(config, data=art, out=out, resume=True, device="cpu").run()
    assert third.status == "finished"
    expected, got = _weights(straight), _weights(out)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    rows = (out / "training" / "loss.csv").read_text().splitlines()
    assert rows == (straight / "training" / "loss.csv").read_text().splitlines() or len(rows) == 7


def test_resume_records_a_source_added_since(straight, art, tmp_path):
    """A finished run resumed after ``dataset check --source`` re-exports its card with the source."""
    out, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(straight, out)
    shutil.copytree(art, data)
    assert "Source: not stated" in (out / "README.md").read_text()
    CliRunner().invoke(app, ["dataset", "check", str(data), "--source", "scanned sketchbook, 2024"], catch_exceptions=False)
    result = Trainer(build_config("tiny", overrides=QUICK), data=data, out=out, resume=True, device="cpu").run()
    assert result.status == "finished"
    manifest = out / "dataset_manifest.json"
    assert json.loads(manifest.read_text())["source"] == "scanned sketchbook, 2024"
    card = (out / "README.md").read_text()
    assert "Source: scanned sketchbook, 2024" in card
    assert hashlib.sha256(manifest.read_bytes()).hexdigest() in card  # the card names the manifest beside it


def test_interrupt_saves_a_checkpoint(art, tmp_path):
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    out = tmp_path / "run"
    result = Trainer(build_config("tiny", overrides=QUICK), data=art, out=out, device="cpu", stop=stop).run()
    assert result.status == "interrupted" and result.steps == {"vae": 2}
    state = json.loads((out / "training" / "checkpoints" / "vae-000002" / "state.json").read_text())
    assert state["stage"] == "vae" and state["step"] == 2


def test_label_conditioning_v_prediction_frozen_text_encoder(straight, art, tmp_path):
    overrides = QUICK + [
        {
            "stages": ["unet"],
            "data": {"conditioning": "label"},
            "model": {"prediction_type": "v_prediction"},
            "unet": {"train_text_encoder": False, "cache_latents": False, "snr_gamma": 5.0},
        }
    ]
    out = tmp_path / "v"
    trainer = Trainer(build_config("tiny", overrides=overrides), data=art, out=out, vae=straight / "vae", device="cpu")
    trainer.run()
    assert trainer._prompt(0) == "cats"
    components = load_components(out)
    assert components.prediction_type == "v_prediction"
    built = build_models(trainer.config)["text_encoder"].state_dict()
    frozen = components.text_encoder.state_dict()
    assert all(torch.equal(built[k], frozen[k]) for k in built)  # frozen: exactly as the seed built it
    assert torch.equal(load_file(straight / "vae" / "diffusion_pytorch_model.safetensors")["encoder.conv_in.weight"], components.vae.encoder.conv_in.weight)


def test_vae_trains_on_random_crops(art, tmp_path):
    from lienzo.training.stream import random_crop as _random_crop

    image = torch.arange(3 * 64 * 64, dtype=torch.float32).view(3, 64, 64)
    corners = set()
    for seed in range(20):
        crop = _random_crop(image, 32, torch.Generator().manual_seed(seed))
        assert crop.shape == (3, 32, 32)
        assert torch.equal(crop, _random_crop(image, 32, torch.Generator().manual_seed(seed)))  # seeded: resumable
        top, left = divmod(int(crop[0, 0, 0]), 64)
        assert torch.equal(crop, image[:, top : top + 32, left : left + 32])
        corners.add((top, left))
    assert len(corners) > 10
    assert _random_crop(image, None, torch.Generator()) is image

    config = build_config("tiny", overrides=QUICK + [{"stages": ["vae"], "vae": {"steps": 2, "crop": 32}}])
    result = Trainer(config, data=art, out=tmp_path / "c", device="cpu").run()
    assert result.status == "finished" and result.steps == {"vae": 2}
    with pytest.raises(ConfigError, match="vae.crop"):
        build_config("tiny", overrides=[{"vae": {"crop": 4096}}])


def test_perceptual_loss_reads_a_vgg16_file(art, tmp_path):
    from lienzo.training.losses import VGGPerceptual

    torch.manual_seed(0)
    layers, channels = {}, 3
    index = 0
    for spec in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]:
        if spec == "M":
            index += 1
            continue
        layers[f"features.{index}.weight"] = torch.randn(spec, channels, 3, 3) * 0.05
        layers[f"features.{index}.bias"] = torch.zeros(spec)
        channels, index = spec, index + 2
    layers["classifier.0.weight"] = torch.zeros(2, 2)
    weights = tmp_path / "vgg16.pth"
    torch.save(layers, weights)
    vgg = VGGPerceptual(weights)
    a, b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    assert vgg(a, a).item() == 0 and vgg(a, b).item() > 0
    config = build_config("tiny", overrides=QUICK + [{"stages": ["vae"], "vae": {"steps": 1}}])
    Trainer(config, data=art, out=tmp_path / "p", perceptual_weights=weights, device="cpu").run()
    assert "perceptual=" in (tmp_path / "p" / "training" / "loss.csv").read_text()
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ModelFileError, match="perceptual_weights"):
        VGGPerceptual(tmp_path / "junk.pth")


# -- bad input: one line, exit 2, nothing overwritten --------------------------------------------------


def _train(*args, **kw):
    quick = ["--set", "vae.steps=1", "--set", "unet.steps=1", "--set", "samples.steps=2", "--set", 'samples.prompts=["a cat"]']
    return CliRunner().invoke(app, ["train", "--preset", "tiny", *quick, *args], **kw)


def test_bad_input_is_one_line_and_overwrites_nothing(straight, art, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    cases = [
        (["--data", str(empty), "--out", str(tmp_path / "o1")], "no valid images"),
        (["--data", str(broken), "--out", str(tmp_path / "o2")], "no valid images"),
        (["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o3")], "does not exist"),
        (["--data", str(art), "--out", str(art / "cats" / "0.png")], "is a file"),
        (["--data", str(art), "--out", str(straight)], "already holds a training run"),
        (["--data", str(art), "--out", str(art)], "is not empty"),
        (["--data", str(art), "--out", str(tmp_path / "o4"), "--set", "unet.colour=1"], "unet.colour: unknown key"),
        (["--data", str(art), "--out", str(tmp_path / "o5"), "--set", "unet.batch_size=0"], "unet.batch_size"),
        (["--resume", str(straight), "--set", "unet.lr=0.5"], "different config (unet.lr was 0.0001, now 0.5)"),
        (["--resume", str(tmp_path)], "not a lienzo training run"),
    ]
    before = {p: p.stat().st_mtime_ns for p in straight.rglob("*")}
    for args, message in cases:
        result = _train(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert {p: p.stat().st_mtime_ns for p in straight.rglob("*")} == before


def test_unwritable_output_folder(art, tmp_path):
    # A folder on the way is a file: creating the run folder fails even for root, who may write anywhere else.
    (tmp_path / "file.txt").write_text("")
    result = _train("--data", str(art), "--out", str(tmp_path / "file.txt" / "run"))
    assert result.exit_code == 2 and "cannot write to" in result.output and "Traceback" not in result.output


def test_cli_trains_and_resumes(art, tmp_path):
    out = tmp_path / "cli"
    first = _train("--data", str(art), "--out", str(out), "--set", "samples.per_prompt=1", "--stop-after", "1")
    assert first.exit_code == 0, first.output
    assert "lienzo train --resume" in first.output
    second = CliRunner().invoke(app, ["train", "--resume", str(out), "--device", "cpu"])
    assert second.exit_code == 0, second.output
    assert second.output.strip().endswith(str(out)) and (out / "unet").is_dir()


# -- several processes ----------------------------------------------------------------------------------


def test_two_cpu_processes_match_one(art, tmp_path):
    """Two gloo processes with half the batch each train the same model as one process with the whole batch."""
    common = ["--preset", "tiny", "--data", str(art), "--stage", "vae", "--set", "vae.steps=2", "--set", "samples.every=0",
              "--set", "samples.prompts=[]", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The one-process run in this process (one thread, as the two below): only the two need launching.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = CliRunner().invoke(app, ["train", *common, "--set", "vae.batch_size=4", "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    assert one.exit_code == 0, one.output[-2000:]
    two = subprocess.run([sys.executable, "-m", "lienzo", "train", *common, "--set", "vae.batch_size=2", "--out", str(tmp_path / "two"), "--num-processes", "2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    state = json.loads(next((tmp_path / "two" / "training" / "checkpoints").glob("*/state.json")).read_text())
    assert state["processes"] == 2 and state["images_seen"] == {"vae": 8}
    a = load_file(tmp_path / "one" / "training" / "checkpoints" / "vae-000002" / "vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "two" / "training" / "checkpoints" / "vae-000002" / "vae" / "diffusion_pytorch_model.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst
    moved = max((a[k] - load_file(next((tmp_path / "one").glob("training/checkpoints/*/vae/*.safetensors")))[k]).abs().max().item() for k in a)
    assert moved == 0.0


# -- LoRA fine-tuning -------------------------------------------------------------------------------------


def test_lora_fine_tune_saves_a_kohya_file_that_changes_generation(art, tmp_path):
    from lienzo.models.single_file_save import save_single_file
    from tiny_models import build_tiny

    models = tmp_path / "models"
    (models / "Lora").mkdir(parents=True)
    save_single_file(build_tiny("sd1"), models / "tiny-sd15.safetensors")
    home = ["--models-dir", str(models), "--data-dir", str(tmp_path / "home"), "--outputs-dir", str(tmp_path / "outputs")]
    train = ["train", "--lora", "--base", "tiny-sd15", "--data", str(art), "--resolution", "64", "--rank", "4",
             "--lora-name", "cats", "--set", "unet.steps=3", "--set", "unet.batch_size=2", "--set", "unet.lr=0.01",
             "--set", "samples.steps=2", "--set", 'samples.prompts=["a cat"]', "--set", "samples.per_prompt=1"]
    straight = CliRunner().invoke(app, [*home, *train, "--out", str(tmp_path / "straight")])
    assert straight.exit_code == 0, straight.output
    lora = tmp_path / "straight" / "cats.safetensors"
    keys = load_file(lora).keys()
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert not (tmp_path / "straight" / "unet").exists()  # a LoRA run ships the LoRA, not a copy of the base
    assert "LoRA fine-tune of tiny-sd15.safetensors" in (tmp_path / "straight" / "README.md").read_text()

    # Stopped after one step and resumed, it ends with the same LoRA.
    first = CliRunner().invoke(app, [*home, *train, "--out", str(tmp_path / "resumed"), "--stop-after", "1"])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(app, [*home, "train", "--resume", str(tmp_path / "resumed")])
    assert second.exit_code == 0, second.output
    resumed = load_file(tmp_path / "resumed" / "cats.safetensors")
    assert all(torch.equal(resumed[k], load_file(lora)[k]) for k in keys)

    # Used at generation, it changes the picture.
    (models / "Lora" / "cats.safetensors").write_bytes(lora.read_bytes())
    fast = ["generate", "a cat", "--steps", "2", "--width", "64", "--height", "64", "--seed", "3", "-m", "tiny-sd15"]
    plain = CliRunner().invoke(app, [*home, *fast, "-o", str(tmp_path / "plain")])
    styled = CliRunner().invoke(app, [*home, *fast, "--lora", "cats:1", "-o", str(tmp_path / "styled")])
    assert plain.exit_code == 0 and styled.exit_code == 0, plain.output + styled.output
    a = np.asarray(Image.open(next((tmp_path / "plain").glob("*.png"))), dtype=np.int16)
    b = np.asarray(Image.open(next((tmp_path / "styled").glob("*.png"))), dtype=np.int16)
    assert np.abs(a - b).max() > 0
