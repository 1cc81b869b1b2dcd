"""`cache`: the extractor once per image -> an fp16 chunked Zarr store with rasterized targets."""
from __future__ import annotations

from pathlib import Path

import click

from roiseg.cli.app import main
from roiseg.cli.common import (
    ann_path,
    default_store,
    option,
    schema_options,
    user_errors,
)
from roiseg.data.cache_config import DEFAULT_ONNX, CacheConfig

SCALES = {"1/255": 1 / 255, "1": 1.0}


def _parse_shard(ctx, param, value):
    """``I/N`` -> (I, N); the schema checks 0 <= I < N.  None when not given (torchrun then shards)."""
    if value is None:
        return None
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter("use I/N, e.g. 0/4") from None
    return i, n


@main.command()
@option("--split", type=click.Choice(["train", "val"]), default="train", show_default=True, panel="Inputs",
        help="Which split: names the default annotation file, image folder and store.")
@option("--subset", type=click.Choice(["100", "500", "full"]), default="full", show_default=True, panel="Inputs",
        help="Which annotation file: _100, _500 or the full one.")
@option("--ann", type=click.Path(path_type=Path), help="Annotation file [from --split/--subset].", panel="Inputs")
@option("--images", type=click.Path(path_type=Path), help="Image folder [data/images/{split}2017].", panel="Inputs")
@option("--onnx", "onnx_path", type=click.Path(path_type=Path), default=DEFAULT_ONNX, show_default=True,
        help="Extractor ONNX model.", panel="Inputs")
@option("--out", type=click.Path(path_type=Path), help="Store path [cache/{split}2017[_subset].zarr].",
        panel="Outputs")
@option("--scale", type=click.Choice(list(SCALES)), default="1/255", show_default=True, panel="Extractor",
        help="Pixel scale: 1/255 gives 0-1 floats, 1 gives 0-255.")
@option("--shard", callback=_parse_shard, default=None, metavar="I/N", panel="Runtime",
        help="Fill only images i with i % N == I (several processes/machines share one store).")
@schema_options(CacheConfig)
@user_errors
def cache(split, subset, ann, images, onnx_path, scale, shard, out, **opts):
    """Run the ONNX extractor once per image -> fp16 chunked Zarr store + rasterized targets."""
    from roiseg.cli.torchrun import run_cache_launched
    from roiseg.common.schema import build
    from roiseg.data.cache import check_something_cached
    cfg = build(CacheConfig, {"ann": ann or ann_path(split, subset), "images": images or Path(f"data/images/{split}2017"),
                              "onnx": onnx_path, "out": out or default_store(split, subset),
                              "scale": SCALES[scale], "shard": shard or (0, 1)}, opts)
    s = run_cache_launched(cfg, shard is not None)
    if s is None:
        return   # a torchrun rank other than 0: rank 0 reports for all
    check_something_cached(s)
    click.echo(f"{s['cached']}/{s['images']} images cached in {s['store']} ({s['elapsed_s']:.1f}s, "
               f"{s['processed_now']} this run{s.get('ranks', '')}, provider {s['provider']})")
    if s["skipped"]:
        click.echo(f"{len(s['skipped'])} image(s) skipped (listed in the store's 'skipped' array):")
        for name, reason in list(s["skipped"].items())[:20]:
            click.echo(f"  {name}: {reason}")
    if not s["complete"]:
        click.echo("store not complete yet (other shards still to run?)")
