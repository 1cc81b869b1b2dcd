"""`demo`: the whole pipeline on built-in synthetic data, in a folder of its own."""
from __future__ import annotations

from pathlib import Path

import click

from roiseg.cli.app import main
from roiseg.cli.common import at_least, option, user_errors


@main.command()
@option("--dir", "folder", type=click.Path(path_type=Path), default=Path("demo_run"), show_default=True,
        help="Demo folder: a new or empty one, or one the demo made (data, ONNX, caches, checkpoints, exports all "
             "go here).", panel="Outputs")
@option("--fresh", is_flag=True, help="Delete the demo's own folders in it first (otherwise data/caches are reused).",
        panel="Outputs")
@option("--epochs", type=int, default=8, show_default=True, callback=at_least(1))
@option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.", panel="Runtime")
@user_errors
def demo(folder, fresh, epochs, device):
    """Run the whole pipeline on built-in synthetic data (no downloads, a few minutes on a CPU)."""
    from roiseg.demo import DemoSettings, run_demo
    from roiseg.modeling.devices import resolve_device
    resolve_device(device)         # checked before the demo writes anything
    run_demo(folder, DemoSettings(epochs=epochs), fresh=fresh, device=device)
