"""A real ``lienzo serve`` in a subprocess on a free loopback port, and the models and images server tests send."""

import base64
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Debian's chromium, which the studio's browser tests drive through Playwright. Its own background traffic
# (updates, sync, metrics) fails on an offline machine; ARGS keep it off.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def lienzo_server(home: Path, *serve_args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Iterator[str]:
    """Run ``lienzo serve`` with ``home``'s models, data and outputs dirs; yield its base URL.

    ``env`` adds environment variables (``LIENZO_MAX_QUEUE``, ...). The server log is written to
    ``home/server-<port>.log`` and shown when it fails to start.
    """
    with lienzo_process(home, *serve_args, env=env, timeout=timeout) as (url, _process):
        yield url


@contextmanager
def lienzo_process(
    home: Path, *serve_args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> Iterator[tuple[str, subprocess.Popen]]:
    """As :func:`lienzo_server`, yielding the process too (to kill it)."""
    port = free_port()
    log_path = home / f"server-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [
        sys.executable, "-m", "lienzo", "--models-dir", str(home / "models"), "--data-dir", str(home / "data"),
        "--outputs-dir", str(home / "outputs"), "serve", "--port", str(port), *serve_args,
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"lienzo serve exited with {process.returncode}:\n{log_path.read_text()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"lienzo serve did not start in {timeout} s:\n{log_path.read_text()}") from None
                    time.sleep(0.2)
            yield f"http://127.0.0.1:{port}", process
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def two_model_home(root: Path) -> Path:
    """``root/models`` with two tiny SD 1.x checkpoints, ``tiny-a`` and ``tiny-b`` (different weights,
    so different hashes and pictures)."""
    from lienzo.models.single_file_save import save_single_file
    from tiny_models import build_tiny

    (root / "models").mkdir()
    tiny = build_tiny("sd1")
    save_single_file(tiny, root / "models" / "tiny-a.safetensors")
    for p in tiny.unet.parameters():
        p.data.mul_(0.5)
    save_single_file(tiny, root / "models" / "tiny-b.safetensors")
    return root


def home_settings(home: Path, *, data: Path, out: Path, model: str = "tiny-a", **values):
    """Settings for an in-process server over ``home/models``, with its own data and outputs folders."""
    from lienzo.settings import Settings

    return Settings(data_dir=data, models_dir=home / "models", outputs_dir=out, default_model=model, **values)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64_png(image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG of a few dozen bytes whose header declares ``width`` x ``height`` RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
