"""`analyze`: class pixel ratios inside padded ROIs -> data_analyze.json (the loss weights)."""
from __future__ import annotations

from pathlib import Path

import click

from roiseg.cli.app import main
from roiseg.cli.common import ann_path, at_least, option, padding, user_errors


@main.command()
@option("--ann", type=click.Path(path_type=Path), default=ann_path("train", "full"), show_default=True,
        help="COCO person annotation file.", panel="Inputs")
@option("--out", type=click.Path(path_type=Path), default=Path("data_analyze.json"), show_default=True,
        help="Output JSON (a new file, or one analyze wrote).", panel="Outputs")
@option("--roi-padding", type=float, default=0.1, show_default=True, callback=padding,
        help="ROI = box grown by this fraction of its width/height on each side.")
@option("--input-size", type=int, default=640, show_default=True, callback=at_least(8),
        help="Model input side, for ROI size statistics.")
@option("--resize", type=click.Choice(["stretch", "letterbox"]), default="stretch", show_default=True,
        help="Resize policy, for ROI size statistics.")
@option("--workers", type=int, default=None, callback=at_least(1), help="Processes (default: all cores).",
        panel="Runtime")
@user_errors
def analyze(ann, out, roi_padding, workers, input_size, resize):
    """Class pixel ratios inside padded ROIs -> data_analyze.json (loss weights)."""
    from roiseg.common.files import (
        check_output_file,
        json_with,
        refuse_overlap,
        write_json_atomic,
    )
    from roiseg.common.geometry import ResizePolicy
    from roiseg.data.analyze import run_analyze
    refuse_overlap({"--out": out}, {"--ann": ann})
    check_output_file(out, "--out", json_with(("counts", "pixel_ratios", "class_weights")),
                      "a data_analyze.json that analyze wrote")
    res = run_analyze(ann, roi_padding, workers, ResizePolicy(input_size, input_size, resize))
    write_json_atomic(out, res)
    c, r = res["counts"], res["pixel_ratios"]
    click.echo(f"{c['images']} images, {c['instances']} persons, {c['rois']} ROIs in {res['elapsed_s']:.1f}s")
    click.echo("pixel ratios  " + "  ".join(f"{k} {v:.4f}" for k, v in r.items()))
    click.echo("roi means     " + "  ".join(f"{k} {v:.4f}" for k, v in res["roi_mean_ratios"].items()))
    sc = res["sparse_cells"]
    if sc.get("mean") is not None:
        click.echo(f"cache --sparse keeps {sc['mean']:.1%} of the stride-8 feature cells on average "
                   f"(median {sc['p50']:.1%}, margin {sc['margin']})")
    click.echo(f"wrote {out}")
