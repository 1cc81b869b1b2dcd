"""`evaluate`: one or more checkpoints scored on a cached val store (or raw annotations + images)."""
from __future__ import annotations

from pathlib import Path

import click

from roiseg.cli.app import main
from roiseg.cli.common import (
    UserError,
    at_least,
    checkpoint_from,
    option,
    provider_option,
    refuse_unused,
    user_errors,
)


@main.command()
@option("--checkpoint", "checkpoint_list", multiple=True, panel="Inputs",
        help="Checkpoint file, glob ('checkpoints/*.pth'), best or last; repeat for a comparison table.")
@option("--epoch", "epochs", type=int, multiple=True, help="Checkpoint of this epoch (repeatable).", panel="Inputs")
@option("--checkpoints", type=click.Path(path_type=Path), default=Path("checkpoints"), show_default=True,
        help="The run folder --epoch, best and last refer to.", panel="Inputs")
@option("--val-store", type=click.Path(path_type=Path), help="Val cache [the one each checkpoint was trained with].",
        panel="Inputs")
@option("--ann", type=click.Path(path_type=Path), help="Evaluate on these annotations instead (with --images).",
        panel="Inputs")
@option("--images", type=click.Path(path_type=Path), help="Image folder of --ann.", panel="Inputs")
@option("--onnx", "onnx_path", type=click.Path(path_type=Path), help="Extractor for --ann [the checkpoint's].",
        panel="Inputs")
@option("--limit", type=int, callback=at_least(1), help="--ann: only the first N images.", panel="Inputs")
@option("--json", "json_out", type=click.Path(path_type=Path), help="Write all metrics here (a new file, or one "
        "evaluate wrote).", panel="Outputs")
@option("--coco-eval", is_flag=True, help="Also COCO mask AP (pycocotools, GT boxes as detections).")
@option("--tta", type=click.Choice(["auto", "none", "flip"]), default="auto", show_default=True,
        help="flip: average each ROI's probabilities with the mirrored image's (a store cached with --flip; with "
             "--ann the temporary store caches both); auto: flip when the store holds mirrored features, else none.")
@option("--work-dir", type=click.Path(path_type=Path), help="--ann: where the temporary store goes [system temp].",
        panel="Runtime")
@provider_option()
@option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.", panel="Runtime")
@option("--batch-size", type=int, callback=at_least(1), help="Images per batch [64 CUDA, 8 CPU].", panel="Runtime")
@user_errors
@click.pass_context
def evaluate(ctx, checkpoint_list, epochs, checkpoints, val_store, ann, images, onnx_path, provider, limit, work_dir,
             coco_eval, tta, device, batch_size, json_out):
    """Score one or more checkpoints: mIoU, class IoUs, instance mIoU (S/M/L, overlapped), box baseline."""
    from roiseg.inference.evaluate import comparison_table
    from roiseg.modeling.devices import resolve_device
    if ann is None:
        refuse_unused(ctx, ["onnx_path", "provider", "limit", "work_dir"],
                      "they build a temporary store from --ann/--images; without them the cached store is read")
    elif val_store is not None:
        raise UserError("give --val-store or --ann with --images, not both")
    if (ann is None) != (images is None):
        raise UserError("--ann and --images go together")
    resolve_device(device)         # an absent GPU is one message before any work
    paths = _checkpoints(checkpoint_list, epochs, checkpoints)
    _check_outputs(paths, json_out, work_dir, val_store, ann, images, onnx_path)
    results = _evaluate_all(paths, val_store, ann, images, onnx_path, provider, limit, work_dir, coco_eval, device,
                            batch_size, tta)
    click.echo(comparison_table(results))
    if json_out:
        import json

        from roiseg.common.files import write_text_atomic
        write_text_atomic(Path(json_out), json.dumps(results, indent=2))
        click.echo(f"wrote {json_out}")


def _checkpoints(specs, epochs, folder) -> list[Path]:
    """Every checkpoint asked for: files, globs, best/last, epochs; best when none."""
    import glob
    paths = []
    for spec in specs:
        if any(ch in spec for ch in "*?["):
            found = sorted(p for p in glob.glob(spec) if p.endswith(".pth"))
            if not found:
                raise UserError(f"no checkpoint matches {spec}")
            paths += [Path(p) for p in found]
        else:
            paths.append(checkpoint_from(None, spec, folder))
    paths += [checkpoint_from(e, None, folder) for e in epochs]
    return paths or [checkpoint_from(None, None, folder, default="best")]


def _check_outputs(paths, json_out, work_dir, val_store, ann, images, onnx_path) -> None:
    """--json and --work-dir replace nothing the command or the checkpoints' runs read, and --json
    replaces only an earlier evaluate output; checked before any work."""
    from roiseg.common.files import check_output_file, json_with, refuse_overlap
    from roiseg.modeling.checkpoint import load_checkpoint
    referenced = {k: v for p in paths for k, v in load_checkpoint(p).referenced_inputs().items()}
    refuse_overlap({"--json": json_out, "--work-dir": work_dir},
                   {**{f"--checkpoint {p.name}": p for p in paths}, "--val-store": val_store, "--ann": ann,
                    "--images": images, "--onnx": onnx_path, **referenced}, inputs_inside_outputs=False)
    check_output_file(json_out, "--json", json_with(("checkpoint", "instance_mIoU"), list_of=True),
                      "a metrics file evaluate wrote")


def _evaluate_all(paths, val_store, ann, images, onnx_path, provider, limit, work_dir, coco_eval, device,
                  batch_size, tta) -> list[dict]:
    from roiseg.inference.evaluate import evaluate_checkpoint, live_store
    if ann is None:
        return [evaluate_checkpoint(p, val_store, device=device, coco_eval=coco_eval, batch_size=batch_size, tta=tta)
                for p in paths]
    from roiseg.common.providers import device_id_for
    gpu = device_id_for(device) if str(device).startswith("cuda") else None   # the decoder's GPU
    with live_store(paths[0], ann, images, work_dir, onnx_path, provider, limit, gpu, flip=tta != "none") as store:
        return [evaluate_checkpoint(p, store, device=device, coco_eval=coco_eval, batch_size=batch_size, tta=tta)
                for p in paths]
