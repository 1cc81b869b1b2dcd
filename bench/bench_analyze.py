"""Time `analyze` on a COCO-scale synthetic file against the plain one-process reference.

    uv run python bench/bench_analyze.py                 # full scale (~60k images)
    uv run python bench/bench_analyze.py --ref-images 6000
The reference runs on the first --ref-images images (it is slow); analyze runs on the same subset
(for the ratio and the equal-counts check) and on the whole file (for the absolute time).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reference_analyze import reference_counts  # noqa: E402
from roiseg.data.analyze import run_analyze  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ann", type=Path, default=ROOT / "bench/out/coco_scale_person.json")
    ap.add_argument("--ref-images", type=int, default=6000)
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args()
    if not a.ann.exists():
        subprocess.run([sys.executable, str(ROOT / "bench/make_coco_scale.py"), "--out", str(a.ann)],
                       check=True)
    d = json.loads(a.ann.read_text())
    sub = {"images": d["images"][: a.ref_images], "categories": d["categories"]}
    keep = {im["id"] for im in sub["images"]}
    sub["annotations"] = [x for x in d["annotations"] if x["image_id"] in keep]
    sub_path = a.ann.with_name("coco_scale_subset.json")
    sub_path.write_text(json.dumps(sub))

    t = time.perf_counter()
    ref = reference_counts(sub_path)
    t_ref = time.perf_counter() - t
    res = run_analyze(sub_path, workers=a.workers, progress=False)
    t_sub = res["elapsed_s"]
    ours = [res["pixel_counts"][k] for k in ("background", "target", "non_target")]
    full = run_analyze(a.ann, workers=a.workers)
    out = {
        "subset_images": len(sub["images"]), "subset_instances": len(sub["annotations"]),
        "reference_s": round(t_ref, 2), "analyze_subset_s": t_sub,
        "speedup": round(t_ref / t_sub, 2), "same_counts": ours == ref.tolist(),
        "full_images": full["counts"]["images"], "full_instances": full["counts"]["instances"],
        "analyze_full_s": full["elapsed_s"],
        "reference_full_estimate_s": round(t_ref * full["counts"]["instances"] / len(sub["annotations"]), 1),
    }
    print(json.dumps(out, indent=2))
    if not out["same_counts"]:
        print(f"COUNT MISMATCH: analyze {ours} vs reference {ref.tolist()}")
        sys.exit(1)


if __name__ == "__main__":
    main()
