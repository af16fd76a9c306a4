"""Prompt text → text-encoder embeddings, with AUTOMATIC1111's emphasis syntax and long prompts.

Three steps, one function each:

1. :func:`parse_prompt_attention` splits ``a (red:1.3) [cat]`` into weighted pieces.
2. :func:`tokenize_prompt` turns the pieces into 77-token chunks with a weight per token.
3. :func:`encode_prompt` runs every chunk through the text encoder(s), applies the weights and
   joins the chunks along the token axis, so a UNet cross-attends to prompts of any length.

Prompt editing and alternation (``[cat:dog:0.5]``, ``[cat|dog]``) come first: :func:`encode_schedules`
resolves them per step (:mod:`lienzo.generation.prompt_schedule`) and encodes each distinct text once,
and, with the model's prompt cache (``components.prompt_cache``), once across jobs.
Before that, a composable prompt (``a cat AND a dog:1.2``) is cut into subprompts, each with its own
schedule and weight (:class:`ComposedPrompt`).

Textual-inversion embeddings (:mod:`lienzo.models.embeddings`) are A1111's: a name of one the model loaded, found
among a piece's tokens, becomes one placeholder token per vector (weighted and counted against the chunk like any
token), and the text encoder's token-embedding layer hands the vectors out at those places.
"""

import re
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lienzo.devices import execution_device
from lienzo.errors import GenerationCancelled, InvalidRequestError, LienzoError
from lienzo.generation.fields import image_hash
from lienzo.generation.prompt_schedule import prompt_schedule, schedule_index, split_subprompts
from lienzo.models.components import Components
from lienzo.models.embeddings import Embedding, ModelEmbeddings, model_embeddings
from lienzo.models.families import FAMILIES

# The piece that stands for the BREAK keyword in parse_prompt_attention's output. A1111 uses
# the same pair; a weight of -1 cannot come from emphasis, which only multiplies positives.
BREAK_MARKER: tuple[str, float] = ("BREAK", -1.0)

ROUND_BRACKET_FACTOR = 1.1  # "(word)"; "[word]" divides by it
# SD's CLIP text encoders have 77 positions: BOS, 75 prompt tokens, EOS (then padding).
CHUNK_LENGTH = 77
CHUNK_TOKENS = CHUNK_LENGTH - 2
# A1111's "comma padding backtrack": a chunk that fills up within 20 tokens after a comma is
# cut just after that comma, so the phrase after it starts the next chunk whole.
COMMA_BACKTRACK = 20
# The id an embedding's vectors stand on until the encoder replaces them (A1111's): not a BOS/EOS id, which
# the encoder's pooling looks for.
EMBEDDING_PLACEHOLDER = 0

# One lexical unit of the emphasis syntax; group 1 is the number of a "(text:1.3)" close.
_ATTENTION_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]                                  # escaped bracket or backslash
    | \\                                            # any other backslash
    | [(\[]                                         # opening bracket
    | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)           # explicit weight, closing a round bracket
    | [)\]]                                         # closing bracket
    | [^\\()\[\]:]+                                 # plain text
    | :                                             # a colon that is just text
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass
class _Piece:
    text: str
    weight: float = 1.0
    is_break: bool = False


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` pieces, following AUTOMATIC1111's emphasis rules.

    - ``(word)`` multiplies by 1.1, ``((word))`` by 1.21, ``[word]`` divides by 1.1;
      ``(word:1.3)`` multiplies by 1.3 instead of 1.1. Nesting multiplies.
    - ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal characters; any other
      backslash is dropped, as A1111 drops it.
    - An opening bracket never closed applies to the rest of the prompt; a closing bracket
      never opened, and ``:1.3)`` outside round brackets, are plain text.
    - ``BREAK`` (upper case, a whole word) becomes :data:`BREAK_MARKER`, which starts a new
      chunk. Unlike A1111, where a BREAK inside brackets silently becomes the word "BREAK",
      it is a break wherever it appears.
    - Adjacent pieces of equal weight are merged; an empty prompt gives ``[("", 1.0)]``.
    """
    pieces: list[_Piece] = []
    open_round: list[int] = []
    open_square: list[int] = []
    for match in _ATTENTION_TOKEN.finditer(text):
        token, explicit_weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append(_Piece(token[1:]))
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif explicit_weight is not None and open_round:
            _emphasise(pieces, open_round.pop(), float(explicit_weight))
        elif token == ")" and open_round:
            _emphasise(pieces, open_round.pop(), ROUND_BRACKET_FACTOR)
        elif token == "]" and open_square:
            _emphasise(pieces, open_square.pop(), 1 / ROUND_BRACKET_FACTOR)
        else:
            pieces.extend(_split_breaks(token))
    for start in open_round:
        _emphasise(pieces, start, ROUND_BRACKET_FACTOR)
    for start in open_square:
        _emphasise(pieces, start, 1 / ROUND_BRACKET_FACTOR)
    return _merge_equal_weights(pieces) or [("", 1.0)]


def _emphasise(pieces: list[_Piece], start: int, factor: float) -> None:
    for piece in pieces[start:]:
        piece.weight *= factor


def _split_breaks(text: str) -> list[_Piece]:
    pieces: list[_Piece] = []
    for index, part in enumerate(_BREAK.split(text)):
        if index > 0:
            pieces.append(_Piece("", is_break=True))
        pieces.append(_Piece(part))
    return pieces


def _merge_equal_weights(pieces: list[_Piece]) -> list[tuple[str, float]]:
    merged: list[tuple[str, float]] = []
    for piece in pieces:
        if piece.is_break:
            merged.append(BREAK_MARKER)
        elif not piece.text:
            continue
        elif merged and merged[-1] != BREAK_MARKER and merged[-1][1] == piece.weight:
            merged[-1] = (merged[-1][0] + piece.text, piece.weight)
        else:
            merged.append((piece.text, piece.weight))
    return merged


@dataclass(frozen=True)
class TokenChunk:
    """One encoder input: ``CHUNK_LENGTH`` token ids (BOS, text, EOS, padding) and their weights; ``fixes``
    are the embeddings in it, each with the position of its first vector (A1111's ``PromptChunkFix``)."""

    ids: list[int]
    weights: list[float]
    fixes: tuple[tuple[int, Embedding], ...] = ()


# A token on its way into a chunk: its id, weight, and the embedding whose first vector it stands for.
_Token = tuple[int, float, Embedding | None]


def tokenize_prompt(tokenizer: CLIPTokenizer, text: str, embeddings: ModelEmbeddings | None = None) -> list[TokenChunk]:
    """Parse emphasis, tokenize, and cut into chunks of at most 75 prompt tokens (A1111's way).

    Each piece is tokenized on its own, as A1111 does. A chunk ends at a BREAK or when full;
    a full chunk whose last comma lies within its final 20 tokens is cut after that comma.
    Chunks are laid out as diffusers' ``padding="max_length"`` does: BOS, tokens, EOS, pad.
    A loaded embedding's name (``embeddings``) among a piece's tokens takes one token per vector, with
    the piece's weight; one that does not fit in what is left of a chunk starts the next, as in A1111.
    """
    pieces = parse_prompt_attention(text)
    texts = [piece_text for piece_text, _ in pieces]
    # verbose=False: pieces longer than 77 tokens are expected here; chunking handles them.
    token_ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids
    comma_id = tokenizer(",", add_special_tokens=False).input_ids[0]

    chunks: list[list[_Token]] = []
    current: list[_Token] = []
    last_comma = -1
    for (piece_text, weight), ids in zip(pieces, token_ids):
        if (piece_text, weight) == BREAK_MARKER:
            chunks.append(current)
            current, last_comma = [], -1
            continue
        position = 0
        while position < len(ids):
            token_id = ids[position]
            if len(current) == CHUNK_TOKENS:
                cut = CHUNK_TOKENS
                if token_id != comma_id and last_comma >= 0 and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK:
                    cut = last_comma + 1
                # An embedding moved on with the tokens after the comma keeps its vectors (A1111 leaves them behind).
                chunks.append(current[:cut])
                current, last_comma = current[cut:], -1
            embedding, length = (None, 0) if embeddings is None else embeddings.trigger_at(tokenizer, ids, position)
            if embedding is None:
                if token_id == comma_id:
                    last_comma = len(current)
                current.append((token_id, weight, None))
                position += 1
                continue
            if len(current) + embedding.count > CHUNK_TOKENS:
                chunks.append(current)
                current, last_comma = [], -1
            current += [(EMBEDDING_PLACEHOLDER, weight, embedding)] + [(EMBEDDING_PLACEHOLDER, weight, None)] * (embedding.count - 1)
            position += length
    if current or not chunks:
        chunks.append(current)
    return [_frame(tokenizer, chunk) for chunk in chunks]


def _frame(tokenizer: CLIPTokenizer, tokens: list[_Token]) -> TokenChunk:
    padding = CHUNK_TOKENS - len(tokens)
    ids = [tokenizer.bos_token_id, *(token for token, _, _ in tokens), tokenizer.eos_token_id]
    weights = [1.0, *(weight for _, weight, _ in tokens), 1.0]
    fixes = tuple((at, embedding) for at, (_, _, embedding) in enumerate(tokens, start=1) if embedding is not None)
    return TokenChunk(ids + [tokenizer.pad_token_id] * padding, weights + [1.0] * padding, fixes)


def used_embeddings(components: Components, texts: list[str]) -> list[Embedding]:
    """The loaded embeddings ``texts`` name, each once, in the order they first appear."""
    embeddings = model_embeddings(components)
    if not embeddings.loaded or FAMILIES[components.family].is_transformer:
        return []
    used = {
        id(embedding): embedding
        for text in texts
        for chunk in tokenize_prompt(components.tokenizer, text, embeddings)
        for _, embedding in chunk.fixes
    }
    return list(used.values())


def ti_hashes(components: Components, texts: list[str]) -> str | None:
    """The infotext's ``TI hashes`` for the embeddings ``texts`` use: ``name: short hash, ...`` as A1111 writes it
    (its reader splits on those characters, so names lose them); None when they use none."""
    hashes = [f"{e.name.replace(':', '').replace(',', '')}: {e.short_hash}" for e in used_embeddings(components, texts)]
    return ", ".join(hashes) or None


@dataclass
class PromptEmbeddings:
    """What the UNet cross-attends to: ``embeds`` is (1, 77·chunks, dim).

    ``pooled`` is SDXL's pooled text embedding (1, dim₂) from the first chunk (its refiner's: bigG's, its only
    encoder's); None for SD 1/2.
    ``mask`` is, for Chroma, which of the sequence's tokens its network attends to (1, length).
    """

    embeds: Tensor
    pooled: Tensor | None = None
    mask: Tensor | None = None

    @property
    def chunks(self) -> int:
        return self.embeds.shape[1] // CHUNK_LENGTH


@torch.no_grad()
def encode_prompt(
    components: Components,
    text: str,
    *,
    clip_skip: int = 1,
    min_chunks: int = 1,
    device: torch.device | str | None = None,
    cancel: Callable[[], bool] | None = None,
    images: tuple[Image.Image, ...] = (),
) -> PromptEmbeddings:
    """Encode one prompt; pad with empty-prompt chunks up to ``min_chunks``.

    ``clip_skip`` counts from the end as A1111 does. SD 1/2: 1 is the encoder's output
    (``last_hidden_state``, bit-identical to diffusers for a plain prompt); n > 1 is the
    n-th last hidden state passed through the final layer norm. SDXL: 1 is the penultimate
    hidden state of both encoders, unnormalised, as SDXL was trained; n is the (n+1)-th last. The SDXL
    refiner reads its one encoder (bigG) so, as A1111 does, with bigG's pooled projection.
    Emphasis weights apply to each encoder's output on its own, as A1111 does for SDXL.
    The result is moved to ``device`` (default: it stays where the text encoder is).
    ``cancel`` is checked before every chunk (True: stop with GenerationCancelled), as a long
    prompt is hundreds of encoder passes. ``images``: the reference images read with the prompt (Qwen-Image-Edit).
    """
    if FAMILIES[components.family].is_transformer:
        # SD 3.x and Flux.1: a fixed-length sequence (CLIP and T5), no chunks to pad.
        from lienzo.generation.text_encoding import encode_transformer_prompt

        return encode_transformer_prompt(components, text, clip_skip=clip_skip, device=device, cancel=cancel, images=images)
    # 1. Tokenize with every tokenizer the model has, padding to a common chunk count
    encoders = _encoders(components)
    embeddings = model_embeddings(components)
    chunk_lists = [tokenize_prompt(tokenizer, text, embeddings) for _, tokenizer in encoders]
    if len({len(chunks) for chunks in chunk_lists}) != 1:
        raise LienzoError("this model's two tokenizers split the prompt differently; they must share one vocabulary")
    missing = max(0, min_chunks - len(chunk_lists[0]))
    chunk_lists = [
        chunks + [_frame(tokenizer, [])] * missing for chunks, (_, tokenizer) in zip(chunk_lists, encoders)
    ]

    # 2. Encode every chunk with every encoder; features of SDXL's two encoders are joined
    is_sdxl = components.family in ("sdxl", "sdxl_refiner")
    per_encoder: list[Tensor] = []
    pooled = None
    for index, ((encoder, _), chunks) in enumerate(zip(encoders, chunk_lists)):
        _check_clip_skip(encoder, clip_skip, is_sdxl)
        encoded = []
        for chunk in chunks:
            if cancel is not None and cancel():
                raise GenerationCancelled("generation cancelled")
            encoded.append(_encode_chunk(encoder, chunk, clip_skip, is_sdxl, index))
        per_encoder.append(torch.cat([hidden for hidden, _ in encoded], dim=1))
        pooled = encoded[0][1]
    embeds = torch.cat(per_encoder, dim=-1)

    # 3. Hand back on the caller's device
    if device is not None:
        embeds = embeds.to(device)
        pooled = None if pooled is None else pooled.to(device)
    return PromptEmbeddings(embeds, pooled)


@dataclass(frozen=True)
class PromptSchedule:
    """A prompt's conditioning step by step: ``entries`` are ``(end_step, embeddings)``, each applying
    up to and including its end step (A1111's schedule, :func:`~lienzo.generation.prompt_schedule.prompt_schedule`)."""

    entries: tuple[tuple[int, PromptEmbeddings], ...]

    @classmethod
    def constant(cls, embeddings: PromptEmbeddings, steps: int = 1) -> "PromptSchedule":
        """The same conditioning at every step: a prompt without editing."""
        return cls(((steps, embeddings),))

    @property
    def end_steps(self) -> list[int]:
        return [end for end, _ in self.entries]

    def at(self, step: int) -> PromptEmbeddings:
        """The conditioning at the denoising loop's 0-based ``step``, looked up as A1111 does."""
        return self.entries[schedule_index(self.end_steps, step)][1]

    @property
    def chunks(self) -> int:
        return self.entries[0][1].chunks

    @property
    def terms(self) -> "tuple[tuple[PromptSchedule, float], ...]":
        """As a :class:`ComposedPrompt`'s: one term of weight 1, whose prediction is guided as it is."""
        return ((self, 1.0),)


@dataclass(frozen=True)
class ComposedPrompt:
    """A1111's composable prompt (``a cat AND a dog:1.2``): a schedule and a weight per distinct
    subprompt (``terms``), all padded to the same chunk count. The denoiser runs one conditional
    prediction per term and guides with ``uncond + scale * sum(weight * (cond - uncond))``
    (:class:`~lienzo.generation.denoiser.Composition`)."""

    terms: tuple[tuple[PromptSchedule, float], ...]

    @property
    def chunks(self) -> int:
        return self.terms[0][0].chunks

    @property
    def total_weight(self) -> float:
        return sum(weight for _, weight in self.terms)


def encode_schedules(
    components: Components,
    prompt: str,
    negative: str,
    steps: int,
    *,
    clip_skip: int = 1,
    device: torch.device | str | None = None,
    cancel: Callable[[], bool] | None = None,
    cache: dict[tuple[str, int], PromptEmbeddings] | None = None,
    wake: Callable[[], None] | None = None,
    images: tuple[Image.Image, ...] = (),
    guided: bool = True,
) -> tuple[PromptSchedule | ComposedPrompt, PromptSchedule | None]:
    """Prompt and negative prompt, each with A1111's editing and alternation resolved over ``steps``,
    every distinct text encoded once. All texts are padded to the same number of chunks, as
    guidance batches any step's texts in one UNet call. ``cancel`` as in :func:`encode_prompt`.
    ``cache`` (text, chunks) → embeddings lets several pairs of one job (dynamic prompts: one pair per
    image) share the texts they have in common; the same embeddings as without it. A text neither there
    nor in the model's prompt cache (:func:`_encode_kept`) is encoded after ``wake()``, the wake of a
    job's :func:`text_encoders_on_call`; None: this call is the job's, and the encoders rest once it is done.
    ``images``: the reference images a family's text encoder reads with every text (Qwen-Image-Edit's), the same
    for all of them (so ``cache`` may stay keyed by text); none for the others.

    A prompt with ``AND`` gives a :class:`ComposedPrompt`, a term per distinct subprompt (a repeated
    one adds its weight to the first's: one U-Net row instead of several equal ones); the negative
    prompt is never cut. Without ``AND``, the prompt's :class:`PromptSchedule`, exactly as before.

    Unguided (``guided`` False: CFG scale 1 or less) the negative prompt is never read: it is not encoded (a
    pass of a text encoder as large as the network, for Flux.1's T5 or Klein's Qwen3) and None stands in for
    it; its length still counts in the padding, so the prompt's embeddings are what they are guided."""
    subprompts: dict[str, float] = {}
    split = split_subprompts(prompt)
    for text, weight in split:
        subprompts[text] = subprompts.get(text, 0.0) + weight
    schedules = [*(prompt_schedule(text, steps) for text in subprompts), prompt_schedule(negative, steps)]
    texts = list(dict.fromkeys(text for schedule in schedules for _, text in schedule))
    read = texts if guided else list(dict.fromkeys(text for schedule in schedules[:-1] for _, text in schedule))
    # Transformer families encode every text to one fixed length: there is nothing to pad.
    if FAMILIES[components.family].is_transformer:
        chunks = 1
    else:
        embeddings = model_embeddings(components)
        chunks = max(len(tokenize_prompt(components.tokenizer, text, embeddings)) for text in texts)
    if wake is None:
        with text_encoders_on_call(components) as wake:
            return encode_schedules(
                components, prompt, negative, steps, clip_skip=clip_skip, device=device, cancel=cancel, cache=cache, wake=wake,
                images=images, guided=guided,
            )
    cache = {} if cache is None else cache
    encoded = {}
    for text in read:
        if (text, chunks) not in cache:
            cache[text, chunks] = _encode_kept(
                components, text, chunks=chunks, clip_skip=clip_skip, device=device, cancel=cancel, wake=wake, images=images
            )
        encoded[text] = cache[text, chunks]
    terms = [PromptSchedule(tuple((end, encoded[text]) for end, text in schedule)) for schedule in schedules[:-1]]
    neg = PromptSchedule(tuple((end, encoded[text]) for end, text in schedules[-1])) if guided else None
    if len(split) == 1:
        return terms[0], neg
    return ComposedPrompt(tuple(zip(terms, subprompts.values(), strict=True))), neg


def _encode_kept(
    components: Components,
    text: str,
    *,
    chunks: int,
    clip_skip: int,
    device: torch.device | str | None,
    cancel: Callable[[], bool] | None,
    wake: Callable[[], None],
    images: tuple[Image.Image, ...] = (),
) -> PromptEmbeddings:
    """``text``'s embeddings from the model's prompt cache, else encoded (after ``wake()``) and kept there.

    The key is all that changes them besides the model itself (the cache is the Components'): the text, its
    chunk count, ``clip_skip``, the device they are for (None: where the encoders compute, which is the
    model's to say), the content hashes of the ``images`` read with it, :func:`_encoder_state` and the embedding files
    the text uses (a file added, changed or removed makes it another text). The cache holds a copy of its own and hands out copies, so
    whatever a job does to its tensors never reaches the next job; kept entries past ``max_bytes`` go least
    recently used first, and an entry larger than all of it is not kept."""
    store = components.prompt_cache
    device_key = None if device is None else torch.device(device)
    used = tuple((embedding.file, embedding.sha256) for embedding in used_embeddings(components, [text]))
    key = (text, chunks, clip_skip, device_key, tuple(map(image_hash, images)), _encoder_state(components), used)
    kept = store.entries.get(key)
    if kept is not None:
        store.entries.move_to_end(key)
        return _copy(kept)
    wake()
    embeddings = encode_prompt(components, text, clip_skip=clip_skip, min_chunks=chunks, device=device, cancel=cancel, images=images)
    size = _nbytes(embeddings)
    if size <= store.max_bytes:
        store.entries[key] = _copy(embeddings)
        store.nbytes += size
        while store.nbytes > store.max_bytes:
            _, dropped = store.entries.popitem(last=False)
            store.nbytes -= _nbytes(dropped)
    return embeddings


def _encoder_state(components: Components) -> tuple:
    """What of the model changes its embeddings and can change while it stays loaded: which text encoders
    (a copy of the Components may have another) in which dtype, and the active LoRAs that patch a text
    encoder, as (file, its size and mtime: a file changed on disk is read again, weight).

    Encoders are held by weak reference, so that the cache keeps no replaced encoder alive, and a new one
    that happens to get a freed one's id still differs from it: a dead reference equals only itself."""
    encoders = tuple((weakref.ref(module), module.dtype) for module in _text_encoder_modules(components))
    adapters = components.loras.adapters
    loras = tuple(
        (str(lora.file), adapters[str(lora.file)].stamp, lora.weight)
        for lora in components.loras.active
        if lora.weight != 0 and any(part.startswith("text_encoder") for part in adapters[str(lora.file)].parts)
    )
    return encoders, loras


def _copy(embeddings: PromptEmbeddings) -> PromptEmbeddings:
    tensors = (embeddings.embeds, embeddings.pooled, embeddings.mask)
    return PromptEmbeddings(*(None if tensor is None else tensor.clone() for tensor in tensors))


def _nbytes(embeddings: PromptEmbeddings) -> int:
    tensors = (embeddings.embeds, embeddings.pooled, embeddings.mask)
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors if tensor is not None)


def _text_encoder_modules(components: Components) -> list[torch.nn.Module]:
    return [m for m in (components.text_encoder, components.text_encoder_2, components.text_encoder_3) if m is not None]


@contextmanager
def text_encoders_on_call(components: Components) -> Iterator[Callable[[], None]]:
    """Encode-then-free for one job, with ``components.text_encoder_offload``: the function it gives wakes the
    text encoders (moves them to the network's execution device) before a text the prompt cache lacks is
    encoded; on leaving, those it moved go back to the CPU, also when encoding was cancelled or failed. A job
    whose texts are all cached never wakes them. Without the option it moves nothing.

    Whole modules move, once a job; low_vram's sequential offload (:func:`lienzo.models.speed.enable_sequential_offload`)
    instead streams every layer at every call, and the encoders it holds (they have accelerate hooks), like
    those ``text_encoder_device`` placed, are left where they are. No ``torch.cuda.empty_cache()``: the freed
    blocks stay in torch's allocator, where the network reuses them."""
    moved: list[torch.nn.Module] = []

    def wake() -> None:
        if moved or not components.text_encoder_offload or components.text_encoder_device is not None:
            return
        target = components.execution_device
        for module in _text_encoder_modules(components):
            if getattr(module, "_hf_hook", None) is None and execution_device(module) != target:
                module.to(target)
                moved.append(module)

    try:
        yield wake
    finally:
        for module in moved:
            module.to("cpu")


def _encoders(components: Components) -> list[tuple[CLIPTextModel | CLIPTextModelWithProjection, CLIPTokenizer]]:
    encoders = [(components.text_encoder, components.tokenizer)]
    if components.family == "sdxl":
        if components.text_encoder_2 is None or components.tokenizer_2 is None:
            raise LienzoError("an SDXL model needs its second text encoder and tokenizer; this one has none")
        encoders.append((components.text_encoder_2, components.tokenizer_2))
    return encoders


def _check_clip_skip(encoder: CLIPTextModel | CLIPTextModelWithProjection, clip_skip: int, is_sdxl: bool) -> None:
    # SDXL already starts one layer back (the penultimate), so it can skip one layer fewer.
    most = encoder.config.num_hidden_layers - (1 if is_sdxl else 0)
    if not 1 <= clip_skip <= most:
        raise InvalidRequestError("clip_skip", f"must be between 1 and {most} for this model, got {clip_skip}")


def _encode_chunk(
    encoder: CLIPTextModel | CLIPTextModelWithProjection,
    chunk: TokenChunk,
    clip_skip: int,
    is_sdxl: bool,
    index: int = 0,
) -> tuple[Tensor, Tensor | None]:
    """One chunk through one encoder (the model's ``index``-th) → (hidden states (1, 77, dim), projected pooled embeds).

    Only SDXL's second encoder and its refiner's one (bigG, with projection) have ``text_embeds``; the others give None.
    """
    ids = torch.tensor([chunk.ids], dtype=torch.long, device=execution_device(encoder))
    with _embeddings_placed(encoder, chunk.fixes, index):
        output = encoder(ids, output_hidden_states=is_sdxl or clip_skip > 1)
    if is_sdxl:
        hidden = output.hidden_states[-(clip_skip + 1)]
    elif clip_skip == 1:
        hidden = output.last_hidden_state
    else:
        hidden = _final_layer_norm(encoder)(output.hidden_states[-clip_skip])
    return apply_weights(hidden, chunk.weights), getattr(output, "text_embeds", None)


@contextmanager
def _embeddings_placed(
    encoder: CLIPTextModel | CLIPTextModelWithProjection, fixes: tuple[tuple[int, Embedding], ...], index: int
) -> Iterator[None]:
    """While it lasts, the encoder's token-embedding layer gives each embedding's vectors (the set for encoder
    ``index``) at its placeholders, as A1111's ``EmbeddingsWithFixes`` does. By hand, with a forward hook, because
    transformers' CLIPTextModel takes no ``inputs_embeds`` (it needs the ids to find EOS for pooling), and
    diffusers' ``load_textual_inversion`` would add tokens to the tokenizer and rows to the encoder: a change to the
    model every prompt would see (its added tokens match inside words too), where A1111 matches whole token
    sequences and leaves the model as it is. A chunk without embeddings runs untouched."""
    if not fixes:
        yield
        return

    def place(module: torch.nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        output = output.clone()
        for at, embedding in fixes:
            vectors = embedding.vectors[index]
            output[0, at : at + len(vectors)] = vectors.to(output.device, output.dtype)
        return output

    handle = encoder.get_input_embeddings().register_forward_hook(place)
    try:
        yield
    finally:
        handle.remove()


def _final_layer_norm(encoder: CLIPTextModel | CLIPTextModelWithProjection) -> torch.nn.LayerNorm:
    # transformers 5 flattened CLIPTextModel (no ``.text_model``); the projection model keeps one.
    return getattr(encoder, "text_model", encoder).final_layer_norm


def apply_weights(hidden: Tensor, weights: list[float]) -> Tensor:
    """A1111's emphasis: scale each token's embedding by its weight, then rescale the whole
    chunk so its mean is what it was, so emphasis shifts attention without changing the
    overall magnitude. All weights 1.0 returns ``hidden`` untouched (bit-identical)."""
    if all(weight == 1.0 for weight in weights):
        return hidden
    # float32: a mean over 77 × 2048 fp16 values loses most of its precision
    original = hidden.float()
    scale = torch.tensor(weights, dtype=torch.float32, device=hidden.device)[None, :, None]
    weighted = original * scale
    return (weighted * (original.mean() / weighted.mean())).to(hidden.dtype)
