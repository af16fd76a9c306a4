"""Styles: A1111's styles.csv in and out of the gallery's presets, merged into the prompts by
``--style`` (and the APIs' ``styles``) the one way A1111 merges them, recorded as the merged prompt."""

import pytest

from lienzo.errors import InvalidRequestError
from lienzo.generation.styles import merge_styles, read_styles_csv, write_styles_csv
from lienzo.images.metadata import parse_infotext, read_parameters

# As A1111 writes it: quoted fields with commas, a {prompt} placeholder, an empty negative, a BOM-less header.
STYLES_CSV = '''name,prompt,negative_prompt
Oil,"oil painting, thick brush strokes","photo, blurry"
Night,"{prompt} at night, moonlight",
"Quoted ""one""",a line,
,"no name, skipped",
'''


class Style:
    def __init__(self, name, prompt, negative_prompt=""):
        self.name, self.prompt, self.negative_prompt = name, prompt, negative_prompt


def test_csv_reads_a1111s_file_and_writes_it_back():
    rows = read_styles_csv(STYLES_CSV)
    assert rows == [
        ("Oil", "oil painting, thick brush strokes", "photo, blurry"), ("Night", "{prompt} at night, moonlight", ""),
        ('Quoted "one"', "a line", ""),
    ]
    assert read_styles_csv(write_styles_csv(Style(*row) for row in rows)) == rows
    with pytest.raises(InvalidRequestError, match="header name,prompt,negative_prompt"):
        read_styles_csv("title,text\na,b\n")


def test_styles_merge_in_order_ignoring_case_and_name_the_unknown():
    styles = [Style("Oil", "oil painting", "photo"), Style("Night", "{prompt} at night")]
    assert merge_styles("a cat", "blurry", ["night", "OIL", "Watercolour"], styles) == (
        "a cat at night, oil painting", "blurry, photo", ["Watercolour"],
    )


def test_import_list_generate_with_a_style_and_export(lienzo, tmp_path):
    csv_file = tmp_path / "styles.csv"
    csv_file.write_text(STYLES_CSV, encoding="utf-8")
    assert "imported 3 styles" in lienzo("styles", "import", str(csv_file)).stdout
    listed = lienzo("styles", "list").stdout.splitlines()
    assert [line.split("\t")[0] for line in listed] == ["Night", "Oil", 'Quoted "one"']
    made = lienzo("generate", "a cat", "--style", "night", "--style", "oil", "--steps", "1", "--width", "64", "--height", "64").stdout
    info = parse_infotext(read_parameters(made.split()[0]))
    assert (info.prompt, info.negative_prompt) == ("a cat at night, moonlight, oil painting, thick brush strokes", "photo, blurry")
    out = tmp_path / "back.csv"
    lienzo("styles", "export", str(out))
    assert read_styles_csv(out.read_text(encoding="utf-8")) == sorted(read_styles_csv(STYLES_CSV))


def test_an_unknown_style_is_refused_before_the_model_loads(lienzo):
    result = lienzo("generate", "a cat", "--style", "Nonesuch", code=2)
    assert "styles: no style named 'Nonesuch'" in result.stderr


def test_a_bad_row_imports_nothing(lienzo, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("name,prompt,negative_prompt\nGood,a,\n" + "x" * 101 + ",b,\n", encoding="utf-8")
    result = lienzo("styles", "import", str(bad), code=2)
    assert "1 to 100 characters" in result.stderr
    assert "Good" not in lienzo("styles", "list").stdout
