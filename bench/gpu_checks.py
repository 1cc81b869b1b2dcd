"""The GPU paths, checked for real: ``--device cuda`` on a lent GPU machine (bench/gpu_bench.sh), and
``--device cpu`` with the CPU in the GPU's place (the same code, bf16 autocast where fp16 needs
CUDA), which must pass on any machine.  Each check prints one line with its wall time,
``PASS|FAIL|SKIP name (s): detail``; the summary line lists every SKIP with its reason, and the
script exits 1 when a check failed.  Each check can fail: ``--plant NAME`` installs a fault in that
path (in this process and in the subprocesses it starts) and the check must then FAIL.

* ``amp``: AMP training (fp16 on CUDA, bf16 on the CPU): the loss falls over the epochs, the grad
  scaler's scale never drops below 1, at most a few steps are skipped (planted: an inf loss).
* ``resume``: deterministic algorithms; 1 epoch then ``--resume`` to 2 equals 2 epochs uninterrupted,
  bit for bit: weights, EMA, optimizer state and the last epoch's loss (planted: the optimizer's
  moments not restored).
* ``resume_to_amp``: a run started on the CPU without AMP, resumed on the device with AMP:
  ``resolved.yaml`` says AMP and the last checkpoint holds a scaler state (planted: AMP never on).
* ``data_paths``: ``ResidentSource`` on the CPU, on the device, and ``PinnedStreamSource`` (ring depth
  2, a slow consumer) give equal batches over an epoch (maps, targets, ROIs) and equal cropped masks
  (planted: a ring that hands out a slot still in use).
* ``fine_amp``: the fine path under AMP: finite, falling loss, and the zero-init fusion learns
  (planted: the fusion cut from the gradient).
* ``ddp``: 2 ranks under torchrun (on one GPU: gloo), replicas bit-identical every epoch (planted:
  gradients not all-reduced).
* ``ort_cuda`` / ``trt_engines``: ONNX Runtime's CUDA and TensorRT providers (SKIP without them).

    python bench/gpu_checks.py --device cpu|cuda [--work DIR] [--only a,b] [--plant NAME] [--timeout S]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.proctree import run_tree  # noqa: E402

RESULTS: list[tuple[str, str, str]] = []


class Skip(Exception):
    """A check that cannot run here; its reason goes into the summary line."""


def report(status: str, name: str, seconds: float, detail: str) -> None:
    RESULTS.append((status, name, detail))
    print(f"{status} {name} ({seconds:.1f} s): {detail}", flush=True)


# ---- setup ---------------------------------------------------------------------------------------
class Env:
    """What every check shares: the device under test and its autocast type, the work folder, the
    subprocess timeout, and the synthetic data (built on first use, inside the first check that needs
    it: a failure there is that check's FAIL, never the end of the script)."""

    def __init__(self, device: str, work: Path, timeout: float, plant: str | None):
        self.device, self.work, self.timeout, self.plant = device, work, timeout, plant
        self.cuda = device.startswith("cuda")
        self.amp_dtype = "float16" if self.cuda else "bfloat16"

    @functools.cached_property
    def data(self) -> dict:
        from roiseg.common.files import write_json_atomic
        from roiseg.data.analyze import run_analyze
        from roiseg.data.cache import CacheConfig, run_cache
        from roiseg.data.standin import build_standin_extractor
        from roiseg.data.synthetic import make_synthetic_dataset
        d = make_synthetic_dataset(self.work / "data", n_train=32, n_val=8, seed=3)
        onnx = build_standin_extractor(self.work / "standin.onnx", channels=64)
        stores = {}
        for name, split, extra in (("train", "train", {"flip": True}), ("val", "val", {}),
                                   ("fine_train", "train", {"fine_feature": "input"}),
                                   ("fine_val", "val", {"fine_feature": "input"})):
            stores[name] = self.work / f"{name}.zarr"
            if not (stores[name] / ".zattrs").is_file():
                run_cache(CacheConfig(ann=d[split], images=d["root"] / f"images/{split}2017", onnx=onnx,
                                      out=stores[name], provider="cpu", **extra), progress=False)
        stores["analysis"] = self.work / "data_analyze.json"
        if not stores["analysis"].is_file():
            write_json_atomic(stores["analysis"], run_analyze(d["train"], workers=2, progress=False))
        return {**d, "onnx": onnx, **stores}

    def fresh(self, name: str) -> Path:
        """An empty run folder for a check (an earlier invocation's is removed: the work folder is ours)."""
        out = self.work / name
        shutil.rmtree(out, ignore_errors=True)
        return out

    def config(self, out: Path, fine: bool = False, **over):
        from roiseg.training.config import make_config
        s = self.data
        train, val = (s["fine_train"], s["fine_val"]) if fine else (s["train"], s["val"])
        base = dict(train_store=str(train), val_store=str(val), analysis=str(s["analysis"]), out=str(out),
                    hidden=32, roi_size=7, mask_size=28, batch_size=8, rois_per_step=16, workers=0,
                    resident="cpu", visualize=False, tensorboard=False, device=self.device, seed=1,
                    amp_dtype=self.amp_dtype)
        return make_config(**{**base, **over})

    def cli(self, *args, torchrun: int = 0, env: dict | None = None):
        """``cli.py ARGS`` in a subprocess (the planted fault goes along), its whole process tree
        killed at the timeout."""
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun)] \
            if torchrun else [sys.executable]
        path = [str(ROOT)] + ([str(self.plant_dir)] if self.plant else [])
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}),
                    "PYTHONPATH": os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")])}
        p = run_tree(head + [ROOT / "cli.py", *args], self.timeout, env=full_env)
        if p.returncode != 0:    # the command's own message when it gave one, else the end of its stderr
            said = [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("Error: ")]
            raise RuntimeError(f"cli.py {' '.join(map(str, args[:2]))} exited {p.returncode}: "
                               + (" | ".join(dict.fromkeys(said)) if said else p.stderr[-2000:]))
        return p

    @property
    def plant_dir(self) -> Path:
        """A folder whose ``sitecustomize.py`` installs the planted fault in every subprocess."""
        d = self.work / "plant"
        d.mkdir(exist_ok=True)
        (d / "sitecustomize.py").write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                                            f"from bench.gpu_checks import install_plant\n"
                                            f"install_plant({self.plant!r})\n")
        return d


def fit(cfg, until: int | None = None):
    """A run as ``cli.py train`` runs it (in this process): the trainer, after ``fit``; ``until``:
    stopped after that epoch, as a run killed there (its LR schedule is the whole run's)."""
    from roiseg.training.loop import Trainer
    t = Trainer(cfg)
    try:
        t.fit(until)
    finally:
        t.close()
    return t


def resumed(cfg_over: dict, env: Env, out: Path):
    """``train --resume auto`` of the run in ``out`` with ``cfg_over`` given on the command line."""
    from roiseg.training.config import make_config
    from roiseg.training.run_state import run_settings
    return fit(make_config(base=run_settings("auto", str(out)), resume="auto", **cfg_over))


def final_state(out: Path) -> dict:
    from roiseg.modeling.checkpoint import find_checkpoint, load_checkpoint
    return load_checkpoint(find_checkpoint(out))


# ---- the checks ----------------------------------------------------------------------------------
def check_amp(env: Env) -> str:
    import torch

    from roiseg.training.loop import Trainer
    t = Trainer(env.config(env.fresh("amp"), epochs=4))
    if not t.amp:
        raise AssertionError(f"AMP is off on {t.device}")
    calls, stepped, scales = [0], [0], []
    opt_step, scaler_step, scaler_update = t.optimizer.step, t.scaler.step, t.scaler.update

    def counted_opt(*a, **k):
        stepped[0] += 1
        return opt_step(*a, **k)

    def counted_scaler(*a, **k):
        calls[0] += 1
        return scaler_step(*a, **k)

    def recorded_update(*a, **k):
        scaler_update(*a, **k)
        scales.append(float(t.scaler.get_scale()))
    t.optimizer.step, t.scaler.step, t.scaler.update = counted_opt, counted_scaler, recorded_update
    try:
        hist = t.fit()
    finally:
        t.close()
    losses = [h["loss"] for h in hist]
    skipped = calls[0] - stepped[0]
    ok = (all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < 0.95 * losses[0]
          and min(scales) >= 1 and skipped <= max(3, calls[0] // 20))
    detail = (f"{env.amp_dtype} on {t.device}: {calls[0]} steps, {skipped} skipped, scale {scales[0]:.0f} -> "
              f"{scales[-1]:.0f} (min {min(scales):.3g}), loss by epoch " + " ".join(f"{v:.3f}" for v in losses))
    if not ok:
        raise AssertionError(detail)
    return detail


def check_resume(env: Env) -> str:
    import torch

    from roiseg.modeling.checkpoint import tensor_digest
    full, part = env.fresh("resume_full"), env.fresh("resume_part")
    over = {"deterministic": True, "amp": True}
    try:
        fit(env.config(full, epochs=2, **over))
        fit(env.config(part, epochs=2, **over), until=1)       # killed after epoch 1
        resumed({"device": env.device}, env, part)
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = final_state(full), final_state(part)
    keys = ("model", "ema", "optimizer", "scaler")
    same = {k: tensor_digest(getattr(a, k)) == tensor_digest(getattr(b, k)) for k in keys}
    la, lb = a.metrics["loss"], b.metrics["loss"]
    detail = ("epoch 2 after resume vs uninterrupted: " + ", ".join(f"{k} {'equal' if v else 'DIFFERENT'}"
                                                                     for k, v in same.items())
              + f"; loss {lb!r} vs {la!r}; instance_mIoU {b.metrics['instance_mIoU']:.6f} vs "
              f"{a.metrics['instance_mIoU']:.6f}")
    if not (all(same.values()) and la == lb and b.epoch == 2):
        raise AssertionError(detail)
    return detail


def check_resume_to_amp(env: Env) -> str:
    import yaml
    out = env.fresh("cpu_then_amp")
    fit(env.config(out, epochs=1, device="cpu", amp=False))
    resumed({"epochs": 2, "device": env.device, "amp": True, "amp_dtype": env.amp_dtype}, env, out)
    resolved = yaml.safe_load((out / "resolved.yaml").read_text())
    ck = final_state(out)
    scaler = ck.scaler
    detail = (f"resolved.yaml amp {resolved.get('amp')} ({resolved.get('amp_dtype')}, device {resolved.get('device')}), "
              f"epoch {ck.epoch} scaler state {sorted(scaler) or 'EMPTY'}, scale {scaler.get('scale')}, "
              f"loss {ck.metrics['loss']:.4f}")
    if not (resolved.get("amp") is True and scaler.get("scale") and ck.epoch == 2
            and ck.metrics["loss"] == ck.metrics["loss"]):
        raise AssertionError(detail)
    return detail


def check_data_paths(env: Env) -> str:
    import torch

    from roiseg.loader.sampling import RoiSampling
    from roiseg.loader.sources import (
        CacheIndex,
        PinnedStreamSource,
        ResidentSource,
        epoch_batches,
    )
    index = CacheIndex(env.data["train"])
    sampling = RoiSampling(hflip=0.5)          # stored mirrored maps: the store has them (cache --flip)
    dev = torch.device(env.device)
    batches = epoch_batches(index.images, 1, 0, 4)
    sources = {"resident on the host": ResidentSource(index, sampling, 28, 0, torch.device("cpu")),
               f"resident on the device ({dev})": ResidentSource(index, sampling, 28, 0, dev),
               f"pinned stream to {dev} (ring depth 2)": PinnedStreamSource(index, sampling, 28, 0, dev, threads=4,
                                                                            depth=2)}
    got = {}
    for name, src in sources.items():
        seen = []
        for b in src.iterate(batches, 1, True):
            seen.append({k: v.cpu().clone() for k, v in b.items()})
            time.sleep(0.02)          # a slow consumer: the producer runs ahead into the ring
        got[name] = seen
    ref_name = next(iter(got))
    diffs = []
    for name, seen in got.items():
        if len(seen) != len(got[ref_name]):
            diffs.append(f"{name}: {len(seen)} batches, not {len(got[ref_name])}")
            continue
        for k, (x, y) in enumerate(zip(got[ref_name], seen)):
            bad = [key for key in x if not torch.equal(x[key], y[key])]
            if bad:
                diffs.append(f"{name}: batch {k} differs in {bad}")
                break
    crops = [(s.masks.to("cpu"), s.unions.to("cpu")) for s in sources.values()]
    for name, (m, u) in zip(sources, crops):
        if not all(torch.equal(a, b) for a, b in ((m.bits, crops[0][0].bits), (m.geom, crops[0][0].geom),
                                                  (u.bits, crops[0][1].bits), (u.geom, crops[0][1].geom))):
            diffs.append(f"{name}: cropped masks differ")
    n_rois = sum(len(b["rois"]) for b in got[ref_name])
    detail = (f"{len(batches)} batches, {n_rois} ROIs, keys {sorted(got[ref_name][0])}; "
              + ("; ".join(diffs) if diffs else f"all {len(sources)} sources equal, cropped masks too"))
    if diffs:
        raise AssertionError(detail)
    return detail


def check_fine_amp(env: Env) -> str:
    import torch
    t = fit(env.config(env.fresh("fine_amp"), fine=True, epochs=3))
    if not t.fine_channels or not t.amp:
        raise AssertionError(f"fine path {t.fine_channels} channels, AMP {t.amp}")
    losses = [h["loss"] for h in t.history]
    last = t.model.fine.fuse[-1].weight
    moved = float(last.detach().abs().max())
    finite = all(torch.isfinite(p).all() for p in t.model.parameters())
    detail = (f"{env.amp_dtype}: fine map {t.train_index.fine_shape}, loss by epoch "
              + " ".join(f"{v:.3f}" for v in losses) + f", fusion's zero-init conv moved to max |w| {moved:.2e}, "
              f"parameters finite {finite}")
    if not (finite and losses[-1] < losses[0] and moved > 0):
        raise AssertionError(detail)
    return detail


def check_ddp(env: Env) -> str:
    s = env.data
    out = env.fresh("ddp")
    device = "cuda:0" if env.cuda else "cpu"
    env.cli("train", "--train-store", s["train"], "--val-store", s["val"], "--analysis", s["analysis"], "--out", out,
            "--hidden", "32", "--roi-size", "7", "--mask-size", "28", "--batch-size", "2", "--workers", "0",
            "--no-vis", "--no-tensorboard", "--epochs", "2", "--device", device, "--min-roi-size", "30",
            torchrun=2, env={"FEATCACHE_DIST_BACKEND": "gloo"})
    ms = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    detail = "; ".join(f"epoch {m['epoch']}: {m.get('replicas')}" for m in ms)
    if not (len(ms) == 2 and all(str(m.get("replicas", "")).startswith("identical on 2 ranks") for m in ms)):
        raise AssertionError(detail)
    return detail


def _ort_providers() -> list:
    import onnxruntime as ort
    return ort.get_available_providers()


def check_ort_cuda(env: Env) -> str:
    import numpy as np

    from roiseg.data.extractor import Extractor
    from roiseg.data.standin import FEATURE_NAME
    if not env.cuda:
        raise Skip("--device cpu: ONNX Runtime's GPU providers are checked with --device cuda")
    if "CUDAExecutionProvider" not in _ort_providers():
        raise Skip(f"this onnxruntime has no CUDA provider ({', '.join(_ort_providers())})")
    x = np.random.default_rng(0).random((1, 3, 640, 640), np.float32)
    cpu = Extractor(env.data["onnx"], FEATURE_NAME, "cpu").run(x).astype(np.float32)
    gpu = Extractor(env.data["onnx"], FEATURE_NAME, "cuda")
    diff = float(np.abs(gpu.run(x).astype(np.float32) - cpu).max())
    detail = f"provider {gpu.provider}, max |cuda - cpu| {diff:.2e} (fp16 storage)"
    if not (gpu.provider == "CUDAExecutionProvider" and diff < 1e-2):
        raise AssertionError(detail)
    return detail


def check_trt_engines(env: Env) -> str:
    import numpy as np

    from roiseg.common.providers import load_tensorrt
    from roiseg.data.extractor import Extractor
    from roiseg.data.standin import FEATURE_NAME, build_standin_extractor
    if not env.cuda:
        raise Skip("--device cpu: TensorRT is checked with --device cuda")
    if "TensorrtExecutionProvider" not in _ort_providers():
        raise Skip(f"this onnxruntime has no TensorRT provider ({', '.join(_ort_providers())})")
    why = load_tensorrt()
    if why:
        raise Skip(why)
    x = np.random.default_rng(1).random((1, 3, 640, 640), np.float32)
    out = {}
    for seed in (0, 1):
        path = build_standin_extractor(env.work / f"same_graph_{seed}.onnx", channels=64, seed=seed)
        ref = Extractor(path, FEATURE_NAME, "cpu").run(x).astype(np.float32)
        trt = Extractor(path, FEATURE_NAME, "tensorrt", trt_cache=env.work / "engines")
        out[seed] = (ref, trt.run(x).astype(np.float32), trt.provider)
    own = max(float(np.abs(t - r).max()) for r, t, _ in out.values())
    cross = float(np.abs(out[0][1] - out[1][0]).max())
    detail = f"each model vs its CPU result {own:.2e} (fp16), model 1's engine vs model 0 {cross:.2e}"
    if not (all(p == "TensorrtExecutionProvider" for _, _, p in out.values()) and own < 5e-2 and cross > 10 * own):
        raise AssertionError(detail)
    return detail


CHECKS = {"amp": check_amp, "resume": check_resume, "resume_to_amp": check_resume_to_amp,
          "data_paths": check_data_paths, "fine_amp": check_fine_amp, "ddp": check_ddp,
          "ort_cuda": check_ort_cuda, "trt_engines": check_trt_engines}


# ---- planted faults: each must turn its check into a FAIL ----------------------------------------
def _plant_amp():      # every loss inf: the scaler skips every step and its scale collapses
    from roiseg.training.losses import SegLoss
    real = SegLoss.forward
    SegLoss.forward = lambda self, *a, **k: {**(r := real(self, *a, **k)), "loss": r["loss"] * float("inf")}


def _plant_resume():   # the optimizer's moments are not restored: AdamW starts afresh after a resume
    import torch
    torch.optim.Optimizer.load_state_dict = lambda self, state: None


def _plant_resume_to_amp():   # AMP silently never turns on
    from roiseg.training.loop import Trainer
    real = Trainer._resolve
    Trainer._resolve = lambda self: dataclasses.replace(real(self), amp=False)


def _plant_data_paths():   # the ring hands out slot 0 at once, while the consumer still reads it
    from roiseg.loader.sources import PinnedRing

    def acquire(self, k):
        return 0, {name: b.numpy() for name, b in self.bufs[0].items()}
    PinnedRing.acquire = acquire


def _plant_fine_amp():   # the fusion is cut from the gradient: it never learns
    import torch

    from roiseg.modeling.decoders import FineFusion, roi_features

    def forward(self, coarse, fine, rois):
        x = self.reduce(self.norm(roi_features(fine, rois, self.size, self.sampling_ratio)))
        return coarse + self.fuse(torch.cat([coarse, x.to(coarse.dtype)], 1)).detach()
    FineFusion.forward = forward


def _plant_ddp():   # a comm hook that skips the all-reduce: each rank steps on its own gradients
    from torch.nn.parallel import DistributedDataParallel
    real_init = DistributedDataParallel.__init__

    def local_only(state, bucket):
        import torch
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self.register_comm_hook(None, local_only)
    DistributedDataParallel.__init__ = init


PLANTS = {"amp": _plant_amp, "resume": _plant_resume, "resume_to_amp": _plant_resume_to_amp,
          "data_paths": _plant_data_paths, "fine_amp": _plant_fine_amp, "ddp": _plant_ddp}


def install_plant(name: str | None) -> None:
    if name:
        PLANTS[name]()


# ---- the run -------------------------------------------------------------------------------------
def run_checks(env: Env, names: list[str]) -> int:
    for name in names:
        t0 = time.perf_counter()
        try:
            detail = CHECKS[name](env)
            report("PASS", name, time.perf_counter() - t0, detail)
        except Skip as why:
            report("SKIP", name, time.perf_counter() - t0, str(why))
        except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others
            report("FAIL", name, time.perf_counter() - t0, f"{type(exc).__name__}: {str(exc)[-1500:]}")
            traceback.print_exc()
    passed = [n for st, n, _ in RESULTS if st == "PASS"]
    skipped = [(n, d) for st, n, d in RESULTS if st == "SKIP"]
    failed = [n for st, n, _ in RESULTS if st == "FAIL"]
    print(f"gpu_checks (--device {env.device}{f', planted {env.plant}' if env.plant else ''}): "
          f"{len(passed)} passed, {len(skipped)} skipped"
          + (" (" + "; ".join(f"{n}: {d}" for n, d in skipped) + ")" if skipped else "")
          + f", {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (the GPU machine) or cpu (anywhere)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gpu_checks")
    ap.add_argument("--only", default=",".join(CHECKS))
    ap.add_argument("--plant", choices=sorted(PLANTS), help="install this check's planted fault (it must FAIL)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds a subprocess (torchrun) may run")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        ap.error(f"unknown checks {unknown}; choose from {list(CHECKS)}")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        report("FAIL", "cuda", 0.0, f"torch {torch.__version__} sees no CUDA device")
        return 1
    args.work.mkdir(parents=True, exist_ok=True)
    install_plant(args.plant)
    return run_checks(Env(args.device, args.work, args.timeout, args.plant), names)


if __name__ == "__main__":
    sys.exit(main())
