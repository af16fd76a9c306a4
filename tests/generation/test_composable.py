"""AUTOMATIC1111's composable prompts (``a cat AND a dog:1.2``): the split into weighted subprompts, their
encoding, and the denoiser combining one prediction per subprompt.

The rules, from A1111's ``modules/prompt_parser.py`` (``get_multicond_prompt_list``) and its CFG denoiser's
``combine_denoised``: the positive prompt is cut on the word ``AND`` (capitals, a word of its own); each
subprompt may end in ``:weight`` (default 1); each gets its own prompt-editing schedule; the negative prompt is
never cut; guided, ``uncond + scale * sum(weight * (cond - uncond))``. lienzo's own choices: a prompt without
``AND`` is never read for a weight (it takes the plain path, byte for byte); subprompts lose their leading
spaces too; at CFG scale 1 or less (no unconditional pass) the subprompts' weighted mean.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from lienzo.errors import InvalidRequestError
from lienzo.generation import engine, prompts
from lienzo.generation.conditioning import encode_images, with_image_prompts
from lienzo.generation.deepcache import DeepCacheUNet
from lienzo.generation.denoiser import Composition, Guidance, ImageGroups, InpaintChannels, PromptSteps, UNetCall, build_denoiser
from lienzo.generation.infotext import fields_from_infotext
from lienzo.generation.plan import BatchPlan, Canvas
from lienzo.generation.prompt_schedule import split_subprompts
from lienzo.generation.prompts import ComposedPrompt, PromptSchedule, encode_schedules
from lienzo.generation.request import build_request
from lienzo.generation.samplers import resolve_sampler
from lienzo.images.metadata import parse_infotext
from tiny_models import build_tiny

SPLITS = [
    # No AND: the prompt whole, as given; a trailing ":weight" is text (A1111 would read it as a weight).
    ("a cat", [("a cat", 1.0)]),
    ("a cat:1.5", [("a cat:1.5", 1.0)]),
    ("", [("", 1.0)]),
    # Weights: spaces around the colon and after the number; signs, a leading or trailing point.
    ("a cat AND a dog :1.2 AND a hat:0.5", [("a cat", 1.0), ("a dog", 1.2), ("a hat", 0.5)]),
    ("a cat : 2 AND a dog:  -.5   ", [("a cat", 2.0), ("a dog", -0.5)]),
    ("a:+1. AND b:3", [("a", 1.0), ("b", 3.0)]),
    # Only the last ":number" is the weight; a word after the colon or an exponent is text.
    ("a:1.5:2 AND b", [("a:1.5", 2.0), ("b", 1.0)]),
    ("a AND b:c AND d:1e3", [("a", 1.0), ("b:c", 1.0), ("d:1e3", 1.0)]),
    # Only "AND" in capitals, as a word: lower case, inside a word, or glued to letters is text.
    ("a cat and a dog", [("a cat and a dog", 1.0)]),
    ("ANDROID sANDy ANDs", [("ANDROID sANDy ANDs", 1.0)]),
    ("cat,AND(dog)", [("cat,", 1.0), ("(dog)", 1.0)]),  # punctuation is a word boundary
    ("a\nAND\nb", [("a", 1.0), ("b", 1.0)]),
    # Empty subprompts are the empty prompt, weight and all, as A1111 keeps them; repeats stay repeated.
    ("a cat AND", [("a cat", 1.0), ("", 1.0)]),
    ("AND", [("", 1.0), ("", 1.0)]),
    ("a AND :0.5 AND a", [("a", 1.0), ("", 0.5), ("a", 1.0)]),
    # Prompt editing, emphasis and BREAK stay in their subprompt, for its own schedule.
    ("[cat:dog:0.5] AND (red:1.3) hat:0.7", [("[cat:dog:0.5]", 1.0), ("(red:1.3) hat", 0.7)]),
    ("a BREAK b AND [c|d]:2", [("a BREAK b", 1.0), ("[c|d]", 2.0)]),
    # A group cut by AND is no group: each half is literal text (A1111 splits first, too).
    ("[cat AND dog:0.5]", [("[cat", 1.0), ("dog:0.5]", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), SPLITS)
def test_split_follows_a1111(text, expected):
    assert split_subprompts(text) == expected


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1")


def test_each_subprompt_gets_its_own_schedule_and_every_text_is_encoded_once(sd1, encoded):
    long_text = ", ".join(f"word{i}" for i in range(60))  # more than 75 tokens
    pos, neg = encode_schedules(sd1, f"[cat:dog:2] AND bird:0.5 AND [cat|bird] AND {long_text}:-1", "blurry AND ugly", 4)
    assert isinstance(pos, ComposedPrompt) and isinstance(neg, PromptSchedule)
    assert [weight for _, weight in pos.terms] == [1.0, 0.5, 1.0, -1.0]
    # The negative prompt is one text, AND and all; every text once, all padded to the longest's chunk count.
    assert encoded == ["cat", "dog", "bird", long_text, "blurry AND ugly"]
    chunks = len(prompts.tokenize_prompt(sd1.tokenizer, long_text))
    assert chunks > 1 and {e.chunks for term, _ in pos.terms for _, e in term.entries} | {neg.at(0).chunks} == {chunks}
    (edit, _), (plain, _), (alternation, _), _ = pos.terms
    cat, dog, bird = edit.entries[0][1], edit.entries[1][1], plain.entries[0][1]
    assert [end for end, _ in edit.entries] == [2, 4] and [end for end, _ in plain.entries] == [4]
    assert [(end, e) for end, e in alternation.entries] == [(1, cat), (2, bird), (3, cat), (4, bird)]
    assert torch.equal(dog.embeds, prompts.encode_prompt(sd1, "dog", min_chunks=chunks).embeds)


def test_a_repeated_subprompt_is_one_term_with_the_weights_added(sd1, encoded):
    pos, _ = encode_schedules(sd1, "a cat:0.5 AND  a cat :0.25 AND a dog", "", 4)
    assert [weight for _, weight in pos.terms] == [0.75, 1.0]
    assert encoded == ["a cat", "a dog", ""]
    plain, _ = encode_schedules(sd1, "a cat", "", 4)
    assert isinstance(plain, PromptSchedule) and plain.terms == ((plain, 1.0),)


# --- the denoiser ----------------------------------------------------------------------------------------


def _plan(components, prompt, negative="blurry", steps=4, **fields):
    pos, neg = encode_schedules(components, prompt, negative, steps)
    base = dict(
        canvas=Canvas(64, 64), prompt=pos, negative=neg, sampler=resolve_sampler("Euler"), schedule="Uniform", steps=steps,
        cfg_scale=7.0, denoising_strength=0.75, inpainting_fill="original", fast=False, batch_size=2, first_seed=1,
    )
    return BatchPlan(**{**base, **fields})


def _unet(components, x, t, text, chunks=1):
    """The U-Net's prediction for ``x`` conditioned on ``text`` alone: one call per text, no batching with others."""
    embeds = prompts.encode_prompt(components, text, min_chunks=chunks)
    added = None
    if components.family == "sdxl":
        ids = torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=x.dtype).repeat(x.shape[0], 1)
        added = {"text_embeds": embeds.pooled.repeat(x.shape[0], 1), "time_ids": ids}
    with torch.no_grad():
        return components.unet(x, t, encoder_hidden_states=embeds.embeds.repeat(x.shape[0], 1, 1), added_cond_kwargs=added)[0]


@pytest.fixture
def unet_batches(sd1):
    """The batch size of every U-Net call."""
    sizes: list[int] = []
    handle = sd1.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    yield sizes
    handle.remove()


@pytest.mark.parametrize(
    ("prompt", "terms"),
    [
        ("a cat AND a dog:1.2", [("a cat", 1.0), ("a dog", 1.2)]),
        ("a cat:0.7 AND a dog:1.2 AND a hat:-0.4", [("a cat", 0.7), ("a dog", 1.2), ("a hat", -0.4)]),
    ],
)
def test_guided_output_is_a1111_s_formula_from_one_batched_call(sd1, unet_batches, prompt, terms):
    plan = _plan(sd1, prompt)
    denoiser = build_denoiser(sd1, plan, None)
    assert isinstance(denoiser, Composition) and isinstance(denoiser.inner, UNetCall)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    out = denoiser(x, t, 0)
    assert unet_batches == [2 + 2 * len(terms)]  # [uncond x2, then each image's subprompts], one call
    uncond = _unet(sd1, x, t, "blurry")
    expected = uncond + 7.0 * sum(weight * (_unet(sd1, x, t, text) - uncond) for text, weight in terms)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_unguided_output_is_the_weighted_mean_of_the_subprompts(sd1):
    # CFG scale 1: no unconditional row, so the negative prompt plays no part.
    denoiser = build_denoiser(sd1, _plan(sd1, "a cat:0.5 AND a dog:1.5 AND a hat:-1", cfg_scale=1.0), None)
    assert isinstance(denoiser, Composition) and not denoiser.guided and denoiser.inner.embeds.shape[0] == 6
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor(300)
    cat, dog, hat = (_unet(sd1, x, t, text) for text in ("a cat", "a dog", "a hat"))
    torch.testing.assert_close(denoiser(x, t, 0), (0.5 * cat + 1.5 * dog - hat) / 1.0, atol=1e-4, rtol=1e-4)
    # Weights adding up to 1 give A1111's own result at scale 1: u + (sum w (c - u)) = sum w c.
    denoiser = build_denoiser(sd1, _plan(sd1, "a cat:0.25 AND a dog:0.75", cfg_scale=1.0), None)
    torch.testing.assert_close(denoiser(x, t, 0), 0.25 * cat + 0.75 * dog, atol=1e-4, rtol=1e-4)


def test_weights_adding_up_to_zero_are_refused_only_without_guidance(sd1):
    fields = dict(negative_prompt="", width=64, height=64, steps=2, seed=1, sampler="Euler")
    with pytest.raises(InvalidRequestError, match="add up to 0; at a CFG scale of 1 or less"):
        engine.generate(sd1, build_request(prompt="a cat AND a dog:-1", cfg_scale=1.0, **fields))
    with pytest.raises(InvalidRequestError, match="^prompt: "):  # a wildcard can draw such weights too
        engine.generate(sd1, build_request(prompt="a cat AND a dog:{-1|-2}", cfg_scale=1.0, batch_size=2, **fields))
    assert len(engine.generate(sd1, build_request(prompt="a cat AND a dog:-1", cfg_scale=7.0, **fields)).images) == 1


def test_editing_inside_a_subprompt_switches_its_row_at_its_step(sd1):
    denoiser = build_denoiser(sd1, _plan(sd1, "[a cat:a dog:2] AND a hat:0.5"), None)
    assert isinstance(denoiser.inner, PromptSteps) and denoiser.inner.end_steps == (2, 4)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor(700)
    uncond, hat = _unet(sd1, x, t, "blurry"), _unet(sd1, x, t, "a hat")
    for step, animal in ((2, "a cat"), (3, "a dog")):
        expected = uncond + 7.0 * ((_unet(sd1, x, t, animal) - uncond) + 0.5 * (hat - uncond))
        torch.testing.assert_close(denoiser(x, t, step), expected, atol=1e-4, rtol=1e-4)


# --- the engine -------------------------------------------------------------------------------------------

SMALL = dict(negative_prompt="blurry", width=64, height=64, steps=4, seed=11, sampler="Euler")


def _generate(components, prompt, **fields):
    return engine.generate(components, build_request(prompt=prompt, **{**SMALL, **fields}))


def _pixels(components, prompt, **fields):
    return np.stack([image.pixels for image in _generate(components, prompt, **fields).images])


def _remake(components, image):
    fields = fields_from_infotext(parse_infotext(image.infotext))
    return engine.generate(components, build_request(**{k: v for k, v in fields.items() if k != "model"})).images[0]


def test_a_prompt_without_and_keeps_the_plain_path(sd1):
    denoiser = build_denoiser(sd1, _plan(sd1, "a cat and a dog:1.5"), None)
    assert isinstance(denoiser, Guidance) and isinstance(denoiser.inner, UNetCall)
    assert torch.equal(denoiser.inner.embeds[2:3], prompts.encode_prompt(sd1, "a cat and a dog:1.5").embeds)
    # Byte for byte the plain guidance: the same calls as a Guidance(UNetCall) built by hand.
    pos, neg = (prompts.encode_prompt(sd1, text).embeds for text in ("a cat", "blurry"))
    by_hand = Guidance(UNetCall(sd1.unet, torch.cat([neg, neg, pos, pos])), 7.0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(400)
    assert torch.equal(build_denoiser(sd1, _plan(sd1, "a cat"), None)(x, t, 0), by_hand(x, t, 0))


def test_halves_of_the_same_subprompt_make_the_plain_image(sd1):
    plain = _pixels(sd1, "a cat", batch_size=2)
    assert np.abs(_pixels(sd1, "a cat:0.5 AND a cat:0.5", batch_size=2) - plain).max() <= 1e-5
    assert not np.array_equal(_pixels(sd1, "a cat AND a dog:0.5", batch_size=2), plain)


def test_infotext_keeps_the_prompt_as_given_and_remakes_it(sd1):
    prompt = "a cat AND a dog :1.2 AND a hat:0.5"
    image = _generate(sd1, prompt).images[0]
    info = parse_infotext(image.infotext)
    assert info.prompt == prompt and fields_from_infotext(info)["prompt"] == prompt
    assert np.array_equal(_remake(sd1, image).pixels, image.pixels)


def test_sdxl_gets_a_pooled_embedding_per_subprompt():
    sdxl = build_tiny("sdxl")
    denoiser = build_denoiser(sdxl, _plan(sdxl, "a cat AND a dog:0.5", negative=""), None)
    added = denoiser.inner.added
    cat, dog, empty = (prompts.encode_prompt(sdxl, text).pooled for text in ("a cat", "a dog", ""))
    assert torch.equal(added["text_embeds"], torch.cat([empty, empty, cat, dog, cat, dog]))
    assert added["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 6
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor(600)
    uncond = _unet(sdxl, x, t, "")
    expected = uncond + 7.0 * ((_unet(sdxl, x, t, "a cat") - uncond) + 0.5 * (_unet(sdxl, x, t, "a dog") - uncond))
    torch.testing.assert_close(denoiser(x, t, 0), expected, atol=1e-4, rtol=1e-4)
    assert _pixels(sdxl, "a cat AND [a dog:a hat:2]:0.5", steps=3, fast=True).shape == (1, 64, 64, 3)


def test_fast_mode_runs_composed_rows_through_one_deepcache(sd1):
    plan = _plan(sd1, "a cat AND [a dog|a hat]:0.5", fast=True)
    denoiser = build_denoiser(sd1, plan, None)
    assert isinstance(denoiser.inner, PromptSteps)
    assert len({id(call.unet) for call in denoiser.inner.calls}) == 1 and isinstance(denoiser.inner.calls[0].unet, DeepCacheUNet)
    fast = _pixels(sd1, "a cat AND [a dog|a hat]:0.5", fast=True, steps=6)
    normal = _pixels(sd1, "a cat AND [a dog|a hat]:0.5", steps=6)
    assert fast.shape == (1, 64, 64, 3) and np.abs(fast - normal).max() < 0.1  # DeepCache stays near the full run


@pytest.mark.parametrize("cfg_scale", [7.0, 1.0])
def test_inpainting_models_get_the_extra_channels_for_every_subprompt_row(cfg_scale):
    inpainting = build_tiny("sd1", inpainting=True)
    image = Image.new("RGB", (64, 64), (120, 80, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    fields = dict(init_image=image, mask=mask, mask_blur=0, steps=6, cfg_scale=cfg_scale, batch_size=2)
    composed = _pixels(inpainting, "a cat AND a dog:0.5", **fields)
    assert composed.shape == (2, 64, 64, 3)
    assert not np.array_equal(composed, _pixels(inpainting, "a cat", **fields))
    layers = build_denoiser(inpainting, _plan(inpainting, "a cat AND a dog:0.5", cfg_scale=cfg_scale), _latent_mask())
    assert isinstance(layers.inner, InpaintChannels) and layers.inner.extra.shape[0] == (6 if cfg_scale > 1 else 4)


def _latent_mask():
    from lienzo.generation.latents import LatentMask

    masks = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])  # image 0 keeps all, image 1 repaints all
    return LatentMask(masks, torch.zeros(2, 4, 8, 8), torch.full((2, 4, 8, 8), 2.0))


def test_inpaint_channels_follow_each_row_s_image(sd1):
    inpainting = build_tiny("sd1", inpainting=True)
    extra = build_denoiser(inpainting, _plan(inpainting, "a AND b AND c"), _latent_mask()).inner.extra
    # [uncond 0, uncond 1, then image 0's three subprompts, image 1's three]: the mask channel shows the image.
    assert extra[:, 0, 0, 0].tolist() == [0, 1, 0, 0, 0, 1, 1, 1]


def test_wildcards_with_and_make_a_prompt_per_image_and_each_remakes_alone(sd1):
    long_text = ", ".join(f"word{i}" for i in range(60))  # several chunks: a call of its own (ImageGroups)
    template = "{a fox|an owl AND a hat:0.5|" + long_text + " AND a hat|a fox}"
    request = build_request(prompt=template, **{**SMALL, "seed": 5, "batch_size": 4})
    texts = [p for p, _ in engine.DynamicPrompts(combinatorial=True).image_texts(template, "blurry", range(4))]
    result = engine.generate(sd1, request, dynamic=engine.DynamicPrompts(combinatorial=True))
    assert [parse_infotext(image.infotext).prompt for image in result.images] == texts
    plan = _plan(sd1, "a fox", batch_size=4)
    conditioning = encode_images(sd1, request, [(t, "blurry") for t in texts], "cpu", None)
    denoiser = build_denoiser(sd1, with_image_prompts(plan, conditioning), None)
    # A fox plain (one row), an owl and a hat (two), the long one (two): uncond 4, conditional rows 6.
    assert isinstance(denoiser, Composition) and denoiser.owners == (0, 1, 1, 2, 2, 3)
    assert isinstance(denoiser.inner, ImageGroups) and denoiser.inner.rows == ((0, 1, 3, 4, 5, 6, 9), (2, 7, 8))
    # Each image remakes alone (the plain ones by the plain path) up to the float noise of another batch size.
    for image in result.images:
        assert np.abs(_remake(sd1, image).pixels - image.pixels).max() <= 1e-4


def test_more_subprompts_than_the_limit_are_refused_at_every_door_before_anything_runs():
    from lienzo.errors import InvalidRequestError
    from lienzo.generation.request import MAX_SUBPROMPTS

    build_request(prompt=" AND ".join(["a cat"] * MAX_SUBPROMPTS))
    with pytest.raises(InvalidRequestError, match=f"has {MAX_SUBPROMPTS + 1} subprompts joined by AND; at most {MAX_SUBPROMPTS}") as caught:
        build_request(prompt=" AND ".join(["a cat"] * (MAX_SUBPROMPTS + 1)))
    assert caught.value.field == "prompt"
