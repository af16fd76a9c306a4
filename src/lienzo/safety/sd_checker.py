"""Stable Diffusion's own safety checker (a CLIP ViT-L/14 and 20 concept embeddings), read from the
``safety_checker/`` and ``feature_extractor/`` folders of a diffusers model folder, offline.

Its weights are loaded on first use, not with the model: it is 1.2 GB in fp32 and the CLI's default
policy never runs it. Safetensors are preferred; a folder that has only ``pytorch_model.bin`` is read
weights-only, so a pickle that holds code is refused and never run.
"""

import json
import logging
import pickle
import threading
from pathlib import Path

import torch
from PIL import Image

from lienzo.errors import ModelFileError
from lienzo.models.quiet import first_line, quiet_transformers
from lienzo.safety.base import SafetyFilter, Verdict

log = logging.getLogger(__name__)

_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class StableDiffusionSafetyFilter(SafetyFilter):
    """diffusers' ``StableDiffusionSafetyChecker`` with its CLIP image processor, as a SafetyFilter."""

    name = "Stable Diffusion safety checker"

    def __init__(self, model_folder: Path, dtype: torch.dtype = torch.float32):
        self.model_folder = Path(model_folder)
        self.dtype = dtype
        self._checker = None
        self._processor = None
        self._lock = threading.Lock()

    def prepare(self, device: torch.device) -> None:
        device = torch.device(device)
        # fp16 on CPU: slow, and some CLIP ops have no half kernel there; the checker is cheap in fp32.
        dtype = torch.float32 if device.type == "cpu" else self.dtype
        with self._lock:
            if self._checker is None:
                self._checker, self._processor = _load(self.model_folder, dtype)
            if self._checker.device != device or self._checker.dtype != dtype:
                self._checker.to(device=device, dtype=dtype)

    def check(self, images: list[Image.Image], prompt: str = "") -> list[Verdict]:
        if not images:
            return []
        if self._checker is None:
            self.prepare(torch.device("cpu"))
        checker = self._checker
        pixels = self._processor([image.convert("RGB") for image in images], return_tensors="pt").pixel_values
        pixels = pixels.to(device=checker.device, dtype=checker.dtype)
        # forward_onnx: the same concept scores and thresholds as forward, without blacking out images
        # itself or logging that it did; what happens to a flagged image is the policy's to decide.
        with torch.no_grad():
            _, flagged = checker.forward_onnx(pixels, torch.zeros(len(images), device=checker.device))
        return [Verdict(True, "nsfw") if f else Verdict(False) for f in flagged.tolist()]


def find_safety_checker(model_folder: Path, dtype: torch.dtype = torch.float32) -> StableDiffusionSafetyFilter | None:
    """The folder's safety checker, not yet loaded; None when it has none (or an incomplete one, logged)."""
    model_folder = Path(model_folder)
    checker, extractor = model_folder / "safety_checker", model_folder / "feature_extractor"
    if not (checker / "config.json").is_file():
        return None
    missing = []
    if not any((checker / name).is_file() for name in _SAFETENSORS + _PICKLES):
        missing.append(f"weights ({_SAFETENSORS[0]})")
    if not (extractor / "preprocessor_config.json").is_file():
        missing.append("feature_extractor/preprocessor_config.json")
    if missing:
        log.warning("%s: its safety_checker cannot be used, it lacks %s", model_folder.name, " and ".join(missing))
        return None
    return StableDiffusionSafetyFilter(model_folder, dtype)


def _load(model_folder: Path, dtype: torch.dtype):
    """Checker and image processor from the folder, local files only."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    folder = model_folder / "safety_checker"
    safetensors = any((folder / name).is_file() for name in _SAFETENSORS)
    local = {"local_files_only": True, "torch_dtype": dtype}
    try:
        with quiet_transformers():
            if safetensors:
                checker = StableDiffusionSafetyChecker.from_pretrained(folder, use_safetensors=True, **local)
            else:
                log.info("%s: safety checker has only pickle weights; reading them weights-only", model_folder.name)
                checker = StableDiffusionSafetyChecker.from_pretrained(folder, use_safetensors=False, weights_only=True, **local)
            # transformers 5 without torchvision falls back to its PIL processor, with the same numbers.
            processor = CLIPImageProcessor.from_pretrained(model_folder / "feature_extractor", local_files_only=True)
    except pickle.UnpicklingError as err:
        raise ModelFileError(
            f"lienzo refuses to load the safety checker of {model_folder.name}: its pytorch_model.bin holds Python "
            "objects or code besides tensors (or is damaged), and lienzo never runs code from model files; "
            "use a copy with safety_checker/model.safetensors"
        ) from err
    except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as err:
        raise ModelFileError(f"cannot load the safety checker of {model_folder.name}: {first_line(err)}") from None
    return checker.eval(), processor
