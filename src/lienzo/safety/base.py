"""The safety filter interface: look at finished images, say which ones to hide and why."""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from PIL import Image


@dataclass(frozen=True)
class Verdict:
    """One image's result: ``flagged`` images are blurred or blocked by the request's policy."""

    flagged: bool
    reason: str | None = None  # a few words for the infotext, e.g. "nsfw"; None when the filter gives none


class SafetyFilter(ABC):
    """A filter lienzo runs on every finished batch when a request's policy is ``blur`` or ``block``.

    Plug one in by setting ``components.safety_filter`` to an instance. ``check`` gets the images of
    one batch as they will be saved (RGB, any size) and the prompt they were made from, and returns
    one :class:`Verdict` per image, in order. What to do with a flagged image is not the filter's
    business: the policy (:func:`lienzo.safety.apply_policy`) blurs or blocks it and says so.
    """

    name: str = "safety filter"

    @abstractmethod
    def check(self, images: list[Image.Image], prompt: str = "") -> list[Verdict]:
        """One verdict per image, in order."""

    def prepare(self, device: torch.device) -> None:
        """Load what ``check`` needs, onto ``device``. The engine calls it before denoising when the
        policy needs the filter, so a filter that cannot load fails before minutes of work, not after."""
