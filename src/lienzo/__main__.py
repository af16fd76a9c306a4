"""``python -m lienzo``: the CLI, as launchers such as ``accelerate launch -m lienzo train`` call it."""

from lienzo.cli import main

main()
