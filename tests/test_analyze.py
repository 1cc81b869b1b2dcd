import json

import numpy as np
from click.testing import CliRunner

from roiseg.common.geometry import normalized_to_pixel, pad_box
from roiseg.data.analyze import run_analyze
from roiseg.data.coco import decode_masks, load_person_records
from roiseg.data.rasterize import roi_target


def _independent_counts(ann, padding):
    """Decode every mask at full resolution and crop: a plain count to check the RLE algebra."""
    recs, _ = load_person_records(ann)
    total = np.zeros(3, np.int64)
    per_roi = []
    for r in recs:
        masks = decode_masks(r.instances)
        for t, inst in enumerate(r.instances):
            box = normalized_to_pixel(pad_box(inst.box_norm, padding), r.width, r.height)
            lab = roi_target(masks, t, box)
            c = np.bincount(lab.ravel(), minlength=3)
            total += c
            per_roi.append(c / max(c.sum(), 1))
    return total, np.mean(per_roi, axis=0), len(per_roi)


def test_analyze_matches_independent_count(synth):
    for padding in (0.1, 0.0):
        res = run_analyze(synth["train"], roi_padding=padding, workers=2, progress=False)
        total, roi_mean, n = _independent_counts(synth["train"], padding)
        got = res["pixel_counts"]
        assert [got["background"], got["target"], got["non_target"]] == total.tolist()
        assert res["counts"]["rois"] == n
        assert np.allclose(list(res["roi_mean_ratios"].values()), roi_mean)
        assert abs(sum(res["pixel_ratios"].values()) - 1) < 1e-9
    # synthetic persons overlap: class 2 must be present
    assert res["pixel_counts"]["non_target"] > 0
    assert res["counts"]["images_with_several_persons"] > 0


def test_class_weights_favour_rare_classes(synth):
    res = run_analyze(synth["train"], workers=1, progress=False)
    w = res["class_weights"]["inverse_frequency"]
    r = res["roi_mean_ratios"]
    rare = min(r, key=r.get)
    assert w[rare] == max(w.values())
    assert set(res["class_weights"]) >= {"inverse_frequency", "log_scaled", "inverse_clipped", "formulas"}
    assert res["settings"]["roi_padding"] == 0.1 and res["version"]


def test_cli_analyze_writes_json(synth, tmp_path):
    from roiseg.cli import main
    out = tmp_path / "da.json"
    r = CliRunner().invoke(main, ["analyze", "--ann", str(synth["val"]), "--out", str(out),
                                  "--workers", "1"])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["counts"]["images"] == 8
    assert d["roi_stats"]["feature_cells_stride8"]["share_smaller_than_2x2_cells"] >= 0
    bad = CliRunner().invoke(main, ["analyze", "--ann", str(tmp_path / "missing.json")])
    assert bad.exit_code == 1 and "annotation file not found" in bad.output
