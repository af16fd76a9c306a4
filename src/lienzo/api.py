"""The Python API: ``load_model`` and ``generate``, the same studio and engine every other front door calls."""

from pathlib import Path

from lienzo.control.prepare import prepare_resources
from lienzo.generation import engine, limits
from lienzo.generation.request import GenerationRequest, build_request
from lienzo.models.components import Components
from lienzo.settings import Settings
from lienzo.studio import Studio, default_model, load_model, prepare_loras

__all__ = ["default_model", "generate", "load_model", "prepare_loras", "prepare_resources"]


def generate(
    request: GenerationRequest | None = None,
    *,
    model: Components | str | Path | None = None,
    progress: engine.ProgressCallback | None = None,
    cancel: engine.CancelCheck | None = None,
    on_image: engine.ImageCallback | None = None,
    **fields,
) -> engine.GenerationResult:
    """Generate images: ``generate(prompt="a red apple", steps=20, model="sd15")`` or with a request.
    The settings' limits apply, as on every front door: raise them with LIENZO_MAX_PIXELS, ...
    Nothing is saved: the images come back in the result."""
    request = request or build_request(**fields)
    settings = Settings()
    limits.check_limits(request, settings, count_batches=False)
    studio = Studio(settings)
    components = model if isinstance(model, Components) else studio.load_model(model)
    return studio.run(components, request, save=False, progress=progress, cancel=cancel, on_image=on_image)
