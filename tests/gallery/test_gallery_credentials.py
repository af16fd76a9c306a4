"""Content Credentials in the gallery: each image's C2PA manifest read when its row is written (lienzo's
own, another tool's, tampered, none), the filter on them in the store, the API and the CLI, the image
page's credentials answer, and the migration that added the columns."""

import io
import sqlite3
import zlib
from pathlib import Path

import c2pa
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from playwright import sync_api as playwright

from lienzo.errors import InvalidRequestError
from lienzo.gallery import importers, schema
from lienzo.gallery.store import Gallery
from lienzo.generation.engine import GeneratedImage
from lienzo.images.credentials import Signing, self_signed_chain
from lienzo.images.io import load_image
from lienzo.images.provenance import ModelInfo, Provenance
from lienzo.outputs import save_generated
from lienzo.server.app import create_app
from servers import ARGS, CHROMIUM, home_settings, lienzo_server, png_bytes

MAX_PIXELS = 4096 * 4096
PROVENANCE = Provenance(ModelInfo("tiny", "ab" * 32, "abababab12", "sd1"))
SHOTS = Path(__file__).resolve().parents[2] / "screenshots"  # ignored: for a person to look at
CAPTURE = "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"
TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def picture(size=(64, 64), seed=0) -> Image.Image:
    """Smooth noise: texture the watermark can hide in, and a PNG of a realistic size."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(size[1] // 8, 1), max(size[0] // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def generated(prompt: str, seed: int = 1, size=(64, 64)) -> GeneratedImage:
    image = picture(size, seed)
    infotext = f"{prompt}\nSteps: 2, Sampler: Euler a, CFG scale: 5, Seed: {seed}, Size: {size[0]}x{size[1]}, Model hash: abababab12, Model: tiny"
    return GeneratedImage(image, seed, infotext, {"Seed": seed}, np.asarray(image, dtype=np.float32) / 255)


def signed_by_another_tool(png: bytes, generator: str = "othertool", source_type: str = CAPTURE) -> bytes:
    """``png`` signed by "another tool": its own claim generator and a throwaway certificate chain."""
    chain, key = self_signed_chain("Other Tool test signer")
    manifest = {
        "claim_generator_info": [{"name": generator, "version": "2.0"}],
        "title": "photo.png",
        "format": "image/png",
        "assertions": [{"label": "c2pa.actions", "data": {"actions": [{"action": "c2pa.created", "digitalSourceType": source_type}]}}],
    }
    out = io.BytesIO()
    with c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain, key, None)) as signer, c2pa.Builder(manifest) as builder:
        builder.sign(signer, "image/png", io.BytesIO(png), out)
    return out.getvalue()


def tamper_pixels(data: bytes) -> bytes:
    """``data`` (a PNG) with one pixel byte changed: its IDAT data inflated, a byte of the first row
    flipped, deflated again into one IDAT chunk in the first one's place; every other chunk (the C2PA
    manifest's included) kept as it was. A valid PNG whose pixels are not those that were signed."""
    chunks, at = [], 8
    while at < len(data):
        length = int.from_bytes(data[at:at + 4], "big")
        chunks.append((data[at + 4:at + 8], data[at + 8:at + 8 + length]))
        at += 12 + length
    pixels = bytearray(zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT")))
    pixels[1] ^= 0x01  # byte 0 is the row's filter type
    out, written = [data[:8]], False
    for kind, body in chunks:
        if kind == b"IDAT":
            if written:
                continue
            kind, body, written = b"IDAT", zlib.compress(bytes(pixels)), True
        out.append(len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big"))
    return b"".join(out)


@pytest.fixture
def gallery(tmp_path):
    with Gallery(tmp_path / "data" / "gallery.db", tmp_path / "out", thumbs_dir=tmp_path / "thumbs") as g:
        yield g


def save_signed(gallery: Gallery, tmp_path, prompt: str, seed: int = 1):
    """A lienzo image through the real save path, signed with lienzo's own self-made identity."""
    return save_generated(
        generated(prompt, seed), tmp_path / "out" / "txt2img-images", PROVENANCE, watermark=False, gallery=gallery,
        source="native", mode="txt2img", signing=Signing(tmp_path / "data"),
    )


def imported(gallery: Gallery, data: bytes, name: str = "image.png"):
    return gallery.import_image(data, name, max_pixels=MAX_PIXELS)


# -- the columns ----------------------------------------------------------------------------------


def test_a_signed_lienzo_image_another_tools_and_a_plain_png(gallery, tmp_path):
    saved = save_signed(gallery, tmp_path, "a lighthouse")
    assert saved.signed
    mine = gallery.get(saved.gallery_id)
    # lienzo's self-made certificate is on no trust list: intact, signer unrecognised.
    assert (mine.credentials, mine.credentials_state) == ("lienzo", "unrecognised signer")

    other = imported(gallery, signed_by_another_tool(png_bytes(picture(seed=2))), "photo.png")
    assert (other.credentials, other.credentials_state) == ("other", "unrecognised signer")

    plain = imported(gallery, png_bytes(picture(seed=3)))
    assert (plain.credentials, plain.credentials_state) == (None, "unsigned")


def test_only_lienzos_own_claim_of_ai_generation_counts_as_lienzos(gallery):
    # Another tool calling itself an AI generator is still another tool; "lienzo" stating a photo is not AI-generated.
    ai_elsewhere = imported(gallery, signed_by_another_tool(png_bytes(picture(seed=4)), source_type=TRAINED))
    photo_by_lienzo = imported(gallery, signed_by_another_tool(png_bytes(picture(seed=5)), generator="lienzo", source_type=CAPTURE))
    by_lienzo = imported(gallery, signed_by_another_tool(png_bytes(picture(seed=6)), generator="lienzo", source_type=TRAINED))
    assert [i.credentials for i in (ai_elsewhere, photo_by_lienzo, by_lienzo)] == ["other", "other", "lienzo"]


def test_a_tampered_lienzo_image_is_no_longer_lienzos(gallery, tmp_path):
    saved = save_signed(gallery, tmp_path, "a castle")
    item = imported(gallery, tamper_pixels(saved.path.read_bytes()), "changed.png")
    assert (item.credentials, item.credentials_state) == ("other", "tampered")


def test_reconcile_reads_the_credentials_of_new_files(gallery, tmp_path):
    folder = tmp_path / "out" / "dropped"
    folder.mkdir(parents=True)
    (folder / "signed.png").write_bytes(signed_by_another_tool(png_bytes(picture(seed=7))))
    (folder / "plain.png").write_bytes(png_bytes(picture(seed=8)))
    assert gallery.reconcile().added == 2
    found = {item.path.name: (item.credentials, item.credentials_state) for item in gallery.search().items}
    assert found == {"signed.png": ("other", "unrecognised signer"), "plain.png": (None, "unsigned")}


def test_credentials_that_cannot_be_read_leave_the_row_unread_until_reconcile(gallery, tmp_path, monkeypatch, caplog):
    def unreadable(source):
        raise OSError("disk hiccup")

    monkeypatch.setattr(importers, "read_credentials", unreadable)
    saved = save_signed(gallery, tmp_path, "a windmill")
    item = gallery.get(saved.gallery_id)  # indexed all the same
    assert (item.credentials, item.credentials_state) == (None, None) and "disk hiccup" in caplog.text
    monkeypatch.undo()
    gallery.reconcile()
    item = gallery.get(saved.gallery_id)
    assert (item.credentials, item.credentials_state) == ("lienzo", "unrecognised signer")


# -- the migration --------------------------------------------------------------------------------


def test_rows_from_the_previous_schema_are_kept_and_reconcile_reads_their_credentials(tmp_path, monkeypatch):
    db, out = tmp_path / "gallery.db", tmp_path / "out"
    out.mkdir()
    signed, plain = out / "signed.png", out / "plain.png"
    signed.write_bytes(signed_by_another_tool(png_bytes(picture(seed=9))))
    plain.write_bytes(png_bytes(picture(seed=10)))
    # The gallery as the previous lienzo left it: schema version 2, two rows.
    previous = schema.MIGRATIONS[:-1]
    with sqlite3.connect(db, isolation_level=None) as conn:
        schema.migrate(conn, db, previous)
        for n, path in enumerate((signed, plain)):
            conn.execute(
                "INSERT INTO images (path, created, source, prompt, width, height, size_bytes, favourite) VALUES (?, ?, 'import', ?, 64, 64, 1, ?)",
                (str(path.resolve()), 1000.0 + n, f"old image {n}", n),
            )
    conn.close()

    with Gallery(db, out, thumbs_dir=tmp_path / "thumbs") as gallery:
        items = gallery.search().items
        assert [(i.prompt, i.favourite) for i in items] == [("old image 1", True), ("old image 0", False)]
        assert {(i.credentials, i.credentials_state) for i in items} == {(None, None)}  # not read yet
        assert gallery.reconcile().added == 0
        found = {item.path.name: (item.credentials, item.credentials_state) for item in gallery.search().items}
    assert found == {"signed.png": ("other", "unrecognised signer"), "plain.png": (None, "unsigned")}
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(schema.MIGRATIONS)


# -- the filter -----------------------------------------------------------------------------------


@pytest.fixture
def three(gallery, tmp_path):
    """Ids of a signed lienzo image, another tool's and a plain one."""
    return {
        "lienzo": save_signed(gallery, tmp_path, "a lienzo fox").gallery_id,
        "other": imported(gallery, signed_by_another_tool(png_bytes(picture(seed=11)))).id,
        "none": imported(gallery, png_bytes(picture(seed=12))).id,
    }


def test_search_filters_by_credentials(gallery, three):
    for kind, image_id in three.items():
        assert [item.id for item in gallery.search(credentials=kind).items] == [image_id]
    assert len(gallery.search(credentials=None).items) == 3
    assert [i.id for i in gallery.search("fox", credentials="lienzo").items] == [three["lienzo"]]
    assert gallery.search("fox", credentials="other").items == []
    with pytest.raises(InvalidRequestError) as err:
        gallery.search(credentials="signed")
    assert err.value.field == "credentials" and "lienzo, other, none" in str(err.value)


def test_cli_gallery_list_filters_by_credentials(lienzo, home, tmp_path):
    with Gallery(home / "data" / "gallery.db", tmp_path / "out", thumbs_dir=tmp_path / "thumbs") as gallery:
        other = imported(gallery, signed_by_another_tool(png_bytes(picture(seed=13))), "other.png").id
        plain = imported(gallery, png_bytes(picture(seed=14)), "plain.png").id
    ids = lambda kind: [int(line.split("\t")[0]) for line in lienzo("gallery", "list", "--credentials", kind).stdout.splitlines()]  # noqa: E731
    assert other in ids("other") and plain not in ids("other")
    assert plain in ids("none") and other not in ids("none")
    assert "Invalid value for '--credentials'" in lienzo("gallery", "list", "--credentials", "signed", code=2).stderr


# -- the API --------------------------------------------------------------------------------------


@pytest.fixture
def client(home, tmp_path):
    settings = home_settings(home, data=tmp_path / "data", out=tmp_path / "out", model="tiny-sd15")
    with TestClient(create_app(settings)) as c:
        yield c


def test_the_api_filters_by_credentials_and_answers_an_images_credentials(client, tmp_path):
    app_gallery = client.app.state.gallery
    ids = {
        "lienzo": save_signed(app_gallery, tmp_path, "a signed harbour").gallery_id,
        "other": imported(app_gallery, signed_by_another_tool(png_bytes(picture(seed=15)))).id,
        "none": imported(app_gallery, png_bytes(picture(seed=16))).id,
    }
    for kind, image_id in ids.items():
        items = client.get("/api/v1/gallery", params={"credentials": kind, "owner": "*"}).json()["items"]
        assert [i["id"] for i in items] == [image_id]
        assert items[0]["credentials"] == (None if kind == "none" else kind)
    bad = client.get("/api/v1/gallery", params={"credentials": "signed"})
    assert bad.status_code == 422 and bad.json()["field"] == "credentials"

    mine = client.get(f"/api/v1/gallery/{ids['lienzo']}/credentials").json()
    assert mine["state"] == "unrecognised signer" and mine["kind"] == "lienzo"
    assert mine["generator"].startswith("lienzo/") and "lienzo" in mine["signer"]
    assert [a["action"] for a in mine["actions"]] == ["c2pa.created"] and mine["actions"][0]["digitalSourceType"] == TRAINED
    assert mine["ingredients"] == []

    theirs = client.get(f"/api/v1/gallery/{ids['other']}/credentials").json()
    assert (theirs["kind"], theirs["generator"], theirs["signer"]) == ("other", "othertool/2.0", "Other Tool test signer")

    plain = client.get(f"/api/v1/gallery/{ids['none']}/credentials").json()
    assert plain == {"state": "unsigned", "kind": None, "watermark": {"detected": False, "payload": None, "matches": []}}
    assert client.get("/api/v1/gallery/999999/credentials").status_code == 404


def test_an_img2img_image_is_lienzos_and_answers_its_ingredient_chain(client, tmp_path):
    app_gallery = client.app.state.gallery
    first = save_signed(app_gallery, tmp_path, "a first sketch")
    second = save_generated(
        generated("a second pass", seed=2), tmp_path / "out" / "img2img-images", PROVENANCE, watermark=False, gallery=app_gallery,
        source="native", mode="img2img", signing=Signing(tmp_path / "data"), parent=load_image(first.path),
    )
    assert app_gallery.get(second.gallery_id).credentials == "lienzo"
    answer = client.get(f"/api/v1/gallery/{second.gallery_id}/credentials").json()
    assert [a["action"] for a in answer["actions"]] == ["c2pa.opened", "c2pa.edited"]
    (ingredient,) = answer["ingredients"]
    assert (ingredient["relationship"], ingredient["state"]) == ("parentOf", "unrecognised signer")
    assert ingredient["manifest"]["generator"].startswith("lienzo/") and ingredient["manifest"]["actions"][0]["action"] == "c2pa.created"


def test_a_copy_stripped_of_its_credentials_is_traced_by_its_watermark(client, tmp_path):
    app_gallery = client.app.state.gallery
    saved = save_generated(
        generated("a watermarked meadow", seed=21, size=(512, 512)), tmp_path / "out" / "txt2img-images", PROVENANCE,
        watermark=True, gallery=app_gallery, source="native", mode="txt2img", signing=Signing(tmp_path / "data"),
    )
    assert saved.watermarked and saved.signed
    original = app_gallery.get(saved.gallery_id)
    assert original.credentials == "lienzo" and original.watermark_id == saved.record.watermark.payload
    assert client.get(f"/api/v1/gallery/{original.id}").json()["watermark_id"] == original.watermark_id

    # The web's copy: the pixels alone, as a JPEG, without any metadata.
    buffer = io.BytesIO()
    Image.open(saved.path).convert("RGB").save(buffer, format="JPEG", quality=90)
    copy = imported(app_gallery, buffer.getvalue(), "found-online.jpg")
    assert (copy.credentials, copy.credentials_state, copy.watermark_id) == (None, "unsigned", None)
    answer = client.get(f"/api/v1/gallery/{copy.id}/credentials").json()
    assert answer["state"] == "unsigned"
    assert answer["watermark"] == {"detected": True, "payload": original.watermark_id, "matches": [original.id]}


# -- the studio -------------------------------------------------------------------------------------


def test_the_studio_filters_by_credentials_and_shows_them(home, tmp_path):
    """In a real browser against a real ``lienzo serve``: the gallery's credentials filter, the tiles'
    marks, and the image page's Content Credentials section for lienzo's own image and another tool's."""
    if not Path(CHROMIUM).exists():
        pytest.fail("the browser tests need Debian's chromium: apt-get install chromium (.ci/run installs it)")
    # lienzo's own signed, watermarked image, made by the save path and dropped into the studio (an import
    # keeps the bytes), and a copy of its pixels alone, as the web passes images around.
    mine = save_generated(
        generated("a credentialled kite", seed=30, size=(512, 512)), tmp_path / "made", PROVENANCE, watermark=True, signing=Signing(tmp_path / "data"),
    )
    stripped = io.BytesIO()
    Image.open(mine.path).convert("RGB").save(stripped, format="JPEG", quality=90)
    edit = save_generated(
        generated("a credentialled kite, repainted", seed=33), tmp_path / "made", PROVENANCE, watermark=False, mode="img2img",
        signing=Signing(tmp_path / "data"), parent=load_image(mine.path),
    )
    theirs = signed_by_another_tool(png_bytes(picture(seed=31)))
    files = [
        ("kite.png", mine.path.read_bytes()), ("theirs.png", theirs), ("plain.png", png_bytes(picture(seed=32))), ("copy.jpg", stripped.getvalue()),
        ("edit.png", edit.path.read_bytes()),
    ]
    with lienzo_server(home, env={"LIENZO_DEFAULT_MODEL": "tiny-sd15"}) as url, playwright.sync_playwright() as p:
        answer = httpx.post(f"{url}/api/v1/gallery/import", files=[("files", (name, data, "image/png")) for name, data in files], timeout=60)
        assert answer.status_code == 200 and len(answer.json()["imported"]) == 5
        original_id, copy_id = answer.json()["imported"][0]["id"], answer.json()["imported"][3]["id"]

        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        page.set_default_timeout(60_000)
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(url + "/#gallery")
        page.wait_for_selector("#filter-credentials")
        page.fill("#search", "credentialled kite")  # the other imports have no prompt: found by the filter alone, below
        tiles = "[...document.querySelectorAll('#gallery-grid .tile')]"

        page.select_option("#filter-credentials", "lienzo")
        page.wait_for_function(f"{tiles}.length === 2 && {tiles}.every(t => t.querySelector('.cr.lienzo'))")
        page.click("#gallery-grid .tile")  # the newest: the img2img picture, made from the kite
        section = page.locator("#viewer-credentials")
        section.locator(".ingredients li").wait_for()
        assert section.locator(".ingredients li").inner_text().startswith("input image (parentOf): credentials intact, signer unrecognised")
        page.click("#viewer-close")
        page.click("#gallery-grid .tile:nth-child(2)")
        section.get_by_text("AI-generated by lienzo").wait_for()
        text = section.inner_text()
        SHOTS.mkdir(exist_ok=True)
        page.screenshot(path=SHOTS / "gallery-credentials.png")
        assert "Intact, signer unrecognised" in text and "certificate it made itself" in text and "c2pa.created (trainedAlgorithmicMedia)" in text
        page.click("#viewer-close")

        page.fill("#search", "")
        page.select_option("#filter-credentials", "other")
        page.wait_for_function(f"{tiles}.some(t => t.querySelector('.cr.other'))")
        assert page.evaluate(f"{tiles}.every(t => t.querySelector('.cr.other'))")
        page.click("#gallery-grid .tile .cr.other")
        section.get_by_text("From another tool").wait_for()
        assert "othertool/2.0" in section.inner_text() and "Other Tool test signer" in section.inner_text()
        page.click("#viewer-close")

        # The stripped copy: no credentials, but lienzo's watermark, which leads back to the original.
        page.select_option("#filter-credentials", "none")
        page.wait_for_selector(f'#gallery-grid .tile[data-id="{copy_id}"]')
        assert page.evaluate(f"{tiles}.every(t => !t.querySelector('.cr'))")
        page.click(f'#gallery-grid .tile[data-id="{copy_id}"]')
        section.get_by_text("lienzo's watermark found").wait_for()
        assert section.locator("strong").inner_text() == "None"
        section.get_by_role("link", name=f"image {original_id}").click()
        section.get_by_text("AI-generated by lienzo").wait_for()
        assert page.locator("#viewer-prompt").inner_text() == "a credentialled kite"
        page.click("#viewer-close")
        page.select_option("#filter-credentials", "")
        page.wait_for_function(f"{tiles}.filter(t => t.querySelector('.cr')).length >= 2")
        page.screenshot(path=SHOTS / "gallery-credentials-grid.png")
        browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"
