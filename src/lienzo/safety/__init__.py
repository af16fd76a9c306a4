"""Optional safety filtering of generated images, with visible policies.

A :class:`SafetyFilter` says which images of a batch are flagged; the request's policy decides what
happens to them: ``off`` (nothing runs), ``blur`` or ``block``. A flagged image is never dropped:
it is replaced, and its infotext (``Safety filter: blurred``) and the API responses say so.
Stable Diffusion's own checker is used when a diffusers model folder ships one; any other filter
plugs in as ``components.safety_filter``.
"""

from lienzo.safety.base import SafetyFilter, Verdict
from lienzo.safety.policy import FILTERED_LABELS, Screened, apply_policy, block, blur, screen
from lienzo.safety.sd_checker import StableDiffusionSafetyFilter, find_safety_checker

__all__ = [
    "FILTERED_LABELS",
    "SafetyFilter",
    "Screened",
    "StableDiffusionSafetyFilter",
    "Verdict",
    "apply_policy",
    "block",
    "blur",
    "find_safety_checker",
    "screen",
]
