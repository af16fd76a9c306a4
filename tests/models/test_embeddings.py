"""Textual-inversion embeddings (lienzo.models.embeddings, lienzo.generation.prompts): every file format people
have, saved the way its tool saves it, read weights-only; a trigger replaced by its vectors exactly where it
stands (checked against the encoder run on input embeddings set by hand); weights, chunks, SDXL's two encoders,
widths that do not fit; nothing leaking to other prompts or models; TI hashes; a whole tiny generation."""

import base64
import copy
import dataclasses
import hashlib
import json
import logging

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from lienzo.errors import ModelFileError
from lienzo.generation.infotext import fields_from_infotext
from lienzo.generation.prompts import (
    EMBEDDING_PLACEHOLDER,
    apply_weights,
    encode_prompt,
    encode_schedules,
    ti_hashes,
    tokenize_prompt,
)
from lienzo.generation.request import build_request
from lienzo.images.metadata import parse_infotext
from lienzo.models.components import PromptCache
from lienzo.models.embeddings import model_embeddings, read_embedding, refresh_embeddings
from lienzo.models.registry import Registry
from lienzo.settings import Settings
from lienzo.studio import Studio
from tiny_models import build_tiny

WIDTH = 64  # the tiny CLIP encoders' width (tests/tiny_models.py)


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1")


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny("sdxl")


def vectors(count: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def save_a1111(path, vec, step=500):
    """As A1111's ``Embedding.save`` writes a trained embedding (its vector still requiring grad)."""
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vec.clone().requires_grad_(True)},
            "name": path.stem,
            "step": step,
            "sd_checkpoint": "0123456789",
            "sd_checkpoint_name": "tiny-sd15",
        },
        path,
    )
    return path


def save_png(path, vec):
    """As A1111 writes its PNG embeddings: the .pt dict as base64 JSON, tensors as {"TORCHTENSOR": lists}."""
    data = {"string_to_param": {"*": {"TORCHTENSOR": vec.tolist()}}, "name": "from-png", "step": 7}
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(data).encode()).decode())
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def by_hand(encoder, ids: list[int], placed: list[tuple[int, torch.Tensor]]):
    """The encoder's output for ``ids`` with each (position, vectors) put in as input embeddings by hand: spare
    vocabulary rows of a copy of the encoder are set to the vectors and the placeholders pointed at them."""
    clone = copy.deepcopy(encoder)
    ids = list(ids)
    spare = 40000
    with torch.no_grad():
        for at, vecs in placed:
            for k, vector in enumerate(vecs):
                clone.get_input_embeddings().weight[spare] = vector
                ids[at + k] = spare
                spare += 1
        return clone(torch.tensor([ids]), output_hidden_states=True)


def folder(tmp_path, **files):
    """An embeddings folder with ``files`` (name -> a function writing it at a path)."""
    directory = tmp_path / "embeddings"
    directory.mkdir(exist_ok=True)
    for name, write in files.items():
        write(directory / name)
    return directory


# -- reading the formats ------------------------------------------------------------------------------------------


def test_every_format_reads_weights_only_with_its_notes(tmp_path):
    vec = vectors(3)
    pt = read_embedding(save_a1111(tmp_path / "my-emb.pt", vec))
    assert pt.name == "my-emb" and pt.count == 3 and pt.widths == (WIDTH,) and torch.equal(pt.vectors[0], vec)
    assert (pt.step, pt.sd_checkpoint, pt.sd_checkpoint_name) == (500, "0123456789", "tiny-sd15")
    assert pt.sha256 == hashlib.sha256((tmp_path / "my-emb.pt").read_bytes()).hexdigest() and pt.short_hash == pt.sha256[:12]
    assert pt.describe() == {"step": 500, "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny-sd15", "shape": 64, "vectors": 3}

    torch.save({"<cat-toy>": vec[0]}, tmp_path / "cat-toy.bin")  # diffusers' learned_embeds.bin: one (width,) vector
    diffusers = read_embedding(tmp_path / "cat-toy.bin")
    assert diffusers.name == "cat-toy" and diffusers.count == 1 and torch.equal(diffusers.vectors[0][0], vec[0])
    assert diffusers.step is None

    save_file({"emb_params": vec}, tmp_path / "params.safetensors")
    assert torch.equal(read_embedding(tmp_path / "params.safetensors").vectors[0], vec)

    clip_l, clip_g = vectors(2, 64, 1), vectors(2, 96, 2)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, tmp_path / "xl.safetensors")
    xl = read_embedding(tmp_path / "xl.safetensors")
    assert xl.widths == (64, 96) and xl.shape == 160 and xl.count == 2 and torch.equal(xl.vectors[1], clip_g)

    png = read_embedding(save_png(tmp_path / "picture.png", vec))
    assert png.name == "from-png" and png.step == 7 and torch.allclose(png.vectors[0], vec)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert read_embedding(tmp_path / "plain.png") is None  # a picture without an embedding is no error


def test_a_pickle_needing_code_or_a_foreign_dict_is_refused_naming_the_file(tmp_path):
    # Textual inversion's first files kept a ParameterDict: unpickling it would run torch.nn code.
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors(1))}), "name": "old"}, tmp_path / "old.pt")
    with pytest.raises(ModelFileError, match=r"embedding: lienzo refuses to load old\.pt"):
        read_embedding(tmp_path / "old.pt")
    save_file({"a": vectors(1), "b": vectors(1)}, tmp_path / "lora-like.safetensors")
    with pytest.raises(ModelFileError, match=r"lora-like\.safetensors is not a textual-inversion embedding"):
        read_embedding(tmp_path / "lora-like.safetensors")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ModelFileError, match=r"cut\.pt"):
        read_embedding(tmp_path / "cut.pt")


def test_refresh_skips_unreadable_files_and_wrong_widths_with_warnings(sd1, sdxl, tmp_path, caplog):
    directory = folder(
        tmp_path,
        **{"good.pt": lambda p: save_a1111(p, vectors(2)), "wide.pt": lambda p: save_a1111(p, vectors(1, 32))},
    )
    (directory / "sub").mkdir()
    save_file({"clip_l": vectors(1), "clip_g": vectors(1)}, directory / "sub" / "xl.safetensors")
    (directory / "broken.pt").write_bytes(b"not a pickle")
    (directory / "empty.pt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="lienzo.models.embeddings"):
        found = refresh_embeddings(sd1, directory)
    assert list(found.loaded) == ["good"] and sorted(found.skipped) == ["wide", "xl"]
    log = caplog.text
    assert "broken.pt" in log and "'wide' skipped" in log and "32 wide" in log and "empty" not in log
    # SDXL takes the pair, not one 64-wide vector: A1111 compares against both encoders' widths together.
    xl = refresh_embeddings(sdxl, directory)
    assert list(xl.loaded) == ["xl"] and sorted(xl.skipped) == ["good", "wide"]
    assert list(model_embeddings(sd1).loaded) == ["good"]  # each model keeps its own


# -- triggers in prompts -------------------------------------------------------------------------------------------


def test_a_trigger_becomes_its_vectors_exactly_where_it_stands(sd1, tmp_path):
    refresh_embeddings(sd1, folder(tmp_path))
    plain = encode_prompt(sd1, "a photo of my-emb cat").embeds
    vec = vectors(3)
    refresh_embeddings(sd1, folder(tmp_path, **{"my-emb.pt": lambda p: save_a1111(p, vec)}))
    (chunk,) = tokenize_prompt(sd1.tokenizer, "a photo of my-emb cat", model_embeddings(sd1))
    # BOS, a, photo, of, three vectors, cat, EOS: the name's tokens gave way to one token per vector
    assert chunk.ids[4:7] == [EMBEDDING_PLACEHOLDER] * 3 and chunk.ids[8] == sd1.tokenizer.eos_token_id
    assert [at for at, _ in chunk.fixes] == [4]

    embeds = encode_prompt(sd1, "a photo of my-emb cat").embeds
    expected = by_hand(sd1.text_encoder, chunk.ids, [(4, vec)]).last_hidden_state
    assert torch.equal(embeds, expected)
    assert torch.equal(embeds[:, :4], plain[:, :4])  # causal attention: what comes before is untouched
    assert not torch.allclose(embeds[:, 4], plain[:, 4])


def test_weights_apply_to_the_vectors_and_the_name_can_be_any_case(sd1, tmp_path):
    vec = vectors(2, seed=3)
    refresh_embeddings(sd1, folder(tmp_path, **{"my-emb.pt": lambda p: save_a1111(p, vec)}))
    (chunk,) = tokenize_prompt(sd1.tokenizer, "a (My-Emb:1.5) cat", model_embeddings(sd1))
    assert chunk.weights[:5] == [1.0, 1.0, 1.5, 1.5, 1.0] and [at for at, _ in chunk.fixes] == [2]
    expected = apply_weights(by_hand(sd1.text_encoder, chunk.ids, [(2, vec)]).last_hidden_state, chunk.weights)
    assert torch.equal(encode_prompt(sd1, "a (My-Emb:1.5) cat").embeds, expected)


def test_vectors_count_against_the_chunk_and_the_longest_name_wins(sd1, tmp_path):
    big = vectors(3, seed=4)
    refresh_embeddings(
        sd1, folder(tmp_path, **{"my-emb.pt": lambda p: save_a1111(p, vectors(1)), "my-emb-big.pt": lambda p: save_a1111(p, big)})
    )
    embeddings = model_embeddings(sd1)
    (chunk,) = tokenize_prompt(sd1.tokenizer, "my-emb-big", embeddings)
    assert chunk.fixes[0][1].name == "my-emb-big" and chunk.ids[4] == sd1.tokenizer.eos_token_id
    # 73 words and three vectors: 76 tokens, one too many, so the vectors start the next chunk whole.
    first, second = tokenize_prompt(sd1.tokenizer, "cat " * 73 + "my-emb-big", embeddings)
    assert first.ids[74] == sd1.tokenizer.eos_token_id and not first.fixes
    assert second.ids[1:5] == [EMBEDDING_PLACEHOLDER] * 3 + [sd1.tokenizer.eos_token_id] and [at for at, _ in second.fixes] == [1]
    embeds = encode_prompt(sd1, "cat " * 73 + "my-emb-big").embeds
    assert torch.equal(embeds[:, 77:], by_hand(sd1.text_encoder, second.ids, [(1, big)]).last_hidden_state)


def test_sdxl_puts_clip_l_in_the_first_encoder_and_clip_g_in_the_second(sdxl, tmp_path):
    clip_l, clip_g = vectors(2, seed=5), vectors(2, seed=6)
    directory = folder(tmp_path, **{"xl-emb.safetensors": lambda p: save_file({"clip_l": clip_l, "clip_g": clip_g}, p)})
    refresh_embeddings(sdxl, directory)
    (chunk,) = tokenize_prompt(sdxl.tokenizer, "a xl-emb cat", model_embeddings(sdxl))
    (chunk_2,) = tokenize_prompt(sdxl.tokenizer_2, "a xl-emb cat", model_embeddings(sdxl))
    assert [at for at, _ in chunk.fixes] == [2] and chunk_2.fixes == chunk.fixes

    encoded = encode_prompt(sdxl, "a xl-emb cat")
    first = by_hand(sdxl.text_encoder, chunk.ids, [(2, clip_l)])
    second = by_hand(sdxl.text_encoder_2, chunk_2.ids, [(2, clip_g)])
    assert torch.equal(encoded.embeds[..., :WIDTH], first.hidden_states[-2])
    assert torch.equal(encoded.embeds[..., WIDTH:], second.hidden_states[-2])
    assert torch.equal(encoded.pooled, second.text_embeds)


def test_nothing_leaks_to_other_prompts_or_models_and_wrong_widths_stay_words(sd1, tmp_path):
    other = build_tiny("sd1")
    refresh_embeddings(sd1, folder(tmp_path))
    before = encode_prompt(sd1, "a photo of a cat, wide").embeds
    other_before = encode_prompt(other, "a photo of my-emb").embeds
    directory = folder(tmp_path, **{"my-emb.pt": lambda p: save_a1111(p, vectors(2)), "wide.pt": lambda p: save_a1111(p, vectors(1, 32))})
    refresh_embeddings(sd1, directory)
    assert torch.equal(encode_prompt(sd1, "a photo of a cat, wide").embeds, before)  # bit-identical; "wide" was skipped
    assert model_embeddings(other).loaded == {}
    assert torch.equal(encode_prompt(other, "a photo of my-emb").embeds, other_before)


def test_the_prompt_cache_keys_on_the_embeddings_a_text_uses(tmp_path):
    model = build_tiny("sd1")
    model.prompt_cache = PromptCache(max_bytes=1 << 24)
    directory = folder(tmp_path)
    refresh_embeddings(model, directory)

    def encoded(text):
        return encode_schedules(model, text, "", 1)[0].at(0).embeds

    words = encoded("a my-emb cat")
    save_a1111(directory / "my-emb.pt", vectors(2))
    refresh_embeddings(model, directory)
    with_embedding = encoded("a my-emb cat")
    assert not torch.equal(with_embedding, words)
    save_a1111(directory / "my-emb.pt", vectors(2, seed=9))  # the same name, other vectors: another hash
    refresh_embeddings(model, directory, force=True)
    assert not torch.equal(encoded("a my-emb cat"), with_embedding)
    (directory / "my-emb.pt").unlink()
    refresh_embeddings(model, directory)
    assert torch.equal(encoded("a my-emb cat"), words)


# -- infotext, listing, and a whole generation -------------------------------------------------------------------


def test_ti_hashes_name_only_the_embeddings_used(sd1, tmp_path):
    directory = folder(
        tmp_path,
        **{
            "my-emb.pt": lambda p: save_a1111(p, vectors(1)),
            "neg emb.safetensors": lambda p: save_file({"emb_params": vectors(2)}, p),
            "unused.pt": lambda p: save_a1111(p, vectors(1)),
        },
    )
    found = refresh_embeddings(sd1, directory)
    short = {name: e.short_hash for name, e in found.loaded.items()}
    text = ti_hashes(sd1, ["a my-emb cat, my-emb", "neg emb"])
    assert text == f"my-emb: {short['my-emb']}, neg emb: {short['neg emb']}"
    assert ti_hashes(sd1, ["a cat", ""]) is None


def test_a_tiny_generation_uses_embeddings_from_the_models_dir_and_says_so(sd1, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    directory = folder(models, **{"my-emb.pt": lambda p: save_a1111(p, vectors(2)), "neg-emb.pt": lambda p: save_a1111(p, vectors(1))})
    sha = {p.stem: hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in directory.iterdir()}
    settings = Settings(models_dir=models, data_dir=tmp_path / "data", outputs_dir=tmp_path / "out")
    request = build_request(prompt="a my-emb apple", negative_prompt="neg-emb", steps=2, width=64, height=64, seed=3, cfg_scale=5)
    result = Studio(settings).run(sd1, request, save=False)
    infotext = result.images[0].infotext
    assert f'TI hashes: "my-emb: {sha["my-emb"]}, neg-emb: {sha["neg-emb"]}"' in infotext
    remade = fields_from_infotext(parse_infotext(infotext))  # --from reads it and remakes from the prompt's words
    assert remade["prompt"] == "a my-emb apple" and remade["negative_prompt"] == "neg-emb"

    # Without the files the same request reads the names as words: another picture, and no TI hashes.
    (tmp_path / "bare").mkdir()
    plain = Studio(settings.model_copy(update={"models_dir": tmp_path / "bare"})).run(sd1, request, save=False)
    assert "TI hashes" not in plain.images[0].infotext
    assert not (result.images[0].pixels == plain.images[0].pixels).all()

    # The registry lists them with the same hashes, and never as checkpoints.
    registry = Registry(models, tmp_path / "cache")
    assert [(e.name, e.short_hash) for e in registry.embeddings()] == [("my-emb", sha["my-emb"]), ("neg-emb", sha["neg-emb"])]
    assert registry.candidates() == []


def test_lienzo_models_lists_the_embeddings(home, lienzo):
    directory = home / "models" / "embeddings"
    directory.mkdir(exist_ok=True)
    path = save_a1111(directory / "cli-emb.pt", vectors(1))
    output = lienzo("models").output
    assert "cli-emb" in output and hashlib.sha256(path.read_bytes()).hexdigest()[:12] in output
    assert output.count("cli-emb") == 1  # not also listed as a checkpoint


def test_vectors_take_a_half_precision_encoders_dtype(sd1, tmp_path):
    half = dataclasses.replace(sd1, text_encoder=copy.deepcopy(sd1.text_encoder).to(torch.bfloat16))
    vec = vectors(2, seed=8)
    refresh_embeddings(half, folder(tmp_path, **{"my-emb.pt": lambda p: save_a1111(p, vec)}))
    (chunk,) = tokenize_prompt(half.tokenizer, "a my-emb", model_embeddings(half))
    embeds = encode_prompt(half, "a my-emb").embeds
    assert embeds.dtype == torch.bfloat16
    assert torch.equal(embeds, by_hand(half.text_encoder, chunk.ids, [(2, vec.to(torch.bfloat16))]).last_hidden_state)
