"""What ranks held-out masks by their true IoU (issue 21)?  Simple numbers of each mask, alone, in a
linear fit (fitted on the other folds' held-out masks: leave one fold out), and the unsure-pixel
fraction used directly as a score.

    uv run python bench/realdata_score_probe.py      # after bench/realdata_predict.py (its checkpoints)

Runs `predict` with the default decoder's checkpoints of ``bench/realdata_predict.py`` (5 folds x 2
seeds) on the held-out images, keeps every mask's probabilities, and prints per box source the rank
correlation of each score with the true mask IoU and the mask AP / AP50 / AP75 it gives (mean of the
seeds; the oracle scores by the true IoU).  Numbers of a mask, on its window at original resolution:
``mean_p`` the mean class-1 probability inside it (the score before mask certainty), ``log_box``
the log box area, ``fill`` mask area / box area, ``unsure`` the pixels with a probability in
(lo, 1 - lo) per mask pixel.  Detected boxes: every score is multiplied by the detector's.
"""
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import cv  # noqa: E402
from bench.realdata import realdata  # noqa: E402
from bench.realdata_predict import (  # noqa: E402
    OUT,
    ck_dir,
    quiet_ap,
    spearman,
    true_ious,
    watched,
)

BANDS = (0.1, 0.2, 0.25, 0.3, 0.4)


def mask_numbers(pred) -> list[dict]:
    h, w = pred.size
    rows = []
    mean_p = dataclasses.replace(pred, quality=None).mask_scores()    # the mean probability inside each mask
    for box, det, p, mp in zip(pred.boxes, pred.scores, pred.probs, mean_p):
        area = int((p > 0.5).sum())
        x1, y1, x2, y2 = box * [w, h, w, h]
        box_area = max((x2 - x1) * (y2 - y1), 1.0)
        row = {"det": float(det), "mean_p": float(mp), "log_box": float(np.log(box_area)), "fill": area / box_area}
        for lo in BANDS:
            row[f"unsure{lo}"] = float(((p > lo) & (p < 1 - lo)).sum()) / max(area, 1)
        rows.append(row)
    return rows


def held_out(boxes: str, seed: int, names: list) -> tuple[list, list]:
    """Every fold's held-out predictions (COCO results) and the numbers of their masks."""
    import torch
    torch.set_num_threads(2)
    from roiseg.inference.torch_decoder import checkpoint_predictor
    from roiseg.runtime.detection import DetectionSettings
    from roiseg.runtime.predict import PredictOptions, run_predict
    results, numbers = [], []
    for f, fold in enumerate(names):
        out = OUT / "probe" / f"{boxes}_f{f}_s{seed}"
        shutil.rmtree(out, ignore_errors=True)
        opts = PredictOptions(source=realdata().images, out=out, checkpoint=ck_dir("default", f, seed) / "last.pth", onnx=realdata().onnx,
                              boxes=boxes, ann=realdata().ann, only=fold, overlays=False, progress=False, provider="cpu",
                              detection=DetectionSettings(conf=0.01))
        seen = []
        summary = run_predict(opts, watched(checkpoint_predictor(opts), seen))
        preds = json.loads((Path(summary["out"]) / "predictions.json").read_text())
        rows = [r for pred in seen for r in mask_numbers(pred)]
        assert len(rows) == len(preds)
        results += preds
        numbers += [{**r, "fold": f} for r in rows]
    return results, numbers


def main():
    gt = json.loads(realdata().ann.read_text())
    names = cv.make_folds(OUT / "store.zarr", 5)
    for boxes in ("gt", "auto"):
        res = {}
        for seed in (0, 1):
            results, rows = held_out(boxes, seed, names)
            iou = true_ious(gt, results)
            col = lambda k: np.array([r[k] for r in rows])  # noqa: E731
            det, fold = (col("det") if boxes == "auto" else 1.0), col("fold")

            def fitted(keys):
                x = np.stack([np.ones(len(rows))] + [col(k) for k in keys], 1)
                out = np.zeros(len(rows))
                for f in range(len(names)):
                    w, *_ = np.linalg.lstsq(x[fold != f], iou[fold != f], rcond=None)
                    out[fold == f] = x[fold == f] @ w
                return det * np.clip(out, 0.01, 1)
            scores = {"mean probability (before)": det * col("mean_p"),
                      "fit: unsure0.25 alone": fitted(["unsure0.25"]),
                      "fit: mean_p, log_box, fill": fitted(["mean_p", "log_box", "fill"]),
                      "fit: mean_p, log_box, fill, unsure0.25": fitted(["mean_p", "log_box", "fill", "unsure0.25"])}
            scores |= {f"1 / (1 + unsure{lo}), no fit": det / (1 + col(f"unsure{lo}")) for lo in BANDS}
            scores |= {"certainty (predict's score now)": np.array([r["score"] for r in results]),
                       "oracle (true IoU)": iou}
            for name, s in scores.items():
                ap = quiet_ap(gt, [{**r, "score": float(v)} for r, v in zip(results, s)])[:3]
                res.setdefault(name, []).append([spearman(s, iou), *ap])
        print(f"{boxes} boxes: rank correlation with the true IoU | mask AP | AP50 | AP75 (mean of 2 seeds)")
        for name, v in res.items():
            m = np.mean(v, 0)
            print(f"  {name:40s} {m[0]:.3f} | {m[1]:.3f} | {m[2]:.3f} | {m[3]:.3f}")


if __name__ == "__main__":
    main()
