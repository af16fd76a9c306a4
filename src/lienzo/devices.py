"""Pick a torch device and dtype. Nothing here runs at import time."""

import torch

from lienzo.errors import LienzoError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
DTYPES.update({"bfloat16": torch.bfloat16, "bf16": torch.bfloat16})


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
    """``auto``: fp16 on GPUs (half the memory, tensor cores), fp32 on the CPU (fp16 matmuls are slow there)."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in DTYPES:
        raise LienzoError(f"dtype: choose one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]
