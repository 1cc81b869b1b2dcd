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


def default_store(split: str, subset: str) -> Path:
    return Path("cache") / f"{split}2017{'' if subset == 'full' else '_' + subset}.zarr"


def _parse_shard(ctx, param, value):
    if value is None:
        return (0, 1)
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter("use I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise click.BadParameter("need 0 <= I < N")
    return i, n


SCALES = {"1/255": 1 / 255, "1": 1.0}


@main.command()
@click.option("--split", type=click.Choice(["train", "val"]), default="train", show_default=True)
@click.option("--subset", type=click.Choice(["100", "500", "full"]), default="full", show_default=True,
              help="Which annotation file: _100, _500 or the full one.")
@click.option("--ann", type=click.Path(path_type=Path), help="Annotation file (default from split/subset).")
@click.option("--images", type=click.Path(path_type=Path), help="Image folder (default data/images/{split}2017).")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), default=DEFAULT_ONNX,
              show_default=True, help="Extractor ONNX model.")
@click.option("--feature-name", default=DEFAULT_FEATURE, show_default=True,
              help="Stride-8 tensor to cache (exposed from inside the graph if needed).")
@click.option("--provider", type=click.Choice(["auto", "tensorrt", "cuda", "cpu"]), default="auto",
              show_default=True, help="ONNX Runtime provider; auto tries TensorRT, CUDA, then CPU.")
@click.option("--channel-order", type=click.Choice(["rgb", "bgr"]), default="rgb", show_default=True)
@click.option("--scale", type=click.Choice(list(SCALES)), default="1/255", show_default=True,
              help="Pixel scale: 1/255 gives 0-1 floats, 1 gives 0-255.")
@click.option("--resize", type=click.Choice(["stretch", "letterbox"]), default="stretch", show_default=True)
@click.option("--roi-padding", type=float, default=0.1, show_default=True)
@click.option("--limit", type=int, default=None, help="Only the first N images.")
@click.option("--shard", callback=_parse_shard, default=None, metavar="I/N",
              help="Fill only images i with i %% N == I (several processes/machines share one store).")
@click.option("--out", type=click.Path(path_type=Path), help="Store path (default cache/{split}2017[_subset].zarr).")
@click.option("--workers", type=int, default=None, help="Decode threads (default min(4, cores)).")
@click.option("--batch", type=int, default=8, show_default=True, help="Batch size for dynamic-batch models.")
@click.option("--no-space-check", is_flag=True, help="Write even if the disk estimate says it will not fit.")
@click.option("--overwrite", is_flag=True, help="Delete an existing store at --out first.")
@_user_errors
def cache(split, subset, ann, images, onnx_path, feature_name, provider, channel_order, scale, resize,
          roi_padding, limit, shard, out, workers, batch, no_space_check, overwrite):
    """Run the ONNX extractor once per image -> fp16 chunked Zarr store + rasterized targets."""
    from featcache.cache import CacheConfig, run_cache
    cfg = CacheConfig(ann=ann or ann_path(split, subset), images=images or Path(f"data/images/{split}2017"),
                      onnx=onnx_path, out=out or default_store(split, subset), feature_name=feature_name,
                      provider=provider, channel_order=channel_order, scale=SCALES[scale], resize=resize,
                      roi_padding=roi_padding, limit=limit, shard=shard, batch=batch,
                      space_check=not no_space_check, overwrite=overwrite)
    if workers:
        cfg.workers = workers
    s = run_cache(cfg)
    click.echo(f"{s['cached']}/{s['images']} images cached in {s['store']} ({s['elapsed_s']:.1f}s, "
               f"{s['processed_now']} this run, provider {s['provider']})")
    if s["skipped"]:
        click.echo(f"{len(s['skipped'])} image(s) skipped (listed in the store's 'skipped' array):")
        for name, reason in list(s["skipped"].items())[:20]:
            click.echo(f"  {name}: {reason}")
    if not s["complete"]:
        click.echo("store not complete yet (other shards still to run?)")


if __name__ == "__main__":
    main()
