"""The command line (click): analyze -> cache -> train -> evaluate / predict / visualize / export,
and the demo; one module per command, ``common.py`` for what they share, ``torchrun.py`` for `cache`
under torchrun."""
from roiseg.cli import (  # noqa: F401 (registers)
    analyze,
    cache,
    demo,
    evaluate,
    export,
    predict,
    train,
    visualize,
)
from roiseg.cli.app import main

__all__ = ["main"]
