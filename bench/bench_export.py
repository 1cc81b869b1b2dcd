"""Exported decoder: CPU latency and output bytes per ROI count, today's graph against the graph
when issue 12 was filed, side by side in one run.

    uv run python bench/bench_export.py [--configs 128x128,1024x256] [--counts 0,1,5,20,50]
        [--provider cpu|cuda|tensorrt] [--end-to-end] [--half]

For each ``CxHIDDEN`` a roialign decoder (random weights, random feature statistics) is exported:

* ``issue``: the graph when the issue was filed (commit 51df9fc^): ``probs [N,3,H,W]`` fp32 pasted
  with ``grid_sample``, + logits + roi_boxes, normalization not folded;
* ``default``: ``cli.py export`` today: masks uint8 [N,H,W] + instance_map [B,H,W] + logits + roi_boxes;
* ``full-probs``: today's graph with ``--full-probs`` (all classes pasted, separable matmuls);
* ``logits-only``: the decoder without any paste (the floor a paste can reach).

ms per run is the best of --repeat after a warm-up, on one image's features [1,C,80,80]; "per ROI"
is the marginal cost (N=20 vs N=1); MB is the sum of all outputs at N=20.  With ``--end-to-end``
the stand-in extractor (roiseg.data.standin, C channels) is joined in front and timed too.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from roiseg.common.geometry import pad_box  # noqa: E402
from roiseg.export.export import export_decoder, export_end_to_end  # noqa: E402
from roiseg.export.graph import (  # noqa: E402
    DecoderExport,
    ExportSpec,
    sample_inputs,
)
from roiseg.export.parity import check_parity, format_parity  # noqa: E402
from roiseg.modeling.decoders import build_model  # noqa: E402


def grid_sample_paste(probs, boxes_px, height, width):
    """The paste of 51df9fc^ (for the baseline graph only)."""
    n, dt = probs.shape[0], probs.dtype
    x0, y0, x1, y1 = (boxes_px[:, k, None].to(dt) for k in range(4))
    xs = torch.arange(width, dtype=dt)[None] + 0.5
    ys = torch.arange(height, dtype=dt)[None] + 0.5
    gx = (xs - x0) / (x1 - x0).clamp_min(1e-6) * 2 - 1
    gy = (ys - y0) / (y1 - y0).clamp_min(1e-6) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(n, height, width), gy[:, :, None].expand(n, height, width)], 3)
    out = F.grid_sample(probs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    missing = 1 - out.sum(1)
    return torch.cat([out[:, :1] + missing[:, None], out[:, 1:]], 1)


class IssueGraph(torch.nn.Module):
    def __init__(self, model, spec):
        super().__init__()
        self.model, self.spec = model.eval(), spec

    def forward(self, features, rois):
        h, w = self.spec.input_hw
        n = rois.shape[0]
        rois = torch.cat([rois, torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]])], 0)
        padded = pad_box(rois[:, 1:5], self.spec.roi_padding, 0.0, 1.0)
        logits = self.model(features, torch.cat([rois[:, :1], padded], 1))
        px = padded * torch.tensor([w, h, w, h], dtype=padded.dtype)
        return grid_sample_paste(logits.softmax(1), px, h, w)[:n], logits[:n], px[:n]


class LogitsOnly(torch.nn.Module):
    def __init__(self, model, spec):
        super().__init__()
        self.inner = DecoderExport(model, spec)

    def forward(self, features, rois):
        s = self.inner.spec
        rois = torch.cat([torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]]), rois], 0)
        padded = pad_box(rois[:, 1:5], s.roi_padding, 0.0, 1.0)
        return self.inner.model(features, torch.cat([rois[:, :1], padded], 1))[1:]


def export_module(module, spec, out_names, path):
    dyn = {"features": {0: "B"}, "rois": {0: "N"}, **{k: {0: "N"} for k in out_names}}
    with torch.no_grad():
        torch.onnx.export(module, sample_inputs(spec, 6, 1), str(path), input_names=spec.inputs,
                          output_names=out_names, opset_version=17, dynamo=False, dynamic_axes=dyn)
    return path


def session(path, provider):
    import onnx
    import onnxruntime as ort

    from roiseg.common.providers import make_session
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return make_session(onnx.load(str(path)), opts, provider, label=Path(path).name)


def stand_in_source(onnx_path: Path, channels: int):
    """The stand-in extractor's feature source (RGB 0-1, stretched to 640x640, 10% ROI padding)."""
    from roiseg.common.files import file_sha256
    from roiseg.data.images import Preprocess
    from roiseg.data.standin import FEATURE_NAME
    from roiseg.data.store_meta import FeatureSource
    return FeatureSource(str(onnx_path), file_sha256(onnx_path), FEATURE_NAME, (channels, 80, 80), (640, 640),
                         Preprocess(), 0.1)


def time_graphs(sessions: dict, feeds: dict, repeat: int):
    """Best-of-``repeat`` ms per (graph, N), rounds interleaved across graphs so that this VM's
    speed drift hits all of them alike; MB of all outputs per N."""
    ms = {g: {n: float("inf") for n in feeds[g]} for g in sessions}
    mb = {g: {} for g in sessions}
    for g, sess in sessions.items():        # warm-up + output sizes
        for n, feed in feeds[g].items():
            mb[g][n] = sum(o.nbytes for o in sess.run(None, feed)) / 1e6
    for _ in range(repeat):
        for g, sess in sessions.items():
            for n, feed in feeds[g].items():
                t = time.perf_counter()
                sess.run(None, feed)
                ms[g][n] = min(ms[g][n], (time.perf_counter() - t) * 1000)
    return ms, mb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="128x128,1024x256")
    ap.add_argument("--counts", default="0,1,5,20,50")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"])
    ap.add_argument("--end-to-end", action="store_true", help="also extractor + decoder (stand-in extractor)")
    ap.add_argument("--half", action="store_true", help="also the --half graph")
    a = ap.parse_args()
    torch.manual_seed(0)
    counts = [int(x) for x in a.counts.split(",")]
    print(f"provider {a.provider}; ms per run (best of {a.repeat}); MB of all outputs\n")
    print("| C x hidden | graph | " + " | ".join(f"{n} ROIs ms" for n in counts)
          + " | ms per extra ROI (1->20) | MB at 20 ROIs | per-ROI vs issue | MB vs issue |")
    print("|---|---|" + "---|" * (len(counts) + 4))
    for cfg in a.configs.split(","):
        c, hidden = (int(x) for x in cfg.split("x"))
        model = build_model("roialign", c, hidden=hidden, feature_stats=(torch.randn(c), torch.rand(c) + 0.5))
        spec = ExportSpec(c, (640, 640), (80, 80), 0.1)
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            graphs = {
                "issue": export_module(IssueGraph(model, spec), spec, ["probs", "logits", "roi_boxes"], d / "i.onnx"),
                "default": export_decoder(model, spec, d / "dec.onnx"),
                "full-probs": export_decoder(model, ExportSpec(c, (640, 640), (80, 80), 0.1, full_probs=True),
                                             d / "full.onnx"),
                "logits-only": export_module(LogitsOnly(model, spec), spec, ["logits"], d / "l.onnx"),
            }
            if a.half:
                hspec = ExportSpec(c, (640, 640), (80, 80), 0.1, half=True)
                graphs["half"] = export_decoder(model, hspec, d / "half.onnx")
                print(f"<!-- {c} x {hidden} half parity: {format_parity(check_parity(model, graphs['half'], hspec))} -->")
            feeds = {n: {k: v.numpy() for k, v in zip(spec.inputs, sample_inputs(spec, n, 1))} for n in counts}
            sessions = {name: session(path, a.provider) for name, path in graphs.items()}
            all_feeds = {name: feeds for name in graphs}
            if a.end_to_end:
                from roiseg.data.standin import build_standin_extractor
                ext = build_standin_extractor(d / "ext.onnx", channels=c)
                e2e = export_end_to_end(ext, stand_in_source(ext, c), graphs["default"], d / "e2e.onnx")
                sessions["end-to-end (stand-in extractor)"] = session(e2e, a.provider)
                img = torch.rand(1, 3, 640, 640).numpy()
                all_feeds["end-to-end (stand-in extractor)"] = {n: {"images": img, "rois": f["rois"]}
                                                               for n, f in feeds.items()}
            ms, mb = time_graphs(sessions, all_feeds, a.repeat)
            per = {g: (ms[g][20] - ms[g][1]) / 19 if 1 in counts and 20 in counts else float("nan") for g in ms}
            for g in sessions:
                print(f"| {c} x {hidden} | {g} | " + " | ".join(f"{ms[g][n]:.1f}" for n in counts)
                      + f" | {per[g]:.2f} | {mb[g].get(20, float('nan')):.2f} | {per[g] / per['issue']:.2f} | "
                        f"{mb[g].get(20, float('nan')) / mb['issue'].get(20, float('nan')):.3f} |", flush=True)
            print(f"<!-- {c} x {hidden}: output stage per ROI (graph minus logits-only): issue "
                  f"{per['issue'] - per['logits-only']:.2f} ms, default {per['default'] - per['logits-only']:.2f} ms -->")

if __name__ == "__main__":
    main()
