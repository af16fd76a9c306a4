"""One router per API family; each only translates its vocabulary to and from GenerationRequest."""

from lienzo.server.dialect import Dialect
from lienzo.server.routes import a1111, native, openai

# Every family's dialect; a path gets the first whose prefix it starts with, the native one otherwise
# (the gallery's paths, the studio's, paths that do not exist).
DIALECTS: tuple[Dialect, ...] = (openai.DIALECT, a1111.DIALECT, a1111.controlnet.DIALECT, native.DIALECT)


def dialect_for(path: str) -> Dialect:
    """The family whose error shape ``path`` gets."""
    return next((dialect for dialect in DIALECTS if path.startswith(dialect.prefix)), native.DIALECT)
