"""X/Y/Z plots: axes over any field of the table (A1111's ranges, Prompt S/R), every cell validated
before a picture is made, and ``lienzo grid`` drawing one labelled grid per z value from pictures
saved through the one Studio, each with its infotext."""

import pytest
from PIL import Image

from lienzo.errors import InvalidRequestError
from lienzo.generation.xyz import MAX_CELLS, SEARCH_REPLACE, parse_axis, plot_cells
from lienzo.images.metadata import parse_infotext, read_parameters


@pytest.mark.parametrize(
    ("text", "field", "values"),
    [
        ("steps=10,20,30", "steps", (10, 20, 30)),
        ("steps=1-5", "steps", (1, 2, 3, 4, 5)),
        ("Steps=10-30 (+10)", "steps", (10, 20, 30)),
        ("steps=30-10 (-10)", "steps", (30, 20, 10)),
        ("cfg=4,7.5", "cfg_scale", (4.0, 7.5)),
        ("CFG scale=0.5-1.5 [3]", "cfg_scale", (0.5, 1.0, 1.5)),
        ("cfg_scale=1-2 (+0.25)", "cfg_scale", (1.0, 1.25, 1.5, 1.75, 2.0)),
        ('sampler=Euler a, "DPM++ 2M"', "sampler", ("Euler a", "DPM++ 2M")),
        ("n_iter=1,2", None, None),  # batches are not a picture's parameter
        ("subseed_strength=0,0.1", "subseed_strength", (0.0, 0.1)),
        ("tiling=false,true", "tiling", (False, True)),
        ("scheduler=karras,exponential", "schedule", ("karras", "exponential")),  # A1111's key
        ("Prompt S/R=apple,pear,plum", SEARCH_REPLACE, ("apple", "pear", "plum")),
    ],
)
def test_axes_by_any_name_with_a1111s_ranges(text, field, values):
    if field is None:
        with pytest.raises(InvalidRequestError, match="no request field"):
            parse_axis(text, "--x")
        return
    axis = parse_axis(text, "--x")
    assert (axis.field, axis.values) == (field, values)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("steps", "FIELD=VALUE"),
        ("steps=", "no values"),
        ("steps=ten", "'ten' is not a value of steps"),
        ("steps=1.5", "not a value of steps"),
        ("tiling=maybe", "not a value of tiling"),
        ("colour=red", "no request field 'colour'"),
        ("Prompt S/R=apple", "the text to search for"),
        ("steps=1-100000", "at most 1,000"),
        ("cfg=1-2 (+0)", "never reaches"),
    ],
)
def test_bad_axes_are_one_line_naming_the_option(text, words):
    with pytest.raises(InvalidRequestError, match=words) as caught:
        parse_axis(text, "--y")
    assert caught.value.field == "--y"


def test_cells_run_z_then_y_then_x_and_every_value_is_checked_before_any_picture():
    x, y, z = parse_axis("steps=2,3,4", "--x"), parse_axis("Prompt S/R=apple,pear", "--y"), parse_axis("cfg=5,6", "--z")
    cells = plot_cells({"prompt": "an apple", "negative_prompt": "a rotten apple", "seed": 4}, x, y, z)
    assert len(cells) == 12 and [(c.z, c.y, c.x) for c in cells[:4]] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0)]
    pear = cells[3].request
    assert (pear.prompt, pear.negative_prompt, pear.steps, pear.cfg_scale, pear.seed) == ("an pear", "a rotten pear", 2, 5.0, 4)
    assert {c.request.batch_size for c in cells} == {1}
    with pytest.raises(InvalidRequestError, match=r"^--z: cfg_scale = 99: cfg_scale must be between 0 and 30") as caught:
        plot_cells({"prompt": "x"}, x, None, parse_axis("cfg=5,99", "--z"))
    assert caught.value.field == "--z"
    with pytest.raises(InvalidRequestError, match="'melon' is in neither the prompt"):
        plot_cells({"prompt": "an apple"}, parse_axis("Prompt S/R=melon,pear", "--x"))
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_CELLS:,}"):
        plot_cells({"prompt": "x"}, parse_axis("seed=1-100", "--x"), parse_axis("steps=1-20", "--y"))


def test_grid_draws_a_labelled_3x3_plot_and_saves_every_picture_with_its_infotext(lienzo, tmp_path):
    args = ["grid", "a red apple", "--x", "steps=1,2,3", "--y", "cfg=1,4,7", "--seed", "6", "--width", "64", "--height", "64", "-m", "tiny-sd15"]
    result = lienzo(*args, "--z", "sampler=Euler,DDIM")
    grids = [line for line in result.stdout.splitlines() if line.endswith(".png")]
    assert len(grids) == 2 and "picture 18/18" in result.stderr
    image = Image.open(grids[0])
    assert image.width > 3 * 64 and image.height > 3 * 64  # the pictures and the labels around them
    grid_info = parse_infotext(read_parameters(grids[1])).params
    assert (grid_info["Sampler"], grid_info["Steps"], grid_info["CFG scale"]) == ("DDIM", "1", "1")
    singles = sorted((tmp_path / "out" / "txt2img-images").rglob("*.png"))
    assert len(singles) == 18
    made = {(p["Sampler"], p["Steps"], p["CFG scale"], p["Seed"]) for p in (parse_infotext(read_parameters(s)).params for s in singles)}
    assert made == {(s, st, c, "6") for s in ("Euler", "DDIM") for st in ("1", "2", "3") for c in ("1", "4", "7")}
    # The cell at steps 3, cfg 7 on the first grid is that picture, pixel for pixel.
    cell = next(s for s in singles if {"Steps": "3", "Sampler": "Euler", "CFG scale": "7"}.items() <= parse_infotext(read_parameters(s)).params.items())
    left = image.width - 3 * 64
    top = image.height - 3 * 64
    assert image.crop((left + 2 * 64, top + 2 * 64, left + 3 * 64, top + 3 * 64)).tobytes() == Image.open(cell).convert("RGB").tobytes()


def test_grid_refuses_a_bad_axis_before_loading_anything(lienzo):
    result = lienzo("grid", "a red apple", "--x", "steps=1,500", code=2)
    assert "--x: steps = 500: steps must be between 1 and 150" in result.stderr
