"""Typed settings: explicit arguments (CLI flags), then LIENZO_* environment variables, then per-user defaults."""

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import platformdirs
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# What the safety filter does with a flagged image (GenerationRequest.safety uses it too).
SafetyPolicy = Literal["off", "blur", "block"]
# When the VAE works in overlapping tiles: "auto" above AUTO_TILE_PIXELS (lienzo.generation.vae_decode).
VaeTiling = Literal["auto", "on", "off"]


def _data_dir() -> Path:
    return Path(platformdirs.user_data_dir("lienzo", appauthor=False))


_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def parse_allowed_hosts(value: str | list[str]) -> list[str]:
    """``allowed_hosts`` from a comma-separated string or a list: lower-case host names, ``.example.com``
    for a domain and its subdomains, or ``*`` for any name."""
    hosts = []
    for item in value.split(",") if isinstance(value, str) else value:
        host = item.strip().lower()
        if not host:
            continue
        bare = host.removeprefix(".")
        try:
            ipaddress.ip_address(bare.removeprefix("[").removesuffix("]"))
        except ValueError:
            if host != "*" and not _HOST_NAME.fullmatch(bare):
                raise ValueError(
                    f"{item.strip()!r} is not a host name; give names such as studio.example or "
                    ".example.com (a domain and its subdomains), without scheme or port"
                ) from None
        hosts.append(host)
    return hosts


def _is_base_url(value: str) -> bool:
    url = urlsplit(value)
    try:
        url.port  # reading it raises ValueError where the port is not a number
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.hostname) and not url.query and not url.fragment


def parse_public_url(value: str) -> str:
    """``public_url`` without its trailing slash, once it is an http(s) base URL."""
    if not _is_base_url(value.strip()):
        raise ValueError(
            f"{value!r} is not a base URL; give the address clients reach lienzo at, such as "
            "https://studio.example or http://192.168.1.5:7860"
        )
    return value.strip().rstrip("/")


class Settings(BaseSettings):
    """Where lienzo keeps things. ``models_dir`` and ``outputs_dir`` default to folders inside ``data_dir``."""

    model_config = SettingsConfigDict(env_prefix="LIENZO_", extra="ignore")

    data_dir: Path = Field(default_factory=_data_dir)
    models_dir: Path | None = None
    outputs_dir: Path | None = None
    default_model: str | None = None  # a name or path; unset: the model lienzo ships
    device: str = "auto"
    dtype: str = "auto"  # auto: fp16 on GPUs; bf16 on CPUs that compute it natively, else fp32
    vae_dtype: str = "auto"  # auto: the model's dtype, but fp32 beside fp16 unless the VAE's config allows fp16

    # Speed and memory (README "Speed"); every switch can be compared on its own.
    threads: int | None = Field(None, ge=1)  # CPU threads; unset: torch's default (one per physical core)
    channels_last: bool | None = None  # NHWC memory layout for the U-Net and VAE; unset: on for CUDA and the CPU
    compile: bool = False  # torch.compile the U-Net and VAE decoder (slow first image, cached in cache_dir)
    int8: bool = False  # CPU: the U-Net's linear layers in int8 (faster, agrees less with fp32)
    fp8: bool = False  # the network's and T5's weights stored in fp8, cast up layer by layer (half bf16's memory)
    vae_tiling: VaeTiling = "auto"
    low_vram: bool = False  # VAE tiling and, on CUDA, CPU offload of the U-Net and text encoders
    free_text_encoders: bool = False  # text encoders in CPU memory, on the network's device only to encode uncached texts
    prompt_cache_mb: float = Field(64, ge=0)  # prompt embeddings each loaded model keeps across jobs (LRU); 0: none
    attention_slicing: bool | None = None  # unset: with low_vram where fused attention is missing (not CPU/CUDA)
    watermark: bool = True  # invisible watermark in every saved image; a request may turn it off
    credentials: bool = True  # a signed C2PA manifest (Content Credentials) in every saved image; a request may turn it off
    c2pa_cert: Path | None = None  # PEM certificate chain to sign with (LIENZO_C2PA_CERT); unset: lienzo's own, made in data_dir
    c2pa_key: Path | None = None  # its PEM private key (LIENZO_C2PA_KEY)
    safety_cli: SafetyPolicy = "off"  # safety filter policy when a request gives none, per front door
    safety_server: SafetyPolicy = "blur"

    # Limits on one request at every front door (CLI, Python API, server; lienzo.generation.limits), and on
    # what the server accepts; each refusal names its limit. GenerationRequest's own ranges stay the ceiling.
    max_pixels: int = Field(2048 * 2048, ge=64 * 64)  # width x height of one output image
    max_steps: int = Field(150, ge=1)
    max_images: int = Field(16, ge=1)  # batch_size x batch_count of one request
    max_body_mb: float = Field(64, gt=0)  # a 4096x4096 PNG in base64 is ~45 MB
    max_input_pixels: int = Field(4096 * 4096, ge=64 * 64)  # an input image or mask (uploaded or a file), checked before it is decoded
    max_queue: int = Field(64, ge=1)  # jobs waiting, not counting the running one
    preview_every: int = Field(2, ge=1)  # denoising steps between live previews
    keep_jobs: int = Field(500, ge=1)  # finished jobs the server keeps in memory; the job history (jobs.db) keeps all
    models_per_worker: int = Field(1, ge=1)  # loaded models each server worker keeps (LRU); SDXL alone is ~7 GB

    # Who may use lienzo serve from a browser (README "Serve it"). Host names it answers to besides
    # localhost, IP addresses and this machine's name; LIENZO_ALLOWED_HOSTS is comma-separated.
    allowed_hosts: Annotated[list[str], NoDecode] = []
    public_url: str | None = None  # the address clients reach it at (a proxy's); unset: the one a request arrived at

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _allowed_hosts(cls, value: str | list[str]) -> list[str]:
        return parse_allowed_hosts(value)

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        return None if value is None else parse_public_url(value)

    def model_post_init(self, _context) -> None:
        self.data_dir = self.data_dir.expanduser()
        self.models_dir = (self.models_dir or self.data_dir / "models").expanduser()
        self.outputs_dir = (self.outputs_dir or self.data_dir / "outputs").expanduser()

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def gallery_db(self) -> Path:
        """The gallery's SQLite database (the CLI and the server share it)."""
        return self.data_dir / "gallery.db"

    @property
    def jobs_db(self) -> Path:
        """The server's job queue and history (SQLite): what survives a restart."""
        return self.data_dir / "jobs.db"

    @property
    def keys_db(self) -> Path:
        """The server's named API keys (SQLite), stored hashed: ``lienzo keys``."""
        return self.data_dir / "keys.db"
