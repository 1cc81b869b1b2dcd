"""Command line: analyze -> cache -> train -> visualize / export, plus a one-command demo."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

log = logging.getLogger("cli")
ANN_DIR = Path("data/annotations")
DEFAULT_ONNX = Path("ext_extractor/yolov9_e_wholebody25_0100_1x3x640x640_featext.onnx")
DEFAULT_FEATURE = "/model.34/Concat_output_0"


def ann_path(split: str, subset: str) -> Path:
    suffix = "" if subset == "full" else f"_{subset}"
    return ANN_DIR / f"instances_{split}2017_person_only_no_crowd{suffix}.json"


class UserError(click.ClickException):
    """One clear message, exit code 1, no traceback."""


def _user_errors(fn):
    """Turn the library's expected failures into one clear CLI message."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from featcache.errors import FeatCacheError
        try:
            return fn(*args, **kwargs)
        except FeatCacheError as exc:
            raise UserError(str(exc)) from exc
        except OSError as exc:
            if getattr(exc, "errno", None) == 28:
                raise UserError(f"disk full while writing ({exc.filename or 'output'}); finished work "
                                f"is kept - free space and re-run the same command") from exc
            raise UserError(f"{exc.strerror or exc}: {exc.filename or ''}".strip()) from exc
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool):
    """ROI-conditioned person segmentation: feature cache + decoder trainer."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@main.command()
@click.option("--ann", type=click.Path(path_type=Path), default=ann_path("train", "full"),
              show_default=True, help="COCO person annotation file.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("data_analyze.json"),
              show_default=True, help="Output JSON.")
@click.option("--roi-padding", type=float, default=0.1, show_default=True,
              help="ROI = box grown by this fraction of its width/height on each side.")
@click.option("--workers", type=int, default=None, help="Processes (default: all cores).")
@click.option("--input-size", type=int, default=640, show_default=True,
              help="Model input side, for ROI size statistics.")
@click.option("--resize", type=click.Choice(["stretch", "letterbox"]), default="stretch",
              show_default=True, help="Resize policy, for ROI size statistics.")
@_user_errors
def analyze(ann, out, roi_padding, workers, input_size, resize):
    """Class pixel ratios inside padded ROIs -> data_analyze.json (loss weights)."""
    from featcache.analyze import run_analyze, write_json_atomic
    from featcache.geometry import ResizePolicy
    if not 0 <= roi_padding < 1:
        raise UserError("--roi-padding must be in [0, 1)")
    res = run_analyze(ann, roi_padding, workers, ResizePolicy(input_size, input_size, resize))
    write_json_atomic(res, out)
    c, r = res["counts"], res["pixel_ratios"]
    click.echo(f"{c['images']} images, {c['instances']} persons, {c['rois']} ROIs "
               f"in {res['elapsed_s']:.1f}s")
    click.echo("pixel ratios  " + "  ".join(f"{k} {v:.4f}" for k, v in r.items()))
    click.echo("roi means     " + "  ".join(f"{k} {v:.4f}" for k, v in res["roi_mean_ratios"].items()))
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
