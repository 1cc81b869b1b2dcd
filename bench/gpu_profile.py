"""Where does a resident training step spend its time on the GPU? (one-off diagnosis)"""
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_train import synthetic_store
from roiseg.loader.sampling import RoiSampling
from roiseg.loader.sources import CacheIndex, ResidentSource, epoch_batches
from roiseg.loader.targets import sample_roi_targets
from roiseg.modeling.decoders import build_model
from roiseg.training.losses import LossConfig, SegLoss

dev = torch.device("cuda")
idx = CacheIndex(synthetic_store(200, 1024, 12))
src = ResidentSource(idx, RoiSampling(samples_per_roi=4), 56, 0, dev)
batches = epoch_batches(idx.images, 1, 0, 16) * 3
model = build_model("roialign", 1024, hidden=256).to(dev)
opt = torch.optim.AdamW(model.parameters(), 1e-4)
loss_fn = SegLoss(LossConfig(), 3).to(dev)

def t(fn, n=20):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t0) / n * 1000

items = [(list(b), 1, True) for b in batches]
host = [src.host_parts[it] for it in items[:20]]
pinned = [{k: v.pin_memory() for k, v in h.items()} for h in host]
print("host_part (cpu, per batch) ms", t(lambda: src.host_parts[items[0]], 10))
print("device_part ms", t(lambda: src.device_part(pinned[0])))
b = src.device_part(pinned[0])
print("rois per batch", len(b["rois"]))
zeros = b["rois"].new_zeros(len(b["rois"]), dtype=torch.long)
print("targets only ms", t(lambda: sample_roi_targets(src.masks, src.unions, zeros, zeros,
                                                      b["rois"][:, 1:].double() * 640, 56, 56, 640)))
print("gather features ms", t(lambda: src.features[torch.arange(16, device=dev)]))
def step(bb):
    with torch.autocast("cuda", dtype=torch.float16):
        lg = model(bb["features"], bb["rois"])
    l = loss_fn(lg, bb["targets"])["loss"]; opt.zero_grad(); l.backward(); opt.step()
print("train step (prebuilt batch) ms", t(lambda: step(b)))
print("device_part + step ms", t(lambda: step(src.device_part(pinned[0]))))
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(5): step(src.device_part(pinned[0]))
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18))
