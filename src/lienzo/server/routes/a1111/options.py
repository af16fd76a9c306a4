"""A1111's settings (``/options``): what clients set, kept in the data dir, over A1111's documented defaults."""

import json
import logging
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from lienzo.errors import InvalidRequestError, ModelFileError
from lienzo.files import write_atomic
from lienzo.generation.request import build_request
from lienzo.models.registry import ModelEntry
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
        "forge_additional_modules": chosen_modules(queue),
        "face_restoration": False,
        "tiling": False,
    }


def set_options(values: dict[str, Any], queue: JobQueue, options: SavedOptions) -> None:
    """Check every value lienzo acts on before changing anything, then apply them all and save them in
    the data dir (all but the model and its modules, which ``lienzo serve`` decides at start).
    Options lienzo does not know are kept and returned, as A1111 does."""
    path = None
    if values.get("sd_model_checkpoint") is not None:
        path = resolve_checkpoint(queue, str(values["sd_model_checkpoint"]), "sd_model_checkpoint")
    modules = resolve_modules(queue, values["forge_additional_modules"]) if "forge_additional_modules" in values else None
    if "CLIP_stop_at_last_layers" in values:
        with DIALECT.speaking():
            build_request(clip_skip=values["CLIP_stop_at_last_layers"])
    if path is not None:
        queue.model = str(path)
    if modules is not None:
        queue.modules = modules
    options.values.update({k: v for k, v in values.items() if k not in ("sd_model_checkpoint", "forge_additional_modules")})
    options.save()


# -- Forge's modules: the text encoders and VAE a transformer model (SD 3.x, Flux.1) loads with ---------------


def is_module(entry: ModelEntry) -> bool:
    """A file Forge lists as a module: a VAE or a text encoder (``text_encoders``, ``clip`` and ``vae`` folders)."""
    return entry.architecture == "VAE" or entry.architecture.startswith("text encoder")


def resolve_modules(queue: JobQueue, value: Any) -> dict:
    """``forge_additional_modules`` (paths or names of files in the models dir, never elsewhere) as
    ``load_model``'s ``vae`` and ``text_encoders``; InvalidRequestError names the first that is not one."""
    field = "forge_additional_modules"
    if isinstance(value, str):
        value = [value] if value else []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidRequestError(field, f"expected a list of text encoder or VAE file paths, got {value!r}")
    vae, text_encoders = None, []
    for item in value:
        try:
            entry = queue.registry.entry(queue.registry.resolve(item, allow_paths=False, field=field))
        except ModelFileError as err:
            raise InvalidRequestError(field, str(err).removeprefix(f"{field}: ")) from None
        if not is_module(entry):
            raise InvalidRequestError(field, f"{entry.file_name} is {entry.architecture}, not a text encoder or VAE")
        if entry.architecture == "VAE":
            if vae is not None:
                raise InvalidRequestError(field, f"{Path(vae).name} and {entry.file_name} are both VAEs; choose one")
            vae = str(entry.path)
        else:
            text_encoders.append(str(entry.path))
    return {"vae": vae, "text_encoders": text_encoders} if value else {}


def chosen_modules(queue: JobQueue) -> list[str]:
    """The module files models load with now, as ``forge_additional_modules`` lists them."""
    return [*queue.modules.get("text_encoders", []), *([queue.modules["vae"]] if queue.modules.get("vae") else [])]
