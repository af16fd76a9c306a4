"""What kind of thing a model path is, judged from ``stat`` alone: without torch, and without opening it.

Opening a FIFO blocks until someone writes to it, and reading ``/dev/zero`` never ends, so a path is
checked before anything reads or hashes it: a regular file, or a folder that holds a model's index or
config. Any other folder is refused too, because hashing an arbitrary folder (a home directory, a
``site-packages``) reads every file under it.
"""

import stat
from pathlib import Path

from lienzo.errors import ModelFileError

# A diffusers pipeline folder has model_index.json; a single component's folder (a VAE) config.json.
MODEL_FOLDER_MARKERS = ("model_index.json", "config.json")


def is_model_folder(path: Path) -> bool:
    return any((path / marker).is_file() for marker in MODEL_FOLDER_MARKERS)


def check_model_path(path: Path, field: str | None = "model") -> Path:
    """``path`` when it is a regular file or a model folder; else a one-line ModelFileError that begins
    with ``field`` (None: with the path)."""
    prefix = f"{field}: " if field else ""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError) as err:  # ValueError: a name with a NUL byte
        raise ModelFileError(f"{prefix}cannot read {path} ({getattr(err, 'strerror', None) or err})") from None
    if stat.S_ISDIR(mode):
        if not is_model_folder(path):
            raise ModelFileError(
                f"{prefix}{path} is a folder without model_index.json or config.json, so not a model folder"
            )
    elif not stat.S_ISREG(mode):
        raise ModelFileError(f"{prefix}{path} is not a regular file or model folder")
    return path
