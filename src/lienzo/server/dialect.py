"""How an API family words its errors: its paths, its error body, its names for the request's fields.

``build_request``, the server's limits and the queue raise InvalidRequestError naming GenerationRequest's
fields; a client of the A1111 or OpenAI routes sent other names (``n_iter``, ``size``) and reads
another error body. One Dialect per family holds all of that, so each family writes it once: its
routes rename inside ``dialect.speaking()``, the app's exception handlers answer through
``dialect.error_response``, and /openapi.json documents ``error_model`` at ``invalid_status``.
"""

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Self

from pydantic import BaseModel

from lienzo.errors import InvalidRequestError
from lienzo.server.codec import JSONResponse


class ErrorBody(BaseModel):
    """Base of the families' error bodies: ``of`` builds one from what every error has."""

    @classmethod
    def of(cls, status: int, message: str, field: str | None) -> Self:
        raise NotImplementedError


def lead_word(field: str, name: str, message: str) -> str:
    """A message that starts with lienzo's field name ("n_iter must be ...") starts with the family's."""
    return name + message[len(field) :] if message.startswith(f"{field} ") else message


@dataclass(frozen=True)
class Dialect:
    """One API family's way of answering errors."""

    prefix: str  # the paths it answers (the native dialect also answers every path no other claims)
    error_model: type[ErrorBody]
    # The status of an invalid request: 422 as FastAPI answers it; OpenAI answers 400.
    invalid_status: int = 422
    # GenerationRequest's field -> the name a client of this family sent it as; others keep their name.
    fields: Mapping[str, str] = field(default_factory=dict)
    # (lienzo's field, this family's name, message) -> the message in this family's words.
    reword: Callable[[str, str, str], str] = lead_word

    def error_response(self, status: int, message: str, field: str | None) -> JSONResponse:
        status = self.invalid_status if status == 422 else status
        return JSONResponse(self.error_model.of(status, message, field).model_dump(), status_code=status)

    def rename(self, err: InvalidRequestError) -> InvalidRequestError:
        """``err`` naming this family's field (in ``field`` and in the message); itself when the name is the same."""
        name = self.fields.get(err.field)
        if name is None:
            return err
        return InvalidRequestError(name, self.reword(err.field, name, str(err).removeprefix(f"{err.field}: ")))

    @contextmanager
    def speaking(self) -> Iterator[None]:
        """Re-raise the InvalidRequestErrors raised inside with this family's field names."""
        try:
            yield
        except InvalidRequestError as err:
            renamed = self.rename(err)
            if renamed is err:
                raise
            raise renamed from None

    def field_error(self, field: str, message: str) -> JSONResponse:
        """The answer for a job that failed on ``field`` (its error stored as lienzo named it)."""
        err = self.rename(InvalidRequestError(field, message.removeprefix(f"{field}: ")))
        return self.error_response(self.invalid_status, str(err), err.field)
