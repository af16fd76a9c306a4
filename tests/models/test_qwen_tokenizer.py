"""Qwen's tokenizer, bundled: the ranked vocabulary of the dashscope wheel turned into a BPE, with the added
tokens of Qwen3 (Z-Image, Flux.2 Klein) and Qwen2.5-VL (Qwen-Image), so a ComfyUI text encoder file, which
carries no tokenizer, reads prompts with the ids its model was trained on."""

import gzip
import hashlib
import logging
import re

import pytest

from lienzo.models.families import TextEncoderSlot
from lienzo.models.single_file_layout import CONFIGS
from lienzo.models.tokenizers import bundled_qwen_tokenizer, folder_tokenizer

# Qwen's own ids, as its model cards and chat logs show them: "Hello world", and the chat markers.
HELLO_WORLD = [9707, 1879]
IM_START, IM_END, ENDOFTEXT, THINK, END_THINK = 151644, 151645, 151643, 151667, 151668
USER, ASSISTANT, NEWLINE, TWO_NEWLINES = 872, 77091, 198, 271


@pytest.fixture(scope="module")
def qwen3():
    return bundled_qwen_tokenizer("qwen3")


def test_the_bundled_vocabulary_is_the_file_the_notice_names():
    notice = (CONFIGS / "qwen_tokenizer" / "NOTICE").read_text()
    digest = re.search(r"sha256 of the file before compression:\s*([0-9a-f]{64})", notice).group(1)
    data = gzip.decompress((CONFIGS / "qwen_tokenizer" / "qwen.tiktoken.gz").read_bytes())
    assert hashlib.sha256(data).hexdigest() == digest
    assert len(data.splitlines()) == 151643


def test_qwen3_ids_and_chat_turn(qwen3):
    assert qwen3("Hello world").input_ids == HELLO_WORLD
    text = qwen3.apply_chat_template(
        [{"role": "user", "content": "Hello world"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert qwen3(text).input_ids == [
        IM_START, USER, NEWLINE, *HELLO_WORLD, IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE, THINK, TWO_NEWLINES, END_THINK, TWO_NEWLINES,
    ]
    thinking = qwen3.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert thinking.endswith("<|im_start|>assistant\n")
    assert len(qwen3) == 151669 and qwen3.pad_token_id == ENDOFTEXT and qwen3.eos_token_id == IM_END


def test_text_round_trips_and_digits_are_one_token_each(qwen3):
    text = "café  naïve, 2026 — 林中的鹿 🦌"
    assert qwen3.decode(qwen3(text).input_ids) == text
    assert len(qwen3("12345").input_ids) == 5
    # NFC: a decomposed "é" reads as the composed one.
    assert qwen3("cafe\u0301").input_ids == qwen3("caf\u00e9").input_ids


def test_qwen25vl_has_its_vision_markers_but_not_qwen3s_thoughts():
    tokenizer = bundled_qwen_tokenizer("qwen25vl")
    assert len(tokenizer) == 151665
    assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == 151652
    assert THINK not in tokenizer("<think>").input_ids


def test_a_diffusers_folder_without_its_tokenizer_gets_the_bundled_one(tmp_path, caplog):
    folder = tmp_path / "tiny-zimage" / "tokenizer"
    folder.mkdir(parents=True)
    slot = TextEncoderSlot("text_encoder", "tokenizer", "Qwen3Model", "qwen3")
    with caplog.at_level(logging.WARNING):
        tokenizer = folder_tokenizer(folder, slot, encoder=None)
    assert tokenizer("Hello world").input_ids == HELLO_WORLD
    assert "using lienzo's Qwen tokenizer" in caplog.text
