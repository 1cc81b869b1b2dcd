"""Exported decoder: CPU latency and output bytes per ROI count (the baseline for issue 12).

    uv run python bench/bench_export.py [--configs 128x128,1024x256] [--counts 0,1,5,20,50]

For each ``CxHIDDEN``: a roialign decoder (random weights, identity feature norm) exported with
`export_decoder` (the `cli.py export` path), run in ONNX Runtime's CPU provider on one image's
features [1,C,80,80] with N ROIs.  Reports ms per run (best of --repeat), the marginal ms per extra
ROI (20 vs 1) and the bytes of all outputs.  CUDA/TensorRT: not run here (no GPU lent).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from trainer.inference.export import export_decoder, input_names, sample_inputs  # noqa: E402
from trainer.models import build_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="128x128,1024x256")
    ap.add_argument("--counts", default="0,1,5,20,50")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    import onnxruntime as ort
    counts = [int(x) for x in a.counts.split(",")]
    print("| C x hidden | " + " | ".join(f"{n} ROIs ms (MB out)" for n in counts) + " | ms per extra ROI (1->20) |")
    print("|---|" + "---|" * (len(counts) + 1))
    for cfg in a.configs.split(","):
        c, hidden = (int(x) for x in cfg.split("x"))
        with tempfile.TemporaryDirectory() as d:
            path = export_decoder(build_model("roialign", c, hidden=hidden), c, (640, 640), (80, 80), 0.1,
                                  Path(d) / "dec.onnx")
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            cells, ms = [], {}
            for n in counts:
                arrays = sample_inputs(c, (80, 80), n, 1)
                feed = {k: v.numpy() for k, v in zip(input_names(False), arrays)}
                out = sess.run(None, feed)
                best = 1e9
                for _ in range(a.repeat):
                    t = time.perf_counter()
                    sess.run(None, feed)
                    best = min(best, time.perf_counter() - t)
                ms[n] = best * 1000
                cells.append(f"{ms[n]:.1f} ({sum(o.nbytes for o in out) / 1e6:.1f})")
            marginal = (ms[20] - ms[1]) / 19 if 1 in ms and 20 in ms else float("nan")
            print(f"| {c} x {hidden} | " + " | ".join(cells) + f" | {marginal:.1f} |", flush=True)


if __name__ == "__main__":
    main()
