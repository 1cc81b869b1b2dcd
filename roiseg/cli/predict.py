"""`predict`: images, folders, videos or a camera -> person masks (overlays, COCO results, PNGs,
polygons), with the extractor's own person boxes or given ones."""
from __future__ import annotations

from pathlib import Path

import click

from roiseg.cli.app import main
from roiseg.cli.common import (
    MAX_PIXELS_HELP,
    UserError,
    at_least,
    checkpoint_from,
    checkpoint_options,
    option,
    provider_option,
    refuse_unused,
    unit,
    user_errors,
)

DETECTION = ["det_output", "det_format", "person_class", "conf", "iou", "max_det"]


@main.command()
@option("--source", required=True, help="Image file, image folder, video file or camera index (0, 1 ...).",
        panel="Inputs")
@checkpoint_options
@option("--exported", type=click.Path(path_type=Path), panel="Inputs",
        help="An exported decoder ONNX (with its extractor) or end-to-end ONNX instead of a checkpoint: ONNX Runtime "
             "only, no torch (end-to-end graphs need --boxes gt or a boxes file).")
@option("--boxes", default="auto", show_default=True, panel="Inputs",
        help="auto = the extractor's own person detections; gt = persons of --ann; or a JSON file (COCO results, "
             "COCO annotations, or {file_name: normalized boxes}).")
@option("--ann", type=click.Path(path_type=Path), panel="Inputs",
        help="COCO annotations: image ids for predictions.json (by file name), and the boxes of --boxes gt.")
@option("--box-format", type=click.Choice(["xyxy", "cxcywh"]), default="xyxy", show_default=True, panel="Inputs",
        help="Layout of normalized boxes in a {file_name: boxes} file.")
@option("--onnx", "onnx_path", type=click.Path(path_type=Path), help="Extractor ONNX [the checkpoint's].",
        panel="Inputs")
@option("--out", type=click.Path(path_type=Path), default=Path("predictions"), show_default=True, panel="Outputs",
        help="Output folder (a used one gives out2, out3 ...): overlays, predictions.json, masks/.")
@option("--save-masks", is_flag=True, help="One PNG per person (original resolution) in OUT/masks.", panel="Outputs")
@option("--polygons", is_flag=True, help="Also OUT/predictions_polygons.json: COCO polygons (OpenCV contours).",
        panel="Outputs")
@option("--threshold", type=float, default=0.5, show_default=True, callback=unit,
        help="Class-1 probability above which a pixel is the person.")
@option("--tta", type=click.Choice(["none", "flip"]), default="flip", show_default=True,
        help="flip: average each person's probabilities with the mirrored image's (the extractor and the decoder "
             "run twice per image: ~2x the time; measured +0.011 instance mIoU, +0.02 mask AP); none: one pass.")
@option("--exif/--no-exif", default=None, help="Apply the EXIF orientation of photos [on with --boxes auto; off "
        "with box files and --ann, whose coordinates refer to the pixels as stored].")
@option("--max-frames", type=int, callback=at_least(1), help="Video/camera: stop after N frames.")
@option("--max-pixels", type=int, default=None, callback=at_least(1), help=MAX_PIXELS_HELP)
@option("--det-output", help="Detection output name [the first output of a known layout].", panel="Detection")
@option("--det-format", type=click.Choice(["auto", "yolov8", "yolox", "yolox-decoded", "nms"]), default="auto",
        show_default=True, help="Detection output layout (see README).", panel="Detection")
@option("--person-class", type=int, default=0, show_default=True, panel="Detection",
        help="Class index of persons in the detector (0 = body for wholebody25, person for COCO).")
@option("--conf", type=float, default=0.25, show_default=True, callback=unit, help="Detection score threshold.",
        panel="Detection")
@option("--iou", type=float, default=0.65, show_default=True, callback=unit, help="NMS IoU threshold.",
        panel="Detection")
@option("--max-det", type=int, default=100, show_default=True, callback=at_least(1), panel="Detection",
        help="At most this many persons per image.")
@option("--no-overlays", is_flag=True, help="Do not write overlay images / video.", panel="Overlays")
@option("--hide-boxes", is_flag=True, help="Overlays without person boxes.", panel="Overlays")
@option("--hide-scores", is_flag=True, help="Overlays without scores.", panel="Overlays")
@provider_option()
@option("--device", default="auto", show_default=True, help="Decoder device: auto (CUDA if present), cpu, cuda.",
        panel="Runtime")
@user_errors
@click.pass_context
def predict(ctx, source, checkpoint, epoch, checkpoints, exported, out, boxes, box_format, ann, onnx_path, provider,
            device, det_output, det_format, person_class, conf, iou, max_det, threshold, save_masks, polygons,
            no_overlays, hide_boxes, hide_scores, max_frames, tta, exif, max_pixels):
    """Person masks for new images, a video or a camera, with the extractor's own person boxes."""
    from roiseg.runtime.detection import DetectionSettings
    from roiseg.runtime.predict import PredictOptions, run_predict
    _refuse_combinations(ctx, source, boxes, no_overlays, exported, checkpoint, epoch, device)
    path = None if exported is not None else checkpoint_from(epoch, checkpoint, checkpoints, default="best")
    if exported is None:
        from roiseg.modeling.devices import resolve_device
        device = str(resolve_device(device))
    opts = PredictOptions(source=source, out=out, checkpoint=path, exported=exported, onnx=onnx_path, provider=provider,
                          device=device, boxes=boxes, box_format=box_format, ann=ann,
                          detection=DetectionSettings(det_output, det_format, person_class, conf, iou, max_det),
                          threshold=threshold, save_masks=save_masks, polygons=polygons, overlays=not no_overlays,
                          show_boxes=not hide_boxes, show_scores=not hide_scores, max_frames=max_frames, exif=exif,
                          tta=tta)
    if max_pixels:
        opts.max_pixels = max_pixels
    predictor = None
    if exported is None:
        from roiseg.inference.torch_decoder import checkpoint_predictor
        predictor = checkpoint_predictor(opts)
    _report(run_predict(opts, predictor))


def _refuse_combinations(ctx, source, boxes, no_overlays, exported, checkpoint, epoch, device) -> None:
    """Options that would do nothing, or contradict each other, are one message before any work."""
    from roiseg.runtime.predict import VIDEO_EXT, is_camera
    if boxes != "auto":
        refuse_unused(ctx, DETECTION, f"they set the extractor's own detections, and --boxes {boxes} gives the boxes")
    if boxes in ("auto", "gt"):
        refuse_unused(ctx, ["box_format"], "it reads normalized boxes of a --boxes FILE only")
    if no_overlays:
        refuse_unused(ctx, ["hide_boxes", "hide_scores"], "they change the overlays, and --no-overlays writes none")
    if not (is_camera(source) or Path(str(source)).suffix.lower() in VIDEO_EXT):
        refuse_unused(ctx, ["max_frames"], "it limits a video or camera, and --source is images")
    if exported is not None and (checkpoint or epoch is not None):
        raise UserError("give --exported or a checkpoint (--checkpoint/--epoch), not both")
    if exported is not None and device != "auto":
        raise UserError("--device is the PyTorch decoder's device; an --exported graph runs in ONNX Runtime: "
                        "choose its provider with --provider")


def _report(s: dict) -> None:
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
