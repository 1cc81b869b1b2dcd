"""`cli.py demo`: the whole pipeline on built-in synthetic data, in a folder of its own.

Generates a COCO-format synthetic person dataset and a stand-in extractor ONNX, then runs the real
stages: analyze -> cache (train, val) -> train (checkpoints + validation PNGs) -> visualize ->
export (+ parity check).  Re-running reuses the data and caches and retrains from scratch; the
user's data/, cache/ and checkpoints/ are never touched.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click

from roiseg.data.cache_config import (
    DEFAULT_FEATURE as DEMO_FEATURE,  # the stand-in names it so
)


@dataclass
class DemoSettings:
    n_train: int = 160
    n_val: int = 24
    channels: int = 64       # the real model has 1024; 64 keeps the demo to a couple of minutes on a CPU
    epochs: int = 8
    hidden: int = 64
    seed: int = 0


def _step(n: int, total: int, text: str) -> float:
    click.secho(f"\n[{n}/{total}] {text}", bold=True)
    return time.perf_counter()


def _done(t0: float, what: str = "") -> None:
    click.echo(f"      done in {time.perf_counter() - t0:.1f}s {what}")


# The demo owns only what it creates: a folder it made (or found empty) and marked with MARKER.
MARKER = ".roiseg-demo"
DEMO_ENTRIES = ("data", "ext_extractor", "cache", "checkpoints", "export", "data_analyze.json",
                "demo_summary.json")


def claim_demo_folder(folder: Path, fresh: bool):
    """Lock ``folder`` for this demo run, refusing any folder the demo did not create: a new or
    empty folder is marked as the demo's; one without the mark that holds anything is refused with
    what it holds.  ``fresh`` deletes the demo's own entries (``DEMO_ENTRIES``) of a marked folder,
    nothing else."""
    from roiseg.common.errors import FeatCacheError
    from roiseg.common.files import claim_folder, folder_entries, write_text_atomic
    if folder.exists() and not folder.is_dir():
        raise FeatCacheError(f"--dir {folder} is a file, not a folder: pick a new folder for the demo")
    claim = claim_folder(folder, "demo folder")
    held = folder_entries(folder)
    if held and MARKER not in held:
        claim.release()
        shown = ", ".join(held[:8]) + (f" ... ({len(held)} entries)" if len(held) > 8 else "")
        raise FeatCacheError(f"--dir {folder} holds files the demo did not create ({shown}): the demo writes only "
                             f"into a new or empty folder it marks as its own (or one it made before). Pick another "
                             f"--dir (default: demo_run)")
    if not held:
        write_text_atomic(folder / MARKER, "made by `cli.py demo`: `demo --fresh` may delete the demo's folders here\n")
    elif fresh:
        for name in DEMO_ENTRIES:
            path = folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    return claim


def run_demo(folder: Path, settings: DemoSettings = DemoSettings(), fresh: bool = False,
             device: str = "auto") -> dict:
    """The demo in ``folder`` (see the module docstring); its summary."""
    folder = Path(folder).resolve()
    claim = claim_demo_folder(folder, fresh)
    try:
        return _run_demo(folder, settings, device)
    finally:
        claim.release()


def _run_demo(folder: Path, settings: DemoSettings, device: str) -> dict:
    from roiseg.common.files import write_json_atomic, write_text_atomic
    from roiseg.data.analyze import run_analyze
    from roiseg.data.cache import CacheConfig, run_cache
    from roiseg.data.standin import build_standin_extractor
    from roiseg.data.store import StoreError
    from roiseg.data.synthetic import make_synthetic_dataset
    from roiseg.export.export import (
        export_decoder,
        export_end_to_end,
        predictor_metadata,
    )
    from roiseg.export.graph import ExportSpec
    from roiseg.export.parity import (
        check_parity,
        decoder_latency,
        format_parity,
    )
    from roiseg.inference.torch_decoder import predictor_from_checkpoint
    from roiseg.inference.visualize import training_hooks, write_validation_png
    from roiseg.modeling.checkpoint import decoder_from_checkpoint, find_checkpoint
    from roiseg.training.config import make_config
    from roiseg.training.run import run_training

    t_start = time.perf_counter()
    total = 7
    data, onnx_path = folder / "data", folder / "ext_extractor" / "standin_featext.onnx"
    stamp = folder / "data" / "settings.json"
    want = json.dumps({"n_train": settings.n_train, "n_val": settings.n_val, "seed": settings.seed,
                       "channels": settings.channels})

    t = _step(1, total, f"synthetic data: {settings.n_train} train / {settings.n_val} val images + "
                        f"stand-in extractor ONNX ({settings.channels} channels)")
    if stamp.is_file() and stamp.read_text() == want and onnx_path.is_file():
        click.echo(f"      reusing {data}")
    else:
        for sub in ("data", "ext_extractor", "cache"):
            shutil.rmtree(folder / sub, ignore_errors=True)
        make_synthetic_dataset(data, settings.n_train, settings.n_val, seed=settings.seed)
        build_standin_extractor(onnx_path, channels=settings.channels)
        write_text_atomic(stamp, want)
    ann = {s: data / "annotations" / f"instances_{s}2017_person_only_no_crowd.json" for s in ("train", "val")}
    _done(t)

    t = _step(2, total, "analyze: class pixel ratios -> data_analyze.json")
    analysis = folder / "data_analyze.json"
    res = run_analyze(ann["train"], progress=True)
    write_json_atomic(analysis, res)
    click.echo("      pixel ratios " + ", ".join(f"{k} {v:.3f}" for k, v in res["pixel_ratios"].items()))
    _done(t)

    stores = {}
    for k, split in enumerate(("train", "val")):
        t = _step(3 + k, total, f"cache {split}: extractor once per image -> fp16 Zarr store")
        stores[split] = folder / "cache" / f"{split}2017.zarr"
        # train: mirrored features too (flip augmentation), as `cache --flip` stores them
        ccfg = CacheConfig(ann=ann[split], images=data / "images" / f"{split}2017", onnx=onnx_path,
                           out=stores[split], feature_name=DEMO_FEATURE, provider="cpu", flip=split == "train")
        try:
            s = run_cache(ccfg)
        except StoreError:  # a demo cache from an older version: it is the demo's own, rebuild it
            shutil.rmtree(stores[split])
            s = run_cache(ccfg)
        _done(t, f"({s['cached']} images, provider {s['provider']})")

    t = _step(5, total, f"train {settings.epochs} epochs (checkpoint + validation PNG per epoch)")
    ck_dir = folder / "checkpoints"
    shutil.rmtree(ck_dir, ignore_errors=True)
    cfg = make_config(train_store=str(stores["train"]), val_store=str(stores["val"]), out=str(ck_dir),
                      analysis=str(analysis), epochs=settings.epochs, hidden=settings.hidden, roi_size=14,
                      mask_size=56, batch_size=4, samples_per_roi=1, workers=0, resident="auto",
                      device=device, seed=settings.seed)
    history = run_training(cfg, training_hooks(cfg)).history
    first, last = history[0], history[-1]
    click.echo(f"      mIoU: epoch 1 {first['mIoU']:.4f} -> epoch {last['epoch']} {last['mIoU']:.4f}   "
               f"instance_mIoU: {first['instance_mIoU']:.4f} -> {last['instance_mIoU']:.4f}")
    _done(t)

    t = _step(6, total, "visualize: redraw the last epoch's validation PNG from its checkpoint")
    ck_path = find_checkpoint(ck_dir, last["epoch"])
    pred = predictor_from_checkpoint(ck_path, provider="cpu")
    png = write_validation_png(pred, ann["val"], data / "images" / "val2017", ck_dir, last["epoch"])
    _done(t, f"-> {png.name}")

    t = _step(7, total, "export the decoder to ONNX and check it in ONNX Runtime")
    model, meta = decoder_from_checkpoint(ck_path)
    spec = ExportSpec.from_meta(meta)
    dec = export_decoder(model, spec, folder / "export" / "decoder.onnx",
                         meta=predictor_metadata(meta, ck_path.name))
    parity = check_parity(model, dec, spec)
    e2e = export_end_to_end(onnx_path, DEMO_FEATURE, dec, folder / "export" / "extractor_decoder.onnx")
    lat = decoder_latency(dec, spec, counts=(1, 5))
    click.echo("      parity: " + format_parity(parity)
               + " | latency: " + ", ".join(f"{n} ROIs {ms} ms" for n, ms in lat.items()))
    _done(t)

    summary = {"folder": str(folder), "first_epoch_mIoU": first["mIoU"], "final_mIoU": last["mIoU"],
               "first_instance_mIoU": first["instance_mIoU"], "final_instance_mIoU": last["instance_mIoU"],
               "checkpoint": str(ck_path), "png": str(png), "decoder_onnx": str(dec), "end_to_end_onnx": str(e2e),
               "analysis": str(analysis), "stores": {k: str(v) for k, v in stores.items()},
               "elapsed_s": round(time.perf_counter() - t_start, 1)}
    write_text_atomic(folder / "demo_summary.json", json.dumps(summary, indent=2))
    click.secho(f"\nDemo finished in {summary['elapsed_s']:.0f}s. Outputs:", bold=True)
    click.echo(f"  {'best / last epoch':24s} {ck_dir / 'best.pth'}, {ck_dir / 'last.pth'}")
    for label, key in (("class ratios", "analysis"), ("last checkpoint", "checkpoint"), ("validation PNG", "png"),
                       ("decoder ONNX", "decoder_onnx"), ("extractor+decoder ONNX", "end_to_end_onnx")):
        click.echo(f"  {label:24s} {summary[key]}")
    click.echo(f"  {'feature caches':24s} {stores['train']}, {stores['val']}")
    click.echo(f"  {'metrics per epoch':24s} {ck_dir / 'metrics.jsonl'}   (TensorBoard: {ck_dir / 'tb'})")
    click.echo(f"\nmIoU epoch 1: {first['mIoU']:.4f}  ->  final: {last['mIoU']:.4f}")
    click.echo("""
Next, on real data (see README):
  1. put COCO person annotations in data/annotations/, images in data/images/{train,val}2017/,
     and the extractor at ext_extractor/yolov9_e_wholebody25_0100_1x3x640x640_featext.onnx
  2. uv run cli.py analyze
  3. uv run cli.py cache --split train --subset 500 --flip && uv run cli.py cache --split val
  4. uv run cli.py train --subset 500
  5. uv run cli.py visualize --checkpoint checkpoints/best.pth ; uv run cli.py export --checkpoint checkpoints/best.pth""")
    return summary
