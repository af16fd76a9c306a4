"""Content Credentials: every saved image carries a signed C2PA manifest that c2pa validates, that
breaks when a pixel or a metadata byte changes, that names an img2img input (and its own manifest) as
its ingredient; signing can be turned off, and a signing failure saves the image unsigned, saying why."""

import io
import json
import logging
import struct
import zlib
from pathlib import Path

import c2pa
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lienzo import __version__
from lienzo.cli import app
from lienzo.generation.engine import GeneratedImage
from lienzo.generation.request import build_request
from lienzo.images import credentials
from lienzo.images.credentials import (
    GENERATION_LABEL,
    SELF_MADE_NAME,
    TAMPERED,
    UNRECOGNISED,
    UNSIGNED,
    Signing,
    make_identity,
    read_credentials,
    self_signed_chain,
)
from lienzo.images.io import SOURCE_KEY, decode_image, load_image
from lienzo.images.watermark import detect, payload_for
from lienzo.images.provenance import DIGITAL_SOURCE_TYPE, LoraInfo, ModelInfo, Provenance, TrainingData, read_provenance
from lienzo.outputs import save_generated, signing_for
from lienzo.settings import Settings

PROVENANCE = Provenance(
    ModelInfo("tiny", "ab" * 32, "abababab12", "sd1"),
    (LoraInfo("film", 0.6, "cd" * 32),),
    TrainingData("ef" * 32, "CC BY-SA 4.0", "my photos", 12),
)
INFOTEXT = 'a fox\nSteps: 2, Sampler: Euler, Seed: 7, Size: 64x64, ControlNet 0: "Module: canny, Model: cn", TI hashes: "emb: 0123456789ab"'


def _generated(seed=7, colour=(200, 80, 30)) -> GeneratedImage:
    picture = Image.new("RGB", (64, 64), colour)
    return GeneratedImage(picture, seed, INFOTEXT, {}, np.asarray(picture, dtype=np.float32) / 255)


def _save(tmp_path, signing, **kwargs):
    return save_generated(_generated(), tmp_path / "out", PROVENANCE, watermark=False, signing=signing, **kwargs)


@pytest.fixture(scope="module")
def signing(tmp_path_factory):
    """lienzo's own identity, made once for the module (making a key pair is the slow part)."""
    return Signing(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def signed(tmp_path_factory, signing) -> Path:
    return _save(tmp_path_factory.mktemp("signed"), signing).path


def _chunks(data: bytes):
    """(offset, type, length) of each PNG chunk."""
    offset = 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        yield offset, data[offset + 4:offset + 8], length
        offset += 12 + length


def _flip(data: bytes, chunk_type: bytes, keyword: bytes | None = None) -> bytes:
    """``data`` with one bit flipped in the middle of a chunk's data (the first of ``chunk_type``, or
    the one whose text starts with ``keyword``) and its CRC fixed, so the PNG still reads as whole."""
    for offset, kind, length in _chunks(data):
        body = data[offset + 8:offset + 8 + length]
        if kind == chunk_type and (keyword is None or body.startswith(keyword + b"\0")):
            changed = bytearray(data)
            changed[offset + 8 + length - 2] ^= 1
            crc = zlib.crc32(bytes(changed[offset + 4:offset + 8 + length]))
            changed[offset + 8 + length:offset + 12 + length] = struct.pack(">I", crc)
            return bytes(changed)
    raise AssertionError(f"no {chunk_type} chunk")


def test_saved_image_carries_a_manifest_that_validates(signed, signing):
    found = read_credentials(signed)
    # Intact; lienzo's self-made certificate is on no trust list, which is all that fails.
    assert found.state == UNRECOGNISED and found.failures == ("signingCredential.untrusted",)
    assert found.generator == f"lienzo/{__version__}" and found.by_lienzo
    assert found.signer == SELF_MADE_NAME
    (created,) = found.actions
    assert created["action"] == "c2pa.created" and created["digitalSourceType"] == DIGITAL_SOURCE_TYPE
    assert created["softwareAgent"] == {"name": "lienzo", "version": __version__}
    generation = found.generation
    assert generation["model"] == {"name": "tiny", "sha256": "ab" * 32, "short_hash": "abababab12", "family": "sd1"}
    assert generation["training_data"]["manifest_sha256"] == "ef" * 32 and generation["training_data"]["licence"] == "CC BY-SA 4.0"
    assert generation["loras"][0]["name"] == "film" and generation["loras"][0]["sha256"] == "cd" * 32
    assert generation["controlnets"] == ["Module: canny, Model: cn"] and generation["embeddings"] == "emb: 0123456789ab"
    assert (generation["seed"], generation["steps"], generation["sampler"]) == ("7", "2", "Euler")
    assert found.ingredients == ()
    # The record inside the (signed) file says it is signed; the key is the owner's alone.
    assert read_provenance(signed).credentials.signed is True
    assert (signing.data_dir / "credentials" / "key.pem").stat().st_mode & 0o777 == 0o600
    assert json.loads(json.dumps(found.to_dict()))["assertions"][GENERATION_LABEL]["seed"] == "7"


def test_the_signer_is_made_once_and_kept(tmp_path):
    folder = tmp_path / "credentials"
    make_identity(folder)
    first = (folder / "chain.pem").read_bytes()
    make_identity(folder)  # a second process that lost the race keeps the first's identity
    assert (folder / "chain.pem").read_bytes() == first
    assert Signing(tmp_path).identity().chain == first
    assert [p.name for p in tmp_path.iterdir()] == ["credentials"]  # no temporary folder left


def test_one_changed_pixel_is_tampering(signed):
    data = signed.read_bytes()
    found = read_credentials(_flip(data, b"IDAT"))
    assert found.state == TAMPERED and "assertion.dataHash.mismatch" in found.failures


def test_one_changed_metadata_byte_is_tampering(signed):
    """The hash binds the whole file but the manifest: the infotext chunk too."""
    found = read_credentials(_flip(signed.read_bytes(), b"tEXt", keyword=b"parameters"))
    assert found.state == TAMPERED and "assertion.dataHash.mismatch" in found.failures


def test_img2img_chain_names_each_input_with_its_own_manifest(tmp_path, signed, signing):
    """A (signed) is the input of B, B of C: C's ingredient is B, whose ingredient is A, each valid."""
    a_input = load_image(signed)
    assert a_input.info[SOURCE_KEY] == signed.read_bytes()
    b = save_generated(_generated(8), tmp_path / "b", PROVENANCE, watermark=False, signing=signing, parent=a_input, mode="img2img")
    c = save_generated(_generated(9), tmp_path / "c", PROVENANCE, watermark=False, signing=signing, parent=load_image(b.path), mode="inpaint")
    found = read_credentials(c.path)
    assert found.state == UNRECOGNISED
    assert [a["action"] for a in found.actions] == ["c2pa.opened", "c2pa.edited"]
    assert found.actions[1]["digitalSourceType"].endswith("/compositeWithTrainedAlgorithmicMedia")  # inpainting mixes
    (b_ingredient,) = found.ingredients
    assert (b_ingredient.relationship, b_ingredient.state) == ("parentOf", UNRECOGNISED)
    assert b_ingredient.manifest.actions[1]["digitalSourceType"] == DIGITAL_SOURCE_TYPE
    (a_ingredient,) = b_ingredient.manifest.ingredients
    assert a_ingredient.state == UNRECOGNISED and a_ingredient.manifest.actions[0]["action"] == "c2pa.created"
    assert a_ingredient.manifest.ingredients == ()


def test_an_input_without_credentials_is_an_unsigned_ingredient(tmp_path, signing):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (32, 32), "teal").save(plain)
    parent = load_image(plain)
    assert SOURCE_KEY not in parent.info  # its bytes are not kept: nothing to keep them for
    found = read_credentials(_save(tmp_path, signing, parent=parent, mode="img2img").path)
    (ingredient,) = found.ingredients
    assert (ingredient.relationship, ingredient.state, ingredient.manifest) == ("parentOf", UNSIGNED, None)


def test_uploaded_inputs_keep_their_bytes_only_when_they_hold_a_manifest(signed):
    data = signed.read_bytes()
    assert decode_image(data, max_pixels=10**6).info[SOURCE_KEY] == data
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    assert SOURCE_KEY not in decode_image(buffer.getvalue(), max_pixels=10**6).info


def test_users_own_certificate_from_the_environment(tmp_path, monkeypatch):
    chain, key = self_signed_chain("Jane Doe, Illustrator")
    (tmp_path / "chain.pem").write_bytes(chain)
    (tmp_path / "key.pem").write_bytes(key)
    monkeypatch.setenv("LIENZO_C2PA_CERT", str(tmp_path / "chain.pem"))
    monkeypatch.setenv("LIENZO_C2PA_KEY", str(tmp_path / "key.pem"))
    settings = Settings(data_dir=tmp_path / "data")
    saved = _save(tmp_path, signing_for(build_request(prompt="a fox"), settings))
    assert read_credentials(saved.path).signer == "Jane Doe, Illustrator"
    assert not (tmp_path / "data" / "credentials").exists()  # no identity of lienzo's own was made


@pytest.mark.parametrize(("setting", "requested", "signs"), [("true", None, True), ("false", None, False), ("false", True, True), ("true", False, False)])
def test_credentials_follow_the_request_then_the_setting(tmp_path, monkeypatch, setting, requested, signs):
    monkeypatch.setenv("LIENZO_CREDENTIALS", setting)
    signing = signing_for(build_request(prompt="a fox", credentials=requested), Settings(data_dir=tmp_path))
    assert (signing is not None) is signs


def test_credentials_off_saves_unsigned_and_says_so(tmp_path):
    saved = _save(tmp_path, None)
    assert read_credentials(saved.path) is None and not saved.signed
    assert read_provenance(saved.path).credentials.note.startswith("turned off")


@pytest.mark.parametrize(("broken", "why"), [
    ("key", "not an unencrypted PEM private key"),
    ("cert only", "LIENZO_C2PA_CERT is set but LIENZO_C2PA_KEY is not"),
    ("data dir is a file", "cannot make lienzo's signing key"),
])
def test_a_signing_failure_saves_the_image_unsigned_and_says_why(tmp_path, caplog, broken, why):
    (tmp_path / "chain.pem").write_bytes(self_signed_chain("someone")[0])
    (tmp_path / "key.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    signing = {
        "key": Signing(tmp_path, tmp_path / "chain.pem", tmp_path / "key.pem"),
        "cert only": Signing(tmp_path, tmp_path / "chain.pem"),
        "data dir is a file": Signing(tmp_path / "key.pem"),
    }[broken]
    with caplog.at_level(logging.WARNING, logger="lienzo.outputs"):
        saved = _save(tmp_path, signing)
    assert read_credentials(saved.path) is None
    note = read_provenance(saved.path).credentials.note
    assert note.startswith("not signed: ") and why in note
    assert note.removeprefix("not signed: ") in caplog.text
    with Image.open(saved.path) as image:
        assert image.getpixel((0, 0)) == (200, 80, 30)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [saved.path.name]  # no temporary file left


def test_a_manifest_made_by_another_tool_is_read(tmp_path):
    """Another tool's JPEG: its generator and actions are read; it is not lienzo's."""
    chain, key = self_signed_chain("Example Camera Co")
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain, key, None))
    manifest = {"claim_generator_info": [{"name": "othertool", "version": "2.0"}],
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [{"action": "c2pa.created", "digitalSourceType": "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"}]}}]}
    source, out = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (32, 32), "navy").save(source, format="JPEG")
    source.seek(0)
    with signer, c2pa.Builder(manifest) as builder:
        builder.sign(signer, "image/jpeg", source, out)
    found = read_credentials(out.getvalue())
    assert (found.state, found.generator, found.signer, found.by_lienzo) == (UNRECOGNISED, "othertool/2.0", "Example Camera Co", False)
    assert found.digital_source_type.endswith("/digitalCapture") and found.generation is None


@pytest.mark.parametrize(("overall", "failures", "state"), [
    ("Trusted", (), "valid"),
    ("Valid", (), "valid"),
    ("Valid", ("signingCredential.untrusted",), UNRECOGNISED),
    ("Invalid", ("signingCredential.untrusted", "assertion.dataHash.mismatch"), TAMPERED),
    ("Invalid", ("claimSignature.mismatch",), TAMPERED),
    ("Invalid", ("signingCredential.expired",), "invalid"),
    ("Valid", ("signingCredential.untrusted", "signingCredential.revoked"), "invalid"),
])
def test_validation_codes_in_a_users_words(overall, failures, state):
    assert credentials._state(overall, failures) == state


def test_verify_and_info_show_credentials_and_fail_on_tampering(tmp_path, signed):
    tampered = tmp_path / "tampered.png"
    tampered.write_bytes(_flip(signed.read_bytes(), b"IDAT"))
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    runner = CliRunner()

    result = runner.invoke(app, ["verify", str(signed), str(plain)])
    assert result.exit_code == 0, result.output
    good, unsigned = result.stdout.splitlines()
    assert good == f"{signed}: unrecognised signer; signer {SELF_MADE_NAME}; generator lienzo/{__version__}"
    assert unsigned == f"{plain}: unsigned"
    assert "no certificate authority vouches for it" in result.stderr  # what "unrecognised" means here

    result = runner.invoke(app, ["verify", "--json", str(signed), str(tampered)])
    assert result.exit_code == 1
    states = [json.loads(line)["state"] for line in result.stdout.splitlines()]
    assert states == [UNRECOGNISED, TAMPERED]
    assert runner.invoke(app, ["verify", str(tmp_path / "missing.png")]).exit_code == 1

    result = runner.invoke(app, ["info", str(signed)])
    assert result.exit_code == 0, result.output
    assert "Content Credentials:\n  State: intact, signer unrecognised" in result.stdout
    assert "Content Credentials when saved: yes" in result.stdout and "no timestamp authority" in result.stdout
    assert "made itself" in result.stdout  # the note that verifiers call the self-made signer unrecognised


SMALL = ["--steps", "1", "--width", "64", "--height", "64", "--seed", "5", "--sampler", "Euler"]


def _path(result) -> str:
    return next(line for line in result.stdout.splitlines() if line.endswith(".png"))


def test_cli_signs_names_an_img2img_input_and_turns_off(lienzo, home):
    """Through the real CLI and tiny model: signed by default with lienzo's own identity in the data
    dir, the img2img input (a signed file) kept as the ingredient, ``--no-credentials`` unsigned."""
    first = _path(lienzo("generate", "a red apple", *SMALL))
    second = _path(lienzo("img2img", first, "a green apple", "--strength", "0.5", *SMALL))
    found = read_credentials(second)
    assert found.state == UNRECOGNISED and found.generation["model"]["family"] == "sd1"
    (ingredient,) = found.ingredients
    assert ingredient.state == UNRECOGNISED and ingredient.manifest.actions[0]["action"] == "c2pa.created"
    assert (home / "data" / "credentials" / "chain.pem").is_file()
    off = _path(lienzo("generate", "a red apple", *SMALL, "--no-credentials"))
    assert read_credentials(off) is None and read_provenance(off).credentials.note.startswith("turned off")


def test_the_watermark_payload_is_the_manifests_soft_binding(tmp_path, signing):
    """The mark carries the image's own id; the record and the manifest's soft binding name the same id."""
    rng = np.random.default_rng(3)
    coarse = Image.fromarray(rng.integers(30, 225, (8, 8, 3), dtype=np.uint8)).resize((512, 512), Image.BICUBIC)
    picture = Image.fromarray(np.clip(np.asarray(coarse) + rng.normal(0, 20, (512, 512, 3)), 0, 255).astype(np.uint8))
    generated = GeneratedImage(picture, 3, INFOTEXT, {}, np.asarray(picture, dtype=np.float32) / 255)
    saved = save_generated(generated, tmp_path, PROVENANCE, watermark=True, signing=signing)
    assert saved.watermarked and saved.record.watermark.payload == payload_for(picture).hex()
    found = read_credentials(saved.path)
    assert found.watermark_id == saved.record.watermark.payload
    with Image.open(saved.path) as image:
        assert detect(image).payload.hex() == found.watermark_id


def test_a_web_copy_is_known_by_its_watermark_and_led_back_to_its_credentials(lienzo, tmp_path):
    """The issue's "done when": a picture re-saved as JPEG at quality 75 and shrunk to half is still lienzo's for
    ``lienzo info`` (the watermark's id), which names the original, whose credentials are intact."""
    lienzo("generate", "a lighthouse at dusk", "--model", "tiny-sd15", "--width", "512", "--height", "512", "--steps", "1", "--seed", "5")
    original = next((tmp_path / "out").rglob("*.png"))
    copy = tmp_path / "copy.jpg"
    with Image.open(original) as image:
        image.convert("RGB").resize((256, 256), Image.Resampling.LANCZOS).save(copy, quality=75, subsampling=2)
    shown = lienzo("info", str(copy)).output
    assert "Watermark: detected" in shown
    assert "Made by lienzo: gallery image" in shown and str(original) in shown
    assert "(Content Credentials: intact, signer unrecognised" in shown
    assert "Content Credentials: unsigned" in shown  # the copy itself has none
