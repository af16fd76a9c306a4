"""The trainer's typed records: what ``state.json`` holds, what a run reports, and its clock."""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lienzo.errors import LienzoError

STAGES = ("vae", "unet")
Status = Literal["finished", "stopped", "interrupted"]


class TrainingError(LienzoError):
    """A run that cannot start or continue: bad output folder, mismatched resume, diverging loss."""


@dataclass
class TrainProgress:
    stage: str
    step: int
    total: int
    loss: float
    lr: float
    images_per_s: float
    elapsed: float


@dataclass
class TrainResult:
    out: Path
    status: Status
    steps: dict[str, int]
    seconds: float


@dataclass
class RunState:
    """``state.json`` in every checkpoint: where the run is and what it has cost so far."""

    stage: str
    step: int
    done: list[str]
    data: str
    manifest_sha256: str
    seconds: float = 0.0
    images_seen: dict[str, int] = field(default_factory=dict)
    device: str = ""
    processes: int = 1
    mixed_precision: str = "no"


@dataclass
class Clock:
    """Time and steps of this session (one process lifetime), next to the seconds the run had before it."""

    run_started: float  # perf_counter at the start of run(), before devices and models
    seconds_before: float  # what state.json said the run had cost when this session resumed it
    session_started: float = field(default_factory=time.perf_counter)  # once the models are built
    session_steps: int = 0

    def run_seconds(self) -> float:
        """The run's cost so far, all sessions together."""
        return self.seconds_before + time.perf_counter() - self.run_started
