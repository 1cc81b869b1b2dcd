"""results.png: a run's curves from its results.csv (loss, LR, mIoU, instance mIoU, class IoUs)."""
from __future__ import annotations

import csv
from pathlib import Path

from roiseg.common.files import atomic_write

PANELS = [("train loss", ["loss"]), ("learning rate", ["lr"]), ("3-class mIoU", ["mIoU"]),
          ("per person: mask and boundary IoU", ["instance_mIoU", "boundary_IoU"]), ("class IoU", ["iou_background", "iou_target", "iou_non_target"]),
          ("training ROIs/s", ["rois_per_s"])]


def read_results(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.items():
            try:
                cols.setdefault(k, []).append(float(v))
            except (TypeError, ValueError):
                cols.setdefault(k, []).append(float("nan"))
    return cols


def plot_results(csv_path: Path, out: Path | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # no display needed, safe in worker processes
    import matplotlib.pyplot as plt
    csv_path = Path(csv_path)
    out = Path(out or csv_path.with_name("results.png"))
    cols = read_results(csv_path)
    epochs = cols.get("epoch", [])
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), tight_layout=True)
    for ax, (title, keys) in zip(axes.ravel(), PANELS):
        for k in keys:
            if k in cols:
                ax.plot(epochs, cols[k], marker="o", markersize=3, label=k.replace("iou_", ""))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    try:
        with atomic_write(out, ".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return out
