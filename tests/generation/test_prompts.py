"""Prompt syntax, 77-token chunking and text encoding, checked against plain transformers calls."""

from importlib import resources

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lienzo.errors import InvalidRequestError
from lienzo.generation.prompts import (
    BREAK_MARKER,
    CHUNK_LENGTH,
    encode_schedules,
    encode_prompt,
    parse_prompt_attention,
    tokenize_prompt,
)
from lienzo.models.components import Components

BOS, EOS = 49406, 49407


def _tokenizer(pad_token: str) -> CLIPTokenizer:
    folder = resources.files("lienzo") / "models" / "configs" / "tokenizer"
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token, model_max_length=77
    )


def _text_config(**overrides) -> CLIPTextConfig:
    settings = dict(
        hidden_size=64,
        num_attention_heads=1,
        intermediate_size=128,
        num_hidden_layers=3,
        vocab_size=49408,
        max_position_embeddings=77,
    )
    return CLIPTextConfig(**{**settings, **overrides})


def _text_only(family: str, **encoders) -> Components:
    """A model's text side alone: prompt encoding reads no network or VAE."""
    return Components(unet=None, vae=None, scheduler_config={}, family=family, **encoders)


@pytest.fixture(scope="module")
def sd1():
    torch.manual_seed(0)
    encoder = CLIPTextModel(_text_config()).eval()
    return _text_only("sd1", text_encoder=encoder, tokenizer=_tokenizer("<|endoftext|>"))


@pytest.fixture(scope="module")
def sd2():
    torch.manual_seed(0)
    return _text_only("sd2", text_encoder=CLIPTextModel(_text_config()).eval(), tokenizer=_tokenizer("!"))


@pytest.fixture(scope="module")
def sdxl():
    torch.manual_seed(0)
    first = CLIPTextModel(_text_config()).eval()
    second = CLIPTextModelWithProjection(_text_config(hidden_size=32, intermediate_size=64, projection_dim=16)).eval()
    return _text_only(
        "sdxl",
        text_encoder=first,
        tokenizer=_tokenizer("<|endoftext|>"),
        text_encoder_2=second,
        tokenizer_2=_tokenizer("!"),
    )


def _diffusers_style(components, prompt: str) -> torch.Tensor:
    """What diffusers' StableDiffusionPipeline.encode_prompt computes for a short prompt."""
    ids = components.tokenizer(
        prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return components.text_encoder(ids)[0]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


# --- parse_prompt_attention --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("a (cat) sat", [("a ", 1.0), ("cat", 1.1), (" sat", 1.0)]),
        ("((cat))", [("cat", 1.1 * 1.1)]),
        ("[cat]", [("cat", 1 / 1.1)]),
        ("[[cat]]", [("cat", 1 / 1.1 / 1.1)]),
        ("(cat:1.3)", [("cat", 1.3)]),
        ("(cat: 0.5 ) dog", [("cat", 0.5), (" dog", 1.0)]),
        ("(a (b:1.5) c)", [("a ", 1.1), ("b", 1.1 * 1.5), (" c", 1.1)]),
        ("(a [b])", [("a ", 1.1), ("b", 1.1 / 1.1)]),
        (r"\(literal\) \[x\] back\\slash", [(r"(literal) [x] back\slash", 1.0)]),
        (r"a \(b\) (c)", [("a (b) ", 1.0), ("c", 1.1)]),
        ("a:b", [("a:b", 1.0)]),
        ("x:1.3) y", [("x:1.3) y", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse_attention(text, expected):
    parsed = parse_prompt_attention(text)
    assert [piece for piece, _ in parsed] == [piece for piece, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])


def test_unbalanced_brackets_apply_to_the_rest_as_a1111_does():
    assert parse_prompt_attention("a (b c") == [("a ", 1.0), ("b c", pytest.approx(1.1))]
    assert parse_prompt_attention("a [b (c") == [("a ", 1.0), ("b ", pytest.approx(1 / 1.1)), ("c", pytest.approx(1.0))]
    assert parse_prompt_attention("a) b]") == [("a) b]", 1.0)]


def test_break_splits_and_is_not_merged():
    assert parse_prompt_attention("a cat BREAK a dog") == [("a cat", 1.0), BREAK_MARKER, ("a dog", 1.0)]
    assert parse_prompt_attention("(a BREAK b)")[1] == BREAK_MARKER
    assert parse_prompt_attention("BREAK BREAK x") == [BREAK_MARKER, BREAK_MARKER, ("x", 1.0)]
    # Only the upper-case whole word is the keyword.
    assert parse_prompt_attention("breakfast BREAKING break") == [("breakfast BREAKING break", 1.0)]


def test_adjacent_equal_weights_merge():
    assert parse_prompt_attention("(a)(b) c") == [("ab", pytest.approx(1.1)), (" c", 1.0)]


# --- tokenize_prompt -------------------------------------------------------------------------


def test_short_prompt_chunk_matches_diffusers_padding(sd1, sd2):
    for components in (sd1, sd2):
        chunks = tokenize_prompt(components.tokenizer, "a photo of a cat")
        expected = components.tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
        assert len(chunks) == 1
        assert chunks[0].ids == expected
        assert chunks[0].weights == [1.0] * CHUNK_LENGTH
    assert tokenize_prompt(sd2.tokenizer, "a")[0].ids[3:] == [0] * 74  # "!" pads OpenCLIP


def test_empty_prompt_is_one_chunk(sd1):
    (chunk,) = tokenize_prompt(sd1.tokenizer, "")
    assert chunk.ids == [BOS] + [EOS] * 76


def test_200_token_prompt_gives_three_chunks(sd1):
    chunks = tokenize_prompt(sd1.tokenizer, " ".join(["cat"] * 200))
    cat = _ids(sd1.tokenizer, "cat")[0]
    assert len(chunks) == 3
    for chunk, count in zip(chunks, (75, 75, 50)):
        assert len(chunk.ids) == CHUNK_LENGTH
        assert chunk.ids[: count + 2] == [BOS] + [cat] * count + [EOS]


def test_full_chunk_breaks_after_a_comma_in_its_last_20_tokens(sd1):
    cat, dog, comma = (_ids(sd1.tokenizer, word)[0] for word in ("cat", "dog", ","))
    # Comma at index 60: within the final 20 of 75, so "dog ..." moves whole to chunk 2.
    chunks = tokenize_prompt(sd1.tokenizer, "cat " * 60 + ", " + "dog " * 20)
    assert chunks[0].ids[:63] == [BOS] + [cat] * 60 + [comma, EOS]
    assert chunks[1].ids[:22] == [BOS] + [dog] * 20 + [EOS]
    # Comma at index 50: 25 tokens back is too far, so the chunk is cut at 75 tokens.
    chunks = tokenize_prompt(sd1.tokenizer, "cat " * 50 + ", " + "dog " * 30)
    assert chunks[0].ids[:77] == [BOS] + [cat] * 50 + [comma] + [dog] * 24 + [EOS]
    assert chunks[1].ids[:8] == [BOS] + [dog] * 6 + [EOS]


def test_break_starts_a_new_chunk(sd1):
    chunks = tokenize_prompt(sd1.tokenizer, "a cat BREAK a dog")
    assert len(chunks) == 2
    assert chunks[0].ids[:4] == [BOS, *_ids(sd1.tokenizer, "a cat"), EOS]
    assert chunks[1].ids[:4] == [BOS, *_ids(sd1.tokenizer, "a dog"), EOS]
    assert len(tokenize_prompt(sd1.tokenizer, "a cat BREAK")) == 1


def test_weights_follow_their_tokens(sd1):
    (chunk,) = tokenize_prompt(sd1.tokenizer, "a (red cat:1.5) [sat]")
    assert chunk.ids[:6] == [BOS, *_ids(sd1.tokenizer, "a red cat sat"), EOS]
    assert chunk.weights[:6] == pytest.approx([1.0, 1.0, 1.5, 1.5, 1 / 1.1, 1.0])
    assert chunk.weights[6:] == [1.0] * 71


# --- encode_prompt ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_plain_prompt_is_bit_identical_to_diffusers(family, request):
    components = request.getfixturevalue(family)
    prompt = "a photograph of an astronaut riding a horse"
    encoded = encode_prompt(components, prompt)
    assert encoded.pooled is None
    assert encoded.embeds.shape == (1, 77, 64)
    assert torch.equal(encoded.embeds, _diffusers_style(components, prompt))


def test_long_prompt_chunks_are_encoded_separately(sd1):
    words = " ".join(["cat"] * 100)
    encoded = encode_prompt(sd1, words)
    assert encoded.embeds.shape == (1, 2 * 77, 64) and encoded.chunks == 2
    second = torch.tensor([[BOS] + _ids(sd1.tokenizer, "cat") * 25 + [EOS] * 51])
    with torch.no_grad():
        expected = sd1.text_encoder(second)[0]
    assert torch.equal(encoded.embeds[:, :77], _diffusers_style(sd1, words))
    assert torch.equal(encoded.embeds[:, 77:], expected)


def test_clip_skip_2_is_final_norm_of_penultimate_layer(sd1):
    ids = sd1.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = sd1.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = sd1.text_encoder.final_layer_norm(hidden)
    assert torch.equal(encode_prompt(sd1, "a cat", clip_skip=2).embeds, expected)
    assert not torch.equal(expected, encode_prompt(sd1, "a cat").embeds)


def test_clip_skip_out_of_range_is_a_clear_error(sd1, sdxl):
    with pytest.raises(InvalidRequestError, match="clip_skip: must be between 1 and 3"):
        encode_prompt(sd1, "a cat", clip_skip=4)
    with pytest.raises(InvalidRequestError, match="between 1 and 2"):
        encode_prompt(sdxl, "a cat", clip_skip=3)
    with pytest.raises(InvalidRequestError):
        encode_prompt(sd1, "a cat", clip_skip=0)


def test_weighted_token_scales_only_that_token_then_restores_the_mean(sd1):
    plain = encode_prompt(sd1, "a cat sat").embeds
    weighted = encode_prompt(sd1, "a (cat:1.5) sat").embeds
    scaled = plain.clone()
    scaled[:, 2] *= 1.5  # BOS, "a", "cat"
    expected = scaled * (plain.mean() / scaled.mean())
    torch.testing.assert_close(weighted, expected)
    torch.testing.assert_close(weighted.mean(), plain.mean())
    ratio = weighted / plain
    rescale = ratio[0, 0, 0]
    torch.testing.assert_close(ratio[:, [0, 1, 3, 4]], torch.full_like(ratio[:, [0, 1, 3, 4]], rescale.item()))
    torch.testing.assert_close(ratio[:, 2], torch.full_like(ratio[:, 2], 1.5 * rescale.item()))


def test_min_chunks_pads_with_empty_prompt_chunks(sd1):
    encoded = encode_prompt(sd1, "a cat", min_chunks=3)
    empty = encode_prompt(sd1, "").embeds
    assert encoded.embeds.shape == (1, 3 * 77, 64)
    assert torch.equal(encoded.embeds[:, :77], encode_prompt(sd1, "a cat").embeds)
    assert torch.equal(encoded.embeds[:, 77:154], empty)
    assert torch.equal(encoded.embeds[:, 154:], empty)


def encode_pair(components, prompt, negative):
    """A plain prompt and negative as the engine encodes them: padded to one chunk count."""
    positive, negative = encode_schedules(components, prompt, negative, steps=1)
    return positive.at(0), negative.at(0)


def test_pair_has_equal_chunk_counts(sd1):
    positive, negative = encode_pair(sd1, " ".join(["cat"] * 200), "blurry")
    assert positive.embeds.shape == negative.embeds.shape == (1, 3 * 77, 64)
    assert torch.equal(negative.embeds[:, :77], _diffusers_style(sd1, "blurry"))
    positive, negative = encode_pair(sd1, "a cat", "ugly BREAK blurry BREAK lowres")
    assert positive.embeds.shape == negative.embeds.shape == (1, 3 * 77, 64)


def test_sdxl_joins_both_encoders_penultimate_states_and_pools_the_second(sdxl):
    prompt = "a cat in a hat"
    encoded = encode_prompt(sdxl, prompt)
    ids_1 = sdxl.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids_2 = sdxl.tokenizer_2(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out_1 = sdxl.text_encoder(ids_1, output_hidden_states=True)
        out_2 = sdxl.text_encoder_2(ids_2, output_hidden_states=True)
    assert encoded.embeds.shape == (1, 77, 64 + 32)
    assert torch.equal(encoded.embeds, torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1))
    assert encoded.pooled.shape == (1, 16)
    assert torch.equal(encoded.pooled, out_2.text_embeds)
    skipped = encode_prompt(sdxl, prompt, clip_skip=2)
    assert torch.equal(skipped.embeds[..., :64], out_1.hidden_states[-3])


def test_sdxl_pair_shapes_and_pooled_from_first_chunk(sdxl):
    positive, negative = encode_pair(sdxl, " ".join(["cat"] * 100), "")
    assert positive.embeds.shape == negative.embeds.shape == (1, 2 * 77, 96)
    assert positive.pooled.shape == negative.pooled.shape == (1, 16)
    assert torch.equal(positive.pooled, encode_prompt(sdxl, " ".join(["cat"] * 75)).pooled)
    assert torch.equal(negative.pooled, encode_prompt(sdxl, "").pooled)


def test_embeddings_go_to_the_requested_device(sd1):
    assert encode_prompt(sd1, "a cat", device="cpu").embeds.device.type == "cpu"
    assert not encode_prompt(sd1, "a cat").embeds.requires_grad
