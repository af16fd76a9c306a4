"""Prompt encoding for the transformer families (SD 3.x, Flux.1, Chroma, Z-Image, Flux.2 Klein, Qwen-Image, Krea 2):
CLIP's pooled vector and a T5 (Z-Image, Flux.2 Klein: Qwen3; Qwen-Image: Qwen2.5-VL; Krea 2: Qwen3-VL) sequence.

A plain prompt is encoded exactly as diffusers' ``StableDiffusion3Pipeline`` / ``FluxPipeline`` /
``ChromaPipeline`` / ``ZImagePipeline`` / ``Flux2KleinPipeline`` / ``QwenImagePipeline`` / ``Krea2Pipeline`` encode it
(the same tokens, layers, padding and masks), so a lienzo picture equals theirs. On top, A1111's emphasis
syntax (``(word:1.3)``, ``[word]``) weights T5's and CLIP's token embeddings as Forge does for these
families: each piece is tokenized on its own, its tokens' embeddings scaled, the whole rescaled to
its original mean. A prompt longer than CLIP's 77 tokens reaches the network through T5 (256 tokens
for SD 3.x, 512 for Flux.1); CLIP sees its first 75, as in diffusers.
"""

from collections.abc import Callable
from functools import partial

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from torch import Tensor

from lienzo.errors import GenerationCancelled, InvalidRequestError
from lienzo.generation.prompts import BREAK_MARKER, PromptEmbeddings, apply_weights, parse_prompt_attention
from lienzo.models.components import Components
from lienzo.devices import execution_device

_CLIP_LENGTH = 77


def _pieces(text: str) -> list[tuple[str, float]]:
    """The prompt's pieces and weights; BREAK has no meaning for one T5 sequence and is dropped."""
    return [piece for piece in parse_prompt_attention(text) if piece != BREAK_MARKER]


def _token_ids(tokenizer, text: str, length: int, *, end: bool) -> tuple[list[int], list[float], int]:
    """``length`` ids, their weights and how many are not padding: a plain prompt tokenized whole (diffusers'
    ids exactly), a weighted one piece by piece; then end-of-text (``end``, T5) and padding, cut to ``length``
    as diffusers cuts."""
    pieces = _pieces(text)
    if all(weight == 1.0 for _, weight in pieces):
        plain = "".join(piece for piece, _ in pieces)
        tokens = tokenizer(plain, padding="max_length", max_length=length, truncation=True)
        return tokens.input_ids, [1.0] * length, sum(tokens.attention_mask)
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
    return ids + [tokenizer.pad_token_id] * padding, weights + [1.0] * padding, len(ids)


def _ids(ids: list[int], encoder: torch.nn.Module) -> Tensor:
    return torch.tensor([ids], dtype=torch.long, device=execution_device(encoder))


def _clip(encoder, tokenizer, text: str, clip_skip: int, *, hidden: bool) -> tuple[Tensor | None, Tensor]:
    """(hidden states or None, pooled): SD 3.x reads the penultimate layer (``clip_skip`` counts on
    from there, as for SDXL) and the projected pooled vector; Flux.1 only CLIP-L's pooled output."""
    ids, weights, _ = _token_ids(tokenizer, text, _CLIP_LENGTH, end=False)
    output = encoder(_ids(ids, encoder), output_hidden_states=hidden)
    if not hidden:
        return None, output.pooler_output
    most = encoder.config.num_hidden_layers - 1
    if not 1 <= clip_skip <= most:
        raise InvalidRequestError("clip_skip", f"must be between 1 and {most} for this model, got {clip_skip}")
    return apply_weights(output.hidden_states[-(clip_skip + 1)], weights), output.text_embeds


def _t5(encoder, tokenizer, text: str, length: int) -> Tensor:
    ids, weights, _ = _token_ids(tokenizer, text, length, end=True)
    return apply_weights(encoder(_ids(ids, encoder), output_hidden_states=False)[0], weights)


def _masked_t5(encoder, tokenizer, text: str, length: int) -> tuple[Tensor, Tensor]:
    """Chroma's T5 sequence and mask: T5 reads the prompt without its padding, and the network attends to
    the prompt and the first padding token only (a float mask, as ``ChromaPipeline`` builds it)."""
    ids, weights, tokens = _token_ids(tokenizer, text, length, end=True)
    ids = _ids(ids, encoder)
    embeds = encoder(ids, attention_mask=(torch.arange(length, device=ids.device) < tokens)[None].long())[0]
    mask = (torch.arange(length, device=ids.device) <= tokens)[None].to(embeds.dtype)
    return apply_weights(embeds, weights), mask


def _chat_ids(
    tokenizer, text: str, length: int, *, thinking: bool = False, template: str | None = None
) -> tuple[list[int], list[float], int]:
    """``length`` ids of the prompt as a chat's user turn (or in a pipeline's own ``template``), their weights and
    how many are not padding. A weighted prompt's pieces are tokenized on their own between the template's tokens."""

    def chat(content: str) -> str:
        if template is not None:
            return template.format(content)
        message = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)

    pieces = _pieces(text)
    if all(weight == 1.0 for _, weight in pieces):
        tokens = tokenizer(chat("".join(piece for piece, _ in pieces)), padding="max_length", max_length=length, truncation=True)
        ids, weights, real = tokens.input_ids, [1.0] * length, sum(tokens.attention_mask)
    else:
        # The template puts the content in verbatim: around a marker it gives what comes before and after.
        before, after = chat("\0").split("\0")
        ids, weights = [], []
        for piece, weight in [(before, 1.0), *pieces, (after, 1.0)]:
            piece_ids = tokenizer(piece, add_special_tokens=False).input_ids
            ids += piece_ids
            weights += [weight] * len(piece_ids)
        ids, weights = ids[:length], weights[:length]
        real = len(ids)
        ids += [tokenizer.pad_token_id] * (length - real)
        weights += [1.0] * (length - real)
    return ids, weights, real


def _qwen3(encoder, tokenizer, text: str, length: int) -> Tensor:
    """Z-Image's sequence, as ``ZImagePipeline`` reads it: the chat turn (thinking on) padded to ``length`` and
    masked, Qwen3's second-to-last layer at the real tokens only (1, tokens, dim)."""
    ids, weights, real = _chat_ids(tokenizer, text, length, thinking=True)
    mask = (torch.arange(length, device=execution_device(encoder)) < real)[None]
    hidden = encoder(input_ids=_ids(ids, encoder), attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    return apply_weights(hidden[:, :real], weights[:real])


# Flux2KleinPipeline's text_encoder_out_layers: the hidden states it reads, side by side.
_FLUX2_LAYERS = (9, 18, 27)


def _flux2_qwen3(encoder, tokenizer, text: str, length: int) -> Tensor:
    """Flux.2 Klein's sequence, as ``Flux2KleinPipeline`` reads it: the chat turn (thinking off) padded to
    ``length`` and masked, Qwen3's layers 9, 18 and 27 side by side at every token, padding too (1, length, 3 dim)."""
    ids, weights, real = _chat_ids(tokenizer, text, length, thinking=False)
    mask = (torch.arange(length, device=execution_device(encoder)) < real)[None].long()
    output = encoder(input_ids=_ids(ids, encoder), attention_mask=mask, output_hidden_states=True, use_cache=False)
    return apply_weights(torch.cat([output.hidden_states[k] for k in _FLUX2_LAYERS], dim=-1), weights)


# QwenImagePipeline's prompt_template_encode and prompt_template_encode_start_idx (set in its __init__, so not
# readable without building one): the template's first 34 tokens (the system turn) are read, then dropped.
_QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial"
    " relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
_QWEN_IMAGE_DROP = 34
_QWEN_IMAGE_TOKENS = 1024  # its tokenizer_max_length: the templated prompt is cut at this many tokens plus the 34


def _qwen25vl(encoder, tokenizer, text: str, length: int) -> tuple[Tensor, Tensor]:
    """Qwen-Image's sequence and mask, as ``QwenImagePipeline`` reads one prompt: the templated prompt unpadded,
    Qwen2.5-VL's last layer, the template's first tokens dropped, at most ``length`` tokens (1, tokens, dim)."""
    longest = _QWEN_IMAGE_TOKENS + _QWEN_IMAGE_DROP
    ids, weights, real = _chat_ids(tokenizer, text, longest, template=_QWEN_IMAGE_TEMPLATE)
    ids = _ids(ids[:real], encoder)
    hidden = encoder(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[-1]
    kept = slice(_QWEN_IMAGE_DROP, _QWEN_IMAGE_DROP + length)
    embeds = apply_weights(hidden[:, kept], weights[:real][kept])
    return embeds, embeds.new_ones(embeds.shape[:2])


# QwenImageEditPlusPipeline's prompt_template_encode and prompt_template_encode_start_idx (set in its __init__) and
# the line it puts before the prompt for each image (in its _get_qwen_prompt_embeds): not readable without building one.
_QWEN_EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, background),"
    " then explain how the user's text instruction should alter or modify the image. Generate a new image that meets the"
    " user's requirements while maintaining consistency with the original input where appropriate.<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
_QWEN_EDIT_DROP = 64
_QWEN_EDIT_PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


def _condition_image(image: Image.Image) -> Image.Image:
    """An input image as QwenImageEditPlusPipeline gives it to Qwen2.5-VL: resized (Lanczos, its VaeImageProcessor's)
    to about its CONDITION_IMAGE_SIZE pixels, keeping its shape, each side a multiple of 32."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

    width, height = edit_plus.calculate_dimensions(edit_plus.CONDITION_IMAGE_SIZE, image.width / image.height)
    return VaeImageProcessor().resize(image, height, width)


def _qwen25vl_images(encoder, tokenizer, image_processor, text: str, images: tuple[Image.Image, ...]) -> tuple[Tensor, Tensor]:
    """Qwen-Image-Edit's sequence and mask, as ``QwenImageEditPlusPipeline`` reads one prompt with its images through
    its Qwen2VLProcessor: a "Picture n:" line per image before the prompt in its template, each image's <|image_pad|>
    repeated once per token of the image, Qwen2.5-VL's last layer with the images' pixels, the template's first tokens
    dropped, the whole prompt kept (1, tokens, dim)."""
    pixels = image_processor(images=[_condition_image(image) for image in images], return_tensors="pt")
    # Qwen2VLProcessor's replace_image_token (which a processor without torchvision cannot be built to call): an image
    # has a token per merge_size x merge_size patches.
    counts = (pixels["image_grid_thw"].prod(-1) // image_processor.merge_size**2).tolist()
    pictures = "".join(
        _QWEN_EDIT_PICTURE.format(index + 1).replace("<|image_pad|>", "<|image_pad|>" * count) for index, count in enumerate(counts)
    )
    template = _QWEN_EDIT_TEMPLATE.format(pictures + "{}")
    # Uncut, as the pipeline reads it: Qwen's byte-level tokens are a byte or more each, so the bytes bound their count.
    ids, weights, real = _chat_ids(tokenizer, text, len(template.format(text).encode()), template=template)
    ids, device = _ids(ids[:real], encoder), execution_device(encoder)
    hidden = encoder(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels["pixel_values"].to(device),
        image_grid_thw=pixels["image_grid_thw"].to(device), output_hidden_states=True,
    ).hidden_states[-1]
    embeds = apply_weights(hidden[:, _QWEN_EDIT_DROP:], weights[_QWEN_EDIT_DROP:real])
    return embeds, embeds.new_ones(embeds.shape[:2])


# Krea2Pipeline's text_encoder_select_layers for a folder that names none (Qwen3-VL-4B's) and the suffix length it
# sizes its block by (set in its __init__, so not readable without building one). Its template is Qwen-Image's,
# split at the prompt: the suffix goes after the padding.
_KREA2_LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)
_KREA2_SUFFIX_TOKENS = 5


def _krea2(encoder, tokenizer, text: str, length: int, layers: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Krea 2's sequence and mask, as ``Krea2Pipeline`` reads one prompt: the templated prompt padded to a fixed
    block and the suffix after the padding, positions counting real tokens only, Qwen3-VL's ``layers`` stacked at
    every token, the template's first 34 tokens dropped ((1, tokens, layers, dim) and a bool (1, tokens))."""
    prefix, suffix = _QWEN_IMAGE_TEMPLATE.split("{}")
    block = length + _QWEN_IMAGE_DROP - _KREA2_SUFFIX_TOKENS
    ids, weights, real = _chat_ids(tokenizer, text, block, template=prefix + "{}")
    suffix_ids = tokenizer(suffix).input_ids
    mask = torch.tensor([[True] * real + [False] * (block - real) + [True] * len(suffix_ids)], device=execution_device(encoder))
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0).expand(3, -1, -1)  # the same on Qwen3-VL's 3 rotary axes
    ids = _ids(ids + suffix_ids, encoder)
    output = encoder(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    hidden = torch.stack([output.hidden_states[k] for k in layers], dim=2)[:, _QWEN_IMAGE_DROP:]
    weights = weights[_QWEN_IMAGE_DROP:] + [1.0] * len(suffix_ids)
    return apply_weights(hidden.flatten(2), weights).view_as(hidden), mask[:, _QWEN_IMAGE_DROP:]


@torch.no_grad()
def encode_transformer_prompt(
    components: Components,
    text: str,
    *,
    clip_skip: int = 1,
    device: torch.device | str | None = None,
    cancel: Callable[[], bool] | None = None,
    images: tuple[Image.Image, ...] = (),
) -> PromptEmbeddings:
    """One prompt for an SD 3.x, Flux.1, Chroma, Z-Image, Flux.2 Klein, Qwen-Image or Krea 2 model: ``embeds`` is what the
    transformer attends to (SD 3.x: CLIP-L and bigG's hidden states side by side, zero-padded to T5's width, then
    T5's sequence; Flux.1 and Chroma: T5's sequence; Z-Image: Qwen3's, as long as the prompt; Flux.2 Klein: three
    of Qwen3's layers; Qwen-Image: Qwen2.5-VL's, as long as the prompt; Krea 2: Qwen3-VL's layers stacked) and
    ``pooled`` the pooled CLIP vector(s) (none for Chroma, Qwen-Image and Krea 2, which have ``mask``, nor for Z-Image
    and Flux.2 Klein). SD 3.x without its T5 gets zeros in its place, as diffusers gives it. Qwen-Image-Edit reads the
    prompt with ``images``, the request's reference images (Qwen2.5-VL's whole sequence, with them)."""
    if cancel is not None and cancel():
        raise GenerationCancelled("generation cancelled")
    spec = components.spec
    length = spec.max_sequence_length
    if components.family in ("zimage", "flux2"):
        read = _qwen3 if components.family == "zimage" else _flux2_qwen3
        embeds = read(components.text_encoder, components.tokenizer, text, length)
        return PromptEmbeddings(embeds if device is None else embeds.to(device))
    if spec.prompt_images:
        embeds, mask = _qwen25vl_images(components.text_encoder, components.tokenizer, components.image_processor, text, images)
        return PromptEmbeddings(embeds, mask=mask) if device is None else PromptEmbeddings(embeds.to(device), mask=mask.to(device))
    if components.family in ("chroma", "qwenimage", "krea2"):
        layers = components.text_encoder_layers or _KREA2_LAYERS
        read = {"chroma": _masked_t5, "qwenimage": _qwen25vl, "krea2": partial(_krea2, layers=layers)}[components.family]
        embeds, mask = read(components.text_encoder, components.tokenizer, text, length)
        if device is not None:
            embeds, mask = embeds.to(device), mask.to(device)
        return PromptEmbeddings(embeds, mask=mask)
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
