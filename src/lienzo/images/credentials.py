"""Content Credentials: a signed C2PA manifest in every image lienzo saves, and reading anyone's.

The manifest says, in the standard verifiers read (Adobe's Content Credentials, c2patool, platforms),
what lienzo's own provenance record says in its own format: a ``c2pa.created`` action with IPTC's
``trainedAlgorithmicMedia``, lienzo as the claim generator, and an ``org.lienzo.generation`` assertion
naming the model, its training data, the LoRAs, ControlNets and embeddings, seed, steps and sampler.
An img2img/inpaint/outpaint input is a ``parentOf`` ingredient, with its own manifest when it had one.
When the pixels carry lienzo's watermark, its payload (the image's id) is a ``c2pa.soft-binding``
assertion: a copy stripped of its metadata can be matched to the manifest through the mark.

Everything of the manifest format (JUMBF, COSE signatures, hash bindings, validation) is c2pa-python's
(the C2PA reference implementation, c2pa-rs); ``cryptography`` makes the keys. This module only decides
what goes into the manifest and what a validation result means for a user.

Signer: the user's own certificate chain and key (``LIENZO_C2PA_CERT`` / ``LIENZO_C2PA_KEY``, PEM), or one
lienzo makes on first use in ``<data_dir>/credentials/``: an ES256 (P-256) key and a two-link chain, a
small root CA and an end-entity certificate it signed, because c2pa refuses to sign with a bare
self-signed end-entity certificate. No certificate authority vouches for that root, so every verifier
reports the signer as unrecognised: the manifest is intact and says who made the image, but not
provably. There is no timestamp authority (lienzo works offline): the signature carries no trusted time.
"""

import base64
import io
import json
import os
import secrets
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import c2pa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image

from lienzo import __version__
from lienzo.errors import LienzoError
from lienzo.images.io import SOURCE_KEY
from lienzo.images.provenance import DIGITAL_SOURCE_TYPE, ProvenanceRecord, WatermarkInfo

GENERATION_LABEL = "org.lienzo.generation"
SOFT_BINDING_ALG = "org.lienzo.watermark"
# IPTC's term for a picture that mixes AI-generated parts into another (inpainting, outpainting).
COMPOSITE_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
SELF_MADE_NAME = "lienzo (self-made signer)"  # the common name of the certificate lienzo makes
SELF_MADE_NOTE = (
    "signed with a certificate a lienzo install made itself: no certificate authority vouches for it, so "
    "verifiers (lienzo, c2patool, Content Credentials sites) call the signer unrecognised; set LIENZO_C2PA_CERT "
    "and LIENZO_C2PA_KEY to sign with your own"
)
NO_TIMESTAMP_NOTE = "no timestamp authority (lienzo signs offline): the signing time is not certified"
FOLDER = "credentials"  # in the data dir
CHAIN_FILE, KEY_FILE = "chain.pem", "key.pem"
# c2pa's default thumbnail of the image (and of each ingredient) is a JPEG up to 1024 px: 200 KB and 0.1 s
# on a 512² picture; 256 px is what verifiers show in a list, 13 KB and 15 ms.
_SETTINGS = {"builder": {"thumbnail": {"long_edge": 256}}}

VALID, TAMPERED, UNSIGNED, UNRECOGNISED, INVALID = "valid", "tampered", "unsigned", "unrecognised signer", "invalid"
_UNTRUSTED = "signingCredential.untrusted"
_JPEG, _WEBP = b"\xff\xd8\xff", b"RIFF"


class CredentialsError(LienzoError):
    """A signing identity cannot be made or read, or an image cannot be signed."""


# --- The signer -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """A PEM certificate chain (end-entity first) and its private key."""

    chain: bytes = field(repr=False)
    key: bytes = field(repr=False)


@dataclass(frozen=True)
class Signing:
    """Where the signing identity comes from: the user's files, else lienzo's own in ``data_dir``.
    Read when an image is signed, so a broken file costs that image its credentials, never the image."""

    data_dir: Path
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def from_settings(cls, settings) -> "Signing":
        return cls(settings.data_dir, settings.c2pa_cert, settings.c2pa_key)

    def identity(self) -> Identity:
        if (self.cert is None) != (self.key is None):
            given, missing = ("LIENZO_C2PA_CERT", "LIENZO_C2PA_KEY") if self.cert else ("LIENZO_C2PA_KEY", "LIENZO_C2PA_CERT")
            raise CredentialsError(f"{given} is set but {missing} is not: give both (PEM certificate chain and PEM key)")
        if self.cert is not None:
            return Identity(_read(self.cert, "LIENZO_C2PA_CERT"), _read(self.key, "LIENZO_C2PA_KEY"))
        folder = self.data_dir / FOLDER
        if not (folder / CHAIN_FILE).exists():
            try:
                make_identity(folder)
            except OSError as err:
                raise CredentialsError(f"cannot make lienzo's signing key in {folder}: {err.strerror or err}") from None
        return Identity(_read(folder / CHAIN_FILE, "credentials"), _read(folder / KEY_FILE, "credentials"))


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise CredentialsError(f"{what}: cannot read {path}: {err.strerror or err}") from None


def make_identity(folder: Path, common_name: str = SELF_MADE_NAME) -> None:
    """Make an ES256 key and a root CA + end-entity certificate chain in ``folder`` (key file 0600).

    Built in a temporary folder renamed into place, so two processes making it at once end with one
    whole identity (the loser's rename fails and its folder is dropped), never a key beside another's chain.
    """
    chain, key = self_signed_chain(common_name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = folder.parent / f".{folder.name}.{secrets.token_hex(6)}.tmp"
    temp.mkdir(mode=0o700)
    try:
        (temp / CHAIN_FILE).write_bytes(chain)
        with os.fdopen(os.open(temp / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
            file.write(key)
        try:
            os.rename(temp, folder)  # replaces only a missing or empty folder
        except OSError:
            if not (folder / CHAIN_FILE).exists():
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def self_signed_chain(common_name: str, days: int = 3650) -> tuple[bytes, bytes]:
    """(PEM chain, PEM PKCS#8 key): an end-entity certificate for ``common_name`` signed by a root made
    for it. C2PA's profile wants the end entity not a CA, with digitalSignature key usage and the
    emailProtection extended key usage; c2pa refuses a self-signed end entity, hence the root."""
    now = datetime.now(UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lienzo (self-made)")])

    def usage(*, sign: bool, ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=sign, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
        )

    def certificate(subject, issuer, public, signing_key, *extensions) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signing_key, hashes.SHA256())

    root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root_name = name(f"{common_name} (root)")
    root = certificate(
        root_name, root_name, root_key.public_key(), root_key,
        (x509.BasicConstraints(ca=True, path_length=0), True), (usage(sign=False, ca=True), True),
    )
    leaf = certificate(
        name(common_name), root_name, key.public_key(), root_key,
        (x509.BasicConstraints(ca=False, path_length=None), True), (usage(sign=True, ca=False), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False),
    )
    pem = serialization.Encoding.PEM
    chain = leaf.public_bytes(pem) + root.public_bytes(pem)
    return chain, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _algorithm(key_pem: bytes) -> c2pa.C2paSigningAlg:
    """The C2PA algorithm for a key: the user's may be another curve, RSA (PSS) or Ed25519."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise CredentialsError(f"the signing key is not an unencrypted PEM private key ({err})") from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        curves = {"secp256r1": c2pa.C2paSigningAlg.ES256, "secp384r1": c2pa.C2paSigningAlg.ES384, "secp521r1": c2pa.C2paSigningAlg.ES512}
        if key.curve.name in curves:
            return curves[key.curve.name]
    elif isinstance(key, rsa.RSAPrivateKey):
        return c2pa.C2paSigningAlg.PS256
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        return c2pa.C2paSigningAlg.ED25519
    raise CredentialsError("the signing key's type is not one C2PA signs with (EC P-256/384/521, RSA or Ed25519)")


# --- Signing --------------------------------------------------------------------------------------

def manifest_for(record: ProvenanceRecord, params: dict[str, str], *, mode: str | None, title: str, edit: bool) -> dict:
    """The manifest definition for one generated image: its actions and lienzo's generation assertion,
    from the provenance record and the infotext's ``params`` (parsed, as A1111 keys). ``edit``: it was
    made from an input image, the ingredient labelled "input" (``c2pa.opened`` then ``c2pa.edited``)."""
    agent = {"name": "lienzo", "version": __version__}
    if edit:
        source_type = COMPOSITE_SOURCE_TYPE if mode in ("inpaint", "outpaint") else DIGITAL_SOURCE_TYPE
        actions = [
            {"action": "c2pa.opened", "softwareAgent": agent, "parameters": {"ingredientIds": ["input"]}},
            {"action": "c2pa.edited", "softwareAgent": agent, "digitalSourceType": source_type, "description": f"lienzo {mode or 'edit'}"},
        ]
    else:
        actions = [{"action": "c2pa.created", "softwareAgent": agent, "digitalSourceType": DIGITAL_SOURCE_TYPE}]
    assertions = [
        {"label": "c2pa.actions", "data": {"actions": actions}},
        {"label": GENERATION_LABEL, "data": generation_assertion(record, params, mode)},
    ]
    if record.watermark.embedded:
        assertions.append({"label": "c2pa.soft-binding", "data": soft_binding(record.watermark)})
    return {"claim_generator_info": [agent], "title": title, "format": "image/png", "assertions": assertions}


def soft_binding(mark: WatermarkInfo) -> dict:
    """The ``c2pa.soft-binding`` assertion for the watermark's payload: the id a verifier reads from the
    pixels of a copy without metadata to find this manifest again. ``alg`` is lienzo's own name: the
    watermark is not one of C2PA's registered soft-binding algorithms."""
    try:
        payload = bytes.fromhex(mark.payload)
    except ValueError:  # a fixed text tag rather than an image's hex id
        payload = mark.payload.encode()
    return {"alg": f"{SOFT_BINDING_ALG}.{mark.method}", "blocks": [{"scope": {}, "value": base64.b64encode(payload).decode()}]}


def generation_assertion(record: ProvenanceRecord, params: dict[str, str], mode: str | None) -> dict:
    """What made the image, as the provenance record and infotext state it (values as the infotext
    writes them). The prompt stays in the infotext (bound by the manifest's hash) and out of here."""
    provenance = record.provenance
    data = {
        "ai_generated": record.ai_generated,
        "statement": record.statement,
        "generator": record.generator,
        "created": record.created.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "mode": mode,
        "model": asdict(provenance.model),
        "training_data": asdict(provenance.training_data) if provenance.training_data else None,
        "loras": [asdict(lora) for lora in provenance.loras],
        "controlnets": [value for key, value in params.items() if key.startswith("ControlNet ") and key[11:].isdigit()],
        "embeddings": params.get("TI hashes"),
        "seed": params.get("Seed"),
        "steps": params.get("Steps"),
        "sampler": params.get("Sampler"),
        "schedule_type": params.get("Schedule type"),
        "cfg_scale": params.get("CFG scale"),
        "size": params.get("Size"),
        "watermark": asdict(record.watermark),
    }
    return {key: value for key, value in data.items() if value not in (None, [])}


def sign_png(png: bytes, manifest: dict, identity: Identity, parent: Image.Image | None = None) -> bytes:
    """``png`` with ``manifest`` signed into it (a ``caBX`` chunk whose hash covers every other byte);
    ``parent`` (an input image) becomes its "input" ingredient. Any failure is a ``CredentialsError``."""
    try:
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(_algorithm(identity.key), identity.chain, identity.key, None))
        context = c2pa.Context(c2pa.Settings.from_dict(_SETTINGS))
        with signer, context, c2pa.Builder(manifest, context) as builder:
            if parent is not None:
                data, mime = _ingredient_bytes(parent)
                builder.add_ingredient({"title": "input image", "relationship": "parentOf", "label": "input"}, mime, io.BytesIO(data))
            out = io.BytesIO()
            builder.sign(signer, "image/png", io.BytesIO(png), out)
            return out.getvalue()
    except (c2pa.C2paError, ValueError) as err:  # c2pa-python checks its arguments with ValueError
        raise CredentialsError(f"C2PA signing failed: {err}") from None


def _ingredient_bytes(image: Image.Image) -> tuple[bytes, str]:
    """The input as its original file when lienzo.images.io kept it (it holds a manifest), else its
    pixels as a PNG (an ingredient with a hash and thumbnail, and no history)."""
    original = image.info.get(SOURCE_KEY)
    if isinstance(original, bytes):
        return original, _mime(original)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"


def _mime(data: bytes) -> str:
    if data.startswith(_JPEG):
        return "image/jpeg"
    if data.startswith(_WEBP) and data[8:12] == b"WEBP":
        return "image/webp"
    return "image/png"


# --- Reading --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IngredientInfo:
    """One ingredient: its title, relationship (``parentOf``, ``componentOf``, ...), the state of its
    own manifest (``unsigned`` when it has none) and that manifest, read as the image's is."""

    title: str
    relationship: str
    state: str
    manifest: "Credentials | None" = None

    def to_dict(self) -> dict:
        return {"title": self.title, "relationship": self.relationship, "state": self.state,
                "manifest": self.manifest.to_dict() if self.manifest else None}


@dataclass(frozen=True)
class Credentials:
    """An image's active C2PA manifest and what its validation means.

    ``state``: ``valid`` (intact, signer on a trust list), ``unrecognised signer`` (intact, signer on
    no trust list: lienzo's self-made certificate gives this), ``tampered`` (the image or manifest
    changed after signing), ``invalid`` (unreadable or otherwise failing validation). An image with
    no manifest has no Credentials (``read_credentials`` gives None; its state is ``unsigned``).
    """

    state: str
    generator: str | None
    signer: str | None
    issuer: str | None
    time: str | None
    actions: tuple[dict, ...]
    assertions: dict
    ingredients: tuple[IngredientInfo, ...]
    failures: tuple[str, ...] = ()  # the validation codes that failed, e.g. "assertion.dataHash.mismatch"

    @property
    def generation(self) -> dict | None:
        """lienzo's generation assertion, when lienzo made it."""
        return self.assertions.get(GENERATION_LABEL)

    @property
    def digital_source_type(self) -> str | None:
        return next((a["digitalSourceType"] for a in self.actions if "digitalSourceType" in a), None)

    @property
    def watermark_id(self) -> str | None:
        """The soft binding's value as hex: the payload lienzo's watermark carries in the pixels, when
        the manifest names one (compare ``detect(image).payload.hex()``)."""
        binding = self.assertions.get("c2pa.soft-binding") or {}
        if not str(binding.get("alg", "")).startswith(SOFT_BINDING_ALG):
            return None
        try:
            return base64.b64decode(binding["blocks"][0]["value"]).hex()
        except (KeyError, IndexError, TypeError, ValueError):
            return None

    @property
    def by_lienzo(self) -> bool:
        return (self.generator or "").split("/")[0] == "lienzo"

    def to_dict(self) -> dict:
        """JSON-able: what the studio's image page and ``lienzo verify --json`` show."""
        return {
            "state": self.state, "generator": self.generator, "signer": self.signer, "issuer": self.issuer,
            "time": self.time, "digital_source_type": self.digital_source_type, "watermark_id": self.watermark_id, "actions": list(self.actions),
            "assertions": self.assertions, "ingredients": [i.to_dict() for i in self.ingredients],
            "failures": list(self.failures),
        }

    def lines(self, indent: str = "") -> list[str]:
        """Readable lines for ``lienzo info``, the ingredient chain nested."""
        lines = [f"{indent}State: {describe_state(self.state)}"]
        if self.state in (TAMPERED, INVALID):
            lines.append(f"{indent}Failed checks: {', '.join(self.failures)}")
        lines.append(f"{indent}Generator: {self.generator or 'not stated'}")
        lines.append(f"{indent}Signer: {self.signer or 'unknown'}" + (f", issued by {self.issuer}" if self.issuer else ""))
        lines.append(f"{indent}Signed at: {self.time}" if self.time else f"{indent}Signed at: no certified time (no timestamp authority)")
        for action in self.actions:
            source = action.get("digitalSourceType")
            lines.append(f"{indent}Action: {action.get('action')}" + (f" ({source.rsplit('/', 1)[-1]})" if source else ""))
        generation = self.generation
        if generation:
            model = generation.get("model", {})
            lines.append(f"{indent}Model: {model.get('name') or 'unnamed'} ({model.get('family')}), sha256 {model.get('sha256') or 'unknown'}")
        for ingredient in self.ingredients:
            lines.append(f"{indent}Ingredient: {ingredient.title} ({ingredient.relationship}), {ingredient.state}")
            if ingredient.manifest is not None:
                lines += ingredient.manifest.lines(indent + "  ")
        return lines


def describe_state(state: str) -> str:
    return {
        VALID: "valid",
        UNRECOGNISED: "intact, signer unrecognised (on no trust list; lienzo's self-made certificate is reported so)",
        TAMPERED: "TAMPERED: the image or its manifest changed after it was signed",
        INVALID: "INVALID: the manifest fails validation",
        UNSIGNED: "unsigned: no Content Credentials",
    }.get(state, state)


def read_credentials(source: str | os.PathLike | bytes) -> Credentials | None:
    """The Content Credentials of an image file (a path or its bytes), validated; None when it holds
    no C2PA manifest. A manifest c2pa cannot parse reads as ``invalid``, not as an error."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        reader = c2pa.Reader.try_create(io.BytesIO(data))
        if reader is None:
            return None
        with reader:
            store = json.loads(reader.json())
            overall = reader.get_validation_state()
    except c2pa.C2paError as err:
        return Credentials(INVALID, None, None, None, None, (), {}, (), failures=(str(err),))
    results = store.get("validation_results") or {}
    failures = tuple(s["code"] for s in (results.get("activeManifest") or {}).get("failure", []))
    if not failures:
        failures = tuple(s["code"] for s in store.get("validation_status") or [])
    manifests = store.get("manifests", {})
    return _credentials(manifests, store.get("active_manifest"), _state(overall, failures), failures)


def _state(overall: str | None, failures: tuple[str, ...]) -> str:
    """c2pa's verdict in a user's words: any hash or signature mismatch is tampering; an untrusted
    signer and nothing else is "unrecognised"; c2pa's "Trusted", or "Valid" with no failure, is valid."""
    if any(code.endswith(".mismatch") for code in failures):
        return TAMPERED
    if overall == "Trusted":
        return VALID
    if overall != "Valid" or set(failures) - {_UNTRUSTED}:
        return INVALID
    return UNRECOGNISED if failures else VALID


def _credentials(manifests: dict, label: str | None, state: str, failures: tuple[str, ...]) -> Credentials:
    manifest = manifests.get(label) or {}
    signature = manifest.get("signature_info") or {}
    actions: list[dict] = []
    assertions: dict = {}
    for assertion in manifest.get("assertions", []):
        if assertion.get("label", "").startswith("c2pa.actions"):
            actions += assertion.get("data", {}).get("actions", [])
        else:
            assertions[assertion.get("label")] = assertion.get("data")
    ingredients = []
    for ingredient in manifest.get("ingredients", []):
        own = ingredient.get("active_manifest")
        codes = tuple(s["code"] for s in ((ingredient.get("validation_results") or {}).get("activeManifest") or {}).get("failure", []))
        codes = codes or tuple(s["code"] for s in ingredient.get("validation_status") or [])
        ingredient_state = _state("Valid", codes) if own else UNSIGNED
        ingredients.append(IngredientInfo(
            ingredient.get("title") or "untitled", ingredient.get("relationship") or "componentOf", ingredient_state,
            _credentials(manifests, own, ingredient_state, codes) if own in manifests else None,
        ))
    return Credentials(
        state, _generator(manifest), signature.get("common_name"), signature.get("issuer"), signature.get("time"),
        tuple(actions), assertions, tuple(ingredients), failures,
    )


def _generator(manifest: dict) -> str | None:
    """``name/version`` of the claim generator (C2PA 2's claim_generator_info, or 1.x's string)."""
    info = manifest.get("claim_generator_info") or []
    if info:
        first = info[0]
        return f"{first.get('name')}/{first['version']}" if first.get("version") else first.get("name")
    return manifest.get("claim_generator")
