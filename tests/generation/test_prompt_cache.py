"""The prompt-embedding cache across jobs (components.prompt_cache) and encode-then-free (--free-text-encoders):
a text already encoded for a model is not encoded again while nothing that changes its embeddings has changed,
the cache stays within its bytes, pictures and infotexts are the same with and without it, and the text
encoders leave for the network's device only to encode a text the cache lacks."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lienzo.cli import app
from lienzo.errors import GenerationCancelled, LienzoError
from lienzo.generation import engine
from lienzo.generation.conditioning import encode_images
from lienzo.generation.prompts import encode_schedules
from lienzo.generation.request import build_request
from lienzo.models.components import Components, PromptCache
from lienzo.models.lora import apply_loras
from lienzo.settings import Settings
from lienzo.studio import load_model
from tiny_models import build_tiny

MIB = 2**20
# kohya names: one LoRA that patches only SD 1.x's text encoder, one that patches only its U-Net.
TEXT_ENCODER_LORA = {
    f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj": ("text_encoder", f"encoder.layers.0.self_attn.{p}_proj")
    for p in "qv"
}
UNET_LORA = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (
        "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
}


def _encoders(components: Components) -> list[torch.nn.Module]:
    return [m for m in (components.text_encoder, components.text_encoder_2, components.text_encoder_3) if m is not None]


def _cached(family: str, max_bytes: int = 64 * MIB) -> tuple[Components, list[int]]:
    """A tiny model with a prompt cache, and a list that grows by one at every text-encoder forward call."""
    components = build_tiny(family)
    components.prompt_cache = PromptCache(max_bytes=max_bytes)
    calls: list[int] = []
    for index, encoder in enumerate(_encoders(components)):
        encoder.register_forward_hook(lambda *_, index=index: calls.append(index))
    return components, calls


def _request(**fields):
    return build_request(**{"prompt": "a watercolor fox", "negative_prompt": "blurry", "steps": 2, "width": 64, "height": 64,
                            "seed": 7, "sampler": "Euler", **fields})


def _write_lora(path, components, layers, seed=0) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (part, module) in layers.items():
        linear = getattr(components, part).get_submodule(module)
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, linear.in_features, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(linear.out_features, 2, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, path)


@pytest.mark.parametrize("family", ["sd1", "flux", "zimage"])
def test_a_repeated_prompt_is_not_encoded_again_and_the_picture_is_the_same(family):
    components, calls = _cached(family)
    first = engine.generate(components, _request()).images[0]
    encoded = len(calls)
    again = engine.generate(components, _request(seed=8)).images[0]
    assert encoded > 0 and len(calls) == encoded  # prompt and negative prompt both came from the cache

    components.prompt_cache = PromptCache()  # none kept: every text encoded, as before the cache
    uncached = engine.generate(components, _request(seed=8)).images[0]
    assert len(calls) == 2 * encoded
    assert np.array_equal(again.pixels, uncached.pixels) and again.infotext == uncached.infotext
    assert not np.array_equal(first.pixels, again.pixels)  # the seed did reach the picture


def test_only_the_texts_not_cached_are_encoded():
    components, calls = _cached("sd1")
    engine.generate(components, _request())
    calls.clear()
    engine.generate(components, _request(negative_prompt="ugly"))  # one chunk: one forward call for the new text
    assert calls == [0]
    calls.clear()
    engine.generate(components, _request(prompt="a watercolor fox, " * 30, negative_prompt="blurry"))
    # Two chunks: the long prompt's two, and "blurry" padded to two chunks is another key than its one-chunk self.
    assert calls == [0, 0, 0, 0]


def test_clip_skip_and_a_text_encoder_lora_encode_again_a_unet_lora_does_not(tmp_path):
    components, calls = _cached("sd1")
    plain = engine.generate(components, _request()).images[0].pixels
    calls.clear()

    engine.generate(components, _request(clip_skip=2))
    assert len(calls) == 2

    text_lora, unet_lora = tmp_path / "words.safetensors", tmp_path / "style.safetensors"
    _write_lora(text_lora, components, TEXT_ENCODER_LORA)
    _write_lora(unet_lora, components, UNET_LORA)
    for weight in (1.0, 0.5):
        calls.clear()
        apply_loras(components, [(text_lora, "words", weight)])
        patched = engine.generate(components, _request(loras=[("words", weight)])).images[0].pixels
        assert len(calls) == 2 and not np.array_equal(patched, plain)

    calls.clear()
    apply_loras(components, [(unet_lora, "style", 1.0)])
    engine.generate(components, _request(loras=[("style", 1.0)]))
    apply_loras(components, [(text_lora, "words", 0.0)])  # loaded but off: the encoder computes as without it
    engine.generate(components, _request(loras=[("words", 0.0)]))
    apply_loras(components, [])
    assert np.array_equal(engine.generate(components, _request()).images[0].pixels, plain)
    assert calls == []


def test_a_lora_file_changed_on_disk_encodes_again(tmp_path):
    components, calls = _cached("sd1")
    path = tmp_path / "words.safetensors"
    _write_lora(path, components, TEXT_ENCODER_LORA)
    apply_loras(components, [(path, "words", 1.0)])
    first = engine.generate(components, _request(loras=[("words", 1.0)])).images[0].pixels
    _write_lora(path, components, TEXT_ENCODER_LORA, seed=1)
    calls.clear()
    apply_loras(components, [(path, "words", 1.0)])
    second = engine.generate(components, _request(loras=[("words", 1.0)])).images[0].pixels
    assert len(calls) == 2 and not np.array_equal(first, second)


def test_a_copy_with_another_text_encoder_does_not_share_its_embeddings():
    components, calls = _cached("sd1")
    engine.generate(components, _request())
    other = build_tiny("sd1")
    torch.manual_seed(3)
    other.text_encoder = type(components.text_encoder)(components.text_encoder.config).eval()
    other.prompt_cache = components.prompt_cache  # as copy.copy(components) shares it
    assert not torch.equal(encode_schedules(other, "a watercolor fox", "", 2)[0].at(0).embeds,
                           encode_schedules(components, "a watercolor fox", "", 2)[0].at(0).embeds)


def test_the_cache_keeps_at_most_its_bytes_least_recently_used_first():
    probe, _ = _cached("sd1")
    encode_schedules(probe, "a", "b", 1)
    entry = probe.prompt_cache.nbytes // 2  # one 77-token chunk of embeddings

    components, calls = _cached("sd1", max_bytes=2 * entry)
    encode_schedules(components, "cat", "dog", 1)
    encode_schedules(components, "cat", "", 1)  # cat is used again; dog is now the least recent
    cache = components.prompt_cache
    assert len(cache.entries) == 2 and cache.nbytes == 2 * entry
    assert [key[0] for key in cache.entries] == ["cat", ""]  # dog made way for ""
    calls.clear()
    encode_schedules(components, "cat", "", 1)
    assert calls == []
    encode_schedules(components, "dog", "", 1)
    assert calls == [0]

    small, calls = _cached("sd1", max_bytes=entry - 1)  # no entry fits: none is kept, all still encode
    encode_schedules(small, "cat", "dog", 1)
    encode_schedules(small, "cat", "dog", 1)
    assert len(calls) == 4 and small.prompt_cache.nbytes == 0 and not small.prompt_cache.entries


def test_what_a_job_does_to_its_embeddings_never_reaches_the_cache():
    components, calls = _cached("sd1")
    expected = encode_schedules(build_tiny("sd1"), "a cat", "blurry", 1)[0].at(0).embeds
    first = encode_schedules(components, "a cat", "blurry", 1)[0].at(0)
    first.embeds.add_(1)  # what the job was handed when it was encoded
    second = encode_schedules(components, "a cat", "blurry", 1)[0].at(0)
    second.embeds.mul_(0)  # what it was handed from the cache
    third = encode_schedules(components, "a cat", "blurry", 1)[0].at(0)
    assert len(calls) == 2 and torch.equal(third.embeds, expected)


def test_a_cancelled_encode_keeps_nothing_half_done():
    components, calls = _cached("sd1")
    with pytest.raises(GenerationCancelled):
        engine.generate(components, _request(), cancel=lambda: True)
    assert calls == [] and not components.prompt_cache.entries


def test_dynamic_prompts_read_and_fill_the_cache():
    components, calls = _cached("sd1")
    engine.generate(components, _request(prompt="a {red|blue} fox", batch_size=2), dynamic=engine.DynamicPrompts(combinatorial=True))
    assert len(calls) == 3  # "a red fox", "a blue fox", "blurry"
    calls.clear()
    engine.generate(components, _request(prompt="a blue fox"))
    assert calls == []


# --- encode-then-free -----------------------------------------------------------------------------


@pytest.fixture
def moves(monkeypatch):
    """A flux model whose network stands on a fake accelerator (cuda:0) while all really stays on the CPU:
    every ``.to()`` of a text encoder is recorded as (encoder index, device) and moves nothing."""
    components, calls = _cached("flux")
    components.text_encoder_offload = True
    monkeypatch.setattr(Components, "execution_device", property(lambda self: torch.device("cuda", 0)))
    recorded: list[tuple[int, torch.device]] = []
    for index, encoder in enumerate(_encoders(components)):

        def to(device, index=index, encoder=encoder):
            recorded.append((index, torch.device(device)))
            return encoder

        monkeypatch.setattr(encoder, "to", to)
    return components, calls, recorded


AWAY_AND_BACK = [(0, torch.device("cuda", 0)), (1, torch.device("cuda", 0)), (0, torch.device("cpu")), (1, torch.device("cpu"))]


def test_free_text_encoders_wakes_them_only_for_a_text_not_cached(moves):
    components, calls, recorded = moves
    encode_schedules(components, "a cat", "blurry", 2)
    assert recorded == AWAY_AND_BACK and calls
    recorded.clear()
    encode_schedules(components, "a cat", "blurry", 2)
    assert recorded == []
    encode_schedules(components, "a dog", "blurry", 2)
    assert recorded == AWAY_AND_BACK


def test_free_text_encoders_wakes_them_once_a_job_and_puts_them_back_when_cancelled(moves):
    components, _, recorded = moves
    texts = [("a red fox", "blurry"), ("a blue fox", "blurry"), ("a red fox", "ugly")]
    encode_images(components, _request(), texts, torch.device("cpu"), None)
    assert recorded == AWAY_AND_BACK
    recorded.clear()
    with pytest.raises(GenerationCancelled):
        encode_schedules(components, "a green fox", "blurry", 2, cancel=lambda: True)
    assert recorded == AWAY_AND_BACK


def test_free_text_encoders_leaves_encoders_placed_elsewhere_alone(moves):
    components, _, recorded = moves
    components.text_encoder_device = torch.device("cpu")
    encode_schedules(components, "a cat", "blurry", 2)
    assert recorded == []


def test_free_text_encoders_is_the_same_picture_and_moves_nothing_on_the_cpu():
    components, calls = _cached("sd1")
    components.text_encoder_offload = True
    freed = engine.generate(components, _request()).images[0]
    assert components.text_encoder.device.type == "cpu" and len(calls) == 2
    components.text_encoder_offload = False
    components.prompt_cache = PromptCache()
    assert np.array_equal(engine.generate(components, _request()).images[0].pixels, freed.pixels)


def test_free_text_encoders_rest_on_the_cpu_when_the_model_moves():
    components = build_tiny("flux")
    components.text_encoder_offload = True
    components.to("meta")  # a stand-in for a GPU: any device other than the CPU
    assert components.transformer.device.type == components.vae.device.type == "meta"
    assert components.text_encoder.device.type == components.text_encoder_2.device.type == "cpu"


def test_load_model_takes_both_from_the_settings(home, tmp_path):
    settings = Settings(data_dir=tmp_path, models_dir=home / "models", prompt_cache_mb=0.5, free_text_encoders=True)
    components = load_model("tiny-sd15", device="cpu", settings=settings)
    assert components.prompt_cache.max_bytes == MIB // 2 and components.text_encoder_offload
    assert not load_model("tiny-sd15", device="cpu", settings=settings, free_text_encoders=False).text_encoder_offload


def test_free_text_encoders_and_a_text_encoder_device_exclude_each_other(home, tmp_path):
    with pytest.raises(LienzoError, match="^free_text_encoders: "):
        load_model("tiny-sd15", text_encoder_device="cpu", free_text_encoders=True, settings=Settings(data_dir=tmp_path))
    result = CliRunner().invoke(
        app, ["--models-dir", str(home / "models"), "--data-dir", str(tmp_path), "generate", "a cat", "--model", "tiny-sd15",
              "--free-text-encoders", "--text-encoder-device", "cpu"],
    )
    assert result.exit_code != 0 and "free_text_encoders" in result.output + result.stderr


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_without_guidance_the_negative_prompt_is_not_encoded(family):
    """At CFG scale 1 the unconditional pass is skipped, so encoding the negative prompt would be a text-encoder
    pass for nothing (Flux.1's T5 is as large as its network): one pass per encoder, and the negative prompt
    changes nothing; guided, both are encoded."""
    components, calls = _cached(family, max_bytes=0)
    encoders = len(_encoders(components))
    unguided = engine.generate(components, _request(cfg_scale=1.0)).images[0].pixels
    assert len(calls) == encoders
    other = engine.generate(components, _request(cfg_scale=1.0, negative_prompt="a much longer negative prompt")).images[0].pixels
    assert np.array_equal(unguided, other)
    calls.clear()
    engine.generate(components, _request(cfg_scale=4.0))
    assert len(calls) == 2 * encoders
