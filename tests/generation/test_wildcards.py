"""Wildcards and dynamic prompts (sd-dynamic-prompts' syntax): the parser, seeding, combinatorial
mode, and the engine giving each image of a batch its own resolved prompt."""

from random import Random

import numpy as np
import pytest

from lienzo.errors import InvalidRequestError
from lienzo.generation import engine
from lienzo.generation.infotext import fields_from_infotext
from lienzo.generation.request import build_request
from lienzo.generation.wildcards import MAX_DEPTH, DynamicPrompts, Wildcards, all_prompts, escape, is_dynamic, resolve
from lienzo.images.metadata import parse_infotext
from tiny_models import build_tiny


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "wildcards"
    (root / "animals").mkdir(parents=True)
    (root / "colour.txt").write_text("# colours\nred\n\n  green  \nblue\n", encoding="utf-8")
    (root / "animals" / "cats.txt").write_text("tabby __colour__ cat\n{small|big} siamese\n", encoding="utf-8")
    (root / "loop.txt").write_text("again __loop__\n", encoding="utf-8")
    return root


def _texts(template, wildcards=None, seeds=range(200)):
    return {resolve(template, Random(seed), wildcards) for seed in seeds}


# -- the parser ---------------------------------------------------------------------------------------


def test_variants_nest_and_may_be_empty():
    assert _texts("a {red|green|blue} fox") == {"a red fox", "a green fox", "a blue fox"}
    assert _texts("{a {b|c}|d}") == {"a b", "a c", "d"}
    assert _texts("[fe|]male {x|}") == {"[fe|]male x", "[fe|]male "}


def test_counts_and_joiners():
    picks = _texts("{2$$a|b|c}")
    assert picks <= {"a, b", "a, c", "b, a", "b, c", "c, a", "c, b"} and len(picks) == 6
    assert {len(t.split(", ")) for t in _texts("{1-3$$a|b|c}")} == {1, 2, 3}
    assert {len(t.split(", ")) for t in _texts("{-2$$a|b|c}")} == {1, 2}
    assert {len(t.split(", ")) for t in _texts("{2-$$a|b|c}")} == {2, 3}
    assert _texts("{5$$a|b}") <= {"a, b", "b, a"}  # more than there are: all of them
    assert _texts("{2$$ and $$a|b}") == {"a and b", "b and a"}
    assert all_prompts("{2$$+$$a|b|c}", 10) == ["a+b", "a+c", "b+c"]


def test_escapes_and_what_is_left_for_the_emphasis_parser():
    assert resolve(r"a \{b|c\} (d:1.2) \(e\) [f|g] x|y}", Random(0)) == r"a {b|c} (d:1.2) \(e\) [f|g] x|y}"
    # Inside a variant, | in square brackets is A1111's alternation, not an option separator.
    assert _texts("{[cat|dog]|bird}") == {"[cat|dog]", "bird"}
    assert not is_dynamic(r"a \{b\} \__colour__ (x) [y|z]") and is_dynamic("{a}") and is_dynamic("__colour__")
    with pytest.raises(InvalidRequestError, match=r"prompt: the \{ at character 3 is never closed"):
        resolve("a {b|c", Random(0))


def test_weights():
    draws = [resolve("{3::red|green}", Random(seed)) for seed in range(2000)]
    assert 0.7 < draws.count("red") / len(draws) < 0.8
    assert _texts("{0::red|green}") == {"green"}
    with pytest.raises(InvalidRequestError, match="all weigh 0"):
        resolve("{0::a|0::b}", Random(0))


def test_wildcard_files_nested_folders_and_recursion(folder):
    wildcards = Wildcards(folder)
    assert _texts("__colour__", wildcards) == {"red", "green", "blue"}  # comments, blank lines, spaces dropped
    cats = _texts("a __animals/cats__", wildcards)
    assert cats == {"a tabby red cat", "a tabby green cat", "a tabby blue cat", "a small siamese", "a big siamese"}
    with pytest.raises(InvalidRequestError, match=f"nest more than {MAX_DEPTH} deep"):
        resolve("__loop__", Random(0), wildcards)


def test_missing_wildcard_file_names_file_and_folder(folder):
    with pytest.raises(InvalidRequestError, match=f"prompt: wildcard __animals/dogs__: no file animals/dogs.txt in the wildcard folder {folder}"):
        resolve("__animals/dogs__", Random(0), Wildcards(folder))
    with pytest.raises(InvalidRequestError, match="no wildcard folder is set"):
        resolve("__colour__", Random(0))
    with pytest.raises(InvalidRequestError, match=r"without '\.' or '\.\.' parts"):
        resolve("__../secret__", Random(0), Wildcards(folder))


def test_escape_reads_back_as_itself():
    text = "a {b} __colour__ c"
    assert escape("plain (x:1.1) [y|z]") == "plain (x:1.1) [y|z]"
    assert not is_dynamic(escape(text))


# -- seeding and combinatorial mode -------------------------------------------------------------------


def test_same_seed_same_text_and_one_text_per_seed():
    template = "a {red|green|blue} fox"
    texts = DynamicPrompts().image_texts(template, "blurry", [10, 11, 12, 13])
    assert texts == [(resolve(template, Random(seed)), "blurry") for seed in [10, 11, 12, 13]]
    assert texts == DynamicPrompts().image_texts(template, "blurry", [10, 11, 12, 13])
    assert len({prompt for prompt, _ in DynamicPrompts().image_texts(template, "", range(30))}) == 3


def test_combinatorial_lists_every_combination_in_order(folder):
    assert len(all_prompts("{a|b} {c|d|e}", 100)) == 6
    assert all_prompts("{a|b} {c|d|e}", 4) == ["a c", "a d", "a e", "b c"]
    assert all_prompts("__colour__ {x|y}", 100, Wildcards(folder)) == [
        "red x", "red y", "green x", "green y", "blue x", "blue y"
    ]
    texts = DynamicPrompts(combinatorial=True).image_texts("{a|b}", "{n|m|o}", [1, 2, 3, 4])
    assert texts == [("a", "n"), ("b", "m"), ("a", "o"), ("b", "n")]  # each starts over past its last


# -- the engine ----------------------------------------------------------------------------------------

SMALL = {"negative_prompt": "blurry", "width": 64, "height": 64, "steps": 3, "sampler": "Euler"}


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1")


def _remake(components, image):
    fields = fields_from_infotext(parse_infotext(image.infotext))
    return engine.generate(components, build_request(**{k: v for k, v in fields.items() if k != "model"})).images[0]


@pytest.mark.parametrize("fast", [False, True])
def test_a_batch_gets_a_prompt_per_image_and_each_remakes_alone(sd1, folder, fast):
    template = "a __colour__ {fox|owl|hare|frog}"
    request = build_request(**SMALL, prompt=template, seed=7, batch_size=2, fast=fast)
    result = engine.generate(sd1, request, dynamic=DynamicPrompts(folder))
    prompts = [parse_infotext(image.infotext).prompt for image in result.images]
    assert prompts == [p for p, _ in DynamicPrompts(folder).image_texts(template, "blurry", [7, 8])]
    assert prompts[0] != prompts[1]
    for image, prompt in zip(result.images, prompts, strict=True):
        info = parse_infotext(image.infotext)
        assert info.params["Template"] == template and "Negative Template" not in info.params
        assert fields_from_infotext(info)["prompt"] == prompt  # the template is only a record
        remade = _remake(sd1, image)  # no wildcard folder needed: the prompt is already resolved
        assert np.abs(remade.pixels - image.pixels).max() <= 1e-4


def test_prompts_of_different_lengths_share_a_batch(sd1):
    long_text = ", ".join(f"word{i}" for i in range(60))  # more than 75 tokens: two chunks
    fields = {**SMALL, "prompt": "{a fox|" + long_text + "}", "negative_prompt": "{blurry|ugly}"}
    request = build_request(**fields, seed=3, batch_size=4)
    result = engine.generate(sd1, request)
    infos = [parse_infotext(image.infotext) for image in result.images]
    assert len({info.prompt for info in infos}) == 2 and all(info.params["Negative Template"] == "{blurry|ugly}" for info in infos)
    for image in result.images:
        assert np.abs(_remake(sd1, image).pixels - image.pixels).max() <= 1e-4


def test_plain_prompt_takes_todays_path(sd1, folder):
    request = build_request(**SMALL, prompt="a red fox", seed=5, batch_size=2)
    plain = engine.generate(sd1, request)
    with_folder = engine.generate(sd1, request, dynamic=DynamicPrompts(folder))
    # A variant with one option draws the same text for every image: the plain path, byte for byte.
    one_option = engine.generate(sd1, build_request(**SMALL, prompt="a {red} fox", seed=5, batch_size=2))
    for a, b, c in zip(plain.images, with_folder.images, one_option.images, strict=True):
        assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.pixels, c.pixels)
        assert a.infotext == b.infotext and "Template" not in a.parameters
    assert one_option.images[0].parameters["Template"] == "a {red} fox"


def test_missing_wildcard_fails_before_the_model_runs(sd1, folder):
    calls = []
    request = build_request(**SMALL, prompt="a __animals/dogs__", seed=1)
    with pytest.raises(InvalidRequestError, match="animals/dogs.txt"):
        engine.generate(sd1, request, dynamic=DynamicPrompts(folder), progress=calls.append, cancel=lambda: calls.append(0) or False)
    assert calls == []
    with pytest.raises(InvalidRequestError, match="no wildcard folder is set"):
        engine.generate(sd1, build_request(**SMALL, prompt="a __colour__", seed=1))


def test_sdxl_batch_with_guidance_and_pooled_embeddings():
    sdxl = build_tiny("sdxl")
    result = engine.generate(sdxl, build_request(**SMALL, prompt="a {fox|owl}", seed=2, batch_size=2))
    assert len({parse_infotext(image.infotext).prompt for image in result.images}) == 2
    for image in result.images:
        assert np.abs(_remake(sdxl, image).pixels - image.pixels).max() <= 1e-4


def test_cli_reads_the_models_dirs_wildcards_and_from_remakes_the_resolved_prompt(lienzo, home):
    from PIL import Image

    from lienzo.images.metadata import read_parameters

    (home / "models" / "wildcards").mkdir(exist_ok=True)
    (home / "models" / "wildcards" / "colour.txt").write_text("red\ngreen\nblue\n", encoding="utf-8")
    args = ["--steps", "2", "--width", "64", "--height", "64", "--seed", "7", "--batch-size", "2"]
    made = [line for line in lienzo("generate", "a __colour__ {fox|owl|hare}", *args).stdout.splitlines() if line.endswith(".png")]
    infos = [parse_infotext(read_parameters(path)) for path in made]
    assert [info.prompt for info in infos] == [p for p, _ in DynamicPrompts().image_texts("a {red|green|blue} {fox|owl|hare}", "", [7, 8])]
    assert all(info.params["Template"] == "a __colour__ {fox|owl|hare}" for info in infos)
    again = [line for line in lienzo("generate", "--from", made[1]).stdout.splitlines() if line.endswith(".png")][0]
    assert parse_infotext(read_parameters(again)).prompt == infos[1].prompt
    difference = np.abs(np.asarray(Image.open(again), dtype=int) - np.asarray(Image.open(made[1]), dtype=int))
    assert difference.max() <= 1  # 8-bit rounding of pixels equal within 1e-4
    failed = lienzo("generate", "a __animals__", *args, code=2)
    assert "no file animals.txt in the wildcard folder" in failed.output + failed.stderr


def test_combinatorial_through_the_cli_gives_every_combination_once(lienzo, home):
    from lienzo.images.metadata import read_parameters

    args = ["--steps", "1", "--width", "64", "--height", "64", "--seed", "3", "--batch-size", "2", "--batch-count", "3"]
    made = [line for line in lienzo("generate", "a {red|blue} {fox|owl|hare}", "--combinatorial", *args).stdout.splitlines() if line.endswith(".png")]
    prompts = [parse_infotext(read_parameters(path)).prompt for path in made]
    assert prompts == ["a red fox", "a red owl", "a red hare", "a blue fox", "a blue owl", "a blue hare"]
