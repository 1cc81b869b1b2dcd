"""`cli.py demo`: the whole pipeline on built-in synthetic data, in a folder of its own.

Generates a COCO-format synthetic person dataset and a stand-in extractor ONNX, then runs the real
stages, each the same code as its command: analyze -> cache (train, val) -> train (checkpoints +
validation PNGs) -> visualize -> export (``export.export_checkpoint``, as `cli.py export
--end-to-end`).  Re-running reuses the data and caches and retrains from scratch.  The demo writes
only into a folder it created (or found empty) and marked as its own (``claim_demo_folder``).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from roiseg.common.errors import RoisegError
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


@dataclass
class DemoRun:
    """The demo folder's parts, and what the steps produce."""
    folder: Path
    settings: DemoSettings
    device: str = "auto"
    t_start: float = field(default_factory=time.perf_counter)
    stores: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    checkpoint: Path | None = None
    png: Path | None = None
    export: object = None      # export.export.ExportResult

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def onnx(self) -> Path:
        return self.folder / "ext_extractor" / "standin_featext.onnx"

    @property
    def analysis(self) -> Path:
        return self.folder / "data_analyze.json"

    @property
    def checkpoints(self) -> Path:
        return self.folder / "checkpoints"

    def ann(self, split: str) -> Path:
        return self.data / "annotations" / f"instances_{split}2017_person_only_no_crowd.json"


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
    from roiseg.common.files import claim_folder, folder_entries, write_text_atomic
    if folder.exists() and not folder.is_dir():
        raise RoisegError(f"--dir {folder} is a file, not a folder: pick a new folder for the demo")
    claim = claim_folder(folder, "demo folder")
    held = folder_entries(folder)
    if held and MARKER not in held:
        claim.release()
        shown = ", ".join(held[:8]) + (f" ... ({len(held)} entries)" if len(held) > 8 else "")
        raise RoisegError(f"--dir {folder} holds files the demo did not create ({shown}): the demo writes only "
                             f"into a new or empty folder it marks as its own (or one it made before). Pick another "
                             f"--dir (default: demo_run)")
    links = [] if fresh else _links_inside(folder)
    if links:
        claim.release()
        raise RoisegError(f"--dir {folder} holds links the demo did not make ({', '.join(map(str, links[:3]))}): the "
                          f"demo writes only into its own folder, never through a link; remove them or use --fresh")
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


def _links_inside(folder: Path) -> list[Path]:
    """Symbolic links anywhere in the demo folder (the demo never makes one: a link would lead its
    writes and deletes into a folder it does not own)."""
    import os
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        found += [Path(root) / n for n in dirs + files if (Path(root) / n).is_symlink()]
    return found


def run_demo(folder: Path, settings: DemoSettings = DemoSettings(), fresh: bool = False,
             device: str = "auto") -> dict:
    """The demo in ``folder`` (see the module docstring); its summary."""
    folder = Path(folder).resolve()
    claim = claim_demo_folder(folder, fresh)
    try:
        run = DemoRun(folder, settings, device)
        for step in STEPS:
            step(run)
        return _summary(run)
    finally:
        claim.release()


TOTAL = 7


def _data(run: DemoRun) -> None:
    from roiseg.common.files import write_text_atomic
    from roiseg.data.standin import build_standin_extractor
    from roiseg.data.synthetic import make_synthetic_dataset
    s = run.settings
    t = _step(1, TOTAL, f"synthetic data: {s.n_train} train / {s.n_val} val images + stand-in extractor ONNX "
                        f"({s.channels} channels)")
    stamp = run.data / "settings.json"
    want = json.dumps({"n_train": s.n_train, "n_val": s.n_val, "seed": s.seed, "channels": s.channels})
    if stamp.is_file() and stamp.read_text() == want and run.onnx.is_file():
        click.echo(f"      reusing {run.data}")
    else:   # the demo's own folders (its folder is marked as the demo's)
        for sub in ("data", "ext_extractor", "cache"):
            shutil.rmtree(run.folder / sub, ignore_errors=True)
        make_synthetic_dataset(run.data, s.n_train, s.n_val, seed=s.seed)
        build_standin_extractor(run.onnx, channels=s.channels)
        write_text_atomic(stamp, want)
    _done(t)


def _analyze(run: DemoRun) -> None:
    from roiseg.common.files import write_json_atomic
    from roiseg.data.analyze import run_analyze
    t = _step(2, TOTAL, "analyze: class pixel ratios -> data_analyze.json")
    res = run_analyze(run.ann("train"), progress=True)
    write_json_atomic(run.analysis, res)
    click.echo("      pixel ratios " + ", ".join(f"{k} {v:.3f}" for k, v in res["pixel_ratios"].items()))
    _done(t)


def _cache(run: DemoRun) -> None:
    from roiseg.data.cache import CacheConfig, run_cache
    from roiseg.data.store import StoreError
    for k, split in enumerate(("train", "val")):
        t = _step(3 + k, TOTAL, f"cache {split}: extractor once per image -> fp16 Zarr store")
        store = run.stores[split] = run.folder / "cache" / f"{split}2017.zarr"
        # train: mirrored features too (flip augmentation), as `cache --flip` stores them
        cfg = CacheConfig(ann=run.ann(split), images=run.data / "images" / f"{split}2017", onnx=run.onnx, out=store,
                          feature_name=DEMO_FEATURE, provider="cpu", flip=split == "train")
        try:
            s = run_cache(cfg)
        except StoreError:  # a demo cache from an older version: it is the demo's own, rebuild it
            shutil.rmtree(store)
            s = run_cache(cfg)
        _done(t, f"({s['cached']} images, provider {s['provider']})")


def _train(run: DemoRun) -> None:
    from roiseg.inference.visualize import training_hooks
    from roiseg.training.config import make_config
    from roiseg.training.run import run_training
    s = run.settings
    t = _step(5, TOTAL, f"train {s.epochs} epochs (checkpoint + validation PNG per epoch)")
    shutil.rmtree(run.checkpoints, ignore_errors=True)
    cfg = make_config(train_store=str(run.stores["train"]), val_store=str(run.stores["val"]), out=str(run.checkpoints),
                      analysis=str(run.analysis), epochs=s.epochs, hidden=s.hidden, roi_size=14, mask_size=56,
                      batch_size=4, samples_per_roi=1, workers=0, resident="auto", device=run.device, seed=s.seed)
    run.history = run_training(cfg, training_hooks(cfg)).history
    first, last = run.history[0], run.history[-1]
    click.echo(f"      mIoU: epoch 1 {first['mIoU']:.4f} -> epoch {last['epoch']} {last['mIoU']:.4f}   "
               f"instance_mIoU: {first['instance_mIoU']:.4f} -> {last['instance_mIoU']:.4f}")
    _done(t)


def _visualize(run: DemoRun) -> None:
    from roiseg.inference.torch_decoder import predictor_from_checkpoint
    from roiseg.inference.visualize import write_validation_png
    from roiseg.modeling.checkpoint import find_checkpoint
    t = _step(6, TOTAL, "visualize: redraw the last epoch's validation PNG from its checkpoint")
    epoch = run.history[-1]["epoch"]
    run.checkpoint = find_checkpoint(run.checkpoints, epoch)
    pred = predictor_from_checkpoint(run.checkpoint, provider="cpu")
    run.png = write_validation_png(pred, run.ann("val"), run.data / "images" / "val2017", run.checkpoints, epoch)
    _done(t, f"-> {run.png.name}")


def _export(run: DemoRun) -> None:
    from roiseg.export.export import export_checkpoint
    from roiseg.export.parity import decoder_latency, format_parity
    t = _step(7, TOTAL, "export the decoder to ONNX (+ extractor and decoder as one graph) and check it in "
                        "ONNX Runtime")
    out = run.folder / "export"
    run.export = export_checkpoint(run.checkpoint, out / "decoder.onnx", end_to_end=True,
                                   e2e_out=out / "extractor_decoder.onnx")
    lat = decoder_latency(run.export.decoder, run.export.spec, counts=(1, 5))
    click.echo("      parity: " + format_parity(run.export.parity)
               + " | latency: " + ", ".join(f"{n} ROIs {ms} ms" for n, ms in lat.items()))
    _done(t)


STEPS = (_data, _analyze, _cache, _train, _visualize, _export)


def _summary(run: DemoRun) -> dict:
    from roiseg.common.files import write_text_atomic
    first, last = run.history[0], run.history[-1]
    summary = {"folder": str(run.folder), "first_epoch_mIoU": first["mIoU"], "final_mIoU": last["mIoU"],
               "first_instance_mIoU": first["instance_mIoU"], "final_instance_mIoU": last["instance_mIoU"],
               "checkpoint": str(run.checkpoint), "png": str(run.png), "decoder_onnx": str(run.export.decoder),
               "end_to_end_onnx": str(run.export.end_to_end), "analysis": str(run.analysis),
               "stores": {k: str(v) for k, v in run.stores.items()},
               "elapsed_s": round(time.perf_counter() - run.t_start, 1)}
    write_text_atomic(run.folder / "demo_summary.json", json.dumps(summary, indent=2))
    _print_outputs(run, summary)
    return summary


def _print_outputs(run: DemoRun, summary: dict) -> None:
    ck = run.checkpoints
    click.secho(f"\nDemo finished in {summary['elapsed_s']:.0f}s. Outputs:", bold=True)
    click.echo(f"  {'best / last epoch':24s} {ck / 'best.pth'}, {ck / 'last.pth'}")
    for label, key in (("class ratios", "analysis"), ("last checkpoint", "checkpoint"), ("validation PNG", "png"),
                       ("decoder ONNX", "decoder_onnx"), ("extractor+decoder ONNX", "end_to_end_onnx")):
        click.echo(f"  {label:24s} {summary[key]}")
    click.echo(f"  {'feature caches':24s} {run.stores['train']}, {run.stores['val']}")
    click.echo(f"  {'metrics per epoch':24s} {ck / 'metrics.jsonl'}   (TensorBoard: {ck / 'tb'})")
    click.echo(f"\nmIoU epoch 1: {summary['first_epoch_mIoU']:.4f}  ->  final: {summary['final_mIoU']:.4f}")
    click.echo(NEXT_STEPS)


NEXT_STEPS = """
Next, on real data (see README):
  1. put COCO person annotations in data/annotations/, images in data/images/{train,val}2017/,
     and the extractor at ext_extractor/yolov9_e_wholebody25_0100_1x3x640x640_featext.onnx
  2. uv run cli.py analyze
  3. uv run cli.py cache --split train --subset 500 --flip && uv run cli.py cache --split val
  4. uv run cli.py train --subset 500
  5. uv run cli.py visualize --checkpoint checkpoints/best.pth ; uv run cli.py export --checkpoint checkpoints/best.pth"""
