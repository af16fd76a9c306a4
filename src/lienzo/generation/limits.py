"""How much work one request may ask for: the same limits on every front door (CLI, Python API, server).

The limits are settings (``max_pixels``, ``max_steps``, ``max_images``; LIENZO_MAX_PIXELS, ...) so that
the owner of a machine raises them deliberately; GenerationRequest's own ranges stay the ceiling. They
are checked before a model is loaded: a request over them costs nothing.
"""

from collections.abc import Callable

from lienzo.errors import InvalidRequestError
from lienzo.generation.request import GenerationRequest
from lienzo.settings import Settings


def output_size(request: GenerationRequest) -> tuple[int, int]:
    """The size the request will make, as far as it is known before a model is loaded."""
    if request.width and request.height:
        return request.width, request.height
    if request.init_image is not None:
        w = request.init_image.width + request.outpaint_left + request.outpaint_right
        h = request.init_image.height + request.outpaint_up + request.outpaint_down
        return request.width or w, request.height or h
    # txt2img at the model's native size: at most 1024 for the families lienzo loads.
    return request.width or 1024, request.height or 1024


def check_limits(
    request: GenerationRequest, settings: Settings, *, name: Callable[[str], str] = str, count_batches: bool = True
) -> None:
    """Raise InvalidRequestError for the first limit ``request`` goes over. ``name`` turns a request
    field into what this front door calls it (the CLI's ``--batch-size``); errors name it and the setting.
    ``count_batches=False`` (the CLI and the Python API, on the user's own machine) limits one batch, which
    is what memory depends on, and lets a local run make a long series (``--batch-count 100``), as A1111 does;
    a server counts every image, as one client's request must not hold the queue for hours."""
    if request.steps is not None and request.steps > settings.max_steps:
        raise InvalidRequestError(
            name("steps"), f"at most {settings.max_steps} steps are allowed (max_steps, LIENZO_MAX_STEPS), got {request.steps}"
        )
    images = request.batch_size * (request.batch_count if count_batches else 1)
    if images > settings.max_images:
        # The field is batch_size, which every API has; the product shows when batch_count is the one to lower.
        product = f" ({name('batch_size')} {request.batch_size} x {name('batch_count')} {request.batch_count})" if count_batches and request.batch_count > 1 else ""
        raise InvalidRequestError(
            name("batch_size"),
            f"at most {settings.max_images} images per request are allowed (max_images, LIENZO_MAX_IMAGES), got {images}{product}",
        )
    width, height = output_size(request)
    if width * height > settings.max_pixels:
        # Without a size the input image's is made: say so, or a user who asked for no size is lost.
        from_input = request.init_image is not None and not (request.width and request.height)
        grown = " grown by the outpainting" if request.is_outpaint else ""
        implied = f" (the input image's size{grown})" if from_input else ""
        fix = f"; give a smaller {name('width')} and {name('height')}" if from_input else ""
        raise InvalidRequestError(
            name("width"),
            f"{width}x{height}{implied} is {width * height:,} pixels; at most {settings.max_pixels:,} are allowed "
            f"(max_pixels, LIENZO_MAX_PIXELS){fix}",
        )
