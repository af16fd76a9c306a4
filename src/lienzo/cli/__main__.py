"""``python -m lienzo.cli``."""

from lienzo.cli import main

main()
