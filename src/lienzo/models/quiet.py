"""Keeping the hub libraries quiet while lienzo loads models, and their errors to one line."""

from contextlib import contextmanager

from transformers.utils import logging as transformers_logging


@contextmanager
def quiet_transformers():
    """transformers draws a progress bar for every model it loads and logs a table of key names for
    every adapter it loads into a text encoder; the CLI draws its own progress, and the LoRA loader reports
    layers that do not fit in one line."""
    bar_was_on, verbosity = transformers_logging.is_progress_bar_enabled(), transformers_logging.get_verbosity()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bar_was_on:
            transformers_logging.enable_progress_bar()


def first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
