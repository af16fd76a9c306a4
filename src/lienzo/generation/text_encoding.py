"""Prompt encoding for the transformer families (SD 3.x, Flux.1): CLIP's pooled vector and a T5 sequence.

A plain prompt is encoded exactly as diffusers' ``StableDiffusion3Pipeline`` / ``FluxPipeline`` encode
it (the same tokens, layers and padding), so a lienzo picture equals theirs. On top, A1111's emphasis
syntax (``(word:1.3)``, ``[word]``) weights T5's and CLIP's token embeddings as Forge does for these
families: each piece is tokenized on its own, its tokens' embeddings scaled, the whole rescaled to
its original mean. A prompt longer than CLIP's 77 tokens reaches the network through T5 (256 tokens
for SD 3.x, 512 for Flux.1); CLIP sees its first 75, as in diffusers.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from lienzo.errors import GenerationCancelled, InvalidRequestError
from lienzo.generation.prompts import BREAK_MARKER, PromptEmbeddings, apply_weights, parse_prompt_attention
from lienzo.models.components import Components
from lienzo.devices import execution_device

_CLIP_LENGTH = 77


def _pieces(text: str) -> list[tuple[str, float]]:
    """The prompt's pieces and weights; BREAK has no meaning for one T5 sequence and is dropped."""
    return [piece for piece in parse_prompt_attention(text) if piece != BREAK_MARKER]


def _token_ids(tokenizer, text: str, length: int, *, end: bool) -> tuple[list[int], list[float]]:
    """``length`` ids and their weights: a plain prompt tokenized whole (diffusers' ids exactly), a weighted
    one piece by piece; then end-of-text (``end``, T5) and padding, cut to ``length`` as diffusers cuts."""
    pieces = _pieces(text)
    if all(weight == 1.0 for _, weight in pieces):
        plain = "".join(piece for piece, _ in pieces)
        ids = tokenizer(plain, padding="max_length", max_length=length, truncation=True).input_ids
        return ids, [1.0] * len(ids)
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in pieces:
        piece_ids = tokenizer(piece, add_special_tokens=False, verbose=False).input_ids
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    if end:  # T5: text, </s>, padding
        ids, weights = ids[: length - 1] + [tokenizer.eos_token_id], weights[: length - 1] + [1.0]
    else:  # CLIP: <|startoftext|>, text, <|endoftext|>, padding
        ids = [tokenizer.bos_token_id, *ids[: length - 2], tokenizer.eos_token_id]
        weights = [1.0, *weights[: length - 2], 1.0]
    padding = length - len(ids)
    return ids + [tokenizer.pad_token_id] * padding, weights + [1.0] * padding


def _ids(ids: list[int], encoder: torch.nn.Module) -> Tensor:
    return torch.tensor([ids], dtype=torch.long, device=execution_device(encoder))


def _clip(encoder, tokenizer, text: str, clip_skip: int, *, hidden: bool) -> tuple[Tensor | None, Tensor]:
    """(hidden states or None, pooled): SD 3.x reads the penultimate layer (``clip_skip`` counts on
    from there, as for SDXL) and the projected pooled vector; Flux.1 only CLIP-L's pooled output."""
    ids, weights = _token_ids(tokenizer, text, _CLIP_LENGTH, end=False)
    output = encoder(_ids(ids, encoder), output_hidden_states=hidden)
    if not hidden:
        return None, output.pooler_output
    most = encoder.config.num_hidden_layers - 1
    if not 1 <= clip_skip <= most:
        raise InvalidRequestError("clip_skip", f"must be between 1 and {most} for this model, got {clip_skip}")
    return apply_weights(output.hidden_states[-(clip_skip + 1)], weights), output.text_embeds


def _t5(encoder, tokenizer, text: str, length: int) -> Tensor:
    ids, weights = _token_ids(tokenizer, text, length, end=True)
    return apply_weights(encoder(_ids(ids, encoder), output_hidden_states=False)[0], weights)


@torch.no_grad()
def encode_transformer_prompt(
    components: Components,
    text: str,
    *,
    clip_skip: int = 1,
    device: torch.device | str | None = None,
    cancel: Callable[[], bool] | None = None,
) -> PromptEmbeddings:
    """One prompt for an SD 3.x or Flux.1 model: ``embeds`` is what the transformer attends to (SD 3.x:
    CLIP-L and bigG's hidden states side by side, zero-padded to T5's width, then T5's sequence; Flux.1:
    T5's sequence) and ``pooled`` the pooled CLIP vector(s). SD 3.x without its T5 gets zeros in its place,
    as diffusers gives it."""
    if cancel is not None and cancel():
        raise GenerationCancelled("generation cancelled")
    spec = components.spec
    length = spec.max_sequence_length
    if components.family == "flux":
        _, pooled = _clip(components.text_encoder, components.tokenizer, text, clip_skip, hidden=False)
        embeds = _t5(components.text_encoder_2, components.tokenizer_2, text, length)
    else:
        hidden_l, pooled_l = _clip(components.text_encoder, components.tokenizer, text, clip_skip, hidden=True)
        hidden_g, pooled_g = _clip(components.text_encoder_2, components.tokenizer_2, text, clip_skip, hidden=True)
        clip = torch.cat([hidden_l, hidden_g], dim=-1)
        if components.text_encoder_3 is not None:
            t5 = _t5(components.text_encoder_3, components.tokenizer_3, text, length).to(clip.dtype)
        else:
            width = components.transformer.config.joint_attention_dim
            t5 = torch.zeros((1, length, width), dtype=clip.dtype, device=clip.device)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        embeds, pooled = torch.cat([clip, t5], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1)
    if device is not None:
        embeds, pooled = embeds.to(device), pooled.to(device)
    return PromptEmbeddings(embeds, pooled)
