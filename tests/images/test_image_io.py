"""Reading images and masks, atomic PNG writes and A1111-style output numbering."""

import os
import stat

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lienzo.errors import ImageFileError, InvalidRequestError
from lienzo.images.io import load_image, load_mask, next_image_path, save_png_atomic


@pytest.fixture
def png(tmp_path):
    """A valid 64x48 RGB PNG with varied pixels (so it compresses to more than a few bytes)."""
    image = Image.effect_noise((64, 48), 64).convert("RGB")
    path = tmp_path / "in.png"
    image.save(path)
    return path


def test_load_image_reads_rgb(png):
    image = load_image(png)
    assert image.mode == "RGB"
    assert image.size == (64, 48)


def test_load_image_composites_transparency_on_white(tmp_path):
    image = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.putpixel((1, 0), (0, 0, 0, 128))
    image.save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == pytest.approx((127, 127, 127), abs=1)
    assert loaded.getpixel((2, 0)) == (255, 0, 0)


def test_load_image_flattens_palette_transparency(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255, 0, 255, 0])
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png")
    assert list(load_image(tmp_path / "p.png").getdata()) == [(255, 255, 255), (0, 255, 0)]


def test_load_image_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (64, 48), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (48, 64)


def test_missing_file_names_field_and_path(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(ImageFileError, match="init_image: no such file") as info:
        load_image(path, field="init_image")
    assert str(path) in str(info.value)


def test_folder_is_refused(tmp_path):
    with pytest.raises(ImageFileError, match="image: .* is a folder"):
        load_image(tmp_path)


def test_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageFileError, match=r"image: .*empty\.png is empty \(0 bytes\)"):
        load_image(tmp_path / "empty.png")


def test_text_file_is_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("a cat on a sofa\n")
    with pytest.raises(ImageFileError, match=r"image: .*notes\.png is not an image file"):
        load_image(tmp_path / "notes.png")


def test_truncated_png_is_refused(png):
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageFileError, match=r"image: .*in\.png is truncated or corrupt") as info:
        load_image(png)
    assert "\n" not in str(info.value)


def test_corrupt_png_data_is_refused(png):
    data = bytearray(png.read_bytes())
    data[100:140] = bytes(40)  # zero a stretch inside the compressed pixel data
    png.write_bytes(bytes(data))
    with pytest.raises(ImageFileError, match="truncated or corrupt"):
        load_image(png)


def test_load_mask_reads_luminance(tmp_path):
    mask = Image.new("RGB", (64, 48), "black")
    mask.paste((255, 255, 255), (10, 10, 20, 20))
    mask.save(tmp_path / "m.png")
    loaded = load_mask(tmp_path / "m.png", (64, 48))
    assert loaded.mode == "L"
    assert loaded.getpixel((15, 15)) == 255
    assert loaded.getpixel((0, 0)) == 0


@pytest.mark.parametrize(
    "background",
    [(255, 255, 255, 0), (0, 0, 0, 255)],
    ids=["transparent: alpha is the mask (white but see-through is unmasked)", "opaque RGBA: luminance is the mask"],
)
def test_load_mask_reads_rgba_by_alpha_or_luminance(tmp_path, background):
    mask = Image.new("RGBA", (64, 48), background)
    mask.paste((255, 255, 255, 255), (10, 10, 20, 20))
    mask.save(tmp_path / "m.png")
    loaded = load_mask(tmp_path / "m.png", (64, 48))
    assert loaded.getpixel((15, 15)) == 255
    assert loaded.getpixel((0, 0)) == 0


def test_load_mask_size_mismatch(tmp_path):
    Image.new("L", (32, 32)).save(tmp_path / "m.png")
    with pytest.raises(InvalidRequestError) as info:
        load_mask(tmp_path / "m.png", (64, 48))
    assert info.value.field == "mask"
    assert str(info.value) == "mask: mask is 32x32 but the image is 64x48; they must match"


def test_load_mask_errors_name_the_field(tmp_path):
    with pytest.raises(ImageFileError, match="mask_image: no such file"):
        load_mask(tmp_path / "nope.png", (64, 48), field="mask_image")


def test_save_png_atomic_writes_png_with_metadata(tmp_path):
    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Seed: 1")
    path = save_png_atomic(Image.new("RGB", (8, 8), "red"), tmp_path / "deep" / "er" / "out.png", info)
    assert path == tmp_path / "deep" / "er" / "out.png"
    with Image.open(path) as saved:
        assert saved.text["parameters"] == "a cat\nSteps: 20, Seed: 1"
        assert saved.getpixel((0, 0)) == (255, 0, 0)
    assert [p.name for p in path.parent.iterdir()] == ["out.png"]


def test_save_png_atomic_replaces_and_leaves_no_temp_on_failure(tmp_path):
    path = tmp_path / "out.png"
    save_png_atomic(Image.new("RGB", (8, 8), "red"), path)
    save_png_atomic(Image.new("RGB", (8, 8), "blue"), path)
    with Image.open(path) as saved:
        assert saved.getpixel((0, 0)) == (0, 0, 255)

    class Broken:
        def save(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_png_atomic(Broken(), path)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    with Image.open(path) as saved:
        assert saved.getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.skipif(os.name != "posix", reason="file modes and the umask are POSIX's")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_get_the_umask_permissions_like_any_new_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = save_png_atomic(Image.new("RGB", (8, 8), "red"), tmp_path / "out.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_next_image_path_numbering(tmp_path):
    assert next_image_path(tmp_path / "missing", 7) == tmp_path / "missing" / "00000-7.png"
    assert next_image_path(tmp_path, 1234) == tmp_path / "00000-1234.png"
    for name in ("00003-1.png", "00011-99.png", "notes.txt", "grid-00050-1.png", "00002-5.txt"):
        (tmp_path / name).write_bytes(b"")
    assert next_image_path(tmp_path, 1234) == tmp_path / "00012-1234.png"


def test_next_image_path_prefix(tmp_path):
    (tmp_path / "00040-1.png").write_bytes(b"")
    (tmp_path / "grid-00004-1.png").write_bytes(b"")
    assert next_image_path(tmp_path, 3, prefix="grid-") == tmp_path / "grid-00005-3.png"
    assert next_image_path(tmp_path, 3) == tmp_path / "00041-3.png"
