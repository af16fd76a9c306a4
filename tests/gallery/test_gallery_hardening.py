"""Ordinary bad input never makes a 500: lone surrogates in prompts, presets and image metadata, ids and
cursors beyond SQLite's integers, files deleted behind the gallery's back (and no server path in the
answer). A damaged gallery.db is moved aside and the gallery rebuilt from the images' own metadata."""

import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lienzo.errors import InvalidRequestError
from lienzo.gallery.records import NotFoundError
from lienzo.gallery.store import Gallery
from lienzo.images.io import save_png_atomic
from lienzo.images.metadata import pnginfo
from lienzo.images.provenance import PROVENANCE_KEY
from lienzo.outputs import save_generated
from lienzo.server.app import create_app
from test_gallery import PROVENANCE, a1111, add, gallery, generated, png  # noqa: F401 (gallery: a fixture)
from test_server_gallery import FAST, a1111_png, client, import_files, settings_for  # noqa: F401 (client: a fixture)

SURROGATE = "\ud800"  # half of a UTF-16 pair; JSON carries it as the escape "\ud800"


def post_json(client, url: str, body: dict):
    # json.dumps escapes the surrogate, as a client's JSON encoder would; httpx's own json= cannot encode it.
    return client.post(url, content=json.dumps(body), headers={"content-type": "application/json"})


# -- lone surrogates ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "body", "field", "status"),
    [
        ("/api/v1/txt2img?wait=true", {**FAST, "prompt": f"a red {SURROGATE}apple"}, "prompt", 422),
        ("/api/v1/txt2img?wait=true", {**FAST, "negative_prompt": SURROGATE}, "negative_prompt", 422),
        ("/api/v1/txt2img?wait=true", {**FAST, "loras": [f"film{SURROGATE}"]}, "loras.0.name", 422),
        ("/sdapi/v1/txt2img", {**FAST, "prompt": f"a red {SURROGATE}apple"}, "prompt", 422),
        ("/v1/images/generations", {"prompt": f"a red {SURROGATE}apple", "size": "64x64", "steps": 2}, "prompt", 400),
    ],
)
def test_a_lone_surrogate_in_a_prompt_is_refused_at_every_door(client, url, body, field, status):
    response = post_json(client, url, body)
    assert response.status_code == status, response.text
    answer = response.json()
    # OpenAI's error shape, or the native and A1111 ones (which share these two keys).
    message, named = (answer["error"]["message"], answer["error"]["param"]) if url.startswith("/v1/") else (answer["detail"], answer["field"])
    assert message.startswith(f"{field}: ") and "lone surrogate (U+D800)" in message and named == field
    assert client.get("/api/v1/gallery").json()["items"] == []  # refused before anything ran


@pytest.mark.parametrize(
    ("url", "body", "status"),
    [
        ("/api/v1/txt2img", {**FAST, "sampler": f"Euler{SURROGATE}"}, 422),
        ("/api/v1/txt2img", {**FAST, "model": SURROGATE}, 422),
        ("/sdapi/v1/txt2img", {**FAST, "prompt": "a fox", "sampler_name": SURROGATE}, 422),
        # An unknown style is a warning, as in A1111; the answer echoes the request's parameters.
        ("/sdapi/v1/txt2img", {**FAST, "prompt": "a fox", "styles": [SURROGATE]}, 200),
        ("/v1/images/generations", {"prompt": "a fox", "size": "64x64", "steps": 2, "model": SURROGATE}, 400),
    ],
)
def test_an_answer_echoing_a_lone_surrogate_is_still_answered(client, url, body, status):
    """Values a client sent come back in messages and echoed parameters; UTF-8 cannot encode a lone
    surrogate, which once turned such an answer into a 500."""
    response = post_json(client, url, body)
    assert response.status_code == status, response.text
    assert response.json()


def test_a_lone_surrogate_in_a_preset_or_a_search_is_refused_naming_the_field(client, gallery):
    response = client.put("/api/v1/presets/noir", content=json.dumps({"prompt": f"dark{SURROGATE}"}), headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["field"] == "prompt" and "U+D800" in response.json()["detail"]
    for call, field in [
        (lambda: gallery.put_preset(f"noir{SURROGATE}", "dark"), "name"),
        (lambda: gallery.put_preset("noir", "dark", SURROGATE), "negative_prompt"),
        (lambda: gallery.preset(SURROGATE), "name"),
        (lambda: gallery.delete_preset(SURROGATE), "name"),
        (lambda: gallery.search(f"fox {SURROGATE}"), "q"),  # a non-UTF-8 argument to `lienzo gallery list`
        (lambda: gallery.search(model=SURROGATE), "model"),
    ]:
        with pytest.raises(InvalidRequestError) as err:
            call()
        assert err.value.field == field and "lone surrogate" in str(err.value)
    assert gallery.presets() == []


def comfy_png(prompt: str, seed: int) -> bytes:
    graph = {
        "3": {"inputs": {"seed": seed, "steps": 9, "cfg": 6, "positive": ["6", 0], "negative": ["7", 0]}},
        "6": {"inputs": {"text": prompt}},
        "7": {"inputs": {"text": "dogs"}},
    }
    return png({"prompt": json.dumps(graph)})


def test_imported_metadata_with_surrogates_or_huge_numbers_is_kept_as_far_as_it_can_be(client):
    novelai = png({"Comment": json.dumps({"prompt": f"a {SURROGATE}cat", "uc": "dogs", "seed": 10**30}), "Software": "NovelAI"})
    result = import_files(
        client,
        ("comfy.png", comfy_png(f"a comfy {SURROGATE}cat", seed=2**64 - 1)),  # ComfyUI's seeds reach 2**64 - 1
        ("novelai.png", novelai),
        ("a1111.png", png({"parameters": 'a fox\nSteps: 99999999999999999999, Seed: 3, Size: 64x64, Model: "sd\\ud80015"'})),  # a JSON-quoted value
        ("invokeai.png", png({"invokeai_metadata": json.dumps({"positive_prompt": "\udfff owl", "steps": 12})})),
    )
    assert result["errors"] == []
    imported = result["imported"]
    assert [i["prompt"] for i in imported] == ["a comfy \ufffdcat", "a \ufffdcat", "a fox", "\ufffd owl"]
    assert [(i["seed"], i["steps"]) for i in imported] == [(None, 9), (None, None), (3, None), (None, 12)]
    assert imported[2]["model"] == "sd\ufffd15"
    detail = client.get(f"/api/v1/gallery/{imported[0]['id']}").json()
    assert "seed" not in detail["parameters"] and detail["parameters"]["prompt"] == "a comfy \ufffdcat"
    assert [i["id"] for i in client.get("/api/v1/gallery", params={"q": "cat"}).json()["items"]] == [imported[1]["id"], imported[0]["id"]]


def test_a_provenance_record_holding_a_surrogate_still_shows(client, tmp_path):
    saved = save_generated(generated("a lighthouse"), tmp_path / "elsewhere", PROVENANCE, watermark=False)
    with Image.open(saved.path) as image:
        record = json.loads(image.info[PROVENANCE_KEY])
        record["note"] = f"edited{SURROGATE}"  # a key a later lienzo might write, by another tool
        chunks = {"parameters": image.info["parameters"], PROVENANCE_KEY: json.dumps(record)}
    (item,) = import_files(client, ("lighthouse.png", png(chunks)))["imported"]
    detail = client.get(f"/api/v1/gallery/{item['id']}")
    assert detail.status_code == 200 and detail.json()["provenance"]["note"] == "edited\ufffd"
    assert detail.json()["provenance"]["model"]["name"] == "tiny"


def test_reconcile_skips_a_file_whose_name_is_not_utf8_and_adds_the_rest(gallery, tmp_path, caplog):
    folder = tmp_path / "out" / "txt2img-images"
    folder.mkdir(parents=True)
    (folder / "fox.png").write_bytes(a1111("a red fox"))
    (folder / os.fsdecode(b"caf\xe9.png")).write_bytes(a1111("a latin-1 name"))  # Python reads the name with a surrogate
    (folder / "comfy.png").write_bytes(comfy_png(f"a {SURROGATE}cat", seed=2**63))
    with caplog.at_level(logging.WARNING, logger="lienzo.gallery.store"):
        report = gallery.reconcile()
    assert report.added == 2 and "not valid UTF-8" in caplog.text
    assert sorted(item.prompt for item in gallery.search().items) == ["a red fox", "a \ufffdcat"]


# -- ids and cursors beyond SQLite's integers -----------------------------------------------------


@pytest.mark.parametrize("image_id", [2**63, 10**20])
@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [("GET", "", None), ("PATCH", "", {"favourite": True}), ("DELETE", "", None), ("GET", "/image", None), ("GET", "/thumb", None)],
)
def test_an_id_beyond_sqlites_integers_is_a_404(client, method, suffix, body, image_id):
    response = client.request(method, f"/api/v1/gallery/{image_id}{suffix}", json=body)
    assert response.status_code == 404
    assert response.json() == {"detail": f"id: no image with id {image_id} in the gallery", "field": "id"}


def test_a_cursor_beyond_sqlites_integers_is_a_422(client, gallery):
    for cursor in (f"1.5_{2**63}", "1.5_-99999999999999999999", "nan_3"):
        response = client.get("/api/v1/gallery", params={"cursor": cursor})
        assert response.status_code == 422 and response.json()["field"] == "cursor"
    with pytest.raises(NotFoundError):
        gallery.set_favourite(2**64, True)
    with pytest.raises(NotFoundError):
        gallery.thumbnail(-(2**70))


# -- files deleted behind the gallery's back ------------------------------------------------------


def test_a_jobs_image_deleted_from_the_gallery_is_a_404_without_server_paths(client, tmp_path):
    job = client.post("/api/v1/txt2img?wait=true", json=FAST).json()
    image = job["images"][0]
    assert client.get(image["url"]).status_code == 200
    assert client.delete(f"/api/v1/gallery/{image['gallery_id']}").status_code == 204
    response = client.get(image["url"])
    assert response.status_code == 404 and response.json()["field"] == "index"
    assert "deleted" in response.json()["detail"] and str(tmp_path) not in response.text


def test_a_gallery_file_gone_or_spoiled_is_answered_without_server_paths(client, tmp_path):
    gone, spoiled = import_files(client, ("gone.png", a1111_png("a fox")), ("spoiled.png", a1111_png("an owl", seed=2)))["imported"]
    Path(client.get(f"/api/v1/gallery/{gone['id']}").json()["file"]).unlink()
    Path(client.get(f"/api/v1/gallery/{spoiled['id']}").json()["file"]).write_bytes(b"no longer a png")
    for url, status in [(gone["url"], 404), (gone["thumb_url"], 404), (spoiled["thumb_url"], 422)]:
        response = client.get(url)
        assert response.status_code == status and response.json()["field"] == "id"
        assert str(tmp_path) not in response.text


# -- a damaged gallery.db -------------------------------------------------------------------------


def _outputs_with_an_image(tmp_path: Path) -> None:
    folder = tmp_path / "out" / "txt2img-images" / "2026-05-06"
    save_png_atomic(Image.new("RGB", (64, 64)), folder / "00000-7.png", pnginfo("a surviving heron\nSteps: 2, Seed: 7, Size: 64x64"))


def _damaged(db: Path) -> list[Path]:
    return sorted(db.parent.glob(f"{db.name}.damaged-*"))


def test_a_garbage_database_is_moved_aside_with_its_wal_and_rebuilt_from_the_images(tmp_path, caplog):
    db = tmp_path / "data" / "gallery.db"
    _outputs_with_an_image(tmp_path)
    # Another process (a running server) holds it open, so its WAL and shared-memory files are there too.
    with Gallery(db, tmp_path / "out", thumbs_dir=tmp_path / "thumbs") as other:
        other.put_preset("noir", "dark")
        db.write_bytes(b"this was never a database " * 100)
        with caplog.at_level(logging.WARNING, logger="lienzo.gallery.store"):
            with Gallery(db, tmp_path / "out", thumbs_dir=tmp_path / "thumbs") as gallery:
                (item,) = gallery.search("heron").items
                assert gallery.presets() == []
    assert item.seed == 7 and item.mode == "txt2img"
    aside, *beside = _damaged(db)
    assert [path.name for path in beside] == [f"{aside.name}-shm", f"{aside.name}-wal"]
    assert aside.read_bytes().startswith(b"this was never") and aside.name.startswith("gallery.db.damaged-20")
    assert "file is not a database" in caplog.text and aside.name in caplog.text and "Favourites" in caplog.text


def test_a_truncated_database_loses_only_what_the_files_do_not_say(tmp_path):
    db = tmp_path / "data" / "gallery.db"
    with Gallery(db, tmp_path / "out", thumbs_dir=tmp_path / "thumbs") as gallery:
        ids = [add(gallery, f"a bird number {n}", seed=n) for n in range(1, 200)]
        gallery.set_favourite(ids[0], True)
    with open(db, "r+b") as file:
        file.truncate(os.path.getsize(db) // 2)
    with Gallery(db, tmp_path / "out", thumbs_dir=tmp_path / "thumbs") as gallery:
        items = gallery.search("bird", limit=200).items
    assert len(items) == 199 and not any(item.favourite for item in items)
    assert len(_damaged(db)) == 1


def test_the_cli_says_what_happened_to_a_damaged_database_and_lists_the_rebuilt_gallery(home, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "gallery.db").write_bytes(b"\0" * 100 + b"garbage" * 1000)
    _outputs_with_an_image(tmp_path)
    base = [sys.executable, "-m", "lienzo", "--models-dir", str(home / "models"), "--data-dir", str(data), "--outputs-dir", str(tmp_path / "out")]
    result = subprocess.run([*base, "gallery", "list"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "a surviving heron" in result.stdout
    (aside,) = _damaged(data / "gallery.db")
    assert "file is not a database" in result.stderr and aside.name in result.stderr
    again = subprocess.run([*base, "gallery", "list"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stderr == "" and "a surviving heron" in again.stdout


def test_the_server_starts_on_a_damaged_database(home, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "gallery.db").write_bytes(b"SQLite format 3\0" + b"\xff" * 5000)
    _outputs_with_an_image(tmp_path)
    with TestClient(create_app(settings_for(home, tmp_path))) as client:
        assert [i["prompt"] for i in client.get("/api/v1/gallery").json()["items"]] == ["a surviving heron"]
    with sqlite3.connect(tmp_path / "data" / "gallery.db") as conn:
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
