"""stable-diffusion.cpp rows for speed.py: the ggml engine that runs Stable Diffusion (and its GGUF files) on CPUs.

The same random weights speed.py builds are written once per process as ONE original-layout (ldm) fp16
.safetensors, the form SD 1.5 checkpoints are downloaded in, which sd.cpp reads directly, and converted once by
sd.cpp itself to a GGUF file in q8_0, as its users make them. They run through the ``stable-diffusion-cpp-python``
binding in three modes, which differ in the linear layers (attention, feed-forward, CLIP): sd.cpp keeps every
convolution's kernel in f16 whatever the file or weight type (its Conv2d is built that way), and convolutions
are most of the U-Net's weights and work.

- f16: the .safetensors as sd.cpp loads it by default (each tensor keeps its type in the file);
- f32: the same file with ``wtype="f32"``: linear layers widened to f32 as sd.cpp loads them (the values are the
  fp16-rounded ones, which speed does not depend on);
- q8_0: the GGUF file sd.cpp's ``convert`` wrote. ggml quantizes in blocks of 32 along a tensor's first
  dimension, so only the linear layers become q8_0; convolutions (3x3 kernels: about 70% of the U-Net's weights),
  biases, norms and embeddings stay f16, as in the file.

ggml's CPU kernels accumulate in f32 in every mode (f16 and q8_0 are storage formats they widen, or dot in
blocks), so each row's FLOP floor is fp32's. Each row gets speed.py's prompt, negative prompt, CFG 7, steps, size
and seed, the sampler under sd.cpp's name and the ``discrete`` schedule, which is speed.py's Uniform
(t = 999 ... 0 in n even steps). sd.cpp draws its starting noise with its own generator (a port of the CUDA
Philox generator A1111 uses), not torch's, so its images cannot match the reference: the rows carry
``comparable = False`` for the table to print "own noise" instead of a PSNR.

Threads: torch's count. ggml's threads spin at a barrier after every operation, so when the cores are busy
with other work sd.cpp slows down many times over (more than torch does): measure on an idle machine.

stable-diffusion.cpp is not a dependency of lienzo; :func:`sdcpp_missing` says how to install it.
"""

import contextlib
import importlib
import time
import weakref
from pathlib import Path

import numpy as np
import torch

INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install stable-diffusion-cpp-python==0.4.7  # builds sd.cpp: needs a C++ compiler and CMake'

SAMPLERS = {"Euler": "euler", "Euler a": "euler_a", "DPM++ 2M": "dpm++2m"}  # speed.py's (lienzo's) name -> sd.cpp's

# (weight type at load, file) per row; sd.cpp's "default" keeps the types in the file.
MODES = {"f16": ("default", "safetensors"), "f32": ("f32", "safetensors"), "q8_0": ("default", "q8_0.gguf")}

# (id of the Components, workdir) -> (a weak reference to them, their files): a weak one, so that the cache does
# not keep gigabytes of weights alive after speed.py drops them, and checked, as a freed object's id can come back.
_exported: dict[tuple[int, str], tuple[weakref.ref, dict[str, Path]]] = {}
_loaded: dict[tuple[Path, str], object] = {}  # (file, weight type) -> StableDiffusion, shared by every size


def sdcpp_missing() -> str | None:
    """None when the stable-diffusion.cpp binding imports; else what to run to add its rows."""
    try:
        importlib.import_module("stable_diffusion_cpp")  # loads sd.cpp's shared library too
    except ImportError as error:
        return f"stable-diffusion.cpp rows left out ({error}); to add them: {INSTALL}"
    return None


def sdcpp_rows(components, size: int, steps: int, sampler, workdir: str, modes=tuple(MODES)) -> list:
    """speed.Row-s running SD 1.x ``components`` through stable-diffusion.cpp at ``size`` x ``size``, one per
    name in ``modes`` (keys of :data:`MODES`). The files are written to ``workdir`` and each model is loaded once
    per process; every row has ``comparable = False`` (sd.cpp's own noise)."""
    from speed import NEGATIVE, PROMPT, Row

    if components.family != "sd1":
        raise ValueError(f"the stable-diffusion.cpp rows cover SD 1.x; got the family {components.family!r}")
    if sampler.name not in SAMPLERS:
        raise ValueError(f"sampler {sampler.name!r} has no stable-diffusion.cpp counterpart here; one of {sorted(SAMPLERS)}")
    if unknown := sorted(set(modes) - MODES.keys()):
        raise ValueError(f"modes {unknown} are not stable-diffusion.cpp modes here; each one of {list(MODES)}")
    clock = _StepClock.install()  # before any sd.cpp call: loading reports progress through the same callback
    files = _export(components, Path(workdir))
    rows = []
    for mode in modes:
        wtype, file = MODES[mode]
        model = _model(files[file], wtype)

        def run(model=model, clock=clock):
            with clock.recording() as stamps:
                image = model.generate_image(
                    PROMPT, negative_prompt=NEGATIVE, width=size, height=size, cfg_scale=7.0, sample_method=SAMPLERS[sampler.name],
                    scheduler="discrete", sample_steps=steps, seed=1,
                )[0]
            return np.asarray(image.convert("RGB"), dtype=np.float32) / 255, stamps

        row = Row("sd.cpp" if mode == "f16" else f"sd.cpp {mode}", run, note=_note(mode), dtype=torch.float32)
        row.comparable = False  # its own noise: a PSNR against torch's would measure the noise, not the precision
        rows.append(row)
    return rows


def _note(mode: str) -> str:
    return {"f16": "f16 file as loaded", "f32": "f32 linears", "q8_0": "GGUF q8_0 linears"}[mode] + ", convs f16, own noise"


def _export(components, workdir: Path) -> dict[str, Path]:
    """The files of ``components`` in ``workdir``: the ldm fp16 .safetensors (lienzo's single-file writer) and the
    q8_0 GGUF that sd.cpp converts it to; written once per process."""
    key = (id(components), str(workdir))
    if key not in _exported or _exported[key][0]() is not components:
        from stable_diffusion_cpp import StableDiffusion

        from lienzo.models.single_file_save import save_single_file

        workdir.mkdir(parents=True, exist_ok=True)
        stem = f"sdcpp-{components.name or components.family}".replace(" ", "_")
        files = {"safetensors": save_single_file(components, workdir / f"{stem}.safetensors", dtype=torch.float16)}
        files["q8_0.gguf"] = workdir / f"{stem}-q8_0.gguf"
        # convert() needs no model: an empty StableDiffusion only holds the binding's settings.
        if not StableDiffusion(verbose=False).convert(str(files["safetensors"]), output_path=str(files["q8_0.gguf"]), output_type="q8_0"):
            raise RuntimeError(f"stable-diffusion.cpp could not convert {files['safetensors']} to q8_0 GGUF")
        for path in files.values():  # models read from these paths before hold other weights
            for loaded in [loaded for loaded in _loaded if loaded[0] == path]:
                del _loaded[loaded]
        _exported[key] = (weakref.ref(components), files)
    return _exported[key][1]


def _model(path: Path, wtype: str):
    """sd.cpp's model from ``path`` with weights in ``wtype``, on as many threads as torch uses, loaded once."""
    if (path, wtype) not in _loaded:
        from stable_diffusion_cpp import StableDiffusion

        _loaded[path, wtype] = StableDiffusion(model_path=str(path), wtype=wtype, n_threads=torch.get_num_threads(), verbose=False)
    return _loaded[path, wtype]


class _StepClock:
    """The end time of each denoising step, from sd.cpp's progress callback.

    sd.cpp keeps ONE process-wide progress callback and calls it while loading weights too. The binding
    installs a new one on each ``generate_image(progress_callback=...)`` and lets it be freed after the call,
    so the next model load would call freed memory; one callback installed here for the whole process, and
    kept alive by this object, avoids that. It reports step 0 before the first step and n after step n.
    """

    _installed = None

    def __init__(self):
        import stable_diffusion_cpp.stable_diffusion_cpp as lib

        self.stamps: list[float] | None = None
        self._callback = lib.sd_progress_callback(self._on_progress)  # the ctypes function sd.cpp holds
        lib.sd_set_progress_callback(self._callback, None)

    @classmethod
    def install(cls) -> "_StepClock":
        if cls._installed is None:
            cls._installed = cls()
        return cls._installed

    def _on_progress(self, step: int, _steps: int, _seconds: float, _data) -> None:
        if self.stamps is not None and step > 0:
            self.stamps.append(time.perf_counter())

    @contextlib.contextmanager
    def recording(self):
        """The step times of one run, in a fresh list; recording stops when the run ends or fails."""
        self.stamps = []
        try:
            yield self.stamps
        finally:
            self.stamps = None
