"""The per-epoch validation PNG: ground truth (top row) vs live full-resolution inference (bottom).

Four columns, by default the val images 000000020992 / 413552 / 109118 / 162732 (1, 2, 3 and 5
persons).  Top: every person's box in red with its number and its mask in its own colour; bottom:
the predicted target mask of each person's ROI in that same colour, no boxes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from roiseg.common.files import atomic_write
from roiseg.data.coco import (
    VALIDATION_PNG_IMAGES,
    ImageRecord,
    decode_masks,
    load_person_records,
)
from roiseg.runtime.drawing import ALPHA, BOX_RED, font, person_colour

log = logging.getLogger(__name__)
CELL_W, CELL_H, MARGIN, TITLE_H, CAPTION_H = 400, 330, 16, 56, 44


def choose_images(records: list[ImageRecord], wanted: list[str] | None = None,
                  quiet: bool = False) -> list[ImageRecord]:
    """The named images; a missing one is replaced by an unused image with the same person count
    (closest count if none), and the replacement is logged (unless ``quiet``: once per run)."""
    by_name = {r.file_name: r for r in records}
    wanted = wanted or list(VALIDATION_PNG_IMAGES)
    chosen, used = [], set()
    for name in wanted:
        if name in by_name:
            chosen.append(by_name[name])
            used.add(name)
    for name in wanted:
        if name in by_name:
            continue
        count = VALIDATION_PNG_IMAGES.get(name)
        pool = [r for r in records if r.file_name not in used]
        if not pool:
            break
        target = count if count is not None else 1
        pick = min(pool, key=lambda r: (abs(len(r.instances) - target), r.image_id))
        k = len(pick.instances)
        if not quiet:
            log.info("%s is not in the val annotations: showing %s (%d person%s) instead%s", name, pick.file_name,
                     k, "" if k == 1 else "s",
                     f" - no unused image has {target} person{'' if target == 1 else 's'}" if k != target else "")
        used.add(pick.file_name)
        chosen.insert(wanted.index(name), pick)
    return chosen


def _overlay(base: np.ndarray, masks, colours) -> np.ndarray:
    out = base.astype(np.float32)
    for m, c in zip(masks, colours):
        out[m] = out[m] * (1 - ALPHA) + np.array(c, np.float32) * ALPHA
    return out.clip(0, 255).astype(np.uint8)


@dataclass
class Panel:
    image: Image.Image
    offset: tuple
    scale: float


def _fit(im: Image.Image, x0: int, y0: int) -> Panel:
    s = min(CELL_W / im.width, CELL_H / im.height)
    small = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BILINEAR)
    return Panel(small, (x0 + (CELL_W - small.width) // 2, y0 + (CELL_H - small.height) // 2), s)


def render_validation_png(columns: list[dict], out_path: str | Path, title: str) -> Path:
    """columns: dicts with file_name, image (PIL RGB), gt_masks [K,H,W], boxes_px [K,4], pred_masks [K,H,W]."""
    n = max(1, len(columns))
    width = MARGIN + n * (CELL_W + MARGIN)
    height = TITLE_H + 2 * (CAPTION_H + CELL_H) + 2 * MARGIN
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    f_title, f_cap, f_num = font(26, True), font(15, True), font(13, True)
    draw.text((width // 2, TITLE_H // 2), title, fill="black", font=f_title, anchor="mm")
    for c, col in enumerate(columns):
        x0 = MARGIN + c * (CELL_W + MARGIN)
        k = len(col["boxes_px"])
        colours = [person_colour(i) for i in range(k)]
        base = np.asarray(col["image"])
        rows = [("gt", _overlay(base, col["gt_masks"], colours)), ("pred", _overlay(base, col["pred_masks"], colours))]
        for r, (kind, arr) in enumerate(rows):
            y_cap = TITLE_H + r * (CAPTION_H + CELL_H + MARGIN)
            caption = (f"{col['file_name']}\n({k} person{'s' if k != 1 else ''}) - Ground Truth" if kind == "gt"
                       else "Predicted Masks")
            draw.multiline_text((x0 + CELL_W // 2, y_cap + CAPTION_H - 4), caption, fill="black", font=f_cap,
                                anchor="md", align="center")
            p = _fit(Image.fromarray(arr), x0, y_cap + CAPTION_H)
            canvas.paste(p.image, p.offset)
            if kind == "gt":
                for i, b in enumerate(col["boxes_px"]):
                    bx = [p.offset[0] + b[0] * p.scale, p.offset[1] + b[1] * p.scale,
                          p.offset[0] + b[2] * p.scale - 1, p.offset[1] + b[3] * p.scale - 1]
                    draw.rectangle(bx, outline=BOX_RED, width=2)
                    tb = draw.textbbox((bx[0] + 3, bx[1] + 2), str(i), font=f_num)
                    draw.rectangle([tb[0] - 2, tb[1] - 1, tb[2] + 2, tb[3] + 1], fill="white", outline="black")
                    draw.text((bx[0] + 3, bx[1] + 2), str(i), fill=BOX_RED, font=f_num)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_path, ".png") as tmp:
        canvas.save(tmp)
    return out_path


def png_name(epoch: int) -> str:
    return f"validation_all_images_epoch_{epoch:04d}.png"


def build_columns(predictor, records: list[ImageRecord], image_dir: Path) -> list[dict]:
    from roiseg.data.images import load_rgb
    cols = []
    for r in records:
        im = load_rgb(Path(image_dir) / r.file_name)
        boxes = np.array([i.box_norm for i in r.instances])
        pred = predictor.predict(im, boxes)
        cols.append({"file_name": r.file_name, "image": im, "gt_masks": decode_masks(r.instances),
                     "boxes_px": boxes * [r.width, r.height, r.width, r.height], "pred_masks": pred.full_masks()})
    return cols


def write_validation_png(predictor, ann: Path, image_dir: Path, out_dir: Path, epoch: int,
                         wanted: list[str] | None = None, quiet: bool = False) -> Path:
    records, _ = load_person_records(ann)
    chosen = choose_images(records, wanted, quiet)
    cols = build_columns(predictor, chosen, image_dir)
    return render_validation_png(cols, Path(out_dir) / png_name(epoch),
                                 f"Validation Results - All Test Images (epoch {epoch})")


def redraw_validation_png(checkpoint: Path, ann: Path | None = None, images: Path | None = None,
                          onnx: Path | None = None, provider: str = "auto", vis_images: list[str] | None = None,
                          out_dir: Path | None = None) -> Path:
    """`cli.py visualize`: an epoch's validation PNG again, from its checkpoint (live extractor, full
    resolution); the run's own val annotations, images and PNG images unless given.  The output may
    not be or lie inside anything the checkpoint's run points at."""
    from roiseg.common.files import refuse_overlap
    from roiseg.inference.torch_decoder import predictor_from_checkpoint
    from roiseg.modeling.checkpoint import load_checkpoint
    from roiseg.training.config import make_config
    ck = load_checkpoint(checkpoint)
    refuse_overlap({"--out-dir": out_dir}, {"--checkpoint": checkpoint, "--ann": ann, "--images": images,
                                            "--onnx": onnx, **ck.referenced_inputs()}, inputs_inside_outputs=False)
    pred = predictor_from_checkpoint(checkpoint, onnx, provider)
    wanted = vis_images or make_config(base=ck.config).vis_images
    return write_validation_png(pred, Path(ann or ck.val_meta.annotation_path), Path(images or ck.val_meta.images_dir),
                                Path(out_dir or Path(checkpoint).parent), ck.epoch, wanted)


def training_hooks(cfg) -> list:
    """The epoch-end hooks `train` adds: the validation PNG, unless ``cfg.visualize`` is off."""
    return [validation_png_hook(cfg)] if cfg.visualize else []


def validation_png_hook(cfg):
    """Epoch-end hook for the Trainer: draws the PNG with the current weights, live extractor."""
    state = {}

    def hook(epoch, ckpt_path, metrics, trainer):
        from roiseg.inference.torch_decoder import TorchDecoder
        from roiseg.runtime.pipeline import Predictor, open_extractor
        val = trainer.val_index.meta
        ann = Path(cfg.vis_ann or val.annotation_path)
        img_dir = Path(cfg.vis_image_dir or val.images_dir)
        source = trainer.train_index.meta.source.with_fine(bool(trainer.fine_channels))
        try:
            if "extractor" not in state:
                # CUDA, not TensorRT: four images an epoch never repay a TensorRT engine build.
                provider = "cuda" if trainer.cuda else "cpu"
                state["extractor"] = open_extractor(source, cfg.vis_onnx, provider, device=trainer.device,
                                                    fine=bool(trainer.fine_channels))
            model = trainer.ema.module if trainer.ema else trainer.model
            pred = Predictor(TorchDecoder(model, trainer.device), source, state["extractor"])
            # the fallback images are announced at the first epoch only
            path = write_validation_png(pred, ann, img_dir, trainer.out, epoch, cfg.vis_images,
                                        quiet=state.get("drawn", False))
            state["drawn"] = True
            model.train()
            log.info("validation PNG: %s", path)
        except Exception as exc:  # a missing image or model must not stop training
            log.warning("validation PNG for epoch %d not drawn: %s", epoch, exc)
    return hook
