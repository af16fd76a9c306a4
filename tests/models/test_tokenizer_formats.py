"""A diffusers folder is read with its own tokenizer, in every layout transformers writes, and a
tokenizer that does not fit its text encoder is refused when the model loads, not mid-generation."""

import copy
import json
import logging
import shutil

import pytest
import torch
from tiny_models import build_tiny, save_diffusers_folder
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lienzo.errors import ModelFileError
from lienzo.generation import engine
from lienzo.generation.request import build_request
from lienzo.models.loading import load_components
from lienzo.models.single_file_save import save_single_file

# A vocabulary of 58 tokens: single letters, letters ending a word, two merges ("fo", "fox"), "!" and the specials.
_LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
_VOCAB = {token: i for i, token in enumerate([*_LETTERS, *(c + "</w>" for c in _LETTERS), "fo", "fox</w>", "!", "!</w>"])}
_VOCAB.update({"<|startoftext|>": len(_VOCAB), "<|endoftext|>": len(_VOCAB) + 1})
_MERGES = [("f", "o"), ("fo", "x</w>")]
# "a fox": BOS, "a</w>", "fox</w>", EOS; CLIP's own vocabulary gives [49406, 320, 3240, 49407].
_A_FOX = [_VOCAB["<|startoftext|>"], _VOCAB["a</w>"], _VOCAB["fox</w>"], _VOCAB["<|endoftext|>"]]


def _small_tokenizer(pad_token: str) -> CLIPTokenizer:
    return CLIPTokenizer(vocab=dict(_VOCAB), merges=list(_MERGES), pad_token=pad_token, model_max_length=77)


def _with_vocabulary(family: str, rows: int):
    """A tiny model whose text encoders embed ``rows`` tokens, paired with the small tokenizer."""
    components = build_tiny(family)
    torch.manual_seed(1)
    for encoder_attr, tokenizer_attr, model_class, pad in (
        ("text_encoder", "tokenizer", CLIPTextModel, "<|endoftext|>"),
        ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection, "!"),
    ):
        encoder = getattr(components, encoder_attr)
        if encoder is None:
            continue
        config = copy.deepcopy(encoder.config)
        config.vocab_size, config.bos_token_id = rows, _VOCAB["<|startoftext|>"]
        config.eos_token_id = config.pad_token_id = _VOCAB["<|endoftext|>"]
        setattr(components, encoder_attr, model_class(config))
        setattr(components, tokenizer_attr, _small_tokenizer(pad))
    return components


def _rewrite_tokenizer(folder, tokenizer: CLIPTokenizer, layout: str) -> None:
    """Lay ``tokenizer`` out in ``folder`` as one version of transformers saves it."""
    shutil.rmtree(folder)
    folder.mkdir()
    if layout in ("tokenizer.json", "both"):
        # transformers 5 (and 4's fast tokenizers, which add the pair below)
        tokenizer.save_pretrained(folder)
    if layout in ("vocab.json + merges.txt", "both"):
        # transformers 4: vocab.json and merges.txt as the tokenizers library writes a BPE model,
        # with a 4.x-style config and special tokens map.
        tokenizer.backend_tokenizer.model.save(str(folder))
        specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        (folder / "special_tokens_map.json").write_text(json.dumps({**specials, "pad_token": tokenizer.pad_token}))
        if layout == "vocab.json + merges.txt":
            config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "errors": "replace"}
            (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def small_sdxl(tmp_path_factory):
    """An SDXL folder with a 58-token vocabulary in both tokenizers and both text encoders."""
    components = _with_vocabulary("sdxl", len(_VOCAB))
    return components, save_diffusers_folder(components, tmp_path_factory.mktemp("small") / "small-sdxl")


@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab.json + merges.txt", "both"])
def test_folder_tokenizer_is_read_in_every_layout(small_sdxl, layout, tmp_path):
    components, saved = small_sdxl
    folder = shutil.copytree(saved, tmp_path / "model")
    _rewrite_tokenizer(folder / "tokenizer", components.tokenizer, layout)
    _rewrite_tokenizer(folder / "tokenizer_2", components.tokenizer_2, layout)
    loaded = load_components(folder)
    for tokenizer, pad in ((loaded.tokenizer, "<|endoftext|>"), (loaded.tokenizer_2, "!")):
        assert len(tokenizer) == len(_VOCAB) and tokenizer("a fox").input_ids == _A_FOX
        assert tokenizer.pad_token == pad
    image = engine.generate(loaded, build_request(prompt="a fox", steps=1, seed=1, width=64, height=64)).images[0]
    assert image.pixels.shape == (64, 64, 3)


def test_transformers_5_saves_only_tokenizer_json(small_sdxl):
    """The layout lienzo once missed: no vocab.json, so its bundled CLIP vocabulary was used instead."""
    _, folder = small_sdxl
    assert sorted(p.name for p in (folder / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_tokenizer_larger_than_the_embedding_is_refused_at_load(tmp_path):
    components = _with_vocabulary("sd1", len(_VOCAB))
    clip = build_tiny("sd1").tokenizer  # CLIP's 49,408 tokens beside a 58-row embedding
    folder = save_diffusers_folder(components, tmp_path / "mismatch")
    _rewrite_tokenizer(folder / "tokenizer", clip, "tokenizer.json")
    with pytest.raises(ModelFileError, match="tokenizer has 49,408 tokens but text_encoder's embedding has 58 rows"):
        load_components(folder)


def test_single_file_text_encoder_without_clips_vocabulary_is_refused_at_load(tmp_path):
    path = save_single_file(_with_vocabulary("sd1", len(_VOCAB)), tmp_path / "small.safetensors")
    with pytest.raises(ModelFileError, match="tokenizer has 49,408 tokens but text_encoder's embedding has 58 rows"):
        load_components(path)


def test_sdxl_second_tokenizer_is_checked_too(small_sdxl, tmp_path):
    _, saved = small_sdxl
    folder = shutil.copytree(saved, tmp_path / "model")
    _rewrite_tokenizer(folder / "tokenizer_2", build_tiny("sd1").tokenizer, "tokenizer.json")
    with pytest.raises(ModelFileError, match="tokenizer_2 has 49,408 tokens but text_encoder_2's embedding has 58 rows"):
        load_components(folder)


def test_folder_without_tokenizer_uses_clips_with_a_warning(tmp_path, caplog):
    folder = save_diffusers_folder(build_tiny("sd1"), tmp_path / "no-tokenizer")
    shutil.rmtree(folder / "tokenizer")
    with caplog.at_level(logging.WARNING, logger="lienzo"):
        loaded = load_components(folder)
    assert loaded.tokenizer("a fox").input_ids == [49406, 320, 3240, 49407]
    assert any("no-tokenizer" in r.getMessage() and "CLIP" in r.getMessage() for r in caplog.records)


def test_folder_without_tokenizer_and_another_vocabulary_is_refused(tmp_path):
    folder = save_diffusers_folder(_with_vocabulary("sd1", len(_VOCAB)), tmp_path / "no-tokenizer")
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(ModelFileError, match="no tokenizer"):
        load_components(folder)


@pytest.mark.parametrize(
    "files",
    [{"tokenizer.json": "{not json"}, {"vocab.json": json.dumps(_VOCAB)}],
    ids=["broken tokenizer.json", "vocab.json without merges.txt"],
)
def test_unreadable_tokenizer_is_one_clear_line(tmp_path, files):
    folder = save_diffusers_folder(build_tiny("sd1"), tmp_path / "model")
    shutil.rmtree(folder / "tokenizer")
    (folder / "tokenizer").mkdir()
    for name, text in files.items():
        (folder / "tokenizer" / name).write_text(text)
    with pytest.raises(ModelFileError, match="tokenizer") as err:
        load_components(folder)
    assert len(str(err.value).splitlines()) == 1


def test_cli_refuses_a_mismatched_model_in_one_line(lienzo, tmp_path):
    folder = save_diffusers_folder(_with_vocabulary("sd1", len(_VOCAB)), tmp_path / "mismatch")
    _rewrite_tokenizer(folder / "tokenizer", build_tiny("sd1").tokenizer, "tokenizer.json")
    result = lienzo("generate", "a fox", "--model", str(folder), "--steps", "1", code=2)
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1
    assert "49,408" in result.stderr and "58 rows" in result.stderr and "text_encoder" in result.stderr
    assert result.stdout == ""
