"""The trainer's speed work: caption variants, pixels decoded once, model folders written while the UNet
trains (with its EMA weights), weights saved from channels-last models, and optimizer moments laid out
like their weights after a resume."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lienzo.training.cache import Pixels, caption_variants
from lienzo.training.config import Data, build_config
from lienzo.training.data import ImageDataset, scan_folder
from lienzo.training.loop import _match_layouts
from lienzo.training.models import build_models, contiguous
from lienzo.training.trainer import Trainer
from pictures import captioned_blobs

# A few steps, no sample grids: seconds on a CPU. Checkpoints at UNet step 2 (and where a run stops),
# whose live weights and EMA are compared with what was exported.
QUICK = [{"vae": {"steps": 1, "batch_size": 2}, "unet": {"steps": 4, "batch_size": 2},
          "samples": {"every": 0, "prompts": []}, "checkpoint_every": 2, "log_every": 1}]


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    """Six small captioned pictures, of odd sizes (resized and cropped), one with transparency."""
    return captioned_blobs(tmp_path_factory.mktemp("art") / "data", noise=40, varied=True, caption="blob, picture {i}, red, round, small")


# -- caption variants -----------------------------------------------------------------------------


TAGS = "rocket, space, red, flying, stars, night sky, cartoon"


def test_caption_variants_are_the_caption_then_seeded_variants():
    data = Data(caption_variants=6, keep_tags=1, shuffle_tags=True, tag_dropout=0.3)
    variants = caption_variants(TAGS, data, seed=3, index=0)
    assert len(variants) == 6 and variants[0] == TAGS
    assert variants == caption_variants(TAGS, data, seed=3, index=0)  # deterministic: resumable
    assert any(v != TAGS for v in variants[1:])  # shuffled and dropped: not all the caption
    other = caption_variants(TAGS, data, seed=3, index=1)
    assert other[0] == TAGS and other[1:] != variants[1:]  # seeded by the image's index
    assert caption_variants(TAGS, data, seed=4, index=0)[1:] != variants[1:]  # and by the run's seed
    tags = set(TAGS.split(", "))
    for v in variants[1:]:
        parts = v.split(", ")
        assert parts[0] == "rocket"  # keep_tags=1: the first tag stays in front
        assert set(parts) <= tags and len(parts) == len(set(parts))  # only the caption's tags, once each


def test_caption_variants_keep_tags_and_articles():
    data = Data(caption_variants=8, keep_tags=1, shuffle_tags=True, tag_dropout=0.5, articles=1.0)
    for caption, article in ((TAGS, "a "), ("apple, fruit, green, shiny", "an "), ("Owl, bird, night", "an ")):
        first = caption.split(",")[0]
        for index in range(3):
            variants = caption_variants(caption, data, seed=0, index=index)
            assert variants[0] == caption
            for v in variants[1:]:
                assert v.startswith(article + first), v
    # Without shuffling or dropout a variant is the caption with its article.
    plain = Data(caption_variants=2, articles=1.0)
    assert caption_variants("cat, sitting", plain, seed=0, index=0) == ["cat, sitting", "a cat, sitting"]
    assert caption_variants("egg", plain, seed=0, index=0) == ["egg", "an egg"]
    # articles=0: never an article.
    none = Data(caption_variants=8, shuffle_tags=True, tag_dropout=0.5)
    assert all(not v.startswith(("a ", "an ")) for v in caption_variants(TAGS, none, seed=0, index=0))


def test_one_caption_variant_is_the_caption_only():
    data = Data(caption_variants=1, shuffle_tags=True, tag_dropout=0.9, articles=1.0)
    assert Data().caption_variants == 1  # the default: prompts as before
    for index in range(5):
        assert caption_variants(TAGS, data, seed=index, index=index) == [TAGS]


def test_prompts_hold_every_variant_as_token_ids(art):
    from lienzo.training.cache import tokenize_prompts
    from lienzo.training.loop import prompt_for
    from lienzo.training.models import PROMPT_LENGTH, fresh_networks

    config = build_config("tiny", overrides=[{"data": {"caption_variants": 3, "shuffle_tags": True, "tag_dropout": 0.3}}])
    nets = fresh_networks(config, None, None, torch.device("cpu"))
    records = scan_folder(art).records
    prompts = tokenize_prompts(nets.tokenizer, PROMPT_LENGTH, config.data, config.seed, records, prompt_for, "cpu")
    assert prompts.ids.shape == (len(records), 3, PROMPT_LENGTH) and prompts.variants == 3
    for i, record in enumerate(records):
        texts = caption_variants(prompt_for(config.data, record), config.data, config.seed, i)
        want = nets.tokenizer(texts, padding="max_length", max_length=PROMPT_LENGTH, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(prompts.ids[i], want)
    empty = nets.tokenizer([""], padding="max_length", max_length=PROMPT_LENGTH, truncation=True, return_tensors="pt").input_ids[0]
    assert torch.equal(prompts.empty, empty)


# -- pixels held in memory ------------------------------------------------------------------------


def test_pixels_equal_the_dataset_to_the_bit(art):
    dataset = ImageDataset(art, scan_folder(art).records, 64)
    pixels = Pixels(dataset, torch.device("cpu"))
    assert pixels.store is not None and pixels.store.dtype == torch.uint8
    assert pixels.store.shape == (len(dataset), 3, 64, 64)
    for i in range(len(dataset)):
        for flip in (False, True):
            want = dataset[(i, flip)]["pixels"]
            got = pixels.get(i, flip)
            assert got.dtype == want.dtype and torch.equal(got, want), (i, flip)
    keys = [(3, True), (0, False), (5, True)]
    assert torch.equal(pixels.batch(keys), torch.stack([dataset[k]["pixels"] for k in keys]))


def test_pixels_over_the_limit_are_read_from_disk(art):
    dataset = ImageDataset(art, scan_folder(art).records, 64)
    pixels = Pixels(dataset, torch.device("cpu"), limit=0)
    assert pixels.store is None
    for i in range(len(dataset)):
        for flip in (False, True):
            assert torch.equal(pixels.get(i, flip), dataset[(i, flip)]["pixels"]), (i, flip)


# -- model folders while the UNet trains, with its EMA weights ------------------------------------


def _unet_names(checkpoint: Path) -> list[str]:
    from diffusers import UNet2DConditionModel

    return [name for name, _ in UNet2DConditionModel.from_pretrained(checkpoint / "unet").named_parameters()]


def _ema_unet(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The UNet's EMA weights in a checkpoint's trainer.pt (the stage's EMA covers the UNet's parameters first)."""
    saved = torch.load(checkpoint / "trainer.pt", map_location="cpu", weights_only=True)
    names = _unet_names(checkpoint)
    shadow = saved["ema"]["shadow_params"]
    assert len(shadow) >= len(names)
    return dict(zip(names, shadow[: len(names)], strict=True))


def _unet_file(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def _assert_ema_not_live(exported: dict, checkpoint: Path) -> None:
    ema, live = _ema_unet(checkpoint), _unet_file(checkpoint)
    assert exported.keys() == live.keys()
    assert set(ema) <= set(exported)
    unequal = [k for k in ema if not torch.equal(exported[k], ema[k])]
    assert not unequal, f"{len(unequal)} exported tensors are not the EMA's, e.g. {unequal[:3]}"
    assert any(not torch.equal(exported[k], live[k]) for k in ema), "the EMA equals the live weights: nothing is tested"


@pytest.fixture
def no_plots(monkeypatch):
    """No loss plot at every checkpoint and export: half a second each, and not what is tested here."""
    from lienzo.training import artifacts

    monkeypatch.setattr(artifacts, "plot_losses", lambda *args: None)


def test_export_every_writes_the_ema_model_while_the_unet_trains(art, tmp_path, no_plots):
    out = tmp_path / "run"
    checkpoints = out / "training" / "checkpoints"
    seen = {}

    def progress(p) -> None:
        if p.stage != "unet":
            return
        seen[p.step] = (out / "model_index.json").is_file()
        if p.step == 3:
            # Step 2's export (step 3's comes after this call), beside step 2's checkpoint.
            seen["exported"] = _unet_file(out)
            seen["index"] = json.loads((out / "model_index.json").read_text())
            _assert_ema_not_live(seen["exported"], checkpoints / "unet-000002")

    config = build_config("tiny", overrides=QUICK)
    # Stopped at UNet step 3 of 4 (one VAE step, three UNet steps).
    result = Trainer(config, data=art, out=out, device="cpu", progress=progress, export_every=1e-9, stop_after=4).run()
    assert result.status == "stopped" and result.steps == {"vae": 1, "unet": 3}
    assert seen[1] is False  # nothing exported before the first UNet step
    assert seen[2] is True and seen[3] is True  # a model folder before the run ended
    assert "unet" in seen["index"] and "text_encoder" in seen["index"]
    # The stopped run's model: the stage's EMA weights, not the live ones the checkpoint holds.
    _assert_ema_not_live(_unet_file(out), checkpoints / "unet-000003")
    assert not torch.equal(_unet_file(out)["conv_in.weight"], seen["exported"]["conv_in.weight"])  # rewritten at the end
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(out / "unet")  # loadable


def test_without_export_every_no_model_before_the_end(art, tmp_path, no_plots):
    out = tmp_path / "run"
    seen = []

    def progress(p) -> None:
        if p.stage == "unet":
            seen.append((out / "model_index.json").is_file())

    overrides = QUICK + [{"unet": {"steps": 2}, "checkpoint_every": 0}]
    result = Trainer(build_config("tiny", overrides=overrides), data=art, out=out, device="cpu", progress=progress).run()
    assert result.status == "finished" and seen == [False, False]
    assert (out / "model_index.json").is_file()
    # A finished stage's weights are its EMA's: the checkpoint and the model folder agree.
    final = out / "training" / "checkpoints" / "unet-000002"
    assert all(torch.equal(v, _unet_file(final)[k]) for k, v in _unet_file(out).items())


# -- channels-last weights saved, optimizer moments relaid ----------------------------------------


def test_contiguous_lets_channels_last_models_be_saved(tmp_path):
    vae = build_models(build_config("tiny"))["vae"]
    vae.to(memory_format=torch.channels_last)
    conv = vae.encoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    want = {k: v.clone() for k, v in vae.state_dict().items()}
    # Why the context exists: safetensors refuses channels-last tensors (diffusers' save_pretrained makes
    # them contiguous itself, but a LoRA's weights go to save_file as they are).
    with pytest.raises(ValueError, match="contiguous"):
        save_file(vae.state_dict(), tmp_path / "refused.safetensors")
    text = torch.nn.Linear(3, 3)  # no convolutions: left alone
    with contiguous({"vae": vae, "text": text}):
        assert conv.is_contiguous()
        vae.save_pretrained(tmp_path / "vae")
        save_file(vae.state_dict(), tmp_path / "vae.safetensors")
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert vae.encoder.conv_in.weight is conv  # the same Parameter: the optimizer still holds it
    for path in (tmp_path / "vae" / "diffusion_pytorch_model.safetensors", tmp_path / "vae.safetensors"):
        saved = load_file(path)
        assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want)
    assert all(torch.equal(v, want[k]) for k, v in vae.state_dict().items())

    # Contiguous models are left as they are.
    plain = torch.nn.Conv2d(3, 4, 3)
    with contiguous({"plain": plain}):
        pass
    assert plain.weight.is_contiguous()


def test_match_layouts_lays_moments_out_like_their_weights():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    weight = conv.weight
    assert not weight.is_contiguous()
    grad = torch.randn_like(weight)

    def step(optimizer) -> None:
        weight.grad, conv.bias.grad = grad.clone(), torch.ones_like(conv.bias)
        optimizer.step()

    first = torch.optim.AdamW(conv.parameters(), lr=0.1)
    step(first)
    def saved() -> dict:
        """What torch.load of a checkpoint gives: a copy, with the moments contiguous."""
        state_dict = copy.deepcopy(first.state_dict())
        for state in state_dict["state"].values():
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = state[key].contiguous()
        return state_dict

    want = {k: v.clone() for k, v in first.state[weight].items()}

    second = torch.optim.AdamW(conv.parameters(), lr=0.1)
    second.load_state_dict(saved())
    assert second.state[weight]["exp_avg"].stride() != weight.stride()  # the case being fixed
    _match_layouts(second)
    state = second.state[weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key].stride() == weight.stride(), key
        assert torch.equal(state[key], want[key]), key
    assert torch.equal(state["step"], want["step"])
    assert second.state[conv.bias]["exp_avg"].stride() == conv.bias.stride()

    # A fused step over the relaid moments is the step the first optimizer takes.
    before = weight.detach().clone()
    fused = {"fused": True} if _fused_on_cpu() else {}
    third = torch.optim.AdamW(conv.parameters(), lr=0.1, **fused)
    third.load_state_dict(saved())
    _match_layouts(third)
    step(third)
    after_third = weight.detach().clone()
    with torch.no_grad():
        weight.copy_(before)
    step(first)
    assert torch.allclose(after_third, weight.detach(), rtol=0, atol=1e-6)


def _fused_on_cpu() -> bool:
    p = torch.nn.Parameter(torch.zeros(2))
    try:
        torch.optim.AdamW([p], fused=True)
        return True
    except RuntimeError:
        return False


# -- on a GPU -------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_run_exports_a_loadable_model_and_resumes(art, tmp_path):
    _run_and_resume(art, tmp_path, "cuda")


def _run_and_resume(art: Path, tmp_path: Path, device: str) -> None:
    """Both stages with caption variants and exports on ``device``; a stopped run resumed to the same end."""
    from diffusers import UNet2DConditionModel

    overrides = [{"vae": {"steps": 3, "batch_size": 2}, "unet": {"steps": 4, "batch_size": 2},
                  "samples": {"every": 0, "prompts": []}, "checkpoint_every": 2, "log_every": 1,
                  "data": {"caption_variants": 3, "shuffle_tags": True, "tag_dropout": 0.2, "articles": 0.5}}]
    config = build_config("tiny", overrides=overrides)
    losses: dict[str, list[float]] = {"straight": [], "resumed": []}

    def record(name):
        return lambda p: losses[name].append(p.loss)

    straight = tmp_path / "straight"
    result = Trainer(config, data=art, out=straight, device=device, export_every=1e-9, progress=record("straight")).run()
    assert result.status == "finished" and result.steps == {"vae": 3, "unet": 4}
    unet = UNet2DConditionModel.from_pretrained(straight / "unet")
    assert all(torch.isfinite(p).all() for p in unet.parameters())

    resumed = tmp_path / "resumed"
    first = Trainer(config, data=art, out=resumed, device=device, export_every=1e-9, stop_after=5).run()
    assert first.status == "stopped" and first.steps == {"vae": 3, "unet": 2}
    UNet2DConditionModel.from_pretrained(resumed / "unet")  # a stopped run's model loads
    # ...and holds the EMA weights, written from channels-last models on a GPU.
    _assert_ema_not_live(_unet_file(resumed), resumed / "training" / "checkpoints" / "unet-000002")
    second = Trainer(config, data=None, out=resumed, resume=True, device=device, export_every=1e-9,
                     progress=record("resumed")).run()
    assert second.status == "finished" and second.steps == {"vae": 3, "unet": 4}
    assert losses["resumed"] and all(math.isfinite(v) for v in losses["straight"] + losses["resumed"])
    rows = [r for r in (resumed / "training" / "loss.csv").read_text().splitlines()[1:] if r.startswith("unet,")]
    assert [int(r.split(",")[1]) for r in rows] == [1, 2, 3, 4]  # the steps after the checkpoint redone once
    assert math.isfinite(float(rows[-1].split(",")[2]))
    state = json.loads(next((resumed / "training" / "checkpoints").glob("unet-000004/state.json")).read_text())
    assert state["step"] == 4 and state["done"] == ["vae", "unet"]
    UNet2DConditionModel.from_pretrained(resumed / "unet")
