"""Each image's texts and conditioning for one job: templates resolved per image (wildcards and variants),
each distinct text encoded once (or not at all, when the model's prompt cache has it), composed prompts
checked, and a batch's plan given its images' prompts."""

from dataclasses import replace

import torch

from lienzo.errors import InvalidRequestError
from lienzo.generation.loop import CancelCheck
from lienzo.generation.lora_tags import extract_lora_tags
from lienzo.generation.plan import BatchPlan
from lienzo.generation.prompts import (
    ComposedPrompt,
    PromptEmbeddings,
    PromptSchedule,
    encode_schedules,
    text_encoders_on_call,
)
from lienzo.generation.request import MAX_PROMPT_CHARS, GenerationRequest
from lienzo.generation.wildcards import DynamicPrompts, is_dynamic
from lienzo.models.components import Components


def image_texts(request: GenerationRequest, seeds: list[int], dynamic: DynamicPrompts | None) -> list[tuple[str, str]] | None:
    """Each image's (prompt, negative prompt) resolved from the request's templates, or None when neither
    holds wildcards or variants. InvalidRequestError on ``prompt`` / ``negative_prompt`` for what cannot be made."""
    if not (is_dynamic(request.prompt) or is_dynamic(request.negative_prompt)):
        return None
    texts = (dynamic or DynamicPrompts()).image_texts(request.prompt, request.negative_prompt, seeds)
    applied = {lora.name for lora in request.requested_loras()}
    for image_prompt, image_negative in texts:
        for name, text in (("prompt", image_prompt), ("negative_prompt", image_negative)):
            if len(text) > MAX_PROMPT_CHARS:
                raise InvalidRequestError(name, f"resolves to {len(text):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
        # LoRAs are applied for the whole job from the template's tags; one a wildcard file adds would be
        # in the infotext but not in the picture.
        added = [name for name, _ in extract_lora_tags(image_prompt)[1] if name not in applied]
        if added:
            raise InvalidRequestError(
                "prompt", f"a wildcard adds <lora:{added[0]}>, but LoRAs come only from the prompt itself and loras"
            )
    return texts


def prompt_images(components: Components, request: GenerationRequest) -> tuple:
    """The images the family's text encoder reads with every text of the request: Qwen-Image-Edit's, the reference
    images; none for the others."""
    return tuple(request.reference_images) if components.spec.prompt_images else ()


def reads_negative(request: GenerationRequest) -> bool:
    """Whether the job guides with its negative prompt (CFG scale above 1; not yet known: yes), so it is encoded."""
    return request.cfg_scale is None or request.cfg_scale > 1


def encode_images(
    components: Components, request: GenerationRequest, texts: list[tuple[str, str]], device: torch.device,
    cancel: CancelCheck | None,
) -> list[tuple[PromptSchedule | ComposedPrompt, PromptSchedule]]:
    """Each image's conditioning, padded as it would be if the image were made alone (so it can be): one
    pair of schedules per distinct pair of texts, each distinct text encoded once per length. The text
    encoders (with ``components.text_encoder_offload``) are woken once for the whole job, not once a pair."""
    cache: dict[tuple[str, int], PromptEmbeddings] = {}
    pairs: dict[tuple[str, str], tuple[PromptSchedule | ComposedPrompt, PromptSchedule]] = {}
    images = prompt_images(components, request)
    with text_encoders_on_call(components) as wake:
        for image_prompt, image_negative in texts:
            if (image_prompt, image_negative) not in pairs:
                pairs[image_prompt, image_negative] = encode_schedules(
                    components, extract_lora_tags(image_prompt)[0], image_negative, request.steps, clip_skip=request.clip_skip,
                    device=device, cancel=cancel, cache=cache, wake=wake, images=images, guided=reads_negative(request),
                )
    return [pairs[pair] for pair in texts]


def check_unguided_weights(request: GenerationRequest, prompts: list[PromptSchedule | ComposedPrompt]) -> None:
    """At CFG scale 1 or less there is no unconditional prediction to guide from, and a composed prompt's
    subprompts are averaged by their weights (:class:`~lienzo.generation.denoiser.Composition`): the
    weights must add up to more than 0."""
    if request.cfg_scale > 1:
        return
    for prompt in prompts:
        if isinstance(prompt, ComposedPrompt) and prompt.total_weight <= 0:
            raise InvalidRequestError(
                "prompt",
                f"the weights of its AND subprompts add up to {prompt.total_weight:g}; at a CFG scale of 1 or less "
                "they are averaged and must add up to more than 0 (or raise the CFG scale)",
            )


def with_image_prompts(
    plan: BatchPlan, images: list[tuple[PromptSchedule | ComposedPrompt, PromptSchedule]]
) -> BatchPlan:
    """The batch's plan with its images' conditioning; a batch whose images all drew the same texts takes
    the plain path (one prompt for all), exactly as one made from that text."""
    pos, neg = images[0]
    if all(image is images[0] for image in images):
        return replace(plan, prompt=pos, negative=neg)
    return replace(plan, prompt=pos, negative=neg, images=tuple(images))
