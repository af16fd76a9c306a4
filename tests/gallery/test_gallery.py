"""The gallery store: search, filters, pages, favourites, delete, import of every tool's PNGs, reconciling
files and rows after a crash, schema migrations, concurrent writers, presets, and the CLI writing to it."""

import io
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lienzo.errors import ImageFileError, InvalidRequestError
from lienzo.gallery import schema, store
from lienzo.gallery.importers import ImageMeta, read_meta
from lienzo.gallery.records import GalleryError, NotFoundError
from lienzo.gallery.rows import fts_query
from lienzo.gallery.store import Gallery
from lienzo.generation.engine import GeneratedImage
from lienzo.images.io import save_png_atomic
from lienzo.images.metadata import pnginfo
from lienzo.images.provenance import PROVENANCE_KEY, ModelInfo, Provenance
from lienzo.outputs import save_generated
from servers import bomb_png

MAX_PIXELS = 4096 * 4096


@pytest.fixture
def gallery(tmp_path):
    with Gallery(tmp_path / "data" / "gallery.db", tmp_path / "out", thumbs_dir=tmp_path / "thumbs") as g:
        yield g


def picture(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def png(chunks: dict[str, str] | None = None, size=(64, 64), seed=0) -> bytes:
    info = PngInfo()
    for key, value in (chunks or {}).items():
        info.add_itxt(key, value)
    buffer = io.BytesIO()
    picture(size, seed).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def a1111(prompt: str, negative: str = "", model: str = "sd15", seed: int = 1, extra: str = "") -> bytes:
    text = f"{prompt}\nNegative prompt: {negative}\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: {seed}, Size: 64x64, Model hash: 1a2b3c4d5e, Model: {model}{extra}"
    return png({"parameters": text}, seed=seed)


def add(gallery: Gallery, prompt: str, **kwargs) -> int:
    """Import an A1111 PNG with ``prompt``; keyword arguments go to :func:`a1111`."""
    return gallery.import_image(a1111(prompt, **kwargs), "image.png", max_pixels=MAX_PIXELS).id


# -- search, filters, pages ---------------------------------------------------------------------


def test_search_matches_every_word_and_the_last_as_a_prefix(gallery):
    fox = add(gallery, "a red fox in the snow", negative="blurry")
    whale = add(gallery, "a blue whale")
    apple = add(gallery, "red apple on a table")
    ids = lambda q: [item.id for item in gallery.search(q).items]  # noqa: E731
    assert ids("red") == [apple, fox]  # newest first
    assert ids("fox sno") == [fox] and ids("Whale") == [whale]
    assert ids("blurry") == [fox]  # the negative prompt is searched too
    assert ids("red whale") == [] and ids("") == [apple, whale, fox]


@pytest.mark.parametrize("text", ['"', "-", ":", "*", "fox:", '"fox', "fox -", "AND", "NEAR(", "(", "^x", "a OR", "col:umn", "'"])
def test_hostile_search_text_is_only_text(gallery, text):
    add(gallery, "a red fox")
    gallery.search(text)  # never an FTS5 syntax error
    assert fts_query(text) is None or all(word.startswith('"') for word in fts_query(text).split())


def test_search_operators_typed_by_a_user_are_words(gallery):
    fox = add(gallery, "a red fox")
    add(gallery, "a whale")
    assert [i.id for i in gallery.search('"red" -fox*').items] == [fox]
    assert gallery.search("fox OR whale").items == []  # OR is a word to find, not an operator


def _pngs(folder, count: int) -> list:
    """``count`` different small PNGs in ``folder``: 0.png, 1.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{i}.png").write_bytes(png(seed=i))
    return [folder / f"{i}.png" for i in range(count)]


def test_filters_by_model_date_and_favourite(gallery, tmp_path):
    paths = _pngs(tmp_path / "out", 3)
    old = gallery.add(paths[0], ImageMeta(64, 64, prompt="old", model="sd15"), source="cli", created=1000.0)
    mid = gallery.add(paths[1], ImageMeta(64, 64, prompt="mid", model="sdxl"), source="native", created=2000.0)
    new = gallery.add(paths[2], ImageMeta(64, 64, prompt="new", model="sd15"), source="openai", created=3000.0)
    gallery.set_favourite(mid, True)
    ids = lambda **kw: [item.id for item in gallery.search(**kw).items]  # noqa: E731
    assert ids(model="sd15") == [new, old] and ids(model="nope") == []
    assert ids(since=2000.0) == [new, mid] and ids(until=2000.0) == [old] and ids(since=1500.0, until=2500.0) == [mid]
    assert ids(favourite=True) == [mid] and ids(favourite=False) == [new, old]
    assert gallery.models() == ["sd15", "sdxl"]
    assert gallery.get(mid).favourite and not gallery.set_favourite(mid, False).favourite


def test_cursor_pages_cover_everything_once_newest_first(gallery, tmp_path):
    ids = []
    for i, path in enumerate(_pngs(tmp_path / "out", 7)):
        # Pairs with the same timestamp: the id breaks the tie, so no image is skipped or repeated.
        ids.append(gallery.add(path, ImageMeta(64, 64, prompt=f"image {i}"), source="cli", created=1000.0 + i // 2))
    seen, cursor, pages = [], None, 0
    while True:
        page = gallery.search(limit=3, cursor=cursor)
        seen += [item.id for item in page.items]
        pages += 1
        if page.next is None:
            break
        cursor = page.next
    assert pages == 3 and seen == sorted(ids, reverse=True)
    with pytest.raises(InvalidRequestError) as err:
        gallery.search(cursor="yesterday")
    assert err.value.field == "cursor"
    with pytest.raises(InvalidRequestError, match="limit"):
        gallery.search(limit=0)


# -- delete --------------------------------------------------------------------------------------


def test_delete_removes_file_row_index_entry_and_thumbnails(gallery, tmp_path):
    image_id = add(gallery, "a red fox")
    path = gallery.get(image_id).path
    thumb = Image.open(io.BytesIO(gallery.thumbnail(image_id, 32)))
    assert thumb.format == "WEBP" and max(thumb.size) == 32
    assert len(list((tmp_path / "thumbs").glob(f"{image_id}-*.webp"))) == 1
    gallery.delete(image_id)
    assert not path.exists() and list((tmp_path / "thumbs").glob("*")) == []
    assert gallery.search("fox").items == []
    with pytest.raises(NotFoundError) as err:
        gallery.get(image_id)
    assert err.value.field == "id"
    with pytest.raises(NotFoundError):
        gallery.delete(image_id)


def test_a_file_that_cannot_be_deleted_keeps_its_row(gallery, monkeypatch):
    image_id = add(gallery, "a red fox")
    path = gallery.get(image_id).path

    def refuse(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(PermissionError):
        gallery.delete(image_id)
    monkeypatch.undo()
    assert path.exists() and gallery.get(image_id).prompt == "a red fox"


def test_a_row_whose_file_is_already_gone_can_be_deleted(gallery):
    image_id = add(gallery, "a red fox")
    gallery.get(image_id).path.unlink()
    gallery.delete(image_id)
    assert gallery.search().items == []


# -- import --------------------------------------------------------------------------------------


def test_import_a1111_png_keeps_its_bytes_and_reads_its_parameters(gallery, tmp_path):
    data = a1111("a castle, (oil painting:1.2)", negative="blurry", seed=42, extra=", Clip skip: 2")
    item = gallery.import_image(data, "my castle!.png", max_pixels=MAX_PIXELS)
    assert item.path.read_bytes() == data  # verbatim: every chunk kept
    assert item.path.parent.parent == (tmp_path / "out" / "imported").resolve() and item.path.name == "my_castle.png"
    assert item.source == "import" and item.mode == "txt2img" and item.model == "sd15" and item.model_hash == "1a2b3c4d5e"
    assert (item.seed, item.steps, item.cfg_scale, item.sampler, item.schedule) == (42, 20, 7.0, "DPM++ 2M", "Karras")
    assert item.parameters == {
        "prompt": "a castle, (oil painting:1.2)", "negative_prompt": "blurry", "steps": 20, "cfg_scale": 7.0, "seed": 42,
        "width": 64, "height": 64, "clip_skip": 2, "sampler": "DPM++ 2M", "schedule": "Karras", "model": "1a2b3c4d5e",
    }
    assert item.infotext.startswith("a castle") and item.size_bytes == len(data)
    again = gallery.import_image(data, "my castle!.png", max_pixels=MAX_PIXELS)
    assert again.path.name == "my_castle-1.png" and again.id != item.id


def test_import_img2img_parameters_keep_the_strength(gallery):
    item = gallery.import_image(a1111("a fox", extra=", Denoising strength: 0.4"), "fox.png", max_pixels=MAX_PIXELS)
    assert item.mode == "img2img" and item.parameters["denoising_strength"] == 0.4
    hires = gallery.import_image(a1111("a fox", extra=", Denoising strength: 0.4, Hires upscale: 2"), "fox.png", max_pixels=MAX_PIXELS)
    assert hires.mode == "txt2img" and "denoising_strength" not in hires.parameters  # txt2img takes none


def test_import_lienzo_png_with_its_provenance(gallery, tmp_path):
    saved = save_generated(generated("a lighthouse at dusk", seed=9), tmp_path / "elsewhere", PROVENANCE, watermark=False)
    data = saved.path.read_bytes()
    item = gallery.import_image(data, saved.path.name, max_pixels=MAX_PIXELS)
    assert item.prompt == "a lighthouse at dusk" and item.seed == 9 and item.model == "tiny" and item.sampler == "Euler a"
    assert PROVENANCE_KEY in Image.open(item.path).info and item.path.read_bytes() == data


COMFY_GRAPH = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "SD1.5\\v1-5-pruned-emaonly.safetensors"}},
    "10": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "film.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 768, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cosy cabin in the woods", "clip": ["10", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "people, text", "clip": ["10", 1]}},
    "11": {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["6", 0], "width": 64, "height": 64}},
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 156680208700286, "steps": 25, "cfg": 6.5, "sampler_name": "euler_ancestral", "scheduler": "karras", "denoise": 1.0,
            "model": ["10", 0], "positive": ["11", 0], "negative": ["7", 0], "latent_image": ["5", 0],
        },
    },
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def test_import_comfyui_png(gallery):
    item = gallery.import_image(png({"prompt": json.dumps(COMFY_GRAPH), "workflow": "{}"}), "ComfyUI_00001_.png", max_pixels=MAX_PIXELS)
    assert item.prompt == "a cosy cabin in the woods" and item.negative_prompt == "people, text"
    assert (item.seed, item.steps, item.cfg_scale, item.sampler, item.schedule) == (156680208700286, 25, 6.5, "Euler a", "Karras")
    assert item.model == "v1-5-pruned-emaonly" and item.mode == "txt2img"
    assert item.parameters["width"] == 512 and item.parameters["height"] == 768 and (item.width, item.height) == (64, 64)
    assert "Sampler: Euler a" in item.infotext and gallery.search("cabin").items[0].id == item.id


def test_import_novelai_png(gallery):
    comment = {"prompt": "1girl, masterpiece", "uc": "lowres, bad anatomy", "steps": 28, "scale": 5.0, "seed": 3407,
               "sampler": "k_euler_ancestral", "width": 832, "height": 1216, "noise_schedule": "karras", "n_samples": 1}
    chunks = {"Title": "NovelAI generated image", "Description": "1girl, masterpiece", "Software": "NovelAI",
              "Source": "Stable Diffusion XL C1E1DE52", "Comment": json.dumps(comment)}
    item = gallery.import_image(png(chunks), "nai.png", max_pixels=MAX_PIXELS)
    assert item.prompt == "1girl, masterpiece" and item.negative_prompt == "lowres, bad anatomy"
    assert (item.seed, item.steps, item.cfg_scale, item.sampler, item.schedule) == (3407, 28, 5.0, "Euler a", "Karras")
    assert item.model == "Stable Diffusion XL C1E1DE52" and item.parameters["width"] == 832


def test_import_invokeai_png(gallery):
    metadata = {"generation_mode": "img2img", "positive_prompt": "a harbour at night", "negative_prompt": "fog", "width": 512,
                "height": 512, "seed": 77, "cfg_scale": 7.5, "steps": 30, "scheduler": "dpmpp_2m_k", "strength": 0.6,
                "model": {"name": "dreamshaper-8", "base": "sd-1", "type": "main"}}
    item = gallery.import_image(png({"invokeai_metadata": json.dumps(metadata)}), "invoke.png", max_pixels=MAX_PIXELS)
    assert item.prompt == "a harbour at night" and item.negative_prompt == "fog" and item.model == "dreamshaper-8"
    assert (item.sampler, item.schedule, item.seed, item.mode) == ("DPM++ 2M", "Karras", 77, "img2img")
    assert item.parameters["denoising_strength"] == 0.6


def test_import_png_without_metadata(gallery):
    item = gallery.import_image(png(), "plain.png", max_pixels=MAX_PIXELS)
    assert item.prompt == "" and item.parameters == {} and item.mode is None and item.model is None
    assert [i.id for i in gallery.search().items] == [item.id]


def test_malformed_metadata_still_imports_the_prompt(gallery):
    broken = {"parameters": "a fox\nSteps: many, Sampler: Euler, Seed: 1", "prompt": "{not json"}
    item = gallery.import_image(png(broken), "broken.png", max_pixels=MAX_PIXELS)
    assert item.prompt == "a fox" and item.steps is None and "Steps: many" in item.infotext


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"not an image at all", "not an image"),
        (b"", "empty"),
        (png()[:200], "truncated"),
        (bomb_png(50_000, 50_000), "limit"),
    ],
)
def test_a_bad_file_is_refused_and_nothing_is_written(gallery, tmp_path, data, words):
    with pytest.raises(ImageFileError, match=words) as err:
        gallery.import_image(data, "bad.png", max_pixels=MAX_PIXELS)
    assert str(err.value).startswith("files:")
    assert not (tmp_path / "out").exists() and gallery.search().items == []


def test_formats_the_gallery_does_not_show_are_refused(gallery):
    buffer = io.BytesIO()
    picture().save(buffer, format="GIF")
    with pytest.raises(ImageFileError, match="GIF"):
        gallery.import_image(buffer.getvalue(), "anim.gif", max_pixels=MAX_PIXELS)
    buffer = io.BytesIO()
    picture().save(buffer, format="JPEG")
    assert gallery.import_image(buffer.getvalue(), "photo.jpeg", max_pixels=MAX_PIXELS).path.suffix == ".jpg"


# -- saving generated images ---------------------------------------------------------------------

PROVENANCE = Provenance(ModelInfo("tiny", "ab" * 32, "abababab12", "sd1"))


def generated(prompt: str, seed: int = 1) -> GeneratedImage:
    image = picture(seed=seed)
    infotext = f"{prompt}\nNegative prompt: ugly\nSteps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5, Seed: {seed}, Size: 64x64, Model hash: abababab12, Model: tiny"
    return GeneratedImage(image, seed, infotext, {"Seed": seed}, np.asarray(image, dtype=np.float32) / 255)


def test_saved_images_get_a_row_after_their_file(gallery, tmp_path):
    saved = save_generated(generated("a red fox", seed=3), tmp_path / "out" / "x", PROVENANCE, watermark=False,
                           gallery=gallery, source="native", mode="txt2img")
    item = gallery.get(saved.gallery_id)
    assert item.path == saved.path.resolve() and item.source == "native" and item.mode == "txt2img"
    assert (item.prompt, item.negative_prompt, item.seed, item.model, item.sampler) == ("a red fox", "ugly", 3, "tiny", "Euler a")
    assert item.parameters["cfg_scale"] == 5.0 and item.parameters["schedule"] == "Automatic"


def test_a_gallery_failure_keeps_the_image_and_reconcile_adds_it(gallery, tmp_path, monkeypatch, caplog):
    """The crash between the file's rename and the row's commit: the file is there, the row is not."""

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(gallery, "add", locked)
    out = tmp_path / "out" / "txt2img-images" / "2026-01-02"
    with caplog.at_level(logging.WARNING, logger="lienzo.outputs"):
        saved = save_generated(generated("a lighthouse in a storm"), out, PROVENANCE, watermark=False, gallery=gallery, source="native")
    assert saved.gallery_id is None and saved.path.is_file() and "reconcile" in caplog.text
    monkeypatch.undo()
    assert gallery.search("lighthouse").items == []

    report = gallery.reconcile()
    assert (report.added, report.removed, report.temp_files) == (1, 0, 0)
    (item,) = gallery.search("lighthouse sto").items
    assert item.path == saved.path.resolve() and item.mode == "txt2img" and item.source == "cli" and item.seed == 1
    assert gallery.reconcile().added == 0  # the second time there is nothing to do


# -- reconciling ---------------------------------------------------------------------------------


def test_reconcile_drops_rows_whose_file_vanished(gallery, tmp_path):
    keep, lose = add(gallery, "a red fox"), add(gallery, "a blue whale")
    gallery.thumbnail(lose)
    gallery.get(lose).path.unlink()
    report = gallery.reconcile()
    assert (report.added, report.removed) == (0, 1)
    assert [i.id for i in gallery.search().items] == [keep] and gallery.search("whale").items == []
    assert list((tmp_path / "thumbs").glob(f"{lose}-*")) == []


def test_reconcile_removes_stale_temp_files_only(gallery, tmp_path):
    folder = tmp_path / "out" / "txt2img-images" / "2026-01-02"
    folder.mkdir(parents=True)
    stale, fresh = folder / ".00003-7.png.a1b2c3.tmp", folder / ".00004-8.png.d4e5f6.tmp"
    stale.write_bytes(png()[:100])
    fresh.write_bytes(png()[:100])
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    report = gallery.reconcile()
    assert report.temp_files == 1 and report.added == 0
    assert not stale.exists() and fresh.exists()  # another process may still be writing it


def test_reconcile_adds_what_it_can_read_and_opens_only_new_files(gallery, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    for i in range(5):
        save_png_atomic(picture(seed=i), out / "img2img-images" / "2026-01-02" / f"{i:05d}-{i}.png",
                        pnginfo(f"image number {i}\nSteps: 2, Seed: {i}, Size: 64x64, Denoising strength: 0.5"))
    (out / "imported").mkdir()
    (out / "imported" / "dropped.png").write_bytes(a1111("dropped by hand"))
    (out / "notes.txt").write_text("not an image")
    (out / "broken.png").write_bytes(b"\x89PNG broken")
    with caplog.at_level(logging.WARNING, logger="lienzo.gallery.store"):
        assert gallery.reconcile().added == 6
    assert "broken.png" in caplog.text
    items = gallery.search().items
    assert {i.mode for i in items if i.prompt.startswith("image number")} == {"img2img"}
    assert [i.source for i in gallery.search("dropped").items] == ["import"]

    reads = []
    monkeypatch.setattr(store, "read_meta", lambda path: reads.append(path) or read_meta(path))
    assert gallery.reconcile().added == 0 and [p.name for p in reads] == ["broken.png"]  # known files are not opened again


# -- schema ---------------------------------------------------------------------------------------


def test_an_older_database_is_migrated_keeping_its_rows(tmp_path, monkeypatch):
    db = tmp_path / "gallery.db"
    with Gallery(db, tmp_path / "out", thumbs_dir=tmp_path / "thumbs") as old:
        image_id = add(old, "a red fox")
    latest = len(schema.MIGRATIONS)
    assert _user_version(db) == latest
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, ("ALTER TABLE images ADD COLUMN rating INTEGER",)])
    with Gallery(db, tmp_path / "out", thumbs_dir=tmp_path / "thumbs") as new:
        assert new.search("fox").items[0].id == image_id
    assert _user_version(db) == latest + 1
    with sqlite3.connect(db) as conn:
        assert "rating" in [row[1] for row in conn.execute("PRAGMA table_info(images)")]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_failed_migration_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    db = tmp_path / "gallery.db"
    Gallery(db, tmp_path / "out", thumbs_dir=tmp_path / "thumbs").close()
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, ("CREATE TABLE extra (x)", "NOT SQL")])
    with pytest.raises(sqlite3.OperationalError):
        Gallery(db, tmp_path / "out", thumbs_dir=tmp_path / "thumbs")
    assert _user_version(db) == len(schema.MIGRATIONS) - 1
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'extra'").fetchone()[0] == 0


def test_a_database_from_a_newer_lienzo_is_refused(tmp_path):
    db = tmp_path / "gallery.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(GalleryError, match=rf"schema version 99, newer than this lienzo's {len(schema.MIGRATIONS)}") as err:
        Gallery(db, tmp_path / "out", thumbs_dir=tmp_path / "thumbs")
    assert str(db) in str(err.value) and _user_version(db) == 99


def _user_version(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def test_two_writers_at_once_lose_no_rows(tmp_path):
    """Two Gallery instances, two connections, as the CLI's and the server's processes have."""
    paths = []
    for i in range(80):
        path = tmp_path / "out" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"png")
        paths.append(path)
    galleries = [Gallery(tmp_path / "gallery.db", tmp_path / "out", thumbs_dir=tmp_path / "thumbs") for _ in range(2)]
    start = threading.Barrier(2)
    ids: list[list[int]] = [[], []]

    def write(n: int) -> None:
        start.wait()
        for path in paths[n::2]:
            ids[n].append(galleries[n].add(path, ImageMeta(8, 8, prompt=f"concurrent {path.stem}"), source="cli"))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids[0] + ids[1])) == 80
    assert len(galleries[0].search("concurrent", limit=200).items) == 80
    for g in galleries:
        g.close()


# -- presets --------------------------------------------------------------------------------------


def test_presets_are_saved_replaced_and_deleted(gallery):
    gallery.put_preset("Film noir", "black and white, dramatic shadows", "colour")
    gallery.put_preset("anime", "cel shading")
    assert [p.name for p in gallery.presets()] == ["anime", "Film noir"]
    replaced = gallery.put_preset("film NOIR", "high contrast")
    assert replaced.name == "film NOIR" and replaced.prompt == "high contrast" and len(gallery.presets()) == 2
    gallery.delete_preset("Film Noir")
    assert [p.name for p in gallery.presets()] == ["anime"]
    with pytest.raises(NotFoundError) as err:
        gallery.preset("film noir")
    assert err.value.field == "name"
    with pytest.raises(InvalidRequestError, match="name"):
        gallery.put_preset("   ", "x")


# -- the CLI --------------------------------------------------------------------------------------


def test_cli_generate_adds_its_images_to_the_gallery(lienzo, home, tmp_path):
    result = lienzo("generate", "a zeppelin over hills", "--steps", "2", "-W", "64", "-H", "64", "--seed", "5", "--batch-size", "2",
                    "--out", str(tmp_path / "elsewhere"))
    paths = [line for line in result.stdout.splitlines() if line.endswith(".png")]
    with Gallery(home / "data" / "gallery.db", tmp_path / "out", thumbs_dir=tmp_path / "thumbs") as gallery:
        items = gallery.search("zeppelin").items
    assert sorted(str(i.path) for i in items) == sorted(str(Path(p).resolve()) for p in paths)
    assert {(i.source, i.mode, i.model) for i in items} == {("cli", "txt2img", "tiny-sd15")} and {i.seed for i in items} == {5, 6}

    listed = lienzo("gallery", "list", "zeppelin").stdout.splitlines()
    assert len(listed) == 2 and all("a zeppelin over hills" in line for line in listed)
    assert listed[0].split("\t")[0] == str(max(i.id for i in items))


def test_cli_gallery_import_and_reconcile(lienzo, home, tmp_path):
    good, bad = tmp_path / "castle.png", tmp_path / "notes.png"
    good.write_bytes(a1111("a castle for the cli test"))
    bad.write_bytes(b"not an image")
    result = lienzo("gallery", "import", str(good), str(bad), code=2)
    (imported,) = result.stdout.splitlines()
    assert Path(imported).read_bytes() == good.read_bytes() and "notes.png" in result.stderr
    assert "a castle for the cli test" in lienzo("gallery", "list", "castle").stdout

    Path(imported).unlink()
    assert "removed 1 rows" in lienzo("gallery", "reconcile").stdout
    assert lienzo("gallery", "list", "castle").stdout == ""
