"""How well simple numbers rank masks (issue 21): a linear fit of the mask IoU on the mean
probability (today's score), the box's log area and the mask's fill, fitted on the other folds'
held-out predictions and applied to each fold (leave one fold out).

    uv run python bench/realdata_score_probe.py      # after bench/realdata_predict.py

Reads the default decoder's predictions of ``bench/realdata_predict.py`` (5 folds x 2 seeds) and
prints, per box source, the rank correlation of each number with the true mask IoU and the mask AP /
AP50 / AP75 each gives as the score (the oracle: the true IoU).
"""
import json
import sys
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.realdata import ANN  # noqa: E402
from bench.realdata_predict import OUT, quiet_ap, spearman, true_ious  # noqa: E402


def main():
    gt = json.loads(ANN.read_text())
    for boxes in ("gt", "auto"):
        res = {}
        for seed in (0, 1):
            pooled = []
            for f in range(5):
                p = json.loads((OUT / "pred" / f"default_{boxes}_f{f}_s{seed}" / "predictions.json").read_text())
                pooled += [{**r, "fold": f} for r in p]
            iou = true_ious(gt, pooled)
            score = np.array([r["score"] for r in pooled])
            area = np.array([r["bbox"][2] * r["bbox"][3] for r in pooled])
            fill = np.array([mask_utils.area({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()})
                             for r in pooled]) / np.maximum(area, 1)
            x = np.stack([np.ones_like(score), score, np.log(area), np.log(area) ** 2, fill, fill ** 2,
                          score * np.log(area)], 1)
            fold = np.array([r["fold"] for r in pooled])
            fitted = np.zeros(len(pooled))
            for f in range(5):
                w, *_ = np.linalg.lstsq(x[fold != f], iou[fold != f], rcond=None)
                fitted[fold == f] = x[fold == f] @ w
            for name, s in (("mean probability (today)", score), ("log box area", np.log(area)), ("fill", fill),
                            ("linear fit, leave one fold out", fitted), ("oracle (true IoU)", iou)):
                ap = quiet_ap(gt, [{**r, "score": float(v)} for r, v in zip(pooled, s)])[:3]
                res.setdefault(name, []).append([spearman(s, iou), *ap])
        print(f"{boxes} boxes: rank correlation with the true IoU | mask AP | AP50 | AP75 (mean of 2 seeds)")
        for name, v in res.items():
            m = np.mean(v, 0)
            print(f"  {name:32s} {m[0]:.3f} | {m[1]:.3f} | {m[2]:.3f} | {m[3]:.3f}")


if __name__ == "__main__":
    main()
