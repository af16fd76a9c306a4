"""The ``lienzo`` command line. Arguments are parsed only inside ``main()``.

Built on click rather than typer: the four generation commands share twenty options, and click's
decorators let them be declared once. Images go to stdout as paths, one per line; progress,
seeds and errors go to stderr.

The package: ``common`` (settings, console, shared options, the group), then one module per concern, each
registering its commands on ``app`` when imported. Importing it imports click and rich, never torch.
"""

import os
import warnings

from lienzo.cli import dataset, detect, gallery, generate, keys, models, plot, serve, train, upscale, verify  # noqa: F401  (register the commands)
from lienzo.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    # lienzo draws its own progress bars; the hub libraries' tqdm bars ("Loading weights") would interleave.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # transformers warns on import that torchvision is missing for image processors lienzo never uses.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # torchsde (DPM++ SDE) warns about float rounding at the ends of its interval on every run.
    warnings.filterwarnings("ignore", category=UserWarning, module="torchsde")
    app(prog_name="lienzo")
