"""The field table: every door is made from GenerationRequest's field specs, so a field's limits,
defaults and names at the CLI, the three APIs and the infotext cannot disagree."""

import click
import pytest
from PIL import Image

from lienzo.cli import app
from lienzo.errors import InvalidRequestError
from lienzo.generation.fields import MODES, SAME
from lienzo.generation.infotext import fields_from_infotext, request_params
from lienzo.generation.request import GenerationRequest, build_request, table
from lienzo.images.metadata import format_infotext, parse_infotext
from lienzo.server.routes.a1111.schemas import CommonRequest, Img2ImgRequest, Txt2ImgRequest
from lienzo.server.routes.a1111.translate import DIALECT as A1111
from lienzo.server.routes.native import BODIES
from lienzo.server.routes.openai import DIALECT as OPENAI
from lienzo.server.routes.openai import EditForm, GenerationBody

COMMANDS = {"txt2img": "generate", "img2img": "img2img", "inpaint": "inpaint", "outpaint": "outpaint"}
IMAGE = Image.new("RGB", (64, 64), (10, 20, 30))
MASK = Image.new("L", (64, 64), 255)
# A value other than the default for every field the infotext carries, per mode.
ODD = {
    "steps": 33, "sampler": "Euler a", "schedule": "Karras", "cfg_scale": 4.5, "seed": 1234, "width": 96, "height": 72,
    "denoising_strength": 0.35, "mask_blur": 9, "inpainting_fill": "latent noise", "inpaint_only_masked": True,
    "only_masked_padding": 40, "outpaint_left": 8, "outpaint_right": 16, "outpaint_up": 24, "outpaint_down": 32,
    "clip_skip": 2, "tiling": True, "fast": True, "subseed": 77, "subseed_strength": 0.25, "seed_resize_from_w": 48,
    "seed_resize_from_h": 40,
}


def request_for(mode: str, **fields) -> GenerationRequest:
    images = {"txt2img": {}, "img2img": {"init_image": IMAGE}, "inpaint": {"init_image": IMAGE, "mask": MASK}, "outpaint": {"init_image": IMAGE}}
    return build_request(**images[mode], **fields)


def test_every_request_field_is_in_the_table():
    assert [row.name for row in table()] == list(GenerationRequest.model_fields)
    assert all(row.spec.label and row.spec.help for row in table())


@pytest.mark.parametrize("mode", MODES)
def test_infotext_written_from_the_table_reads_back_every_field(mode):
    wanted = {row.name: ODD[row.name] for row in table() if row.name in ODD and mode in row.spec.modes}
    request = request_for(mode, prompt="a cat", negative_prompt="a dog", **wanted)
    resolved = {"width": request.width, "height": request.height}
    text = format_infotext(request.prompt, request.negative_prompt, request_params(request, resolved))
    read = fields_from_infotext(parse_infotext(text), mode)
    assert read == {"prompt": "a cat", "negative_prompt": "a dog", **wanted}


def test_infotext_leaves_out_defaults_and_other_modes_keys():
    # What the engine resolves for every image: the seed and size, and what the model family filled in.
    resolved = {"seed": 5, "width": 64, "height": 64, "steps": 20, "cfg_scale": 7.0, "sampler": "Euler"}
    params = request_params(request_for("txt2img"), resolved)
    assert list(params) == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size"]
    params = request_params(request_for("inpaint"), resolved)
    assert list(params)[6:] == ["Denoising strength", "Mask blur", "Masked content"]  # no "Inpaint area": whole picture
    assert request_params(request_for("outpaint", outpaint_up=8), resolved)["Outpaint"] == "left 0, right 0, up 8, down 0"


@pytest.mark.parametrize("row", [r for r in table() if r.spec.limits], ids=lambda r: r.name)
def test_limits_are_held_where_the_table_says(row):
    limits = row.spec.limits
    mode = next(iter(row.spec.modes & {"txt2img", "outpaint"}), "img2img")
    request_for(mode, **{row.name: limits.high})
    with pytest.raises(InvalidRequestError, match=f"{row.name} must be") as caught:
        request_for(mode, **{row.name: limits.high + (limits.multiple or 1)})
    assert caught.value.field == row.name


@pytest.mark.parametrize("mode", MODES)
def test_cli_options_are_the_tables_with_the_modes_defaults(mode):
    command = app.commands[COMMANDS[mode]]
    options = {param.name: param for param in command.params if isinstance(param, click.Option)}
    for row in table():
        if not row.spec.cli or mode not in row.spec.modes:
            assert row.name not in options
            continue
        option = options[row.name]
        assert f"--{row.spec.cli}" in option.opts and option.help.startswith(row.spec.help)
        if option.multiple:  # --lora, --style: repeatable, none by default
            assert row.default == []
        else:
            assert option.default == row.spec.default_for(mode, row.default)


def test_native_bodies_are_the_tables_with_the_modes_defaults():
    for mode in MODES:
        fields = BODIES[mode].model_fields
        assert set(fields) == {"model", "priority"} | {row.name for row in table() if mode in row.spec.modes}
    assert BODIES["img2img"].model_fields["denoising_strength"].default == 0.75
    assert BODIES["outpaint"].model_fields["denoising_strength"].default == 0.8
    assert BODIES["outpaint"].model_fields["inpainting_fill"].default == "fill"


def test_a1111_and_openai_bodies_and_error_names_come_from_the_table():
    for row in table():
        spec = row.spec
        if spec.a1111 and spec.a1111_body:
            # The hires fix's fields are txt2img's alone; what both modes take is in the common body.
            body = Txt2ImgRequest if spec.modes == {"txt2img"} else CommonRequest if "txt2img" in spec.modes else Img2ImgRequest
            default = row.default if spec.a1111_default is SAME else spec.a1111_default
            assert body.model_fields[spec.a1111].default == default, row.name
        if spec.a1111 and spec.a1111 != row.name:
            assert A1111.fields[row.name] == spec.a1111
        if spec.openai and spec.openai not in ("n", "size"):
            body = GenerationBody if "txt2img" in spec.modes else EditForm
            assert spec.openai in body.model_fields, row.name
        if spec.openai and spec.openai != row.name:
            assert OPENAI.fields[row.name] == spec.openai
    assert CommonRequest.model_fields["steps"].default == 50  # A1111's own default, not lienzo's 20
