"""A1111's settings (``/options``): what clients set, kept in the data dir, over A1111's documented defaults."""

import json
import logging
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from lienzo.files import write_atomic
from lienzo.generation.request import build_request
from lienzo.server.jobs import JobQueue
from lienzo.server.routes.a1111.translate import DIALECT, resolve_checkpoint
from lienzo.settings import Settings

# The A1111 door's one logger, named after the package (log filters name it).
log = logging.getLogger(__package__)

OPTIONS_FILE = "a1111-options.json"
# Every option AUTOMATIC1111 documents, with its default (names and values only, for clients that read
# them); default_options overlays what lienzo really does.
_A1111_OPTIONS = Path(__file__).resolve().parents[2] / "a1111_options.json"


@dataclass
class SavedOptions:
    """What clients POSTed to /options, and where it persists across restarts."""

    values: dict[str, Any] = dataclass_field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def load(cls, path: Path) -> "SavedOptions":
        """The options saved in ``path``; none when it is missing or unreadable (said in the log: a
        damaged settings file must not keep the server from starting)."""
        values: dict[str, Any] = {}
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as err:
            log.warning("%s: cannot read the saved A1111 options (%s); starting from the defaults", path, err)
        return cls(values=values if isinstance(values, dict) else {}, path=path)

    def save(self) -> None:
        if self.path is not None:
            data = json.dumps(self.values, indent=1, sort_keys=True).encode()
            write_atomic(self.path, lambda file: file.write(data))


def get_saved_options(request: Request) -> SavedOptions:
    """The app's options, read from the data dir on first use."""
    options = getattr(request.app.state, "a1111_options", None)
    if options is None:
        options = request.app.state.a1111_options = SavedOptions.load(request.app.state.settings.data_dir / OPTIONS_FILE)
    return options


Options = Annotated[SavedOptions, Depends(get_saved_options)]


def default_options(settings: Settings, queue: JobQueue) -> dict[str, Any]:
    """A1111's documented options with lienzo's values where lienzo has the setting."""
    current = queue.current_model_or_none()
    return {
        **json.loads(_A1111_OPTIONS.read_text(encoding="utf-8")),
        "samples_save": True,
        "enable_pnginfo": True,
        "CLIP_stop_at_last_layers": 1,
        "randn_source": "CPU",  # lienzo draws noise on the CPU, so a seed gives the same picture on every device
        "show_progress_every_n_steps": settings.preview_every,
        "show_progress_type": "Approx cheap",  # previews are a linear map of the latents (engine._PREVIEW_RGB)
        "save_incomplete_images": True,  # an interrupted image is saved, marked "Interrupted" in its infotext
        "outdir_samples": "",
        "outdir_txt2img_samples": str(settings.outputs_dir / "txt2img-images"),
        "outdir_img2img_samples": str(settings.outputs_dir / "img2img-images"),
        "sd_checkpoint_hash": queue.registry.entry(current).sha256 if current is not None else "",
        "face_restoration": False,
        "tiling": False,
    }


def set_options(values: dict[str, Any], queue: JobQueue, options: SavedOptions) -> None:
    """Check every value lienzo acts on before changing anything, then apply them all and save them in
    the data dir (all but the model, which ``lienzo serve --model`` or the default decides at start).
    Options lienzo does not know are kept and returned, as A1111 does."""
    path = None
    if values.get("sd_model_checkpoint") is not None:
        path = resolve_checkpoint(queue, str(values["sd_model_checkpoint"]), "sd_model_checkpoint")
    if "CLIP_stop_at_last_layers" in values:
        with DIALECT.speaking():
            build_request(clip_skip=values["CLIP_stop_at_last_layers"])
    if path is not None:
        queue.model = str(path)
    options.values.update({k: v for k, v in values.items() if k != "sd_model_checkpoint"})
    options.save()
