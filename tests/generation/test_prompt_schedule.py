r"""AUTOMATIC1111's prompt editing ``[from:to:when]`` and alternation ``[a|b]``: the schedules, and the
engine conditioning each step on its own text.

Every expected schedule below is derived by hand from A1111's rules (modules/prompt_parser.py, default
timeline, no hires fix): a ``when`` with a decimal point is ``int(when * steps)``, one without is a step
number, both capped at ``steps``; ``from`` applies while ``step <= when``; an alternation takes option
``(step - 1) % n`` at every step 1..steps; entries are ``(end_step, text)``, each text applying up to
and including its end step; consecutive equal texts are merged.
"""

import numpy as np
import pytest
import torch

from lienzo.generation import engine, prompts
from lienzo.generation.denoiser import Guidance, PromptSteps, UNetCall, build_denoiser
from lienzo.generation.lora_tags import extract_lora_tags
from lienzo.generation.plan import BatchPlan, Canvas
from lienzo.generation.prompt_schedule import prompt_schedule, schedule_index
from lienzo.generation.prompts import encode_schedules
from lienzo.generation.request import build_request
from lienzo.generation.samplers import resolve_sampler
from tiny_models import build_tiny

LANDSCAPE = (
    "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
    "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
)

CASES = [
    # No editing: the text as given, for the whole run.
    ("a cat", 10, [(10, "a cat")]),
    ("", 10, [(10, "")]),
    # [from:to:when] with a step number and with a fraction.
    ("[cat:dog:5]", 10, [(5, "cat"), (10, "dog")]),
    ("[cat:dog:0.5]", 10, [(5, "cat"), (10, "dog")]),
    ("[cat:dog:0.25]", 10, [(2, "cat"), (10, "dog")]),  # 2.5 truncated to 2
    ("[cat:dog:0.3]", 10, [(3, "cat"), (10, "dog")]),  # 0.3 * 10 is 3.0000000000000004 in floats: 3
    ("[cat:dog:0.5]", 3, [(1, "cat"), (3, "dog")]),  # 1.5 truncated to 1
    ("[cat:dog:.5]", 10, [(5, "cat"), (10, "dog")]),  # a leading point is a fraction too
    # A point decides, not the size: 1 is step 1, 1.0 is the whole run, 5. is 5 times the run (capped).
    ("[cat:dog:1]", 10, [(1, "cat"), (10, "dog")]),
    ("[cat:dog:1.0]", 10, [(10, "cat")]),
    ("[cat:dog:5.]", 10, [(10, "cat")]),
    ("[cat:dog:15]", 10, [(10, "cat")]),  # capped at the last step: "from" throughout
    # A when below step 1 adds no schedule point: "to" throughout.
    ("[cat:dog:0]", 10, [(10, "dog")]),
    ("[cat:dog:-2]", 10, [(10, "dog")]),
    ("[cat:dog:0.05]", 10, [(10, "dog")]),  # 0.5 truncated to 0
    ("[cat:dog:0.5]", 1, [(1, "dog")]),  # likewise 0.5 of one step
    # [to:when] adds, [from::when] removes; the text around stays as written, spaces included.
    ("a [red:0.5] ball", 10, [(5, "a  ball"), (10, "a red ball")]),
    ("a [red::3] ball", 10, [(3, "a red ball"), (10, "a  ball")]),
    ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),  # spaces before a colon belong to the text
    ("[cat:dog: 5 ]", 10, [(5, "cat"), (10, "dog")]),  # spaces around the number do not
    ("[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),
    # Nested: every when in the prompt is a schedule point, even in a branch not shown at it.
    ("a [[b:c:2]:d:5]", 10, [(2, "a b"), (5, "a c"), (10, "a d")]),
    ("[a:[b:c:7]:3]", 10, [(3, "a"), (7, "b"), (10, "c")]),
    ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),
    # The inner switch (step 2) comes before the outer one (5): "b" never shows; points 2 and 5 merge.
    ("[a:[b:c:2]:5]", 10, [(5, "a"), (10, "c")]),
    (LANDSCAPE, 100, [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),  # 0.6 * 100 = 60.000…01
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]),
    # Alternation: one entry per step, cycling; empty options count.
    ("[cat|dog]", 4, [(1, "cat"), (2, "dog"), (3, "cat"), (4, "dog")]),
    ("[a|b|c] x", 5, [(1, "a x"), (2, "b x"), (3, "c x"), (4, "a x"), (5, "b x")]),
    ("[fe|]male", 3, [(1, "female"), (2, "male"), (3, "female")]),
    ("[fe|||]male", 6, [(1, "female"), (4, "male"), (5, "female"), (6, "male")]),  # fe, -, -, -, fe, -
    ("[a|(b:1.1)]", 2, [(1, "a"), (2, "(b:1.1)")]),
    ("[cat|dog] [red:blue:2]", 4, [(1, "cat red"), (2, "dog red"), (3, "cat blue"), (4, "dog blue")]),
    ("[[cat|dog]:bird:2]", 4, [(1, "cat"), (2, "dog"), (4, "bird")]),
    # The inner alternation sees the same step number as the outer one: at odd steps both pick their first.
    ("[[a|b]|c]", 4, [(1, "a"), (2, "c"), (3, "a"), (4, "c")]),
    # Emphasis, BREAK and long prompts go through untouched, around and inside groups.
    ("a (red:1.2) [ball] ((big))", 10, [(10, "a (red:1.2) [ball] ((big))")]),
    ("((a [cat:dog:5]))", 10, [(5, "((a cat))"), (10, "((a dog))")]),
    ("[(cat:1.3):[dog]:5]", 10, [(5, "(cat:1.3)"), (10, "[dog]")]),
    ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),
    ("a BREAK [cat:dog:5]", 10, [(5, "a BREAK cat"), (10, "a BREAK dog")]),
    ("a, " * 100 + "[cat:dog:5]", 10, [(5, "a, " * 100 + "cat"), (10, "a, " * 100 + "dog")]),
    # Escaped brackets are text; the backslashes stay for the emphasis parser to read.
    (r"\[cat:dog:5\]", 10, [(10, r"\[cat:dog:5\]")]),
    (r"[\[cat\]:dog:5]", 10, [(5, r"\[cat\]"), (10, "dog")]),
    (r"a \(x\) [b:c:5]", 10, [(5, r"a \(x\) b"), (10, r"a \(x\) c")]),
    # Groups that are not editing stay literal: no number, a word, one colon too many, never closed.
    ("[cat:dog]", 10, [(10, "[cat:dog]")]),
    ("[cat:dog:five]", 10, [(10, "[cat:dog:five]")]),
    ("[a:b:c:5]", 10, [(10, "[a:b:c:5]")]),
    ("a [cat:dog:5", 10, [(10, "a [cat:dog:5")]),
    ("a [unbalanced", 10, [(10, "a [unbalanced")]),
    # An unclosed bracket is a character, and a group after it still counts.
    ("(a [cat:dog:5]", 10, [(5, "(a cat"), (10, "(a dog")]),
    ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    # A "|" outside an alternation is outside A1111's grammar: the whole prompt is then literal.
    ("a | b [cat:dog:5]", 10, [(10, "a | b [cat:dog:5]")]),
]


@pytest.mark.parametrize(("text", "steps", "expected"), CASES)
def test_schedules_follow_a1111(text, steps, expected):
    assert prompt_schedule(text, steps) == expected


def test_lora_tags_stripped_first_leave_the_schedule_intact():
    # The engine takes <lora:...> tags out before scheduling (A1111 does too); their colons would break groups.
    text, loras = extract_lora_tags("a [cat:dog <lora:fur:0.5>:0.5] <lora:style:1>")
    assert loras == [("fur", 0.5), ("style", 1.0)]
    assert prompt_schedule(text, 4) == [(2, "a cat "), (4, "a dog  ")]  # the tags' spaces stay


def test_a1111_looks_steps_up_with_its_0_based_counter():
    # [a:b:5] over 10 steps: "a" for the calls 0..5 (six of them), "b" from call 6; past the end, the last.
    ends = [5, 10]
    assert [schedule_index(ends, i) for i in range(12)] == [0] * 6 + [1] * 6
    # Alternation: the first option twice, then one each step, as A1111 runs it.
    ends = [end for end, _ in prompt_schedule("[cat|dog]", 4)]
    assert [prompt_schedule("[cat|dog]", 4)[schedule_index(ends, i)][1] for i in range(4)] == ["cat", "cat", "dog", "cat"]


# --- the engine ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1")


def _pixels(components, prompt, **fields):
    base = dict(steps=4, width=64, height=64, seed=11, sampler="Euler", negative_prompt="blurry")
    result = engine.generate(components, build_request(prompt=prompt, **{**base, **fields}))
    return np.stack([image.pixels for image in result.images])


def test_a_prompt_without_editing_is_one_text_encoded_once(sd1, encoded):
    pos, neg = encode_schedules(sd1, "a red apple", "blurry", 20)
    assert len(pos.entries) == 1 and len(neg.entries) == 1
    assert encoded == ["a red apple", "blurry"]
    # The embeddings of the prompt alone, so a plain prompt denoises exactly as before.
    assert torch.equal(pos.at(0).embeds, prompts.encode_prompt(sd1, "a red apple").embeds)
    assert torch.equal(neg.at(19).embeds, prompts.encode_prompt(sd1, "blurry").embeds)


def test_an_edit_to_the_same_text_gives_the_same_pixels(sd1):
    plain = _pixels(sd1, "a red apple")
    assert np.array_equal(_pixels(sd1, "[a red apple:a red apple:0.5]"), plain)


def test_an_edit_differs_from_both_of_its_prompts(sd1, encoded):
    edited = _pixels(sd1, "[a cat:a dog:0.5]")
    assert encoded == ["a cat", "a dog", "blurry"]
    assert not np.array_equal(edited, _pixels(sd1, "a cat"))
    assert not np.array_equal(edited, _pixels(sd1, "a dog"))


def test_each_distinct_text_is_encoded_once(sd1, encoded):
    _pixels(sd1, "[cat:dog:2]", steps=4)
    assert [text for text in encoded if text != "blurry"] == ["cat", "dog"]
    encoded.clear()
    _pixels(sd1, "[cat|dog]", negative_prompt="[blurry|cat]", steps=6)  # 6 steps, 3 texts
    assert encoded == ["cat", "dog", "blurry"]


def _plan(components, prompt, negative, steps=4, **fields):
    pos, neg = encode_schedules(components, prompt, negative, steps)
    base = dict(
        canvas=Canvas(64, 64), prompt=pos, negative=neg, sampler=resolve_sampler("Euler"), schedule="Uniform", steps=steps,
        cfg_scale=7.0, denoising_strength=0.75, inpainting_fill="original", fast=False, batch_size=2, first_seed=1,
    )
    return BatchPlan(**{**base, **fields})


def _cond_rows(call: UNetCall, guided: bool = True) -> torch.Tensor:
    return call.embeds[2:3] if guided else call.embeds[:1]  # batch of 2: [uncond, uncond, cond, cond]


def test_the_denoiser_conditions_each_step_on_its_own_prompt(sd1):
    cat, dog, blurry, sharp = (prompts.encode_prompt(sd1, text).embeds for text in ("cat", "dog", "blurry", "sharp"))
    # The negative prompt is scheduled too; the steps of both are joined: 0..1 | 2 | 3.
    plan = _plan(sd1, "[cat:dog:2]", "[blurry:sharp:1]")
    denoiser = build_denoiser(sd1, plan, None)
    assert isinstance(denoiser, Guidance) and isinstance(denoiser.inner, PromptSteps)
    steps = denoiser.inner
    assert steps.end_steps == (1, 2, 4)
    calls = [steps.calls[schedule_index(steps.end_steps, i)] for i in range(4)]
    assert [torch.equal(_cond_rows(c), cat) for c in calls] == [True, True, True, False]
    assert [torch.equal(c.embeds[:1], blurry) for c in calls] == [True, True, False, False]
    assert torch.equal(_cond_rows(calls[3]), dog) and torch.equal(calls[3].embeds[:1], sharp)
    assert len({id(c.unet) for c in calls}) == 1  # one U-Net (one DeepCache) for every stretch
    # The loop's call reaches the step's conditioning: one row each, so guidance sees them apart.
    x = torch.randn(2, 4, 8, 8)
    outputs = [denoiser(x, torch.tensor(500), i) for i in range(4)]
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[1], outputs[2]) and not torch.equal(outputs[2], outputs[3])


def test_alternation_reuses_one_call_per_distinct_pair_and_cfg_1_ignores_the_negative(sd1):
    plan = _plan(sd1, "[cat|dog]", "[blurry:sharp:2]", steps=6, cfg_scale=1.0, fast=True)
    denoiser = build_denoiser(sd1, plan, None)
    assert isinstance(denoiser, PromptSteps) and denoiser.end_steps == (1, 2, 3, 4, 5, 6)
    assert len({id(c) for c in denoiser.calls}) == 2  # the negative prompt's edit plays no part at guidance 1
    assert all(c.embeds.shape[0] == 2 for c in denoiser.calls)
    assert denoiser(torch.randn(2, 4, 8, 8), torch.tensor(500), 3).shape == (2, 4, 8, 8)


def test_a_plain_prompt_keeps_the_single_call():
    sd1 = build_tiny("sd1")
    assert isinstance(build_denoiser(sd1, _plan(sd1, "a cat", "blurry"), None).inner, UNetCall)


def test_sdxl_takes_its_pooled_embeddings_from_the_step_s_prompt():
    sdxl = build_tiny("sdxl")
    cat, dog = (prompts.encode_prompt(sdxl, text).pooled for text in ("cat", "dog"))
    steps = build_denoiser(sdxl, _plan(sdxl, "[cat:dog:2]", ""), None).inner
    first, last = steps.calls[0], steps.calls[-1]
    assert torch.equal(first.added["text_embeds"][2:3], cat) and torch.equal(last.added["text_embeds"][2:3], dog)
    assert first.added["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 4
    assert _pixels(sdxl, "[cat:dog:2]", steps=3).shape == (1, 64, 64, 3)


def test_editing_runs_with_inpainting_models_and_fast_mode():
    from PIL import Image

    inpainting = build_tiny("sd1", inpainting=True)
    image = Image.new("RGB", (64, 64), (120, 80, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    fields = dict(init_image=image, mask=mask, mask_blur=0, steps=6)  # strength 0.75: 4 of the 6 steps run
    edited = _pixels(inpainting, "[cat:dog:1]", fast=True, **fields)
    assert edited.shape == (1, 64, 64, 3)
    assert not np.array_equal(edited, _pixels(inpainting, "cat", fast=True, **fields))
