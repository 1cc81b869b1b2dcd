"""CPU training under load: one real-data `train` alone vs two side by side, per thread setting.

    uv run python bench/bench_contention.py [--epochs 1] [--settings default,passive,one]

Runs `cli.py train` (fold 0 of the 61 real images: 48 train / 13 val, validation and the validation
PNG with the live extractor included) as a subprocess, first alone, then two at once on the same
machine; reports wall time per run and the ratio shared/alone (fair share on a 2-way shared CPU: each
run at 0.5 of its idle speed).  Settings are environments of the subprocess:
  * ``default``: what the code does without any environment (the project's own thread settings);
  * ``stock``: ``FEATCACHE_THREADS=stock``: the project's settings off (torch/OpenMP defaults);
  * ``one``: OMP_NUM_THREADS=1 (the issue's workaround).
Needs bench/realdata_predict.py's store (bench/out/predict/store.zarr).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import cv  # noqa: E402
from bench.realdata import realdata  # noqa: E402

EXTRA: list[str] = []       # train options on top of the defaults (--options)
WORKLOAD: list[str] = []
STORE = ROOT / "bench" / "out" / "predict" / "store.zarr"
SETTINGS = {"default": {}, "stock": {"FEATCACHE_THREADS": "stock"}, "one": {"OMP_NUM_THREADS": "1", "FEATCACHE_THREADS": "stock"},
            "passive": {"OMP_WAIT_POLICY": "PASSIVE", "FEATCACHE_THREADS": "stock"},
            "spin10k": {"GOMP_SPINCOUNT": "10000", "FEATCACHE_THREADS": "stock"}}


def job(tmp: Path, k: int, epochs: int) -> list[str]:
    if WORKLOAD == ["demo"]:   # the demo's small decoder: many tiny ops (data and caches reused)
        return [sys.executable, str(ROOT / "cli.py"), "demo", "--dir", str(ROOT / "bench" / "out" / f"demo{k}"),
                "--epochs", str(epochs)]
    names = cv.make_folds(STORE, 5)
    cfg = tmp / f"fold{k}.yaml"
    import yaml
    cfg.write_text(yaml.safe_dump({"train_images": sorted(n for f in names[1:] for n in f), "val_images": names[0]}))
    analysis = ROOT / "bench" / "out" / "predict" / "fold0_analyze.json"
    return [sys.executable, str(ROOT / "cli.py"), "train", "--config", str(cfg), "--train-store", str(STORE),
            "--val-store", str(STORE), "--analysis", str(analysis), "--out", str(tmp / f"ck{k}"),
            "--epochs", str(epochs), *EXTRA, "--vis-onnx",
            str(realdata().onnx), "--vis-ann", str(realdata().ann), "--vis-image-dir", str(realdata().images)]


def run(settings: dict, n: int, epochs: int) -> list[float]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                                 "FEATCACHE_THREADS", "MKL_NUM_THREADS")}
        env.update(settings)
        t0 = time.perf_counter()
        procs = [subprocess.Popen(job(tmp, k, epochs), env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for k in range(n)]
        out = []
        for p in procs:
            _, err = p.communicate()
            if p.returncode:
                raise SystemExit(err[-2000:])
            out.append(time.perf_counter() - t0)
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--settings", default="default,stock,one")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workload", choices=["train", "demo"], default="train",
                    help="train: one real-data epoch; demo: `cli.py demo` (synthetic, tiny decoder)")
    ap.add_argument("--options", default="", help="extra train options, e.g. '--resident off --workers 2'")
    args = ap.parse_args()
    EXTRA[:] = args.options.split()
    WORKLOAD[:] = [args.workload]
    if args.workload == "demo":   # first run makes the demo folders' data and caches
        run({}, 2, 1)
    res = {}
    for name in args.settings.split(","):
        alone = min(run(SETTINGS[name], 1, args.epochs)[0] for _ in range(args.repeat))
        shared = [max(run(SETTINGS[name], 2, args.epochs)) for _ in range(args.repeat)]
        shared = min(shared)
        res[name] = {"alone_s": round(alone, 1), "two_at_once_s": round(shared, 1),
                     "speed_shared_vs_alone": round(alone / shared, 2)}
        print(name, json.dumps(res[name]), flush=True)
    (ROOT / "bench" / "out" / f"contention_{args.workload}.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
