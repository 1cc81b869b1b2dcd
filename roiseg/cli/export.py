"""`export`: the decoder (and extractor + decoder) as ONNX, checked before it replaces anything."""
from __future__ import annotations

from pathlib import Path

import click

from roiseg.cli.app import main
from roiseg.cli.common import (
    UserError,
    checkpoint_from,
    checkpoint_options,
    option,
    refuse_unused,
    unit,
    user_errors,
)


@main.command()
@checkpoint_options
@option("--out", type=click.Path(path_type=Path), help="Decoder ONNX [<checkpoint>.decoder.onnx].", panel="Outputs")
@option("--end-to-end", is_flag=True, help="Also write extractor + decoder as one graph.", panel="Outputs")
@option("--onnx", "onnx_path", type=click.Path(path_type=Path), help="Extractor ONNX for --end-to-end [the "
        "checkpoint's].", panel="Inputs")
@option("--masks", "mask_format", type=click.Choice(["binary", "prob"]), default="binary", show_default=True,
        help="masks output: uint8 0/1 at --threshold, or the fp16 class-1 probability.")
@option("--threshold", type=float, default=0.5, show_default=True, callback=unit,
        help="Class-1 probability above which a pixel is the person (masks, instance_map).")
@option("--full-probs", is_flag=True, help="Also output probs [N,3,H,W] (all classes, fp32: 12 bytes per pixel "
        "and ROI).")
@option("--half", is_flag=True, help="fp16 weights and activations in the conv stack (GPU); parity is checked and "
        "reported.", panel="Runtime")
@option("--opset", type=int, default=17, show_default=True, panel="Runtime",
        help="ONNX opset: 16 (RoiAlign with half_pixel) up to what torch and ONNX Runtime support (20).")
@user_errors
@click.pass_context
def export(ctx, epoch, checkpoint, checkpoints, out, opset, end_to_end, onnx_path, mask_format, threshold,
           full_probs, half):
    """Export the decoder to ONNX, check parity with PyTorch in ONNX Runtime, report latency."""
    from roiseg.export.export import default_paths, export_checkpoint
    from roiseg.export.graph import ExportError
    from roiseg.export.parity import decoder_latency, format_parity
    if not end_to_end:
        refuse_unused(ctx, ["onnx_path"], "the extractor is part of the end-to-end graph only: add --end-to-end")
    path = checkpoint_from(epoch, checkpoint, checkpoints)
    try:
        res = export_checkpoint(path, out, opset, end_to_end, onnx_path, masks=mask_format, threshold=threshold,
                                full_probs=full_probs, half=half)
    except ExportError as exc:
        kept = [str(p) for p in default_paths(path, out, half, end_to_end) if p is not None and p.exists()]
        raise UserError(f"{exc}\nnothing was written{'; kept as they were: ' + ', '.join(kept) if kept else ''}") from exc
    spec = res.spec
    click.echo(f"wrote {res.decoder} (opset {opset}{', fp16 conv stack' if half else ''}; inputs "
               f"{', '.join(spec.inputs)} -> {', '.join(spec.outputs)})")
    click.echo("parity vs PyTorch (max abs diff): " + format_parity(res.parity))
    if res.end_to_end is not None:
        click.echo(f"wrote {res.end_to_end} (images [1,3,H,W] + {', '.join(i for i in spec.inputs[1:] if i != 'fine')} "
                   f"-> {', '.join(spec.outputs)})")
    lat = decoder_latency(res.decoder, spec)
    click.echo("decoder latency on CPU (ms): " + ", ".join(f"{n} ROIs {ms}" for n, ms in lat.items()))
