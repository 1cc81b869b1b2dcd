"""Checks of a written graph in ONNX Runtime: parity with the PyTorch decoder (within a tolerance, each
differing mask pixel at a decision boundary) and its latency per ROI count."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from roiseg.export.graph import (
    DecoderExport,
    ExportError,
    ExportSpec,
    sample_inputs,
)

PARITY_TOL = 1e-3
HALF_TOL = 1e-2      # fp16 conv stack: max abs difference allowed (probabilities, relative logits)


def cpu_session(path: Path):
    """A CPU session of an exported graph; one that ONNX Runtime cannot load is an ``ExportError``."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
        raise ExportError(f"ONNX Runtime cannot load the exported graph: {str(exc).splitlines()[0][:300]}") from exc


def _ambiguous_pixels(fg: np.ndarray, idx: np.ndarray, batch: int, t: float, tol: float) -> np.ndarray:
    """[B,H,W]: pixels whose mask or instance decision is within ``tol`` of flipping: some ROI's
    probability within tol of the threshold, or two ROIs of the image within tol of each other."""
    amb = np.zeros((batch,) + fg.shape[1:], bool)
    for b in range(batch):
        f = fg[idx == b]
        if not len(f):
            continue
        amb[b] = (np.abs(f - t) <= tol).any(0)
        if len(f) > 1:
            top2 = -np.sort(-np.where(f > t, f, 0), 0)[:2]
            amb[b] |= (top2[0] > 0) & (top2[0] - top2[1] <= tol)
    return amb


def check_parity(model, onnx_path: Path, spec: ExportSpec, tol: float | None = None) -> dict:
    """ORT vs PyTorch (the unfolded fp32 model) for N = 1, 5 (ROIs of two images) and N = 0.

    Max abs difference of the float outputs (logits relative to their scale, at least 1); for
    ``masks`` (binary) and ``instance_map`` the number of differing pixels, each of which must be a
    pixel whose reference probability is within ``tol`` of its decision (the threshold or a
    competing ROI).  Raises over ``tol`` (``HALF_TOL`` for ``half`` graphs)."""
    tol = tol if tol is not None else (HALF_TOL if spec.half else PARITY_TOL)
    sess = cpu_session(onnx_path)
    names = [o.name for o in sess.get_outputs()]
    if names != spec.outputs:
        raise ExportError(f"{onnx_path} has outputs {names}, expected {spec.outputs}")
    ref_wrapper = DecoderExport(model.cpu().float(), spec, as_exported=False)
    report = {"tolerance": tol}
    for n, batch in ((1, 1), (5, 2), (0, 2)):
        inputs = sample_inputs(spec, n, batch, seed=n + 1)
        with torch.no_grad():
            named = dict(zip(spec.inputs, inputs))
            ref = {k: v.numpy() for k, v in ref_wrapper.decode(named["features"], named["rois"],
                                                                named.get("image_rects"), named.get("fine")).items()}
        got = dict(zip(names, sess.run(None, {k: v.numpy() for k, v in zip(spec.inputs, inputs)})))
        idx = inputs[1][:, 0].numpy().astype(int)
        diff, flips = 0.0, 0
        for k in names:
            g, r = got[k], ref[k]
            if g.shape != r.shape or g.dtype != r.dtype:
                raise ExportError(f"ONNX output {k} {g.dtype}{list(g.shape)} != PyTorch {r.dtype}{list(r.shape)} (N={n})")
            if not g.size:
                continue
            if g.dtype in (np.uint8, np.int16):
                amb = _ambiguous_pixels(ref["fg"], idx, batch, spec.threshold, tol)
                bad = g != r
                wrong = bad & ~(amb if k == "instance_map" else amb[idx])
                if wrong.any():
                    raise ExportError(f"ONNX/PyTorch parity failed for N={n}: {int(wrong.sum())} pixels of {k} "
                                      f"differ away from a decision boundary")
                flips += int(bad.sum())
            else:
                d = np.abs(g.astype(np.float64) - r).max()
                diff = max(diff, float(d / max(1.0, np.abs(r).max()) if k == "logits" else d))
        report[f"N={n}"] = {"max_abs_diff": diff, "flipped_pixels": flips}
        if diff > tol:
            raise ExportError(f"ONNX/PyTorch parity failed for N={n}: max abs difference {diff:.3g} > {tol}")
    return report


def format_parity(report: dict) -> str:
    parts = [f"{k} {v['max_abs_diff']:.1e}" + (f" ({v['flipped_pixels']} px within tolerance of a decision)"
                                               if v["flipped_pixels"] else "")
             for k, v in report.items() if k.startswith("N=")]
    return ", ".join(parts) + f" (tolerance {report['tolerance']:g})"


def decoder_latency(onnx_path: Path, spec: ExportSpec, counts=(1, 5, 20, 50), repeat: int = 5) -> dict:
    """Best-of-``repeat`` ms per run on the CPU provider, one image with N ROIs."""
    sess = cpu_session(onnx_path)
    out = {}
    for n in counts:
        inputs = {k: v.numpy() for k, v in zip(spec.inputs, sample_inputs(spec, n, 1))}
        sess.run(None, inputs)
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            sess.run(None, inputs)
            best = min(best, time.perf_counter() - t)
        out[n] = round(best * 1000, 2)
    return out


