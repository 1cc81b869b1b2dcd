"""The GPU-only behaviour the CPU tests pin down with fakes, run for real on a GPU (bench/gpu_bench.sh).

Each check prints one line, ``PASS name: ...``, ``FAIL name: ...`` or ``SKIP name: why``, and the
script exits 1 when any check failed (never hidden behind ``|| true``):

* ``resume_cuda``: train 1 epoch on CUDA with AMP, resume to epoch 2 from the checkpoint (RNG
  states, grad scaler and optimizer mapped from the GPU); the same run uninterrupted is compared
  (equivalent, not bitwise: ``roi_align``'s backward uses atomics on CUDA).
* ``resume_cpu_to_amp``: a run started on the CPU (empty scaler state) resumed on CUDA with AMP.
* ``amp_no_nan``: a few hundred AMP steps on CUDA, every epoch's loss finite.
* ``ddp_one_gpu``: 2 ranks on one GPU (gloo: NCCL refuses two ranks per device), replicas
  bit-identical after every epoch (the trainer checks and says so).
* ``ort_cuda``: the extractor on ONNX Runtime's CUDA provider equals the CPU provider.
* ``trt_engines``: two extractors with the same graph and other weights through TensorRT: each
  matches its own CPU result and they differ (no shared engine); an exported decoder runs fp32.

    python3 bench/gpu_checks.py [--work /tmp/gpu_checks] [--only resume_cuda,ddp_one_gpu]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS: list[tuple[str, str, str]] = []


def report(status: str, name: str, detail: str) -> None:
    RESULTS.append((status, name, detail))
    print(f"{status} {name}: {detail}", flush=True)


def cli(*args, env=None, torchrun: int = 0) -> subprocess.CompletedProcess:
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun)] \
        if torchrun else [sys.executable]
    p = subprocess.run(head + [str(ROOT / "cli.py"), *[str(a) for a in args]], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=400)
    if p.returncode != 0:
        raise RuntimeError(f"cli.py {' '.join(map(str, args[:2]))} exited {p.returncode}:\n{p.stderr[-2000:]}")
    return p


def data(work: Path) -> dict:
    """A small synthetic set, a 64-channel stand-in extractor and its CPU-provider stores."""
    from roiseg.featcache.analyze import run_analyze
    from roiseg.featcache.cache import CacheConfig, run_cache
    from roiseg.featcache.files import write_json_atomic
    from roiseg.featcache.standin import build_standin_extractor
    from roiseg.featcache.synthetic import make_synthetic_dataset
    d = make_synthetic_dataset(work / "data", n_train=48, n_val=12, seed=3)
    onnx = build_standin_extractor(work / "standin.onnx", channels=64)
    stores = {}
    for split in ("train", "val"):
        stores[split] = work / f"{split}.zarr"
        if not (stores[split] / ".zattrs").is_file():
            run_cache(CacheConfig(ann=d[split], images=d["root"] / f"images/{split}2017", onnx=onnx,
                                  out=stores[split], provider="cpu"), progress=False)
    stores["analysis"] = work / "data_analyze.json"
    write_json_atomic(stores["analysis"], run_analyze(d["train"], workers=2, progress=False))
    return {**d, "onnx": onnx, "stores": stores}


def train_args(s: dict, out: Path, *extra) -> list:
    st = s["stores"]
    return ["train", "--train-store", st["train"], "--val-store", st["val"], "--analysis", st["analysis"],
            "--out", out, "--hidden", "64", "--batch-size", "16", "--workers", "2", "--no-vis", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def check_resume_cuda(s: dict, work: Path) -> None:
    full, part = work / "full", work / "part"
    cli(*train_args(s, full, "--epochs", "2", "--device", "cuda", "--seed", "1"))
    cli(*train_args(s, part, "--epochs", "1", "--device", "cuda", "--seed", "1"))
    cli("train", "--out", part, "--resume", "auto", "--epochs", "2", "--device", "cuda")
    a, b = metrics(full)[-1], metrics(part)[-1]
    diff = abs(a["instance_mIoU"] - b["instance_mIoU"])
    ok = b["epoch"] == 2 and all(map(lambda m: m["loss"] == m["loss"], (a, b))) and diff < 0.05
    report("PASS" if ok else "FAIL", "resume_cuda",
           f"resumed epoch 2 instance_mIoU {b['instance_mIoU']:.4f} vs uninterrupted {a['instance_mIoU']:.4f} "
           f"(|diff| {diff:.4f}; equivalent, not bitwise on CUDA)")


def check_resume_cpu_to_amp(s: dict, work: Path) -> None:
    out = work / "cpu_then_amp"
    cli(*train_args(s, out, "--epochs", "1", "--device", "cpu"))
    cli("train", "--out", out, "--resume", "auto", "--epochs", "2", "--device", "cuda", "--amp")
    m = metrics(out)[-1]
    report("PASS" if m["epoch"] == 2 and m["loss"] == m["loss"] else "FAIL", "resume_cpu_to_amp",
           f"epoch {m['epoch']} loss {m['loss']:.4f} (scaler started fresh from an empty CPU state)")


def check_amp_no_nan(s: dict, work: Path) -> None:
    out = work / "amp"
    t = time.perf_counter()
    cli(*train_args(s, out, "--device", "cuda", "--amp", "--rois-per-step", "16", "--min-steps", "300"))
    ms = metrics(out)
    steps = sum(m["steps"] for m in ms)
    bad = [m["epoch"] for m in ms if not (m["loss"] == m["loss"] and abs(m["loss"]) < 1e6)]
    report("FAIL" if bad or steps < 300 else "PASS", "amp_no_nan",
           f"{steps} AMP steps in {len(ms)} epochs ({time.perf_counter() - t:.0f} s), losses "
           f"{ms[0]['loss']:.3f} -> {ms[-1]['loss']:.3f}" + (f"; non-finite at epochs {bad}" if bad else ""))


def check_ddp_one_gpu(s: dict, work: Path) -> None:
    out = work / "ddp"
    cli(*train_args(s, out, "--epochs", "2", "--device", "cuda:0", "--batch-size", "2", "--min-roi-size", "60"),
        torchrun=2, env={"FEATCACHE_DIST_BACKEND": "gloo"})
    ms = metrics(out)
    ok = all(str(m.get("replicas", "")).startswith("identical on 2 ranks") for m in ms)
    report("PASS" if ok else "FAIL", "ddp_one_gpu", "; ".join(f"epoch {m['epoch']}: {m.get('replicas')}" for m in ms))


def _ort_providers() -> list:
    import onnxruntime as ort
    return ort.get_available_providers()


def check_ort_cuda(s: dict, work: Path) -> None:
    import numpy as np

    from roiseg.featcache.extractor import Extractor
    from roiseg.featcache.standin import FEATURE_NAME
    if "CUDAExecutionProvider" not in _ort_providers():
        report("SKIP", "ort_cuda", f"this onnxruntime has no CUDA provider ({_ort_providers()})")
        return
    x = np.random.default_rng(0).random((1, 3, 640, 640), np.float32)
    cpu = Extractor(s["onnx"], FEATURE_NAME, "cpu").run(x).astype(np.float32)
    gpu = Extractor(s["onnx"], FEATURE_NAME, "cuda")
    diff = float(np.abs(gpu.run(x).astype(np.float32) - cpu).max())
    report("PASS" if gpu.provider == "CUDAExecutionProvider" and diff < 1e-2 else "FAIL", "ort_cuda",
           f"provider {gpu.provider}, max |cuda - cpu| {diff:.2e} (fp16 storage)")


def check_trt_engines(s: dict, work: Path) -> None:
    import numpy as np

    from roiseg.featcache.extractor import Extractor
    from roiseg.featcache.providers import load_tensorrt
    from roiseg.featcache.standin import FEATURE_NAME, build_standin_extractor
    why = load_tensorrt() if "TensorrtExecutionProvider" in _ort_providers() else "no TensorRT provider in onnxruntime"
    if why:
        report("SKIP", "trt_engines", why)
        return
    x = np.random.default_rng(1).random((1, 3, 640, 640), np.float32)
    out = {}
    for seed in (0, 1):
        path = build_standin_extractor(work / f"same_graph_{seed}.onnx", channels=64, seed=seed)
        ref = Extractor(path, FEATURE_NAME, "cpu").run(x).astype(np.float32)
        trt = Extractor(path, FEATURE_NAME, "tensorrt", trt_cache=work / "engines")
        out[seed] = (ref, trt.run(x).astype(np.float32), trt.provider)
    own = max(float(np.abs(t - r).max()) for r, t, _ in out.values())
    cross = float(np.abs(out[0][1] - out[1][0]).max())
    folders = sorted(p.name for p in (work / "engines").iterdir() if p.is_dir())
    ok = all(p == "TensorrtExecutionProvider" for _, _, p in out.values()) and own < 5e-2 and cross > 10 * own
    report("PASS" if ok else "FAIL", "trt_engines",
           f"each model vs its CPU result {own:.2e} (fp16), model 1's engine vs model 0 {cross:.2e}; "
           f"engine folders {folders}")


CHECKS = {"resume_cuda": check_resume_cuda, "resume_cpu_to_amp": check_resume_cpu_to_amp,
          "amp_no_nan": check_amp_no_nan, "ddp_one_gpu": check_ddp_one_gpu, "ort_cuda": check_ort_cuda,
          "trt_engines": check_trt_engines}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu_checks"))
    ap.add_argument("--only", default=",".join(CHECKS))
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        report("FAIL", "cuda", "torch sees no CUDA device")
        return 1
    args.work.mkdir(parents=True, exist_ok=True)
    s = data(args.work)
    for name in args.only.split(","):
        try:
            CHECKS[name](s, args.work)
        except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others
            report("FAIL", name, f"{type(exc).__name__}: {str(exc)[-1500:]}")
            traceback.print_exc()
    failed = [n for st, n, _ in RESULTS if st == "FAIL"]
    print(f"gpu_checks: {len(RESULTS) - len(failed)} of {len(RESULTS)} passed or skipped"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
