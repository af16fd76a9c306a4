"""Named API keys: the key store (only hashes on disk, constant-time checks, a cache that still sees the
CLI's changes at once), ``lienzo keys``, the server letting in the admin and named keys only, and each
key's own gallery."""

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from lienzo.cli import app as cli
from lienzo.cli import serve as serve_command
from lienzo.errors import InvalidRequestError
from lienzo.gallery import schema
from lienzo.gallery.importers import read_meta
from lienzo.gallery.records import NotFoundError
from lienzo.gallery.store import Gallery
from lienzo.server import keys as keys_module
from lienzo.server.app import Auth, create_app
from lienzo.server.job import Identity
from lienzo.server.keys import KeyInfo, KeyStore
from lienzo.settings import Settings
from servers import png_bytes

ADMIN_KEY = "the-admins-key"


def _no_model(path, cancel):
    raise AssertionError("these tests run no job")


def settings_in(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models", outputs_dir=tmp_path / "out")


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def make_old(path) -> None:
    """Date the file back, as if written long ago: the store's cache trusts only files older than a second."""
    old = time.time_ns() - 10 * 10**9
    os.utime(path, ns=(old, old))


# -- the store ------------------------------------------------------------------------------------


def test_a_key_round_trips(tmp_path):
    with KeyStore(tmp_path / "keys.db") as store:
        secret = store.add("alice", max_queued=2)
        assert secret.startswith("lz_") and len(secret) == 3 + 43  # 32 bytes, base64url
        [info] = store.list()
        assert isinstance(info, KeyInfo) and (info.name, info.max_queued, info.max_pixels) == ("alice", 2, None)
        assert abs(info.created - time.time()) < 60
        assert store.identify(secret) == Identity(owner="alice", admin=False, max_queued=2, max_pixels=None)

        store.set_limits("ALICE", max_pixels=512 * 512)  # names ignore case; both limits are replaced
        assert store.identify(secret) == Identity(owner="alice", admin=False, max_queued=None, max_pixels=512 * 512)

        store.remove("Alice")
        assert store.identify(secret) is None and store.list() == [] and not store.has_keys()
        with pytest.raises(NotFoundError, match="no key named 'alice'") as err:
            store.remove("alice")
        assert err.value.field == "name"


def test_the_file_holds_a_hash_not_the_secret(tmp_path):
    path = tmp_path / "keys.db"
    with KeyStore(path) as store:
        secret = store.add("alice")
    data = path.read_bytes()
    assert secret.encode() not in data and secret.removeprefix("lz_").encode() not in data
    with sqlite3.connect(path) as conn:
        stored, salt = conn.execute("SELECT hash, salt FROM keys").fetchone()
    assert stored.encode() in data and len(bytes.fromhex(stored)) == 32 and len(bytes.fromhex(salt)) == 16


def test_identify_refuses_what_is_not_a_key(tmp_path):
    with KeyStore(tmp_path / "keys.db") as store:
        alice, bob = store.add("alice"), store.add("bob")
        assert store.identify(bob).owner == "bob" and store.identify(alice).owner == "alice"
        changed = alice[:-1] + ("A" if alice[-1] != "A" else "B")
        for wrong in ("", "lz_", alice[:-1], changed, alice + "x", alice.upper(), "bob", "\udcff"):
            assert store.identify(wrong) is None, wrong


def test_every_key_is_compared_in_constant_time(tmp_path, monkeypatch):
    """Which key a secret matched, if any, must not show in how long identify takes: every key is
    compared with hmac.compare_digest and the loop never stops at the match."""
    with KeyStore(tmp_path / "keys.db") as store:
        first = [store.add(name) for name in ("alice", "bob", "carol")][0]
        compared = []
        real = keys_module.hmac.compare_digest
        monkeypatch.setattr(keys_module.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
        assert store.identify(first).owner == "alice" and len(compared) == 3
        assert store.identify("lz_nothing") is None and len(compared) == 6


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "admin", "ADMIN", "ñandú", "a/b", "x\n"])
def test_bad_names_are_refused(tmp_path, name):
    with KeyStore(tmp_path / "keys.db") as store:
        with pytest.raises(InvalidRequestError) as err:
            store.add(name)
        assert err.value.field == "name" and store.list() == []


def test_names_are_unique_ignoring_case_and_limits_checked(tmp_path):
    with KeyStore(tmp_path / "keys.db") as store:
        store.add("Alice.B-2_x")
        with pytest.raises(InvalidRequestError, match="a key named 'alice.b-2_x' exists already") as err:
            store.add("alice.b-2_x")
        assert err.value.field == "name"
        for field, value in (("max_queued", 0), ("max_pixels", 100), ("max_queued", True)):
            with pytest.raises(InvalidRequestError) as err:
                store.add("bob", **{field: value})
            assert err.value.field == field
        with pytest.raises(NotFoundError, match="no key named 'carol' \\(keys: Alice.B-2_x\\)"):
            store.set_limits("carol", max_queued=1)
        assert [info.name for info in store.list()] == ["Alice.B-2_x"]


def test_unchanged_keys_are_answered_from_memory_and_changes_seen_at_once(tmp_path):
    path = tmp_path / "keys.db"
    with KeyStore(path) as server, KeyStore(path) as cli_store:
        alice = cli_store.add("alice")
        make_old(path)
        statements = []
        server._connection().set_trace_callback(statements.append)
        for _ in range(3):
            assert server.identify(alice).owner == "alice"
        assert sum("FROM keys" in s for s in statements) == 1  # read once, then from memory

        bob = cli_store.add("bob")  # another process, as `lienzo keys add` is
        assert server.identify(bob).owner == "bob"
        cli_store.remove("alice")
        assert server.identify(alice) is None


def test_a_change_within_the_same_tick_of_the_file_clock_is_seen(tmp_path):
    """A file system whose clock is coarse can give two writes the same mtime: a file read within a
    second of its last change is read again next time, whatever its mtime says."""
    path = tmp_path / "keys.db"
    with KeyStore(path) as server, KeyStore(path) as cli_store:
        alice = cli_store.add("alice")
        assert server.identify(alice).owner == "alice"
        before = os.stat(path)
        bob = cli_store.add("bob")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # bob's write in the same tick as alice's
        assert os.stat(path).st_size == before.st_size  # the stat tells the writes apart no more
        assert server.identify(bob).owner == "bob"


def test_a_store_is_refused_from_a_newer_lienzo(tmp_path):
    path = tmp_path / "keys.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 9")
    with pytest.raises(Exception, match="schema version 9, newer than this lienzo's 1"):
        KeyStore(path)


# -- lienzo keys ------------------------------------------------------------------------------------


def test_the_keys_command_adds_lists_and_removes(tmp_path):
    runner, env = CliRunner(), {"LIENZO_DATA_DIR": str(tmp_path / "data")}
    added = runner.invoke(cli, ["keys", "add", "alice", "--max-queued", "3", "--max-pixels", "1048576"], env=env)
    assert added.exit_code == 0, added.output
    secret = added.stdout.strip()
    assert secret.startswith("lz_") and f"Authorization: Bearer {secret}" in added.stderr

    listed = runner.invoke(cli, ["keys", "list"], env=env)
    assert listed.exit_code == 0 and secret not in listed.output
    name, _made, *limits = listed.stdout.strip().split("\t")
    assert name == "alice" and limits == ["max_queued=3", "max_pixels=1048576"]
    with KeyStore(tmp_path / "data" / "keys.db") as store:  # settings.keys_db
        assert store.identify(secret).max_pixels == 1048576

    again = runner.invoke(cli, ["keys", "add", "ALICE"], env=env)
    assert again.exit_code == 2 and "error: name: a key named 'ALICE' exists already" in again.stderr
    assert runner.invoke(cli, ["keys", "limits", "alice", "--max-queued", "1"], env=env).exit_code == 0
    assert runner.invoke(cli, ["keys", "list"], env=env).stdout.strip().endswith("max_queued=1\tmax_pixels=-")

    assert runner.invoke(cli, ["keys", "remove", "alice"], env=env).exit_code == 0
    assert runner.invoke(cli, ["keys", "list"], env=env).stdout == ""
    gone = runner.invoke(cli, ["keys", "remove", "alice"], env=env)
    assert gone.exit_code == 2 and "no key named 'alice'" in gone.stderr


# Runs the CLI in a fresh interpreter, then reports its exit code and which heavy libraries it imported.
_REPORT_IMPORTS = """
import json, sys
from lienzo.cli import main
sys.argv = ["lienzo", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "imported": [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]}))
"""


@pytest.mark.parametrize(("args", "code"), [(["add", "bad name"], 2), (["add", "alice"], 0), (["list"], 0)])
def test_the_keys_command_imports_no_torch(tmp_path, args, code):
    run = subprocess.run(
        [sys.executable, "-c", _REPORT_IMPORTS, json.dumps(["--data-dir", str(tmp_path / "data"), "keys", *args])],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert json.loads(run.stdout.splitlines()[-1]) == {"code": code, "imported": []}, run.stderr


# -- the server -------------------------------------------------------------------------------------


def import_image(client, secret: str | None, color) -> int:
    upload = ("files", ("mine.png", png_bytes(Image.new("RGB", (64, 64), color)), "image/png"))
    response = client.post("/api/v1/gallery/import", files=[upload], headers=bearer(secret) if secret else {})
    assert response.status_code == 200, response.text
    return response.json()["imported"][0]["id"]


def listed(client, secret: str, **params) -> list[int]:
    response = client.get("/api/v1/gallery", params=params, headers=bearer(secret))
    assert response.status_code == 200, response.text
    return sorted(item["id"] for item in response.json()["items"])


@pytest.fixture
def keyed(tmp_path):
    """A server with the admin's --api-key and two named keys, found in the settings' keys.db."""
    settings = settings_in(tmp_path)
    with KeyStore(settings.keys_db) as store:
        secrets = {name: store.add(name) for name in ("alice", "bob")}
    app = create_app(settings, loader=_no_model, auth=Auth(api_key=ADMIN_KEY))
    with TestClient(app) as client:
        yield client, secrets, settings


def test_a_server_with_keys_lets_in_only_keys(keyed):
    client, secrets, _settings = keyed
    refused = client.get("/api/v1/gallery")
    assert refused.status_code == 401 and "authentication required" in refused.json()["detail"]
    assert client.get("/api/v1/gallery", headers=bearer("lz_wrong")).status_code == 401
    assert client.get("/api/v1/gallery", headers={"Authorization": f"Basic {secrets['alice']}"}).status_code == 401
    for secret in (*secrets.values(), ADMIN_KEY):
        assert client.get("/api/v1/gallery", headers=bearer(secret)).status_code == 200


def test_each_key_sees_its_own_images_unless_it_asks(keyed):
    client, secrets, settings = keyed
    alice, bob = secrets["alice"], secrets["bob"]
    a, b = import_image(client, alice, "red"), import_image(client, bob, "blue")
    admins = import_image(client, ADMIN_KEY, "green")

    assert listed(client, alice) == [a] and listed(client, bob) == [b]
    assert listed(client, alice, owner="*") == [a, b, admins]
    assert listed(client, alice, owner="BOB") == [b] and listed(client, bob, owner="admin") == [admins]
    assert listed(client, ADMIN_KEY) == [a, b, admins] and listed(client, ADMIN_KEY, owner="alice") == [a]
    with Gallery.for_settings(settings) as gallery:
        assert [gallery.owner(i) for i in (a, b, admins)] == ["alice", "bob", "admin"]


def test_a_key_changes_only_its_own_images(keyed):
    client, secrets, _settings = keyed
    alice, bob = secrets["alice"], secrets["bob"]
    a, b = import_image(client, alice, "red"), import_image(client, bob, "blue")

    refused = client.delete(f"/api/v1/gallery/{b}", headers=bearer(alice))
    assert refused.status_code == 403 and f"image {b} is bob's" in refused.json()["detail"]
    refused = client.patch(f"/api/v1/gallery/{b}", json={"favourite": True}, headers=bearer(alice))
    assert refused.status_code == 403 and f"image {b}" in refused.json()["detail"]
    assert client.get(f"/api/v1/gallery/{b}", headers=bearer(alice)).json()["favourite"] is False  # looking is allowed

    assert client.patch(f"/api/v1/gallery/{a}", json={"favourite": True}, headers=bearer(alice)).status_code == 200
    assert client.delete(f"/api/v1/gallery/{b}", headers=bearer(bob)).status_code == 204
    assert client.delete(f"/api/v1/gallery/{a}", headers=bearer(ADMIN_KEY)).status_code == 204  # the admin may
    assert listed(client, ADMIN_KEY) == []


def test_a_key_added_or_removed_while_the_server_runs_counts_at_once(keyed):
    client, secrets, settings = keyed
    assert client.get("/api/v1/gallery", headers=bearer(secrets["alice"])).status_code == 200
    with KeyStore(settings.keys_db) as cli_store:  # as `lienzo keys add` would, from another process
        carol = cli_store.add("carol")
        mine = import_image(client, carol, "white")
        assert listed(client, carol) == [mine]
        cli_store.remove("alice")
    assert client.get("/api/v1/gallery", headers=bearer(secrets["alice"])).status_code == 401


def test_a_server_without_credentials_is_open_until_a_key_is_added(tmp_path):
    settings = settings_in(tmp_path)
    with KeyStore(settings.keys_db) as store, TestClient(create_app(settings, loader=_no_model, keys=store)) as client:
        anyone = import_image(client, None, "red")  # anonymous: an admin, owning nothing
        assert listed(client, "whatever") == [anyone]
        assert client.delete(f"/api/v1/gallery/{anyone}").status_code == 204
        secret = store.add("alice")
        assert client.get("/api/v1/gallery").status_code == 401
        assert listed(client, secret) == []


def test_serve_counts_named_keys_as_authentication(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(serve_command, "_run_server", lambda config, *_, **__: started.append(config.host))
    monkeypatch.setattr(serve_command, "setup_logging", lambda *_: None, raising=False)  # leave this process's logging be
    runner, env = CliRunner(), {"LIENZO_DATA_DIR": str(tmp_path / "data"), "LIENZO_AUTH": None, "LIENZO_API_KEY": None}
    refused = runner.invoke(cli, ["serve", "--listen"], env=env)
    assert refused.exit_code == 2 and "refusing to listen on 0.0.0.0 without authentication" in refused.stderr
    assert started == []
    with KeyStore(tmp_path / "data" / "keys.db") as store:
        store.add("alice")
    assert runner.invoke(cli, ["serve", "--listen"], env=env).exit_code == 0 and started == ["0.0.0.0"]


# -- the gallery's owners ----------------------------------------------------------------------------


def test_a_gallery_from_before_owners_is_migrated(tmp_path, monkeypatch):
    db, out = tmp_path / "gallery.db", tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (64, 64)).save(out / "old.png")
    with monkeypatch.context() as m:
        m.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])  # the schema before owners
        Gallery(db, out, thumbs_dir=tmp_path / "thumbs").close()
    with sqlite3.connect(db) as conn:  # a row as that lienzo wrote it
        conn.row_factory = sqlite3.Row
        old_id = conn.execute(
            "INSERT INTO images (path, created, source, width, height, size_bytes) VALUES (?, ?, 'cli', 64, 64, ?) RETURNING id",
            (str((out / "old.png").resolve()), time.time(), (out / "old.png").stat().st_size),
        ).fetchone()[0]
        assert "owner" not in [row[1] for row in conn.execute("PRAGMA table_info(images)")]
    conn.close()
    with Gallery(db, out, thumbs_dir=tmp_path / "thumbs") as gallery:
        assert gallery.owner(old_id) is None
        assert gallery.search(owner="alice").items == [] and [i.id for i in gallery.search().items] == [old_id]
        Image.new("RGB", (64, 64)).save(out / "new.png")
        new_id = gallery.add(out / "new.png", read_meta(out / "new.png"), source="native", owner="alice")
        assert [i.id for i in gallery.search(owner="ALICE").items] == [new_id]
        assert [i.id for i in gallery.search().items] == [new_id, old_id]
        with pytest.raises(NotFoundError):
            gallery.owner(new_id + 100)


def test_a_saved_image_records_its_owner(tmp_path):
    import numpy as np

    from lienzo.generation.engine import GeneratedImage
    from lienzo.images.provenance import ModelInfo, Provenance
    from lienzo.outputs import save_generated

    provenance = Provenance(ModelInfo("tiny", "ab" * 32, "abababab12", "sd1"))
    with Gallery(tmp_path / "gallery.db", tmp_path / "out", thumbs_dir=tmp_path / "thumbs") as gallery:
        ids = []
        for owner in ("alice", None):
            generated = GeneratedImage(Image.new("RGB", (32, 32)), 5, "a fox\nSteps: 1, Seed: 5", {}, np.zeros((32, 32, 3), np.float32))
            saved = save_generated(generated, tmp_path / "out", provenance, watermark=False, gallery=gallery, source="native", owner=owner)
            ids.append(saved.gallery_id)
        assert [gallery.owner(i) for i in ids] == ["alice", None]
        assert [i.id for i in gallery.search("fox", owner="alice").items] == ids[:1]
