"""Pick a torch device, dtype and thread count. Nothing here runs at import time."""

import functools
import logging
import os
import platform
import subprocess
from pathlib import Path

import torch

from lienzo.errors import LienzoError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
DTYPES.update({"bfloat16": torch.bfloat16, "bf16": torch.bfloat16})

# /proc/cpuinfo flags of x86 CPUs with bf16 dot products in hardware (AVX512-BF16: Cooper Lake, Zen 4;
# AMX: Sapphire Rapids); ARMv8.6's BF16 extension is "bf16" in the Features line.
_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` prefers CUDA, then Apple MPS, then the CPU; an unavailable explicit choice is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise LienzoError(f"device: choose one of auto, cpu, cuda, mps; got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LienzoError("device: cuda was asked for but torch sees no CUDA GPU on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise LienzoError("device: mps was asked for but this machine has no Apple GPU")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on GPUs (half the memory, tensor cores); on the CPU bf16 where it computes bf16
    natively (see :func:`cpu_has_native_bf16`), else fp32 (fp16 and emulated bf16 are slow there)."""
    if name == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        return torch.float16
    if name not in DTYPES:
        raise LienzoError(f"dtype: choose one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware: AVX512-BF16 or AMX on x86, the BF16 extension on ARM.

    Read from ``/proc/cpuinfo`` on Linux and ``sysctl`` on macOS; False wherever it cannot be told, and
    False when ``ONEDNN_MAX_CPU_ISA`` caps oneDNN below its bf16 instructions (see :func:`onednn_isa_has_bf16`).
    """
    if not onednn_isa_has_bf16(os.environ.get("ONEDNN_MAX_CPU_ISA", "")):
        return False
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        try:
            return cpuinfo_has_bf16(cpuinfo.read_text(errors="replace"))
        except OSError:
            return False
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return out.strip() == "1"
    return False


# oneDNN's ISA names (its ONEDNN_MAX_CPU_ISA variable) whose kernels have no bf16 arithmetic: capped at one of
# these, oneDNN computes bf16 convolutions and matmuls the slow way even on a CPU that has the instructions.
_ISAS_WITHOUT_BF16 = {"sse41", "avx", "avx2", "avx2_vnni", "avx512_core", "avx512_core_vnni"}


def onednn_isa_has_bf16(max_isa: str) -> bool:
    """Whether oneDNN may use bf16 instructions under ``ONEDNN_MAX_CPU_ISA=max_isa`` (empty: not capped).

    The cap is how a user (or ``benchmarks/speed.py --isa avx2``) runs an AVX512-BF16 machine as an AVX2 one;
    ``auto`` precision must then pick fp32, as it would on a real AVX2 CPU."""
    return max_isa.strip().lower() not in _ISAS_WITHOUT_BF16


def cpuinfo_has_bf16(cpuinfo: str) -> bool:
    """Whether a Linux ``/proc/cpuinfo`` text lists bf16 arithmetic among the first CPU's flags (x86) or Features (ARM)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            words = set(value.split())
            return bool(words & _BF16_FLAGS) or "bf16" in words
    return False


def configure_threads(threads: int | None = None) -> None:
    """CPU threads for torch: ``threads`` intra-op threads (None: torch's default, one per physical core,
    or ``OMP_NUM_THREADS``) and one inter-op thread, so that the two pools never compete for the cores.

    The inter-op pool can only be sized before its first use; later calls leave it as it is.
    """
    if threads is not None:
        if threads < 1:
            raise LienzoError(f"threads: give 1 or more; got {threads}")
        torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already started (or already set) in this process
            log.debug("inter-op threads stay at %d", torch.get_num_interop_threads())


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: its parameters' device, or, when accelerate's CPU offload hooks hold its
    weights (their parameters then sit on the ``meta`` device), the device the hooks load them onto."""
    first = next(module.parameters(), None)
    if first is not None and first.device.type != "meta":
        return first.device
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return first.device if first is not None else torch.device("cpu")
