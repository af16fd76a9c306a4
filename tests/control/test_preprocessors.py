"""ControlNet preprocessors: each built-in module on a drawn picture against stored digests and what its map
must show, lookups and slider checks, pixel-perfect resolution, the neural modules on tiny weight files,
and ``lienzo detect``."""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw

from lienzo.cli import app
from lienzo.control.preprocessors import PREPROCESSORS, RESOLUTION, Slider, find_preprocessor, pixel_perfect_resolution, preprocess
from lienzo.errors import InvalidRequestError, ModelFileError

DATA = Path(__file__).parent / "data"

# Each built-in module's call on the drawn picture; the digests of their maps are in data/expected.json.
# The maps of canny, threshold, scribble_xdog, lineart_standard, tile_resample, blur_gaussian and color
# were compared pixel for pixel with sd-webui-controlnet's own functions when the digests were stored.
CASES = {
    "none": {},
    "invert": {},
    "canny": {"resolution": 128},
    "canny-40-90": {"resolution": 100, "threshold_a": 40, "threshold_b": 90},
    "threshold": {"resolution": 64, "threshold_a": 100},
    "scribble_xdog": {"resolution": 128},
    "lineart_standard": {"resolution": 128},
    "tile_resample": {"threshold_a": 2.5},
    "blur_gaussian": {"resolution": 64, "threshold_a": 3.0},
    "inpaint": {"mask": True},
    "inpaint_only": {"mask": True},
    "shuffle": {"seed": 7},
    "color": {"resolution": 128},
}


def drawing() -> Image.Image:
    """96x64: white, a dark blue rectangle, a black diagonal line and a red disc."""
    image = Image.new("RGB", (96, 64), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 8, 40, 40), fill=(20, 30, 120))
    draw.line((50, 60, 90, 4), fill="black", width=3)
    draw.ellipse((56, 30, 76, 50), fill=(210, 30, 30))
    return image


def left_half_mask() -> Image.Image:
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (0, 0, 48, 64))
    return mask


def run_case(case: str) -> Image.Image:
    options = dict(CASES[case])
    if options.pop("mask", False):
        options["mask"] = left_half_mask()
    return preprocess(case.split("-")[0], drawing(), **options)


def digest(image: Image.Image) -> str:
    return hashlib.sha256(f"{image.mode} {image.width}x{image.height} ".encode() + image.tobytes()).hexdigest()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


@pytest.mark.parametrize("case", list(CASES))
def test_each_built_in_module_makes_its_stored_map(case):
    expected = json.loads((DATA / "expected.json").read_text())["maps"]
    actual = digest(run_case(case))
    assert actual == expected[case], f"{case}: the map's digest is now {actual}"


def test_every_module_listed_is_stored_or_neural():
    """No module is listed that does not run: each model-free one has a stored map, the others a file."""
    expected = json.loads((DATA / "expected.json").read_text())["maps"]
    for p in PREPROCESSORS.values():
        assert (p.name in expected) == p.model_free, p.name
        assert p.model_free == (p.annotator is None)
    assert "reference_only" not in PREPROCESSORS


def test_maps_are_scaled_to_the_resolution_on_the_short_side():
    assert preprocess("canny", drawing(), 128).size == (192, 128)  # enlarged
    assert preprocess("canny", drawing(), 100).size == (150, 100)  # 96 * 100 / 64 = 150
    tall = drawing().transpose(Image.Transpose.ROTATE_90)
    assert preprocess("threshold", tall, 64).size == (64, 96)
    assert preprocess("blur_gaussian", drawing(), 640).size == (960, 640)


def test_canny_is_binary_with_edges_on_the_shapes_outlines_only():
    edges = pixels(preprocess("canny", drawing(), 64))
    assert edges.shape == (64, 96, 3) and set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 0] == edges[..., 2]).all()
    gray = edges[..., 0]
    assert gray[8:41, 7:10].max() == 255 and gray[8:41, 39:42].max() == 255  # the rectangle's left and right sides
    assert gray[14:35, 14:35].max() == 0  # inside the rectangle: flat
    assert gray[:, :5].max() == 0  # white margin
    faint = Image.new("RGB", (64, 64), "white")
    faint.paste((235, 235, 235), (16, 16, 48, 48))  # a step of 20 grey levels
    assert pixels(preprocess("canny", faint, 64))[..., 0].max() == 0  # under the default thresholds
    assert pixels(preprocess("canny", faint, 64, 10, 20))[16:48, 14:18, 0].max() == 255


def test_invert_inverts_without_resizing():
    inverted = pixels(preprocess("invert (FROM white bg & black line)", drawing(), 1024))
    assert inverted.shape == (64, 96, 3)
    assert (inverted == 255 - pixels(drawing())).all()


def test_none_returns_the_picture_flattened_onto_white():
    assert (pixels(preprocess("none", drawing())) == pixels(drawing())).all()
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert pixels(preprocess("none", clear)).tolist() == [[[255, 255, 255]] * 4] * 4


def test_threshold_is_white_where_every_channel_is_above_it():
    binary = pixels(preprocess("threshold", drawing(), 64, 100))
    assert binary[0, 0].tolist() == [255] * 3  # white background
    assert binary[20, 20].tolist() == [0] * 3  # blue rectangle: red and green below 100
    assert binary[40, 66].tolist() == [0] * 3  # red disc: green and blue below 100
    assert set(np.unique(binary)) == {0, 255}


def test_tile_resample_shrinks_by_the_rate_with_area_averaging():
    picture = Image.fromarray(np.arange(64 * 96 * 3, dtype=np.uint32).reshape(64, 96, 3).astype(np.uint8))
    same = preprocess("tile_resample", picture, threshold_a=1.05)
    assert (pixels(same) == pixels(picture)).all()
    half = preprocess("tile_resample", picture, threshold_a=2)
    assert half.size == (48, 32)
    block = pixels(picture)[10:12, 20:22].reshape(-1, 3).mean(axis=0)
    assert np.abs(pixels(half)[5, 10] - block).max() <= 1
    assert preprocess("tile_resample", picture, threshold_a=2.5).size == (38, 25)  # int(96 / 2.5), int(64 / 2.5)


def test_scribble_xdog_draws_lines_at_the_outlines():
    lines = pixels(preprocess("scribble_xdog", drawing(), 64))[..., 0]
    assert set(np.unique(lines)) == {0, 255}
    assert lines[0:5, 0:5].max() == 0  # white margin
    assert lines[8:41, 6:11].max() == 255  # the rectangle's left side


def test_blur_gaussian_smooths_more_with_a_larger_sigma():
    sharp = pixels(preprocess("blur_gaussian", drawing(), 64, 0.5))
    soft = pixels(preprocess("blur_gaussian", drawing(), 64, 8))
    assert np.abs(np.diff(soft, axis=1)).max() < np.abs(np.diff(sharp, axis=1)).max() / 4
    assert abs(soft.mean() - pixels(drawing()).mean()) < 4  # blurring keeps the average


def test_lineart_standard_is_white_lines_on_black():
    art = pixels(preprocess("lineart_standard", drawing(), 64))[..., 0]
    assert art[0:5, 0:5].max() == 0  # flat white
    assert art[10, 83:89].max() > 100  # on the black line
    blank = pixels(preprocess("lineart_standard", Image.new("RGB", (64, 64), "white"), 64))
    assert blank.max() == 0


def test_color_grid_is_one_colour_per_64_pixel_cell():
    grid = pixels(preprocess("t2ia_color_grid", drawing(), 128))
    assert grid.shape == (128, 192, 3)
    for y in (0, 64):
        for x in (0, 64, 128):
            cell = grid[y : y + 64, x : x + 64].reshape(-1, 3)
            assert (cell == cell[0]).all()
    assert not (grid[0, 0] == grid[0, 128]).all()  # the cells differ


def test_inpaint_maps_carry_the_mask_as_transparency():
    for module in ("inpaint", "inpaint_global_harmonious", "inpaint_only"):
        map_ = preprocess(module, drawing(), mask=left_half_mask())
        assert map_.mode == "RGBA" and map_.size == (96, 64)
        rgba = pixels(map_)
        assert (rgba[..., :3] == pixels(drawing())).all()
        assert (rgba[:, :48, 3] == 0).all() and (rgba[:, 48:, 3] == 255).all()
    grey = Image.new("L", (96, 64), 127)  # at most half grey: kept, as the extension binarises
    assert (pixels(preprocess("inpaint", drawing(), mask=grey))[..., 3] == 255).all()


def test_inpaint_needs_a_mask_of_the_pictures_size():
    with pytest.raises(InvalidRequestError, match="needs a mask") as err:
        preprocess("inpaint_only", drawing())
    assert err.value.field == "mask"
    with pytest.raises(InvalidRequestError, match="mask is 10x10 but the image is 96x64") as err:
        preprocess("inpaint", drawing(), mask=Image.new("L", (10, 10)), field="controlnet_units[2].module")
    assert err.value.field == "controlnet_units[2].mask"


def test_shuffle_is_repeatable_with_a_seed_and_fixed_at_512():
    one, again, other = (preprocess("shuffle", drawing(), 128, seed=s) for s in (1, 1, 2))
    assert one.size == (768, 512)  # the extension shuffles at 512 whatever the resolution
    assert digest(one) == digest(again) and digest(one) != digest(other)
    flat = preprocess("shuffle", Image.new("RGB", (64, 64), (10, 200, 30)), seed=3)
    assert set(map(tuple, pixels(flat).reshape(-1, 3))) == {(10, 200, 30)}  # it moves pixels, never invents colours
    with pytest.raises(InvalidRequestError, match="whole number") as err:
        preprocess("shuffle", drawing(), seed=-5)
    assert err.value.field == "seed"


def test_modules_are_found_by_name_or_alias_in_any_case():
    assert find_preprocessor("SoftEdge_HED").name == "hed"
    assert find_preprocessor("lineart_realistic").name == "lineart"
    assert find_preprocessor("T2IA_COLOR_GRID").name == "color"
    assert find_preprocessor("invert (from white bg & black line)").name == "invert"
    assert find_preprocessor(" Canny ").alias == "canny"
    assert find_preprocessor("inpaint_global_harmonious").takes_mask


def test_an_unknown_module_lists_the_available_ones():
    with pytest.raises(InvalidRequestError) as err:
        find_preprocessor("depth_midas")
    assert err.value.field == "module"
    message = str(err.value)
    assert "unknown preprocessor 'depth_midas'" in message
    for name in ("canny", "tile_resample", "lineart_coarse", "softedge_hed = hed", "t2ia_color_grid = color"):
        assert name in message
    with pytest.raises(InvalidRequestError) as err:
        preprocess("reference_only", drawing(), field="units[0].module")
    assert err.value.field == "units[0].module"


def test_sliders_are_the_extensions():
    canny = PREPROCESSORS["canny"]
    assert canny.sliders == (Slider("Resolution", 512, 64, 2048, 8), Slider("Low Threshold", 100, 1, 255), Slider("High Threshold", 200, 1, 255))
    assert PREPROCESSORS["tile_resample"].sliders == (Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01),)
    assert PREPROCESSORS["blur_gaussian"].sliders[1] == Slider("Sigma", 9.0, 0.01, 64.0, 0.01)
    assert PREPROCESSORS["scribble_xdog"].sliders[1] == Slider("XDoG Threshold", 32, 1, 64)
    assert PREPROCESSORS["threshold"].sliders[1] == Slider("Binarization Threshold", 127, 0, 255)
    for name in ("none", "invert", "inpaint", "inpaint_only", "shuffle"):
        assert PREPROCESSORS[name].sliders == ()
    for name in ("hed", "lineart", "lineart_coarse", "lineart_standard", "color"):
        assert PREPROCESSORS[name].sliders == (RESOLUTION,)


def test_slider_defaults_and_unset_values():
    canny = PREPROCESSORS["canny"]
    assert canny.slider_values(None, None, None) == (512, 100, 200)
    assert canny.slider_values(-1, -1, -1) == (512, 100, 200)  # the extension API's "unset"
    assert canny.slider_values(700, 5, 6) == (700, 5, 6)
    assert PREPROCESSORS["tile_resample"].slider_values(4096, 3, 999) == (None, 3, None)  # no such sliders: ignored
    assert PREPROCESSORS["invert"].slider_values(1, 999, 999) == (None, None, None)


@pytest.mark.parametrize(
    ("module", "values", "field", "message"),
    [
        ("canny", (512, 0, None), "threshold_a", "Low Threshold must be between 1 and 255, got 0"),
        ("canny", (512, None, 256), "threshold_b", "High Threshold must be between 1 and 255, got 256"),
        ("canny", (32, None, None), "processor_res", "Resolution must be between 64 and 2048, got 32"),
        ("blur_gaussian", (512, math.nan, None), "threshold_a", "Sigma must be between 0.01 and 64, got nan"),
        ("tile_resample", (512, 9, None), "threshold_a", "Down Sampling Rate must be between 1 and 8, got 9"),
        ("scribble_xdog", (4096, None, None), "processor_res", "Resolution must be between 64 and 2048, got 4096"),
        ("threshold", (512, "high", None), "threshold_a", "Binarization Threshold must be between 0 and 255, got 'high'"),
    ],
)
def test_out_of_range_sliders_name_the_field_and_range(module, values, field, message):
    with pytest.raises(InvalidRequestError) as err:
        preprocess(module, drawing(), *values)
    assert err.value.field == field and str(err.value) == f"{field}: {message}"
    with pytest.raises(InvalidRequestError) as err:
        preprocess(module, drawing(), *values, field="alwayson.controlnet.args[1].module")
    assert err.value.field == f"alwayson.controlnet.args[1].{field}"


def test_a_long_thin_picture_cannot_ask_for_a_huge_map():
    strip = Image.new("RGB", (2000, 10), "white")
    with pytest.raises(InvalidRequestError, match="would be 409600x2048 pixels; the most is 16,777,216") as err:
        preprocess("canny", strip, 2048, field="units[0].module")
    assert err.value.field == "units[0].processor_res"
    assert preprocess("canny", strip, 64).size == (12800, 64)  # 819,200 pixels: fine
    assert preprocess("invert", strip, 2048).size == (2000, 10)  # no resolution slider, no scaling


@pytest.mark.parametrize(
    ("size", "width", "height", "mode", "expected"),
    [
        # k_h = target_h / raw_h, k_w = target_w / raw_w; max(k_h, k_w) * short side, min for "Resize and Fill".
        ((512, 512), 768, 512, "Just Resize", 768),  # max(1, 1.5) * 512
        ((512, 512), 768, 512, "Crop and Resize", 768),
        ((512, 512), 768, 512, "Resize and Fill", 512),  # min(1, 1.5) * 512
        ((1000, 600), 512, 768, "Crop and Resize", 768),  # max(1.28, 0.512) * 600
        ((1000, 600), 512, 768, "Resize and Fill", 307),  # min(1.28, 0.512) * 600 = 307.2
        ((4, 2), 5, 2, "Just Resize", 2),  # max(1, 1.25) * 2 = 2.5, rounded half to even as numpy does
        ((4, 6), 5, 2, "Just Resize", 5),  # max(1/3, 1.25) * 4 = 5
        ((1000, 600), 512, 768, "Envelope (Outer Fit)", 307),  # an older label the extension still takes
        ((1000, 600), 512, 768, "crop and resize", 768),
    ],
)
def test_pixel_perfect_resolution_is_the_extensions_formula(size, width, height, mode, expected):
    assert pixel_perfect_resolution(size, width, height, mode) == expected


def test_pixel_perfect_refuses_an_unknown_resize_mode():
    with pytest.raises(InvalidRequestError, match="Just Resize, Crop and Resize, Resize and Fill") as err:
        pixel_perfect_resolution((64, 64), 512, 512, "Stretch")
    assert err.value.field == "resize_mode"
    with pytest.raises(InvalidRequestError) as err:
        pixel_perfect_resolution((64, 64), 0, 512, "Just Resize")
    assert err.value.field == "width"


# --- Neural modules on tiny weight files --------------------------------------------------------------


def conv(out_channels: int, in_channels: int, k: int, rng: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and bias: drawn from ``rng`` (numpy's, so the file is the same everywhere), or zeros."""
    if rng is None:
        return torch.zeros(out_channels, in_channels, k, k), torch.zeros(out_channels)
    scale = 1 / math.sqrt(in_channels * k * k)
    return (
        torch.from_numpy(rng.uniform(-scale, scale, (out_channels, in_channels, k, k)).astype(np.float32)),
        torch.from_numpy(rng.uniform(-scale, scale, out_channels).astype(np.float32)),
    )


def hed_weights(widths=(4, 8, 8, 8, 8), convs=(2, 2, 3, 3, 3), rng=None) -> dict[str, torch.Tensor]:
    """ControlNetHED.pth's keys (block1..5, their convs and projection, norm), at small widths."""
    state, channels = {"norm": torch.zeros(1, 3, 1, 1)}, 3
    for i, (width, n) in enumerate(zip(widths, convs), 1):
        for j in range(n):
            state[f"block{i}.convs.{j}.weight"], state[f"block{i}.convs.{j}.bias"] = conv(width, channels if j == 0 else width, 3, rng)
        state[f"block{i}.projection.weight"], state[f"block{i}.projection.bias"] = conv(1, width, 1, rng)
        channels = width
    return state


def lineart_weights(base: int = 4, rng=None) -> dict[str, torch.Tensor]:
    """sk_model.pth's keys (model0..4 and three residual blocks) with ``base`` channels instead of 64."""
    c1, c2, c4 = base, base * 2, base * 4
    layers = {"model0.1": conv(c1, 3, 7, rng), "model1.0": conv(c2, c1, 3, rng), "model1.3": conv(c4, c2, 3, rng)}
    for i in range(3):
        layers[f"model2.{i}.conv_block.1"] = conv(c4, c4, 3, rng)
        layers[f"model2.{i}.conv_block.5"] = conv(c4, c4, 3, rng)
    layers["model3.0"], layers["model3.3"] = transposed(c4, c2, rng), transposed(c2, c1, rng)
    layers["model4.1"] = conv(1, c1, 7, rng)
    state = {}
    for name, (weight, bias) in layers.items():
        state[f"{name}.weight"], state[f"{name}.bias"] = weight, bias
    return state


def transposed(in_channels: int, out_channels: int, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """A transposed 3x3 convolution's weight (in, out, 3, 3) and bias (out)."""
    weight, bias = conv(out_channels, in_channels, 3, rng)
    return weight.transpose(0, 1).contiguous(), bias


@pytest.fixture
def models_dir(tmp_path):
    (tmp_path / "models" / "annotators").mkdir(parents=True)
    return tmp_path / "models"


def save(models_dir: Path, name: str, state: dict) -> None:
    torch.save(state, models_dir / "annotators" / name)


def test_a_missing_annotator_file_says_which_file_and_where(models_dir):
    for module, file in (("softedge_hed", "ControlNetHED.pth"), ("lineart_realistic", "sk_model.pth"), ("lineart_coarse", "sk_model2.pth")):
        with pytest.raises(ModelFileError) as err:
            preprocess(module, drawing(), models_dir=models_dir)
        assert f"needs {file}" in str(err.value) and str(models_dir / "annotators") in str(err.value)
        assert "never downloads" in str(err.value)
    with pytest.raises(ModelFileError, match="models dir's annotators folder"):
        preprocess("hed", drawing())


def test_hed_reads_rgb_0_to_255_and_averages_its_sides_through_a_sigmoid(models_dir):
    """One block whose convolution passes the red channel through: the edge is sigmoid(red * 0.02 - 2.5)."""
    state = hed_weights(widths=(1,), convs=(1,))
    state["block1.convs.0.weight"][0, 0, 1, 1] = 1.0  # the centre tap of the red channel
    state["block1.projection.weight"][...] = 0.02
    state["block1.projection.bias"][...] = -2.5
    save(models_dir, "ControlNetHED.pth", state)
    edges = pixels(preprocess("softedge_hed", drawing(), 64, models_dir=models_dir, device="cpu"))
    assert edges.shape == (64, 96, 3)
    assert edges[0, 0, 0] == int(255 / (1 + math.exp(-(255 * 0.02 - 2.5))))  # white: 237
    assert edges[20, 20, 0] == int(255 / (1 + math.exp(-(20 * 0.02 - 2.5))))  # the blue rectangle's red is 20
    assert edges[40, 66, 0] == int(255 / (1 + math.exp(-(210 * 0.02 - 2.5))))  # the red disc


def test_hed_in_the_released_layout_runs_and_is_repeatable(models_dir):
    state = hed_weights(rng=np.random.default_rng(0))
    save(models_dir, "ControlNetHED.pth", state)
    one = preprocess("hed", drawing(), 128, models_dir=models_dir, device="cpu")
    assert one.size == (192, 128) and one.mode == "RGB"
    assert digest(one) == digest(preprocess("hed", drawing(), 128, models_dir=models_dir, device="cpu"))
    assert len(np.unique(pixels(one))) > 10  # the picture shows through
    blank = hed_weights()
    for i in range(1, 6):
        blank[f"block{i}.projection.bias"][...] = (1, 2, 3, -1, 0)[i - 1]
    save(models_dir, "ControlNetHED.pth", blank)
    flat = pixels(preprocess("hed", drawing(), 64, models_dir=models_dir, device="cpu"))
    assert (flat == int(255 / (1 + math.exp(-1)))).all()  # sigmoid of the sides' mean, (1 + 2 + 3 - 1 + 0) / 5


def test_lineart_inverts_the_networks_drawing(models_dir):
    state = lineart_weights()
    state["model4.1.bias"][...] = 1.0  # zero weights: the network draws sigmoid(1) everywhere
    save(models_dir, "sk_model.pth", state)
    art = pixels(preprocess("lineart_realistic", drawing(), 64, models_dir=models_dir, device="cpu"))
    assert art.shape == (64, 96, 3) and (art == 255 - int(255 / (1 + math.exp(-1)))).all()


def test_lineart_coarse_reads_its_own_file(models_dir):
    save(models_dir, "sk_model2.pth", lineart_weights(rng=np.random.default_rng(1)))
    one = preprocess("lineart_coarse", drawing(), 100, models_dir=models_dir, device="cpu")
    assert one.size == (150, 100)
    assert digest(one) == digest(preprocess("lineart_coarse", drawing(), 100, models_dir=models_dir, device="cpu"))
    with pytest.raises(ModelFileError, match="sk_model.pth"):
        preprocess("lineart", drawing(), models_dir=models_dir)


def test_a_file_of_another_network_or_with_code_is_refused(models_dir):
    save(models_dir, "ControlNetHED.pth", lineart_weights())
    with pytest.raises(ModelFileError, match="does not hold the network its name says: Missing key.*norm"):
        preprocess("hed", drawing(), models_dir=models_dir, device="cpu")
    state = lineart_weights()
    state["model1.0.weight"] = torch.zeros(8, 5, 3, 3)  # does not fit model0's 4 channels
    save(models_dir, "sk_model.pth", state)
    with pytest.raises(ModelFileError, match="does not hold the network its name says"):
        preprocess("lineart", drawing(), models_dir=models_dir, device="cpu")
    torch.save({"weights": Path("code")}, models_dir / "annotators" / "sk_model2.pth")  # an arbitrary Python object
    with pytest.raises(ModelFileError, match="refuses to load"):
        preprocess("lineart_coarse", drawing(), models_dir=models_dir, device="cpu")


# --- lienzo detect --------------------------------------------------------------------------------------


@pytest.fixture
def detect(tmp_path):
    """Run ``lienzo detect`` with folders under ``tmp_path``; checks the exit code."""
    drawing().save(tmp_path / "drawing.png")
    left_half_mask().save(tmp_path / "mask.png")

    def run(*args, code=0):
        base = ["--models-dir", str(tmp_path / "models"), "--outputs-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")]
        result = CliRunner().invoke(app, [*base, "detect", *args], catch_exceptions=False)
        assert result.exit_code == code, result.output + result.stderr
        return result

    return run


def test_detect_writes_the_map_and_prints_its_path(detect, tmp_path):
    result = detect(str(tmp_path / "drawing.png"), "--module", "canny", "--resolution", "128")
    assert result.stdout.splitlines() == [str(tmp_path / "out" / "detect" / "drawing-canny.png")]
    assert digest(Image.open(result.stdout.strip())) == digest(preprocess("canny", drawing(), 128))
    again = detect(str(tmp_path / "drawing.png"), "-M", "Canny", "--threshold-a", "40", "--threshold-b", "90", "--resolution", "100")
    assert again.stdout.strip().endswith("drawing-canny-2.png")  # never over the first
    assert digest(Image.open(again.stdout.strip())) == json.loads((DATA / "expected.json").read_text())["maps"]["canny-40-90"]
    named = detect(str(tmp_path / "drawing.png"), "-M", "invert (from white bg & black line)", "-o", str(tmp_path / "inv.png"))
    assert named.stdout.strip() == str(tmp_path / "inv.png") and Image.open(tmp_path / "inv.png").size == (96, 64)
    into = detect(str(tmp_path / "drawing.png"), "-M", "t2ia_color_grid", "-o", str(tmp_path))
    assert into.stdout.strip() == str(tmp_path / "drawing-color.png")


def test_detect_inpaint_and_shuffle(detect, tmp_path):
    out = detect(str(tmp_path / "drawing.png"), "-M", "inpaint_only", "--mask", str(tmp_path / "mask.png")).stdout.strip()
    assert Image.open(out).mode == "RGBA"
    first = detect(str(tmp_path / "drawing.png"), "-M", "shuffle")
    seed = first.stderr.strip().removeprefix("seed: ")
    again = detect(str(tmp_path / "drawing.png"), "-M", "shuffle", "--seed", seed)
    assert digest(Image.open(first.stdout.strip())) == digest(Image.open(again.stdout.strip()))
    assert "seed" not in again.stderr


def test_detect_lists_the_modules(detect, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per slider
    (tmp_path / "models" / "annotators").mkdir(parents=True)
    (tmp_path / "models" / "annotators" / "sk_model.pth").write_bytes(b"x")
    out = detect("--list").stdout
    for text in ("softedge_hed", "t2ia_color_grid", "--threshold-a 100 (1-255): Low Threshold", "--resolution 512 (64-2048)"):
        assert text in out
    assert "ControlNetHED.pth (missing)" in out and "sk_model.pth " in out and "sk_model.pth (missing)" not in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("│ ") and line.split()[1] != "│"] == list(PREPROCESSORS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-M", "depth"], "error: --module: unknown preprocessor 'depth'; available: none, invert, canny"),
        (["-M", "canny", "--threshold-a", "300"], "error: --threshold-a: Low Threshold must be between 1 and 255, got 300.0"),
        (["-M", "canny", "--resolution", "16"], "error: --resolution: Resolution must be between 64 and 2048, got 16"),
        (["-M", "inpaint"], "error: --mask: inpaint_global_harmonious needs a mask"),
        (["-M", "canny", "--mask", "mask.png"], "error: --mask: canny takes no mask"),
        (["-M", "softedge_hed"], "error: softedge_hed needs ControlNetHED.pth (from lllyasviel/Annotators on Hugging Face) in "),
        (["-M", "shuffle", "--seed", "-3"], "error: --seed: must be a whole number from 0 up"),
    ],
)
def test_detect_errors_are_one_line_naming_the_flag(detect, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = detect("drawing.png", *args, code=2)
    assert result.stderr.replace("\n", " ").startswith(message)
    assert not (tmp_path / "out").exists()


def test_detect_needs_an_image_and_a_module(detect, tmp_path):
    assert "give IMAGE and --module" in detect("-M", "canny", code=2).stderr
    assert "no such file" in detect(str(tmp_path / "nothing.png"), "-M", "canny", code=2).stderr
