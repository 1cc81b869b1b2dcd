"""Training throughput (ROIs/s, images/s) by data path, same model and steps:

  (a) stream   - from the Zarr store through DataLoader workers (the CPU streaming path)
      pinned   - from the Zarr store, decoded by threads into pinned buffers (the GPU streaming path)
  (b) resident - the store loaded once into memory (GPU if --device cuda)
  (c) memory   - batches prepared beforehand, already on the device (the ceiling)
  (d) onnx     - the earlier project's way: JPEG decode + the ONNX extractor inside every step
                 (CPU, real stand-in only)

    uv run python bench/bench_train.py                       # the real-data store (bench/realdata_cv.py makes it)
    uv run python bench/bench_train.py --synthetic 300 --channels 1024 --device cuda   # GPU, real feature size
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.realdata import realdata  # noqa: E402
from roiseg.loader.sampling import RoiSampling  # noqa: E402
from roiseg.loader.sources import (  # noqa: E402
    CacheIndex,
    PinnedStreamSource,
    ResidentSource,
    StreamingSource,
    epoch_batches,
)
from roiseg.modeling.decoders import build_model  # noqa: E402
from roiseg.training.losses import LossConfig, SegLoss  # noqa: E402


def synthetic_store(n: int, channels: int, workers: int, keep: Path | None = None, sparse: bool = False) -> Path:
    from roiseg.data.cache import CacheConfig, run_cache
    from roiseg.data.standin import build_standin_extractor
    from roiseg.data.synthetic import make_synthetic_dataset
    if keep and (keep / "train.zarr").is_dir():
        return keep / "train.zarr"
    d = keep or Path(tempfile.mkdtemp(prefix="bench_train_"))
    d.mkdir(parents=True, exist_ok=True)
    syn = make_synthetic_dataset(d, n_train=n, n_val=4, seed=0)
    onnx = build_standin_extractor(d / "standin.onnx", channels=channels)
    out = d / "train.zarr"
    run_cache(CacheConfig(ann=syn["train"], images=d / "images/train2017", onnx=onnx, out=out,
                          feature_name="/model.34/Concat_output_0", provider="cpu", workers=workers,
                          sparse=sparse),
              progress=False)
    return out


def run_steps(model, opt, loss_fn, batches, device, amp, steps, rois_per_step=0):
    """``rois_per_step`` > 0: each read is split into optimizer steps of that many ROIs (the
    trainer's recipe); 0: one step per read."""
    n_rois = n_img = 0
    t0 = None
    for k, b in enumerate(batches):
        if k == 2:  # warm-up excluded
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            n_rois = n_img = 0
        f = b["features"]
        n = len(b["rois"])
        chunks = torch.tensor_split(torch.randperm(n, device=f.device), max(1, n // rois_per_step)) \
            if rois_per_step else [slice(None)]
        for sel in chunks:
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                logits = model(f if amp else f.float(), b["rois"][sel])
            loss = loss_fn(logits, b["targets"][sel])["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        n_rois += len(b["rois"])
        n_img += len(b["features"])
        if k + 1 >= steps + 2:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"rois_per_s": round(n_rois / dt, 1), "images_per_s": round(n_img / dt, 1), "steps": steps}


def onnx_batches(index, resident, batches, epoch):
    """Earlier project's data path: decode JPEG + run the extractor for every image, every step."""
    from roiseg.data.extractor import Extractor
    from roiseg.data.images import load_rgb, preprocess
    ex = Extractor(realdata().onnx, index.meta.source.feature_name, "cpu", streams=1)
    prep = index.meta.source.preprocess
    img_dir = Path(index.meta.images_dir)
    for b in batches:
        batch = resident.batch(b, epoch, True)
        feats = [ex.run(preprocess(load_rgb(img_dir / index.tables["file_name"][i]), prep)[None])[0] for i in b]
        batch["features"] = torch.from_numpy(np.stack(feats)).half()
        yield batch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, default=ROOT / "bench/out/cv/store.zarr")
    ap.add_argument("--synthetic", type=int, default=0, help="build a synthetic store of N images instead")
    ap.add_argument("--channels", type=int, default=1024)
    ap.add_argument("--keep-store", type=Path, help="build the synthetic store here once and reuse it")
    ap.add_argument("--sparse", action="store_true", help="the synthetic store ROI-sparse (cache --sparse)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--samples-per-roi", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--modes", default="stream,resident,memory,onnx")
    ap.add_argument("--rois-per-step", type=int, default=0, help="split reads into steps of N ROIs (0: one step per read)")
    a = ap.parse_args()
    device = torch.device(a.device)
    store = synthetic_store(a.synthetic, a.channels, a.workers, a.keep_store, a.sparse) if a.synthetic else a.store
    index = CacheIndex(store)
    sampling = RoiSampling(samples_per_roi=a.samples_per_roi)
    amp = device.type == "cuda"
    batches = epoch_batches(index.images, 1, 0, a.batch_size)
    while len(batches) < a.steps + 2:
        batches = batches + batches
    batches = batches[: a.steps + 2]
    torch.manual_seed(0)
    model = build_model("roialign", index.feature_shape[0], hidden=a.hidden).to(device)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    loss_fn = SegLoss(LossConfig(), 3).to(device)
    out = {"device": torch.cuda.get_device_name(device) if amp else "cpu (2 cores)" if a.device == "cpu" else a.device,
           "feature_shape": list(index.feature_shape), "images": len(index.images),
           "batch_images": a.batch_size, "samples_per_roi": a.samples_per_roi, "hidden": a.hidden,
           "rois_per_step": a.rois_per_step or "one step per read"}
    modes = a.modes.split(",")
    resident = None
    t = time.perf_counter()
    if {"resident", "memory", "onnx"} & set(modes):
        resident = ResidentSource(index, sampling, 56, 0, device)
        out["resident_load_s"] = round(time.perf_counter() - t, 2)
    for mode in modes:
        if mode == "stream":
            src = StreamingSource(index, sampling, 56, 0, a.workers, device)
            it = src.iterate(batches, 1, True)
        elif mode == "pinned":  # the GPU streaming path: thread decode into pinned buffers
            it = PinnedStreamSource(index, sampling, 56, 0, device, threads=a.workers).iterate(batches, 1, True)
        elif mode == "resident":
            it = resident.iterate(batches, 1, True)
        elif mode == "memory":
            it = list(resident.iterate(batches, 1, True))
        elif mode == "onnx":
            if device.type != "cpu" or a.synthetic:
                continue
            it = onnx_batches(index, resident, batches, 1)
        out[mode] = run_steps(model, opt, loss_fn, it, device, amp, a.steps, a.rois_per_step)
    if "memory" in out:
        for mode in ("stream", "pinned", "resident", "onnx"):
            if mode in out:
                out[f"{mode}_vs_memory"] = round(out[mode]["rois_per_s"] / out["memory"]["rois_per_s"], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
