"""The run folder: opening it (new, taken over or resumed) and its checkpoints.

A checkpoint, ``training/checkpoints/<stage>-<step>/``, holds the weights (diffusers folders, or the
LoRA's safetensors), ``trainer.pt`` (optimizer, LR schedule, EMA) and ``state.json`` (RunState).
"""

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from lienzo.files import write_atomic
from lienzo.training.config import TrainConfig, read_toml, to_toml, validate_config
from lienzo.training.manifest import read_manifest
from lienzo.training.lora import ADAPTER
from lienzo.training.state import STAGES, RunState, TrainingError


@dataclass
class Opening:
    """How a run opens its folder, decided before anything is written."""

    checkpoint: Path | None  # the checkpoint to continue from; None starts at step 0
    resume: bool  # continuing a run: its images must be the ones it started with
    take_over: bool  # the folder holds a run killed before its first checkpoint; this one replaces it
    data: Path | None  # the image folder, when given or recorded


def open_folder(config: TrainConfig, out: Path, *, resume: bool, data: Path | None, vae: Path | None,
                say: Callable[..., None]) -> Opening:
    """Check ``out`` for a new or resumed run, and find the checkpoint to continue from; writes nothing."""
    if vae is not None and not (Path(vae) / "config.json").is_file():
        raise TrainingError(f"vae: {vae} is not a diffusers VAE folder (no config.json); give one such as RUN/vae")
    if resume:
        checkpoint = latest_checkpoint(out)
        old, new = saved_config(out).identity(), config.identity()
        if old != new:
            raise TrainingError(f"resume: {out} was trained with a different config ({_first_difference(old, new)})")
        if checkpoint is not None:
            return Opening(checkpoint, resume=True, take_over=False, data=data)
        # Killed before its first checkpoint: nothing to continue, so the run starts again as it began.
        say("resume: %s was stopped before its first checkpoint; starting it again from step 0 with its saved config", out)
        return Opening(None, resume=False, take_over=True, data=data or _recorded_data(out))
    if out.exists() and not out.is_dir():
        raise TrainingError(f"out: {out} is a file, not a folder")
    take_over = _unstarted(out)
    if take_over:
        say("out: %s holds a run stopped before its first checkpoint; starting afresh in its place", out)
    elif (out / "training" / "config.toml").exists():
        raise TrainingError(f"out: {out} already holds a training run; continue it with --resume {out} or choose another --out")
    elif out.is_dir() and any(out.iterdir()):
        raise TrainingError(f"out: {out} is not empty; choose a new or empty folder")
    return Opening(None, resume=False, take_over=take_over, data=data)


def _unstarted(out: Path) -> bool:
    """``out`` holds only a run killed before its first checkpoint: its ``training`` folder, with the
    run's config (written first) or, killed sooner, nothing but temporary files; perhaps its manifest."""
    training = out / "training"
    if not training.is_dir() or latest_checkpoint(out) is not None:
        return False
    if not {p.name for p in out.iterdir()} <= {"training", "dataset_manifest.json"}:
        return False
    return (training / "config.toml").is_file() or all(is_temp(p) for p in training.iterdir())


def _recorded_data(out: Path) -> Path:
    """The data folder named by the manifest of a run killed before its first checkpoint."""
    manifest = out / "dataset_manifest.json"
    if not manifest.is_file():
        raise TrainingError(f"resume: {out} was stopped before it recorded its data folder; give it with --data FOLDER")
    return Path(read_manifest(manifest)["root"])


def start_folder(acc: Accelerator, config: TrainConfig, out: Path, take_over: bool) -> None:
    """A new run's folder: the config first, the mark of a lienzo run, so that a run killed at any
    later moment can be resumed or taken over. A run taken over is cleared around its config, which
    stays in place until the new one replaces it."""
    training = out / "training"
    # Every process checks before the first one writes, or the others would find the folder taken.
    acc.wait_for_everyone()
    if acc.is_main_process:
        try:
            if take_over:
                for entry in training.iterdir():
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    elif entry.name != "config.toml":
                        entry.unlink()
                (out / "dataset_manifest.json").unlink(missing_ok=True)
            write_atomic(training / "config.toml", lambda file: file.write(to_toml(config).encode()))
            (training / "samples").mkdir(exist_ok=True)
            (training / "checkpoints").mkdir(exist_ok=True)
        except OSError as err:
            raise TrainingError(f"out: cannot write to {out}: {err.strerror or err}") from None
    acc.wait_for_everyone()


def is_temp(path: Path) -> bool:
    """What a write in progress (or killed) is named: ``<name>.tmp``, or write_atomic's ``.<name>.<random>.tmp``."""
    return path.name.endswith(".tmp")


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of a run (stage order first, then step). A checkpoint is complete
    once it has its name: it is written as ``<name>.tmp`` and renamed, and loses its ``state.json``
    first when it is deleted, so a kill at any moment leaves the previous complete one to resume from."""
    found = []
    for state_file in (run / "training" / "checkpoints").glob("*/state.json"):
        if is_temp(state_file.parent):
            continue
        state = json.loads(state_file.read_text())
        found.append(((STAGES.index(state["stage"]), state["step"]), state_file.parent))
    return max(found)[1] if found else None


def saved_config(run: Path) -> TrainConfig:
    """The config a run was started with (``training/config.toml``), for ``--resume``."""
    path = run / "training" / "config.toml"
    if not path.is_file() and (run / "training").is_dir():
        raise TrainingError(f"resume: {run} was stopped before it saved its config; start it again with --data FOLDER --out {run}")
    if not path.is_file():
        raise TrainingError(f"resume: {run} is not a lienzo training run (no training/config.toml)")
    return validate_config(read_toml(path))


def read_state(checkpoint: Path) -> RunState:
    return RunState(**json.loads((checkpoint / "state.json").read_text()))


def write_checkpoint(final: Path, models: dict[str, torch.nn.Module], lora_text_encoder: bool | None,
                     trainer_state: dict, state: bytes) -> None:
    """Everything into ``<final>.tmp``, then one rename: a kill mid-way leaves only a temporary folder,
    which resuming ignores and the next checkpoint removes. ``lora_text_encoder`` is None for a model
    trained from scratch (whole diffusers folders), else whether the LoRA covers the text encoder too."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if lora_text_encoder is not None:
        save_file(get_peft_model_state_dict(models["unet"], adapter_name=ADAPTER), tmp / "unet_lora.safetensors")
        if lora_text_encoder:
            te = get_peft_model_state_dict(models["text_encoder"], adapter_name=ADAPTER)
            save_file(te, tmp / "text_encoder_lora.safetensors")
    else:
        for name, module in models.items():
            module.save_pretrained(tmp / name)
    torch.save(trainer_state, tmp / "trainer.pt")
    (tmp / "state.json").write_bytes(state)
    os.replace(tmp, final)


def trainer_state(optimizer: torch.optim.Optimizer, schedule, ema: EMAModel | None) -> dict:
    """What ``trainer.pt`` holds beside the weights."""
    return {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "ema": ema.state_dict() if ema is not None else None}


def prune(folder: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove older ones and what killed writes and
    deletions left. Each loses its state.json first: half deleted, it is not taken for complete."""
    complete = sorted(
        (STAGES.index(json.loads((p / "state.json").read_text())["stage"]), p.name, p)
        for p in folder.iterdir()
        if not is_temp(p) and (p / "state.json").is_file()
    )
    kept = {path for *_, path in complete[-keep:]}
    for path in folder.iterdir():
        if path.is_dir() and path not in kept:
            (path / "state.json").unlink(missing_ok=True)
            shutil.rmtree(path)


def _first_difference(old, new, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')} was {old!r}, now {new!r}"
