"""`visualize`: an epoch's validation PNG again, from its checkpoint."""
from __future__ import annotations

from pathlib import Path

import click

from roiseg.cli.app import main
from roiseg.cli.common import (
    checkpoint_from,
    checkpoint_options,
    option,
    provider_option,
    user_errors,
)


@main.command()
@checkpoint_options
@option("--ann", type=click.Path(path_type=Path), help="Val annotations [the val cache's].", panel="Inputs")
@option("--images", type=click.Path(path_type=Path), help="Val image folder [the val cache's].", panel="Inputs")
@option("--onnx", "onnx_path", type=click.Path(path_type=Path), help="Extractor ONNX [the cache's].", panel="Inputs")
@option("--out-dir", type=click.Path(path_type=Path), help="Where to write the PNG [next to the checkpoint].",
        panel="Outputs")
@option("--vis-images", help="Comma-separated val file names (default: the run's, else the four fixed ones).")
@provider_option()
@user_errors
def visualize(epoch, checkpoint, checkpoints, ann, images, onnx_path, provider, vis_images, out_dir):
    """Redraw an epoch's validation PNG from its checkpoint (live extractor, full resolution)."""
    from roiseg.inference.visualize import redraw_validation_png
    path = checkpoint_from(epoch, checkpoint, checkpoints)
    png = redraw_validation_png(path, ann, images, onnx_path, provider,
                                [v.strip() for v in vis_images.split(",")] if vis_images else None, out_dir)
    click.echo(f"wrote {png}")
