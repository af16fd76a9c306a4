"""Writers racing for the same numbered name: every image is kept, whole, under a name of its own."""

import errno
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lienzo.generation.engine import GeneratedImage
from lienzo.images.provenance import ModelInfo, Provenance
from lienzo.outputs import save_generated

PROVENANCE = Provenance(ModelInfo("tiny", "ab" * 32, "abababab12", "sd1"))
SEED = 1234  # every writer uses the same seed, so every writer wants the same file name


def _picture(index: int) -> Image.Image:
    """A small picture whose top-left pixel says which write it was."""
    return Image.new("RGB", (32, 32), (index % 256, index // 256, 7))


def _written(folder: Path) -> list[int]:
    """The index each PNG in ``folder`` carries, after decoding every pixel of it."""
    found = []
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as image:
            image.load()
            found.append(image.getpixel((0, 0))[0] + 256 * image.getpixel((0, 0))[1])
    return found


def _race_threads(folder: Path, threads: int, each: int, *, empty_ok: bool = False) -> list[Path]:
    """``threads`` threads saving ``each`` images at once through save_generated; a reader opens every
    PNG it sees meanwhile and records any that is not whole (or, with ``empty_ok``, empty)."""
    start = threading.Barrier(threads + 1)
    saved: list[Path] = []
    broken: list[str] = []
    done = threading.Event()

    def write(worker: int) -> None:
        start.wait()
        for i in range(each):
            index = worker * each + i
            pixels = np.zeros((32, 32, 3), dtype=np.float32)
            generated = GeneratedImage(_picture(index), SEED, f"race\nSteps: 1, Seed: {SEED}", {"Seed": SEED}, pixels)
            saved.append(save_generated(generated, folder, PROVENANCE, watermark=False).path)

    def read() -> None:
        start.wait()
        while not done.is_set():
            for path in folder.glob("[0-9]*.png"):
                data = path.read_bytes()
                if empty_ok and not data:
                    continue
                try:
                    with Image.open(io.BytesIO(data)) as image:
                        image.load()
                except OSError as err:  # a partial or empty file at a final name
                    broken.append(f"{path.name}: {err}")

    workers = [threading.Thread(target=write, args=(w,)) for w in range(threads)]
    reader = threading.Thread(target=read)
    for t in [*workers, reader]:
        t.start()
    for t in workers:
        t.join()
    done.set()
    reader.join()
    assert not broken, broken
    return saved


def test_threads_with_the_same_seed_never_overwrite(tmp_path):
    folder = tmp_path / "out"
    saved = _race_threads(folder, threads=8, each=6)
    assert len(saved) == len(set(saved)) == 48
    assert sorted(_written(folder)) == list(range(48))  # every image, none written over
    assert all(p.name.endswith(f"-{SEED}.png") for p in saved)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in saved)  # no temporary file left


def test_without_hard_links_names_are_claimed_by_exclusive_create(tmp_path, monkeypatch):
    """FAT and exFAT have no hard links: the name is created exclusively, empty, then the whole file
    renamed over it; readers may see it empty for that moment, never partly written."""

    def no_link(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(src))

    monkeypatch.setattr(os, "link", no_link)
    folder = tmp_path / "fat"
    saved = _race_threads(folder, threads=6, each=4, empty_ok=True)
    assert len(set(saved)) == 24
    assert sorted(_written(folder)) == list(range(24))
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in saved)


_WRITER = """
import sys, time
from pathlib import Path
from PIL import Image
from lienzo.images.io import save_png_numbered

folder, go, worker, each = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
while not go.exists():
    time.sleep(0.001)
for i in range(each):
    index = worker * each + i
    print(save_png_numbered(Image.new("RGB", (32, 32), (index % 256, index // 256, 7)), folder, 1234).name)
"""


def test_processes_with_the_same_seed_never_overwrite(tmp_path):
    """Two `lienzo generate` at once into one folder: here four processes, started together."""
    folder, go = tmp_path / "out", tmp_path / "go"
    processes = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(folder), str(go), str(w), "12"], stdout=subprocess.PIPE, text=True)
        for w in range(4)
    ]
    time.sleep(0.5)  # let them import; a late one still races the others' later images
    go.touch()
    names = []
    for p in processes:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        names += out.split()
    assert len(names) == len(set(names)) == 48
    assert sorted(_written(folder)) == list(range(48))
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)
