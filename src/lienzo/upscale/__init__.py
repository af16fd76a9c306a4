"""Upscalers as A1111 names them: the built-ins (None, Lanczos, Nearest) and super-resolution model files
(ESRGAN, RealESRGAN, SwinIR, DAT, HAT, ... read by spandrel) from the models dir's A1111 and ComfyUI folders.

- ``upscalers``: listing, finding by name, and upscaling one image (tiled, so big images fit in memory)
- ``tiles``: the overlapping tiles a model runs on and how their outputs are blended back together
- ``postprocess``: A1111's extras step around them: the infotext it adds and the PNG text it keeps
"""

from lienzo.upscale.upscalers import BUILTINS, LATENT_MODES, MAX_SCALE, Upscaler, find_upscaler, list_upscalers, upscale

__all__ = ["BUILTINS", "LATENT_MODES", "MAX_SCALE", "Upscaler", "find_upscaler", "list_upscalers", "upscale"]
