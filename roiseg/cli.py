"""Command line: analyze -> cache -> train -> visualize / export, plus a one-command demo."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from roiseg.common.threads import configure_threads

configure_threads()  # before any command imports torch (OpenMP reads its wait policy once)

log = logging.getLogger("cli")
ANN_DIR = Path("data/annotations")
from roiseg.common.providers import PROVIDERS  # noqa: E402
from roiseg.data.cache_config import (
    DEFAULT_ONNX,  # noqa: E402  (after configure_threads)
)


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
        from roiseg.common.errors import RoisegError
        try:
            return fn(*args, **kwargs)
        except RoisegError as exc:
            raise UserError(str(exc)) from exc
        except OSError as exc:
            from roiseg.common.files import user_facing_name
            name = user_facing_name(exc.filename)
            if getattr(exc, "errno", None) == 28:
                raise UserError(f"disk full while writing ({name or 'output'}); finished work "
                                f"is kept - free space and re-run the same command") from exc
            raise UserError(f"{exc.strerror or exc}: {name or ''}".strip()) from exc
    return wrapper


class ExitOneGroup(click.Group):
    """Usage errors (unknown option, bad choice, missing argument) exit 1 like every other user
    error, not click's 2: one rule for scripts that call the CLI."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            exc.show()
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


MAX_PIXELS_HELP = "Images larger than this many pixels are skipped (decompression bombs) [89478485, Pillow's]."


def refuse_unused(ctx: click.Context, names, why: str) -> None:
    """Options the user gave (command line or environment) that would do nothing here: an error
    that says why, never a silent no-op."""
    from click.core import ParameterSource
    given = [n for n in names if ctx.get_parameter_source(n) in (ParameterSource.COMMANDLINE,
                                                                  ParameterSource.ENVIRONMENT)]
    if given:
        flags = ", ".join("--" + n.replace("_", "-").replace("onnx-path", "onnx").replace("mask-format", "masks")
                          for n in given)
        raise UserError(f"{flags}: {why}")


@click.group(cls=ExitOneGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool):
    """ROI-conditioned person segmentation: feature cache + decoder trainer."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _at_least(low: float, strict: bool = False):
    """Option check: a number >= low (> low when strict); one message, exit code 1."""
    def check(ctx, param, value):
        if value is not None and (value <= low if strict else value < low):
            raise UserError(f"--{param.name.replace('_', '-')} must be {'>' if strict else '>='} {low:g}, got {value}")
        return value
    return check


def _unit(ctx, param, value):
    if value is not None and not 0 <= value <= 1:
        raise UserError(f"--{param.name.replace('_', '-')} must be in [0, 1], got {value}")
    return value


def _padding(ctx, param, value):
    if value is not None and not 0 <= value < 1:
        raise UserError(f"--{param.name.replace('_', '-')} must be in [0, 1), got {value}")
    return value


@main.command()
@click.option("--ann", type=click.Path(path_type=Path), default=ann_path("train", "full"),
              show_default=True, help="COCO person annotation file.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("data_analyze.json"),
              show_default=True, help="Output JSON.")
@click.option("--roi-padding", type=float, default=0.1, show_default=True, callback=_padding,
              help="ROI = box grown by this fraction of its width/height on each side.")
@click.option("--workers", type=int, default=None, callback=_at_least(1), help="Processes (default: all cores).")
@click.option("--input-size", type=int, default=640, show_default=True, callback=_at_least(8),
              help="Model input side, for ROI size statistics.")
@click.option("--resize", type=click.Choice(["stretch", "letterbox"]), default="stretch",
              show_default=True, help="Resize policy, for ROI size statistics.")
@_user_errors
def analyze(ann, out, roi_padding, workers, input_size, resize):
    """Class pixel ratios inside padded ROIs -> data_analyze.json (loss weights)."""
    from roiseg.common.files import refuse_overlap, write_json_atomic
    from roiseg.common.geometry import ResizePolicy
    from roiseg.data.analyze import run_analyze
    refuse_overlap({"--out": out}, {"--ann": ann})
    res = run_analyze(ann, roi_padding, workers, ResizePolicy(input_size, input_size, resize))
    write_json_atomic(out, res)
    c, r = res["counts"], res["pixel_ratios"]
    click.echo(f"{c['images']} images, {c['instances']} persons, {c['rois']} ROIs "
               f"in {res['elapsed_s']:.1f}s")
    click.echo("pixel ratios  " + "  ".join(f"{k} {v:.4f}" for k, v in r.items()))
    click.echo("roi means     " + "  ".join(f"{k} {v:.4f}" for k, v in res["roi_mean_ratios"].items()))
    sc = res["sparse_cells"]
    if sc.get("mean") is not None:
        click.echo(f"cache --sparse keeps {sc['mean']:.1%} of the stride-8 feature cells on average "
                   f"(median {sc['p50']:.1%}, margin {sc['margin']})")
    click.echo(f"wrote {out}")


def schema_options(cls):
    """Click options for every field of a config schema (``roiseg.common.schema``): names, choices,
    help and shown defaults all come from the schema; values are checked by it (one message each).
    Every option defaults to None: only what the user gives overrides a config file or a resumed run."""
    from roiseg.common.schema import specs
    metavars = {int: "INTEGER", float: "FLOAT", str: "TEXT", list: "A,B,..."}

    def decorate(fn):
        for spec in reversed(list(specs(cls).values())):
            if spec.flag is None:
                continue
            if spec.kind is bool:
                opt = click.option(f"{spec.flag}/--no-{spec.flag[2:]}", spec.name, default=None, help=spec.help)
            elif spec.choices is not None:
                opt = click.option(spec.flag, spec.name, type=click.Choice([str(c) for c in spec.choices]),
                                   default=None, help=spec.help)
            else:
                opt = click.option(spec.flag, spec.name, default=None, help=spec.help,
                                   metavar=spec.info.metavar or metavars.get(spec.kind, "TEXT"))
            fn = opt(fn)
        return fn
    return decorate


def default_store(split: str, subset: str) -> Path:
    return Path("cache") / f"{split}2017{'' if subset == 'full' else '_' + subset}.zarr"


def _parse_shard(ctx, param, value):
    """``I/N`` -> (I, N); the schema checks 0 <= I < N.  None when not given (torchrun then shards)."""
    if value is None:
        return None
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter("use I/N, e.g. 0/4") from None
    return i, n


SCALES = {"1/255": 1 / 255, "1": 1.0}
# --provider of the commands that run an extractor or an exported graph (cache's comes from its schema)
provider_option = click.option("--provider", type=click.Choice(list(PROVIDERS)), default="auto",
                               show_default=True, help="ONNX Runtime provider; auto tries TensorRT, CUDA, then CPU.")


def _cache_config():
    from roiseg.data.cache_config import CacheConfig
    return CacheConfig


@main.command()
@click.option("--split", type=click.Choice(["train", "val"]), default="train", show_default=True)
@click.option("--subset", type=click.Choice(["100", "500", "full"]), default="full", show_default=True,
              help="Which annotation file: _100, _500 or the full one.")
@click.option("--ann", type=click.Path(path_type=Path), help="Annotation file [from --split/--subset].")
@click.option("--images", type=click.Path(path_type=Path), help="Image folder [data/images/{split}2017].")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), default=DEFAULT_ONNX,
              show_default=True, help="Extractor ONNX model.")
@click.option("--scale", type=click.Choice(list(SCALES)), default="1/255", show_default=True,
              help="Pixel scale: 1/255 gives 0-1 floats, 1 gives 0-255.")
@click.option("--shard", callback=_parse_shard, default=None, metavar="I/N",
              help="Fill only images i with i % N == I (several processes/machines share one store).")
@click.option("--out", type=click.Path(path_type=Path), help="Store path [cache/{split}2017[_subset].zarr].")
@schema_options(_cache_config())
@_user_errors
def cache(split, subset, ann, images, onnx_path, scale, shard, out, **opts):
    """Run the ONNX extractor once per image -> fp16 chunked Zarr store + rasterized targets."""
    from roiseg.common.schema import build
    cfg = build(_cache_config(), {"ann": ann or ann_path(split, subset), "images": images or Path(f"data/images/{split}2017"),
                                  "onnx": onnx_path, "out": out or default_store(split, subset),
                                  "scale": SCALES[scale], "shard": shard or (0, 1)}, opts)
    s = _run_cache_launched(cfg, shard is not None)
    if s is None:
        return   # a torchrun rank other than 0: rank 0 reports for all
    from roiseg.data.cache import check_something_cached
    check_something_cached(s)
    click.echo(f"{s['cached']}/{s['images']} images cached in {s['store']} ({s['elapsed_s']:.1f}s, "
               f"{s['processed_now']} this run{s.get('ranks', '')}, provider {s['provider']})")
    if s["skipped"]:
        click.echo(f"{len(s['skipped'])} image(s) skipped (listed in the store's 'skipped' array):")
        for name, reason in list(s["skipped"].items())[:20]:
            click.echo(f"  {name}: {reason}")
    if not s["complete"]:
        click.echo("store not complete yet (other shards still to run?)")


def _run_cache_launched(cfg, shard_given: bool):
    """`cache`, or under torchrun (WORLD_SIZE > 1) one shard per rank: shard RANK/WORLD_SIZE on the
    rank's local GPU (LOCAL_RANK); rank 0 opens or creates the store while the others wait at a
    barrier, and gathers the ranks' summaries (None on the other ranks).  A rank that dies leaves a
    store a re-run completes, as with --shard."""
    import dataclasses
    import os

    from roiseg.data.cache import run_cache
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world == 1:
        return run_cache(cfg)
    if shard_given:
        raise UserError("--shard and torchrun both split the images: launch with torchrun without --shard, "
                        "or run one process per --shard I/N")
    from datetime import timedelta

    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    # gloo: only a few small messages; a shard may run for hours before the final gather
    dist.init_process_group("gloo", timeout=timedelta(days=7))
    try:
        cfg = dataclasses.replace(cfg, shard=(rank, world))
        if rank == 0:
            s = run_cache(cfg, progress=True, on_store_ready=dist.barrier)
        else:
            dist.barrier()                  # the store exists: fill this rank's shard
            s = run_cache(cfg, progress=False)
        every = [None] * world
        dist.all_gather_object(every, s)
        if rank != 0:
            return None
        from roiseg.data.store import FeatureStore
        store = FeatureStore(cfg.out)
        done, skipped = store.done_mask(), store.skipped()
        return {**s, "cached": int(done.sum()) - len(skipped), "complete": bool(done.all()),
                "processed_now": sum(r["processed_now"] for r in every),
                "newly_skipped": sum(r["newly_skipped"] for r in every),
                "skipped": {k: v for r in every for k, v in r["skipped"].items()},
                "elapsed_s": max(r["elapsed_s"] for r in every), "created": every[0].get("created", False),
                "ranks": f" by {world} ranks (" + ", ".join(str(r["processed_now"]) for r in every) + ")"}
    finally:
        dist.destroy_process_group()


def _train_config():
    from roiseg.training.config import TrainConfig
    return TrainConfig


@main.command()
@click.option("--config", "config_file", type=click.Path(exists=True, path_type=Path),
              help="TOML or YAML file with any train option (a [train] table or top level).")
@click.option("--subset", type=click.Choice(["100", "500", "full"]), default=None,
              help="Train on cache/train2017[_subset].zarr (val: cache/val2017.zarr).")
@click.option("--dice-on-others", is_flag=True, default=None, help="Dice on class 2 too.")
@schema_options(_train_config())
@_user_errors
def train(config_file, subset, dice_on_others, **opts):
    """Train the decoder from the cache only; checkpoint (+ validation PNG) every epoch."""
    from roiseg.inference.visualize import training_hooks
    from roiseg.training.config import make_config
    from roiseg.training.run import run_training
    if subset and not opts.get("train_store"):
        opts["train_store"] = str(default_store("train", subset))
    if dice_on_others:
        opts["dice_classes"] = [1, 2]
    base = None
    if opts.get("resume"):   # the run's own settings; options given now override them
        from roiseg.training.run_state import run_settings
        base = run_settings(opts["resume"], opts.get("out"))
    try:
        cfg = make_config(config_file, base=base, **opts)
    except (ValueError, TypeError) as exc:
        raise UserError(f"bad configuration: {exc}") from exc
    res = run_training(cfg, training_hooks(cfg))
    if res.trained_epochs == 0:
        click.echo(f"nothing to do: the run in {res.out} already finished epoch {res.epochs} of {res.epochs} "
                   f"(pass --epochs N above {res.epochs} with --resume to train longer)")
    elif res.history:
        last = res.history[-1]
        click.echo(f"done: epoch {last['epoch']} mIoU {last['mIoU']:.4f} "
                   f"instance_mIoU {last['instance_mIoU']:.4f} -> {res.out}")


def _checkpoint_from(epoch, checkpoint, folder, default: str | None = None) -> Path:
    """--checkpoint PATH | best | last (in --checkpoints), or --epoch N; ``default`` when neither."""
    from roiseg.modeling.checkpoint import find_checkpoint
    checkpoint = str(checkpoint) if checkpoint else (None if epoch is not None else default)
    if checkpoint in ("best", "last") and not Path(checkpoint).is_file():
        path = Path(folder) / f"{checkpoint}.pth"
        if not path.is_file():
            raise UserError(f"no {checkpoint}.pth in {folder} (pass --checkpoints DIR, --epoch N or --checkpoint PATH)")
        return path
    if checkpoint:
        return Path(checkpoint)
    if epoch is None:
        raise UserError("pass --epoch N or --checkpoint PATH")
    return find_checkpoint(folder, epoch)


@main.command()
@click.option("--epoch", type=int, help="Find checkpoint_epoch_{epoch:04d}_*.pth in --checkpoints.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="A checkpoint file instead.")
@click.option("--checkpoints", type=click.Path(path_type=Path), default=Path("checkpoints"), show_default=True)
@click.option("--ann", type=click.Path(path_type=Path), help="Val annotations [the val cache's].")
@click.option("--images", type=click.Path(path_type=Path), help="Val image folder [the val cache's].")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), help="Extractor ONNX [the cache's].")
@provider_option
@click.option("--vis-images", help="Comma-separated val file names (default: the four fixed ones).")
@click.option("--out-dir", type=click.Path(path_type=Path), help="Where to write the PNG [next to the checkpoint].")
@_user_errors
def visualize(epoch, checkpoint, checkpoints, ann, images, onnx_path, provider, vis_images, out_dir):
    """Redraw an epoch's validation PNG from its checkpoint (live extractor, full resolution)."""
    from roiseg.inference.visualize import redraw_validation_png
    path = _checkpoint_from(epoch, checkpoint, checkpoints)
    png = redraw_validation_png(path, ann, images, onnx_path, provider,
                                [v.strip() for v in vis_images.split(",")] if vis_images else None, out_dir)
    click.echo(f"wrote {png}")


@main.command()
@click.option("--epoch", type=int, help="Find the checkpoint of this epoch in --checkpoints.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="A checkpoint file instead.")
@click.option("--checkpoints", type=click.Path(path_type=Path), default=Path("checkpoints"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Decoder ONNX [<checkpoint>.decoder.onnx].")
@click.option("--opset", type=int, default=17, show_default=True,
              help="ONNX opset: 16 (RoiAlign with half_pixel) up to what torch and ONNX Runtime support (20).")
@click.option("--end-to-end", is_flag=True, help="Also write extractor + decoder as one graph.")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), help="Extractor ONNX for --end-to-end.")
@click.option("--masks", "mask_format", type=click.Choice(["binary", "prob"]), default="binary", show_default=True,
              help="masks output: uint8 0/1 at --threshold, or the fp16 class-1 probability.")
@click.option("--threshold", type=float, default=0.5, show_default=True, callback=_unit,
              help="Class-1 probability above which a pixel is the person (masks, instance_map).")
@click.option("--full-probs", is_flag=True, help="Also output probs [N,3,H,W] (all classes, fp32: 12 bytes per pixel and ROI).")
@click.option("--half", is_flag=True, help="fp16 weights and activations in the conv stack (GPU); parity is checked and reported.")
@_user_errors
@click.pass_context
def export(ctx, epoch, checkpoint, checkpoints, out, opset, end_to_end, onnx_path, mask_format, threshold,
           full_probs, half):
    """Export the decoder to ONNX, check parity with PyTorch in ONNX Runtime, report latency."""
    if not end_to_end:
        refuse_unused(ctx, ["onnx_path"], "the extractor is part of the end-to-end graph only: add --end-to-end")
    from roiseg.export.export import default_paths, export_checkpoint
    from roiseg.export.graph import ExportError
    from roiseg.export.parity import decoder_latency, format_parity
    path = _checkpoint_from(epoch, checkpoint, checkpoints)
    try:
        res = export_checkpoint(path, out, opset, end_to_end, onnx_path, masks=mask_format, threshold=threshold,
                                full_probs=full_probs, half=half)
    except ExportError as exc:
        kept = [str(p) for p in default_paths(path, out, half, end_to_end) if p is not None and p.exists()]
        raise UserError(f"{exc}\nnothing was written{'; kept as they were: ' + ', '.join(kept) if kept else ''}") from exc
    spec, out = res.spec, res.decoder
    click.echo(f"wrote {out} (opset {opset}{', fp16 conv stack' if half else ''}; inputs {', '.join(spec.inputs)} "
               f"-> {', '.join(spec.outputs)})")
    click.echo("parity vs PyTorch (max abs diff): " + format_parity(res.parity))
    if res.end_to_end is not None:
        click.echo(f"wrote {res.end_to_end} (images [1,3,H,W] + {', '.join(i for i in spec.inputs[1:] if i != 'fine')} "
                   f"-> {', '.join(spec.outputs)})")
    lat = decoder_latency(out, spec)
    click.echo("decoder latency on CPU (ms): " + ", ".join(f"{n} ROIs {ms}" for n, ms in lat.items()))


@main.command()
@click.option("--source", required=True, help="Image file, image folder, video file or camera index (0, 1 ...).")
@click.option("--checkpoint", help="Checkpoint file, or best / last in --checkpoints [best].")
@click.option("--epoch", type=int, help="The checkpoint of this epoch in --checkpoints.")
@click.option("--checkpoints", type=click.Path(path_type=Path), default=Path("checkpoints"), show_default=True)
@click.option("--exported", type=click.Path(path_type=Path),
              help="An exported decoder ONNX (with its extractor) or end-to-end ONNX instead of a checkpoint: "
                   "ONNX Runtime only, no torch (end-to-end graphs need --boxes gt or a boxes file).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("predictions"), show_default=True,
              help="Output folder: overlays, predictions.json, masks/.")
@click.option("--boxes", default="auto", show_default=True,
              help="auto = the extractor's own person detections; gt = persons of --ann; or a JSON file "
                   "(COCO results, COCO annotations, or {file_name: normalized boxes}).")
@click.option("--box-format", type=click.Choice(["xyxy", "cxcywh"]), default="xyxy", show_default=True,
              help="Layout of normalized boxes in a {file_name: boxes} file.")
@click.option("--ann", type=click.Path(path_type=Path),
              help="COCO annotations: image ids for predictions.json (by file name), and the boxes of --boxes gt.")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), help="Extractor ONNX [the checkpoint's].")
@provider_option
@click.option("--device", default="auto", show_default=True, help="Decoder device: auto (CUDA if present), cpu, cuda.")
@click.option("--det-output", help="Detection output name [the first output of a known layout].")
@click.option("--det-format", type=click.Choice(["auto", "yolov8", "yolox", "yolox-decoded", "nms"]),
              default="auto", show_default=True, help="Detection output layout (see README).")
@click.option("--person-class", type=int, default=0, show_default=True,
              help="Class index of persons in the detector (0 = body for wholebody25, person for COCO).")
@click.option("--conf", type=float, default=0.25, show_default=True, callback=_unit, help="Detection score threshold.")
@click.option("--iou", type=float, default=0.65, show_default=True, callback=_unit, help="NMS IoU threshold.")
@click.option("--max-det", type=int, default=100, show_default=True, callback=_at_least(1))
@click.option("--threshold", type=float, default=0.5, show_default=True, callback=_unit,
              help="Class-1 probability above which a pixel is the person.")
@click.option("--save-masks", is_flag=True, help="One PNG per person (original resolution) in OUT/masks.")
@click.option("--polygons", is_flag=True, help="Also OUT/predictions_polygons.json: COCO polygons (OpenCV contours).")
@click.option("--no-overlays", is_flag=True, help="Do not write overlay images / video.")
@click.option("--hide-boxes", is_flag=True, help="Overlays without person boxes.")
@click.option("--hide-scores", is_flag=True, help="Overlays without scores.")
@click.option("--max-frames", type=int, callback=_at_least(1), help="Video/camera: stop after N frames.")
@click.option("--exif/--no-exif", default=None,
              help="Apply the EXIF orientation of photos [on with --boxes auto; off with box files and --ann, "
                   "whose coordinates refer to the pixels as stored].")
@click.option("--max-pixels", type=int, default=None, callback=_at_least(1), help=MAX_PIXELS_HELP)
@_user_errors
@click.pass_context
def predict(ctx, source, checkpoint, epoch, checkpoints, exported, out, boxes, box_format, ann, onnx_path, provider,
            device, det_output, det_format, person_class, conf, iou, max_det, threshold, save_masks, polygons,
            no_overlays, hide_boxes, hide_scores, max_frames, exif, max_pixels):
    """Person masks for new images, a video or a camera, with the extractor's own person boxes."""
    from roiseg.runtime.predict import VIDEO_EXT, is_camera
    if boxes != "auto":
        refuse_unused(ctx, ["det_output", "det_format", "person_class", "conf", "iou", "max_det"],
                      f"they set the extractor's own detections, and --boxes {boxes} gives the boxes")
    if boxes in ("auto", "gt"):
        refuse_unused(ctx, ["box_format"], "it reads normalized boxes of a --boxes FILE only")
    if no_overlays:
        refuse_unused(ctx, ["hide_boxes", "hide_scores"], "they change the overlays, and --no-overlays writes none")
    if not (is_camera(source) or Path(str(source)).suffix.lower() in VIDEO_EXT):
        refuse_unused(ctx, ["max_frames"], "it limits a video or camera, and --source is images")
    from roiseg.runtime.detection import DetectionSettings
    from roiseg.runtime.predict import PredictOptions, run_predict
    if exported is not None and (checkpoint or epoch is not None):
        raise UserError("give --exported or a checkpoint (--checkpoint/--epoch), not both")
    if exported is not None and device != "auto":
        raise UserError("--device is the PyTorch decoder's device; an --exported graph runs in ONNX Runtime: "
                        "choose its provider with --provider")
    path = None if exported is not None else _checkpoint_from(epoch, checkpoint, checkpoints, default="best")
    if exported is None:
        from roiseg.modeling.devices import resolve_device
        device = str(resolve_device(device))
    opts = PredictOptions(source=source, out=out, checkpoint=path, exported=exported, onnx=onnx_path, provider=provider,
                          device=device, boxes=boxes, box_format=box_format, ann=ann,
                          detection=DetectionSettings(det_output, det_format, person_class, conf, iou, max_det),
                          threshold=threshold, save_masks=save_masks, polygons=polygons,
                          overlays=not no_overlays, show_boxes=not hide_boxes, show_scores=not hide_scores,
                          max_frames=max_frames, exif=exif)
    if max_pixels:
        opts.max_pixels = max_pixels
    if exported is None:
        from roiseg.inference.torch_decoder import checkpoint_predictor
    s = run_predict(opts, None if exported is not None else checkpoint_predictor(opts))
    click.echo(f"{s['images']} images, {s['persons']} persons in {s['seconds']:.1f}s "
               f"({s['images_per_s']:.2f} images/s, image encoder on {s['provider']}, decoder on {s['decoder']}) "
               f"-> {s['out']}")
    if "instance_mIoU" in s:
        click.echo(f"instance mIoU with the GT boxes: {s['instance_mIoU']:.4f} (boundary IoU {s['boundary_IoU']:.4f})")
    if s["boxes_skipped"]:
        click.echo(s["boxes_skipped"])
    if s["skipped"]:
        click.echo(f"{len(s['skipped'])} image(s) skipped:")
    for line in s["skipped"][:20]:
        click.echo(f"  {line}")


@main.command()
@click.option("--checkpoint", "checkpoint_list", multiple=True,
              help="Checkpoint file, glob ('checkpoints/*.pth'), best or last; repeat for a comparison table.")
@click.option("--epoch", "epochs", type=int, multiple=True, help="Checkpoint of this epoch (repeatable).")
@click.option("--checkpoints", type=click.Path(path_type=Path), default=Path("checkpoints"), show_default=True)
@click.option("--val-store", type=click.Path(path_type=Path), help="Val cache [the one each checkpoint was trained with].")
@click.option("--ann", type=click.Path(path_type=Path), help="Evaluate on these annotations instead (with --images).")
@click.option("--images", type=click.Path(path_type=Path), help="Image folder of --ann.")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), help="Extractor for --ann [the checkpoint's].")
@provider_option
@click.option("--limit", type=int, callback=_at_least(1), help="--ann: only the first N images.")
@click.option("--work-dir", type=click.Path(path_type=Path), help="--ann: where the temporary store goes [system temp].")
@click.option("--coco-eval", is_flag=True, help="Also COCO mask AP (pycocotools, GT boxes as detections).")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", type=int, callback=_at_least(1), help="Images per batch [64 CUDA, 8 CPU].")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write all metrics here.")
@_user_errors
@click.pass_context
def evaluate(ctx, checkpoint_list, epochs, checkpoints, val_store, ann, images, onnx_path, provider, limit, work_dir,
             coco_eval, device, batch_size, json_out):
    """Score one or more checkpoints: mIoU, class IoUs, instance mIoU (S/M/L, overlapped), box baseline."""
    if ann is None:
        refuse_unused(ctx, ["onnx_path", "provider", "limit", "work_dir"],
                      "they build a temporary store from --ann/--images; without them the cached store is read")
    elif val_store is not None:
        raise UserError("give --val-store or --ann with --images, not both")
    import glob
    import json as _json

    from roiseg.common.files import write_text_atomic
    from roiseg.inference.evaluate import (
        comparison_table,
        evaluate_checkpoint,
        live_store,
    )
    from roiseg.modeling.devices import resolve_device
    resolve_device(device)         # an absent GPU is one message before any work
    paths = []
    for spec in checkpoint_list:
        if any(ch in spec for ch in "*?["):
            found = sorted(p for p in glob.glob(spec) if p.endswith(".pth"))
            if not found:
                raise UserError(f"no checkpoint matches {spec}")
            paths += [Path(p) for p in found]
        else:
            paths.append(_checkpoint_from(None, spec, checkpoints))
    paths += [_checkpoint_from(e, None, checkpoints) for e in epochs]
    if not paths:
        paths = [_checkpoint_from(None, None, checkpoints, default="best")]
    if (ann is None) != (images is None):
        raise UserError("--ann and --images go together")
    from roiseg.common.files import refuse_overlap
    from roiseg.modeling.checkpoint import load_checkpoint
    referenced = {k: v for p in paths for k, v in load_checkpoint(p).referenced_inputs().items()}
    refuse_overlap({"--json": json_out, "--work-dir": work_dir},
                   {**{f"--checkpoint {p.name}": p for p in paths}, "--val-store": val_store, "--ann": ann,
                    "--images": images, "--onnx": onnx_path, **referenced}, inputs_inside_outputs=False)
    results = []
    if ann is not None:
        from roiseg.common.providers import device_id_for
        gpu = device_id_for(device) if str(device).startswith("cuda") else None   # the decoder's GPU
        with live_store(paths[0], ann, images, work_dir, onnx_path, provider, limit, gpu) as store:
            for p in paths:
                results.append(evaluate_checkpoint(p, store, device=device, coco_eval=coco_eval, batch_size=batch_size))
    else:
        for p in paths:
            results.append(evaluate_checkpoint(p, val_store, device=device, coco_eval=coco_eval, batch_size=batch_size))
    click.echo(comparison_table(results))
    if json_out:
        write_text_atomic(Path(json_out), _json.dumps(results, indent=2))
        click.echo(f"wrote {json_out}")


@main.command()
@click.option("--dir", "folder", type=click.Path(path_type=Path), default=Path("demo_run"), show_default=True,
              help="Demo folder (data, ONNX, caches, checkpoints, exports all go here).")
@click.option("--fresh", is_flag=True, help="Delete the demo folder first (otherwise data/caches are reused).")
@click.option("--epochs", type=int, default=8, show_default=True, callback=_at_least(1))
@click.option("--device", default="auto", show_default=True)
@_user_errors
def demo(folder, fresh, epochs, device):
    """Run the whole pipeline on built-in synthetic data (no downloads, a few minutes on a CPU)."""
    from roiseg.demo import DemoSettings, run_demo
    from roiseg.modeling.devices import resolve_device
    resolve_device(device)         # checked before the demo writes anything
    run_demo(folder, DemoSettings(epochs=epochs), fresh=fresh, device=device)


if __name__ == "__main__":
    main()
