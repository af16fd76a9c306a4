"""The gallery API, /api/v1/gallery and /api/v1/presets: images from every API appear, are searched, paged,
favourited, downloaded, remade and deleted; dropped files are imported; start-up reconciles."""

import io
import json
import os
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lienzo.images.io import save_png_atomic
from lienzo.images.metadata import pnginfo
from lienzo.server.app import create_app
from lienzo.settings import Settings
from servers import bomb_png, home_settings, png_bytes

FAST = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64, "seed": 7}
ITEM_KEYS = {
    "id", "url", "thumb_url", "created", "source", "mode", "prompt", "negative_prompt", "model", "seed", "width", "height",
    "steps", "cfg_scale", "sampler", "schedule", "favourite", "owner", "credentials", "credentials_state",
}


def settings_for(home, tmp_path, **limits) -> Settings:
    return home_settings(home, data=tmp_path / "data", out=tmp_path / "out", model="tiny-sd15", **limits)


@pytest.fixture
def client(home, tmp_path):
    with TestClient(create_app(settings_for(home, tmp_path, max_input_pixels=256 * 256))) as c:
        yield c


def a1111_png(prompt: str, model: str = "sd15", seed: int = 1, size=(64, 64)) -> bytes:
    text = f"{prompt}\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: {seed}, Size: {size[0]}x{size[1]}, Model: {model}"
    buffer = io.BytesIO()
    Image.new("RGB", size, (seed * 40 % 255, 90, 160)).save(buffer, format="PNG", pnginfo=pnginfo(text))
    return buffer.getvalue()


def import_files(client, *files: tuple[str, bytes]) -> dict:
    response = client.post("/api/v1/gallery/import", files=[("files", (name, data, "image/png")) for name, data in files])
    assert response.status_code == 200, response.text
    return response.json()


def test_images_from_every_api_appear_in_the_gallery_and_remake_exactly(client):
    native = client.post("/api/v1/txt2img?wait=true", json=FAST).json()
    client.post("/sdapi/v1/txt2img", json={**FAST, "prompt": "a green pear"}).raise_for_status()
    client.post("/v1/images/generations", json={"prompt": "a yellow lemon", "size": "64x64", "steps": 2, "seed": 3}).raise_for_status()

    items = client.get("/api/v1/gallery").json()["items"]
    assert [(i["source"], i["prompt"]) for i in items] == [("openai", "a yellow lemon"), ("a1111", "a green pear"), ("native", "a red apple")]
    assert all(set(i) == ITEM_KEYS and i["mode"] == "txt2img" and i["model"] == "tiny-sd15" for i in items)
    gallery_id = native["images"][0]["gallery_id"]
    assert gallery_id == items[2]["id"] and items[2]["seed"] == 7 and items[2]["steps"] == 2

    # Reuse the parameters: POSTed back they make the same pixels.
    detail = client.get(f"/api/v1/gallery/{gallery_id}").json()
    again = client.post("/api/v1/txt2img?wait=true", json=detail["parameters"]).json()
    first = Image.open(io.BytesIO(client.get(detail["url"]).content))
    second = Image.open(io.BytesIO(client.get(f"/api/v1/gallery/{again['images'][0]['gallery_id']}/image").content))
    assert first.tobytes() == second.tobytes() and detail["parameters"]["seed"] == 7


def test_detail_shows_every_parameter_and_the_provenance(client):
    job = client.post("/api/v1/txt2img?wait=true", json={**FAST, "negative_prompt": "blurry", "sampler": "Euler a"}).json()
    detail = client.get(f"/api/v1/gallery/{job['images'][0]['gallery_id']}").json()
    assert set(detail) == ITEM_KEYS | {"model_hash", "file", "size_bytes", "infotext", "parameters", "provenance", "watermark_id"}
    assert detail["infotext"] == job["images"][0]["infotext"] and detail["file"] == job["images"][0]["file"]
    assert detail["parameters"] == {
        "prompt": "a red apple", "negative_prompt": "blurry", "steps": 2, "cfg_scale": 7.0, "seed": 7, "width": 64, "height": 64,
        "sampler": "Euler a", "schedule": "Uniform", "model": detail["model_hash"],  # the schedule it ran with
    }
    assert detail["provenance"]["format"] == "lienzo-provenance" and detail["provenance"]["model"]["name"] == "tiny-sd15"
    assert detail["size_bytes"] == os.path.getsize(detail["file"])


def test_search_filters_and_pages(client):
    imported = import_files(
        client, ("fox.png", a1111_png("a red fox", model="sd15", seed=1)), ("whale.png", a1111_png("a blue whale", model="sdxl", seed=2)),
        ("apple.png", a1111_png("a red apple", model="sd15", seed=3)),
    )["imported"]
    fox, whale, apple = (i["id"] for i in imported)
    ids = lambda **params: [i["id"] for i in client.get("/api/v1/gallery", params=params).json()["items"]]  # noqa: E731
    assert ids(q="red") == [apple, fox] and ids(q='re"d -:*') == [] and ids(q='"red" fox') == [fox]
    assert ids(model="sdxl") == [whale] and client.get("/api/v1/gallery/models").json() == ["sd15", "sdxl"]
    assert ids(since=time.time() + 60) == [] and ids(until=time.time() + 60) == [apple, whale, fox]

    assert client.patch(f"/api/v1/gallery/{whale}", json={"favourite": True}).json()["favourite"] is True
    assert ids(favourite="true") == [whale] and ids(favourite="false") == [apple, fox]

    first = client.get("/api/v1/gallery", params={"limit": 2}).json()
    second = client.get("/api/v1/gallery", params={"limit": 2, "cursor": first["next"]}).json()
    assert [i["id"] for i in first["items"] + second["items"]] == [apple, whale, fox] and second["next"] is None
    bad = client.get("/api/v1/gallery", params={"cursor": "nonsense"})
    assert bad.status_code == 422 and bad.json()["field"] == "cursor"
    assert client.get("/api/v1/gallery", params={"limit": 0}).json()["field"] == "limit"


def test_image_download_thumbnail_and_delete(client, tmp_path):
    data = a1111_png("a lighthouse", size=(300, 200))
    (item,) = import_files(client, ("light house.png", data))["imported"]
    image = client.get(item["url"])
    assert image.content == data and image.headers["content-type"] == "image/png"
    assert "content-disposition" not in image.headers
    download = client.get(item["url"], params={"download": "true"})
    assert download.headers["content-disposition"] == 'attachment; filename="light_house.png"'

    thumb = client.get(item["thumb_url"])
    assert thumb.headers["content-type"] == "image/webp" and Image.open(io.BytesIO(thumb.content)).size == (256, 171)
    assert Image.open(io.BytesIO(client.get(item["thumb_url"], params={"size": 64}).content)).size == (64, 43)
    assert len(list((tmp_path / "data" / "cache" / "thumbs").glob(f"{item['id']}-*"))) == 2

    path = client.get(f"/api/v1/gallery/{item['id']}").json()["file"]
    assert client.delete(f"/api/v1/gallery/{item['id']}").status_code == 204
    assert not os.path.exists(path) and list((tmp_path / "data" / "cache" / "thumbs").glob("*")) == []
    assert client.get("/api/v1/gallery").json()["items"] == []


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/v1/gallery/999", None),
        ("PATCH", "/api/v1/gallery/999", {"favourite": True}),
        ("DELETE", "/api/v1/gallery/999", None),
        ("GET", "/api/v1/gallery/999/image", None),
        ("GET", "/api/v1/gallery/999/thumb", None),
    ],
)
def test_an_unknown_id_is_a_404_naming_the_id(client, method, path, body):
    response = client.request(method, path, json=body)
    assert response.status_code == 404
    assert response.json() == {"detail": "id: no image with id 999 in the gallery", "field": "id"}


def test_a_bad_favourite_body_names_the_field(client):
    (item,) = import_files(client, ("fox.png", a1111_png("a fox")))["imported"]
    response = client.patch(f"/api/v1/gallery/{item['id']}", json={"favourite": "maybe"})
    assert response.status_code == 422 and response.json()["field"] == "favourite"


def test_import_reports_bad_files_and_keeps_the_good_ones(client, tmp_path):
    comfy = {"3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 9, "positive": ["6", 0], "negative": ["7", 0]}},
             "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a comfy cat"}},
             "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "dogs"}}}
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG", pnginfo=_text_chunks(prompt=json.dumps(comfy)))
    result = import_files(
        client, ("good.png", a1111_png("a good one")), ("notes.png", b"hello"), ("huge.png", bomb_png(1000, 1000)),
        ("comfy.png", buffer.getvalue()), ("plain.png", png_bytes(Image.new("RGB", (64, 64)))),
    )
    assert [i["prompt"] for i in result["imported"]] == ["a good one", "a comfy cat", ""]
    assert [i["source"] for i in result["imported"]] == ["import"] * 3
    assert [e["file"] for e in result["errors"]] == ["notes.png", "huge.png"]
    assert "not an image" in result["errors"][0]["detail"] and "65,536" in result["errors"][1]["detail"]
    files = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["comfy.png", "good.png", "plain.png"]
    assert client.get(f"/api/v1/gallery/{result['imported'][1]['id']}").json()["parameters"]["negative_prompt"] == "dogs"


def _text_chunks(**chunks):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    return info


def test_presets(client):
    assert client.get("/api/v1/presets").json() == []
    saved = client.put("/api/v1/presets/Film noir", json={"prompt": "black and white", "negative_prompt": "colour"}).json()
    assert saved["name"] == "Film noir" and saved["prompt"] == "black and white"
    client.put("/api/v1/presets/anime", json={"prompt": "cel shading"}).raise_for_status()
    assert [p["name"] for p in client.get("/api/v1/presets").json()] == ["anime", "Film noir"]
    assert client.get("/api/v1/presets/film noir").json()["negative_prompt"] == "colour"
    assert client.delete("/api/v1/presets/Film noir").status_code == 204
    missing = client.get("/api/v1/presets/Film noir")
    assert missing.status_code == 404 and missing.json()["field"] == "name"
    assert client.put("/api/v1/presets/x", json={"prompt": "a", "style": 1}).json()["field"] == "style"


def test_start_up_reconciles_files_and_rows(home, tmp_path):
    # A crash between the rename and the commit left a file with no row, and a temporary file.
    folder = tmp_path / "out" / "img2img-images" / "2026-03-04"
    save_png_atomic(Image.new("RGB", (64, 64)), folder / "00000-1.png", pnginfo("a recovered owl\nSteps: 2, Seed: 1, Size: 64x64"))
    stale = folder / ".00001-2.png.xyz.tmp"
    stale.write_bytes(b"half a png")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    with TestClient(create_app(settings_for(home, tmp_path))) as client:
        (item,) = client.get("/api/v1/gallery", params={"q": "owl"}).json()["items"]
        assert item["mode"] == "img2img" and item["prompt"] == "a recovered owl"
    assert not stale.exists()
