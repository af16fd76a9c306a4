"""A1111 infotext: what lienzo writes reads back, and what other tools wrote reads too."""

import json

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lienzo.errors import ImageFileError, LienzoError
from lienzo.generation.infotext import fields_from_infotext
from lienzo.images.metadata import (
    Infotext,
    format_infotext,
    parse_infotext,
    pnginfo,
    read_parameters,
)

PARAMS = {
    "Steps": 20,
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": 7.5,
    "Seed": 1234,
    "Size": "512x768",
    "Model hash": "6ce0161689",
    "Model": "v1-5-pruned-emaonly",
    "Lora hashes": "a: 1b2c, b: 3d4e",
    "Note": 'say "hi"\nthen leave',
    "Skipped": None,
    "Version": "lienzo 0.1.0",
}


# --- writing and round trips -------------------------------------------------------------


def test_format_matches_a1111_layout():
    text = format_infotext("a cat", "blurry", {"Steps": 20, "Sampler": "Euler a", "Seed": None, "CFG scale": 7})
    assert text == "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7"


def test_format_quotes_values_as_a1111_does():
    text = format_infotext("p", "", {"Steps": 1, "Lora hashes": "a: 1b2c, b: 3d4e", "Q": 'x"y'})
    assert text.splitlines()[-1] == r'Steps: 1, Lora hashes: "a: 1b2c, b: 3d4e", Q: "x\"y"'


@pytest.mark.parametrize("key", ["Only masked padding, pixels", "Ratio: w/h", "", "-dash first"])
def test_format_refuses_keys_that_would_not_read_back(key):
    with pytest.raises(ValueError, match="would not read back"):
        format_infotext("p", "", {key: 1})


def test_format_omits_empty_negative_prompt():
    assert "Negative prompt" not in format_infotext("a cat", "", {"Steps": 20})


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [
        ("a cat", "blurry"),
        ("masterpiece, (red:1.3) [dress], \\(cosplay\\), a, b, c", "(worst quality:1.4), lowres"),
        ("line one\nline two: Steps: 3, Seed: 4, Size: 5x5", "neg one\nneg two"),
        ("no negative here", ""),
        ("", "only a negative"),
        ("日本語のプロンプト, ümlaut", "ネガティブ"),
    ],
)
def test_round_trip(prompt, negative):
    parsed = parse_infotext(format_infotext(prompt, negative, PARAMS))
    assert parsed.prompt == prompt
    assert parsed.negative_prompt == negative
    assert parsed.params == {key: str(value) for key, value in PARAMS.items() if value is not None}
    assert list(parsed.params) == [key for key, value in PARAMS.items() if value is not None]


def test_request_fields_read_through_the_table():
    info = parse_infotext(format_infotext("a cat", "", {**PARAMS, "Denoising strength": 0.45, "Clip skip": 2}))
    fields = fields_from_infotext(info, "img2img")
    assert (fields["steps"], fields["sampler"], fields["schedule"]) == (20, "DPM++ 2M", "Karras")
    assert (fields["cfg_scale"], fields["seed"], fields["width"], fields["height"]) == (7.5, 1234, 512, 768)
    assert (info.model_hash, info.model, fields["model"]) == ("6ce0161689", "v1-5-pruned-emaonly", "6ce0161689")
    assert (fields["denoising_strength"], fields["clip_skip"]) == (0.45, 2)
    assert "denoising_strength" not in fields_from_infotext(info, "txt2img")  # a hires-fix pass's, in txt2img


def test_absent_fields_are_left_out():
    assert fields_from_infotext(Infotext("a cat", "", {})) == {"prompt": "a cat", "negative_prompt": ""}


# --- what other tools wrote ----------------------------------------------------------------

A1111_V1_10 = """masterpiece, best quality, (1girl:1.2), solo, <lora:add_detail:0.8>
looking at viewer, [smile], \\(cosplay\\), ((detailed eyes))
Negative prompt: (worst quality, low quality:1.4), lowres,
bad anatomy, easynegative
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3051163391, Size: 512x768, \
Model hash: 7f96a1a9ca, Model: anything-v5, Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, \
Hires steps: 10, Hires upscaler: R-ESRGAN 4x+ Anime6B, \
Lora hashes: "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef", \
TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1"""


def test_a1111_v1_10_multiline_with_quoted_hashes():
    info = parse_infotext(A1111_V1_10)
    assert info.prompt.splitlines() == [
        "masterpiece, best quality, (1girl:1.2), solo, <lora:add_detail:0.8>",
        "looking at viewer, [smile], \\(cosplay\\), ((detailed eyes))",
    ]
    assert info.negative_prompt == "(worst quality, low quality:1.4), lowres,\nbad anatomy, easynegative"
    assert info.params["Lora hashes"] == "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef"
    assert info.params["TI hashes"] == "easynegative: c74b4e810b03"
    assert info.params["Hires upscale"] == "2" and info.params["Hires steps"] == "10"
    assert info.params["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B"
    fields = fields_from_infotext(info, "img2img")
    assert (fields["steps"], fields["sampler"], fields["schedule"], fields["cfg_scale"]) == (28, "DPM++ 2M", "Karras", 7.0)
    assert (fields["seed"], fields["width"], fields["height"], fields["clip_skip"]) == (3051163391, 512, 768, 2)
    assert (fields["denoising_strength"], info.params["Version"], info.model) == (0.45, "v1.10.1", "anything-v5")
    assert list(info.params)[-1] == "Version"


def test_old_a1111_windows_newlines_trailing_whitespace_no_negative():
    text = (
        "a photograph of an astronaut riding a horse  \r\n"
        "Steps: 50, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 768x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, ENSD: 31337   \r\n\r\n"
    )
    info = parse_infotext(text)
    assert info.prompt == "a photograph of an astronaut riding a horse"
    assert info.negative_prompt == ""
    assert info.params["Sampler"] == "DPM++ 2M Karras" and "Schedule type" not in info.params
    fields = fields_from_infotext(info)
    assert (fields["sampler"], fields["schedule"], fields["width"], fields["height"]) == ("DPM++ 2M", "Karras", 768, 512)
    assert info.params["ENSD"] == "31337"


def test_forge_flux_with_unknown_keys():
    text = (
        "a cozy cabin in the woods, snow, warm light\n"
        "Steps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, "
        "Seed: 12345, Size: 896x1152, Model hash: 0a7d3d6c3e, Model: flux1-dev-bnb-nf4-v2, "
        "Diffusion in Low Bits: Automatic (fp16 LoRA), Module 1: ae, Module 2: clip_l, "
        "Version: f2.0.1v1.10.1-previous-519-g44eb4ea8"
    )
    info = parse_infotext(text)
    assert info.negative_prompt == ""
    assert info.params["Distilled CFG Scale"] == "3.5"
    assert info.params["Diffusion in Low Bits"] == "Automatic (fp16 LoRA)"
    assert info.params["Module 2"] == "clip_l"
    assert info.params["Version"] == "f2.0.1v1.10.1-previous-519-g44eb4ea8"


def test_sdnext_prompt_that_contains_parameter_text():
    text = (
        'a poster that reads "Steps: 20, Sampler: Euler, Seed: 1", bold letters\n'
        "Negative prompt: text, watermark\n"
        "Steps: 30, Seed: 1620085323, Sampler: Default, CFG scale: 6, Size: 1024x1024, Batch: 1x1, "
        "Parser: Full parser, Model: sd_xl_base_1.0, Model hash: 31e35c80fc, Backend: Diffusers, "
        "App: SD.Next, Version: 6a6a4a1, Operations: txt2img, Pipeline: StableDiffusionXLPipeline"
    )
    info = parse_infotext(text)
    assert info.prompt == 'a poster that reads "Steps: 20, Sampler: Euler, Seed: 1", bold letters'
    assert info.negative_prompt == "text, watermark"
    fields = fields_from_infotext(info)
    assert (fields["steps"], fields["seed"], info.params["Sampler"]) == (30, 1620085323, "Default")
    assert info.params["Pipeline"] == "StableDiffusionXLPipeline"


def test_civitai_json_and_adetailer_quoted_prompt():
    resources = '[{"type":"checkpoint","modelVersionId":128713},{"type":"lora","weight":0.8,"modelVersionId":62833}]'
    text = (
        "portrait of a knight, (intricate armor:1.2), BREAK castle background\n"
        "Negative prompt: cartoon\n"
        "Steps: 25, Sampler: Euler a, CFG scale: 5, Seed: 7, Size: 832x1216, "
        'ADetailer model: face_yolov8n.pt, ADetailer prompt: "stern face, scar", '
        f"Civitai resources: {resources}, Civitai metadata: {{}}"
    )
    info = parse_infotext(text)
    assert info.prompt == "portrait of a knight, (intricate armor:1.2), BREAK castle background"
    assert info.params["ADetailer prompt"] == "stern face, scar"
    assert json.loads(info.params["Civitai resources"])[1]["weight"] == 0.8
    assert info.params["Civitai metadata"] == "{}"
    assert list(info.params)[-2:] == ["Civitai resources", "Civitai metadata"]


def test_controlnet_quoted_unit_and_multiline_negative():
    text = (
        "a house\n"
        "Negative prompt: ugly,\n"
        "  deformed\n"
        "Steps: 20, Sampler: UniPC, CFG scale: 7, Seed: 99, Size: 512x512, Model hash: cc6cb27103, "
        'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, '
        'Resize Mode: Crop and Resize, Guidance Start: 0, Guidance End: 1", Version: v1.6.0'
    )
    info = parse_infotext(text)
    assert info.negative_prompt == "ugly,\n  deformed"
    assert info.params["ControlNet 0"].startswith("Module: canny, Model: control_v11p_sd15_canny [d14c016b]")
    assert info.params["Version"] == "v1.6.0"


def test_prompt_only_text_has_no_params():
    info = parse_infotext("just a prompt, style: anime")
    assert info == Infotext("just a prompt, style: anime", "", {})


# --- malformed values --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("Steps", "twenty", "whole number"),
        ("Seed", "12.5", "whole number"),
        ("CFG scale", "high", "number"),
        ("Size", "512", "WIDTHxHEIGHT"),
        ("Size", "512 x 768", "WIDTHxHEIGHT"),
        ("Clip skip", "two", "whole number"),
        ("Denoising strength", "", "number"),
        ("Outpaint", "left many", "left N"),
    ],
)
def test_malformed_values_raise_lienzo_error(key, value, words):
    info = Infotext("p", "", {key: value})
    with pytest.raises(LienzoError, match=words) as caught:
        fields_from_infotext(info, "outpaint")
    assert key in str(caught.value)


# --- reading images ----------------------------------------------------------------------


def test_png_round_trip_through_pillow(tmp_path):
    text = format_infotext("café au lait, 日本", "blurry", PARAMS)
    path = tmp_path / "image.png"
    Image.new("RGB", (16, 16)).save(path, pnginfo=pnginfo(text, {"lienzo": '{"job": 1}'}))
    assert read_parameters(path) == text
    with Image.open(path) as image:
        assert image.info["lienzo"] == '{"job": 1}'
    assert parse_infotext(read_parameters(path)).prompt == "café au lait, 日本"


def test_pnginfo_refuses_a_second_parameters_key():
    with pytest.raises(LienzoError, match="parameters"):
        pnginfo("a", {"parameters": "b"})


def test_png_without_parameters_gives_none(tmp_path):
    # ComfyUI stores its graph under "prompt" and "workflow"; NovelAI under "Comment".
    path = tmp_path / "comfy.png"
    info = PngInfo()
    info.add_text("prompt", '{"3": {"class_type": "KSampler"}}')
    info.add_text("Comment", '{"steps": 28}')
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    assert read_parameters(path) is None


def _save_with_user_comment(path, comment: bytes, image_format: str) -> None:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment
    Image.new("RGB", (8, 8)).save(path, image_format, exif=exif)


@pytest.mark.parametrize(
    ("encode", "image_format"),
    [
        (lambda text: b"UNICODE\0" + text.encode("utf-16-be"), "JPEG"),  # A1111 via piexif
        (lambda text: b"UNICODE\0" + text.encode("utf-16-le"), "JPEG"),
        (lambda text: b"ASCII\0\0\0" + text.encode("utf-8"), "JPEG"),
        (lambda text: b"UNICODE\0" + text.encode("utf-16-be"), "WEBP"),
    ],
)
def test_exif_user_comment(tmp_path, encode, image_format):
    text = format_infotext("a cat, (fluffy:1.2)", "dog", PARAMS)
    path = tmp_path / f"image.{image_format.lower()}"
    _save_with_user_comment(path, encode(text), image_format)
    assert read_parameters(path) == text


def test_jpeg_without_exif_gives_none(tmp_path):
    path = tmp_path / "plain.jpg"
    Image.new("RGB", (8, 8)).save(path)
    assert read_parameters(path) is None


def test_unreadable_image_raises_image_file_error(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image at all")
    with pytest.raises(ImageFileError, match="broken.png"):
        read_parameters(path)
    with pytest.raises(ImageFileError, match="missing.png"):
        read_parameters(tmp_path / "missing.png")
