"""Tokenizers: a model folder's own, or the ones lienzo bundles for files that carry none.

Single-file checkpoints and ComfyUI's split text-encoder files hold weights only. CLIP's BPE vocabulary
(CLIP-L, OpenCLIP bigG) is bundled in ``models/configs/tokenizer``, T5's in ``models/configs/t5_tokenizer``,
Qwen's (Qwen3, Qwen2.5-VL) in ``models/configs/qwen_tokenizer`` (see the NOTICE files); nothing is ever
downloaded.
"""

import gzip
import logging
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from lienzo.errors import ModelFileError
from lienzo.models.families import TextEncoderSlot
from lienzo.models.quiet import first_line
from lienzo.models.single_file_layout import CONFIGS, bundled_tokenizer

log = logging.getLogger(__name__)


def bundled_t5_tokenizer(max_length: int = 512):
    """T5's tokenizer from the bundled file, as diffusers' SD 3 and Flux pipelines use it."""
    from tokenizers import Tokenizer
    from transformers import T5TokenizerFast

    text = gzip.decompress((CONFIGS / "t5_tokenizer" / "tokenizer.json.gz").read_bytes()).decode()
    return T5TokenizerFast(
        tokenizer_object=Tokenizer.from_str(text), eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=max_length
    )


QWEN_KINDS = ("qwen3", "qwen25vl", "qwen3vl")  # the text encoder kinds that read prompts with Qwen's vocabulary
# Qwen's pre-tokenizer split (its tokenizer.json's; one digit a piece, unlike tiktoken's default of three).
_QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# The tokens Qwen2.5(-VL)'s tokenizer adds after the 151,643 of the vocabulary, in id order; Qwen3's adds four more.
_QWEN25_ADDED = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
_QWEN3_ADDED = (*_QWEN25_ADDED, "<tool_response>", "</tool_response>", "<think>", "</think>")
# Qwen3's chat template, for the turns lienzo sends (user turns, then the assistant's opening; with thinking
# off, an empty thought), which is what Z-Image's and Flux.2 Klein's pipelines ask it for.
_QWEN3_CHAT = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def bundled_qwen_tokenizer(kind: str):
    """Qwen's tokenizer for a text encoder kind ("qwen3" or "qwen25vl"), built from the bundled ranked vocabulary.

    The vocabulary ships in tiktoken's form (the only openly licensed wheel that carries it has it so);
    transformers' converter turns ranks into BPE merges, as it does for any tiktoken model, with the file read
    here rather than through the tiktoken package, which lienzo would otherwise not need."""
    import base64

    from tokenizers import AddedToken, normalizers
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    lines = gzip.decompress((CONFIGS / "qwen_tokenizer" / "qwen.tiktoken.gz").read_bytes()).splitlines()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}

    class _Ranks(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_) -> dict[bytes, int]:
            return ranks

    bpe = _Ranks(pattern=_QWEN_SPLIT).converted()
    bpe.normalizer = normalizers.NFC()
    added = _QWEN3_ADDED if kind == "qwen3" else _QWEN25_ADDED
    bpe.add_tokens([AddedToken(token, special=token.startswith("<|"), normalized=False) for token in added])
    return Qwen2TokenizerFast(
        tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token=None, padding_side="right",
        chat_template=_QWEN3_CHAT if kind == "qwen3" else None, model_max_length=131072,
    )


def bundled_for(kind: str):
    """The bundled tokenizer for a text encoder kind: "clip_l", "clip_g" or "t5xxl"."""
    if kind == "t5xxl":
        return bundled_t5_tokenizer()
    return bundled_tokenizer("!" if kind == "clip_g" else "<|endoftext|>")


def folder_tokenizer(folder: Path, slot: TextEncoderSlot, encoder: torch.nn.Module):
    """The tokenizer of one text encoder slot of a diffusers folder."""
    if slot.kind in QWEN_KINDS:
        from transformers import AutoTokenizer

        if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
            log.warning("model %s: no tokenizer in %s/; using lienzo's Qwen tokenizer", folder.parent.name, folder.name)
            return bundled_qwen_tokenizer(slot.kind)
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as err:  # the tokenizers library raises a plain Exception for a file it cannot parse
            raise ModelFileError(f"model {folder.parent.name}: cannot read {folder.name}/ ({first_line(err)})") from None
    if slot.kind == "t5xxl":
        from transformers import T5TokenizerFast

        if not (folder / "tokenizer.json").is_file() and not (folder / "spiece.model").is_file():
            log.warning("model %s: no tokenizer in %s/; using lienzo's T5 tokenizer", folder.parent.name, folder.name)
            return bundled_t5_tokenizer()
        try:
            return T5TokenizerFast.from_pretrained(folder, local_files_only=True)
        except Exception as err:  # the tokenizers library raises a plain Exception for a file it cannot parse
            raise ModelFileError(f"model {folder.parent.name}: cannot read {folder.name}/ ({first_line(err)})") from None
    # OpenCLIP encoders (SD 2.x, bigG) pad with "!"; OpenAI CLIP pads with end-of-text.
    return clip_folder_tokenizer(folder, encoder, "!" if slot.kind == "clip_g" else "<|endoftext|>")


def clip_folder_tokenizer(folder: Path, encoder: torch.nn.Module, pad_token: str) -> CLIPTokenizer:
    """The model folder's own tokenizer, in each layout transformers writes: ``tokenizer.json`` alone
    (transformers 5), ``vocab.json`` + ``merges.txt`` (4.x slow tokenizers) or all three (4.x fast ones).

    A folder without one gets lienzo's CLIP tokenizer, as every single-file checkpoint does (they carry
    none): it is the vocabulary every SD 1.x/2.x/XL text encoder was trained on, so refusing would turn
    away a model lienzo reads correctly. It is said in a warning, and only for a text encoder with CLIP's
    number of tokens: with another vocabulary CLIP's ids would index other words, or none.
    """
    model, encoder_name = folder.parent.name, folder.name.replace("tokenizer", "text_encoder")
    pair = [name for name in ("vocab.json", "merges.txt") if (folder / name).is_file()]
    if (folder / "tokenizer.json").is_file() or len(pair) == 2:
        try:
            return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        # The tokenizers library raises a plain Exception for a tokenizer.json it cannot parse.
        except Exception as err:
            raise ModelFileError(f"model {model}: cannot read {folder.name}/ ({first_line(err)})") from None
    if pair:
        missing = "merges.txt" if pair == ["vocab.json"] else "vocab.json"
        raise ModelFileError(
            f"model {model}: {folder.name}/ has {pair[0]} but no {missing}; the tokenizer is incomplete"
        )
    clip, rows = bundled_tokenizer(pad_token), embedding_rows(encoder)
    if rows != len(clip):
        raise ModelFileError(
            f"model {model}: there is no tokenizer in {folder.name}/ (tokenizer.json, or vocab.json and merges.txt), "
            f"and {encoder_name}'s embedding has {rows:,} rows where CLIP's tokenizer has {len(clip):,} tokens; "
            "copy the tokenizer folder from where the model came from"
        )
    log.warning(
        "model %s: no tokenizer in %s/; using lienzo's CLIP tokenizer, which fits its %s", model, folder.name, encoder_name
    )
    return clip


def embedding_rows(encoder: torch.nn.Module) -> int:
    return encoder.get_input_embeddings().num_embeddings
