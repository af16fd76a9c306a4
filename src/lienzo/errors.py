"""Errors a user can act on. Front doors print ``str(err)`` as one line; nothing else leaks out."""


class LienzoError(ValueError):
    """Base class: the message names what is wrong and what is allowed."""


class InvalidRequestError(LienzoError):
    """A generation parameter is out of range; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelFileError(LienzoError):
    """A model file is missing, empty, truncated, corrupt, of an unknown architecture or unsafe."""


class ImageFileError(LienzoError):
    """An input image or mask cannot be read."""


class DatasetError(LienzoError):
    """A training data folder or its manifest is missing, unusable or cannot be written."""


class GenerationCancelled(Exception):
    """Raised between denoising steps when the caller asks to stop."""
