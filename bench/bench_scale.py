"""COCO scale, measured: the real commands at N = 1k, 4k, 16k and 64k synthetic images (issue 22).

    uv run python bench/bench_scale.py [--sizes 1000,4000,16000,64000] [--val 2700] [--channels 8]

Renders a COCO-like person set once (``bench/make_coco_scale.py --images-dir``: real JPEGs of COCO's
sizes, ~3.85 persons per image) and a validation set, builds a stand-in extractor with few channels
(so the run measures the pipeline's own costs, not the model's), then for every N runs the commands a
user runs, each in its own process, and records wall time, time per image, the peak RSS of the
command's whole process tree (workers included: /proc polled every 0.1 s; also its PSS, which counts
pages shared with forked workers once), files and bytes on disk:

* ``analyze``; ``cache`` dense and ``--sparse``; the re-run of the finished store (the resume scan);
  ``cache`` killed with SIGKILL at half the images, then re-run (its store compared with the
  uninterrupted one on a sample of images);
* ``train`` start-up (store open, index, resident load) and a fixed number of reads, resident and
  streaming, plus one validation over the val store (``bench/bench_scale.py --phase train``);
* ``evaluate`` of the checkpoint on the val store, and ``predict`` on a 2k-image folder (largest N only).

Writes ``bench/out/scale/scale.json``, a markdown table (``bench/out/scale.md``) and a log-log plot of
cost against N with each stage's slope (``bench/out/scale.png``).  Disk: checked before it starts.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench/out/scale"
CLI = [sys.executable, str(ROOT / "cli.py")]
FEATURE = "/model.34/Concat_output_0"


# ---- measuring one command ------------------------------------------------------------------
def tree_pids(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parent[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [pid], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def proc_bytes(pid: int, file: str, key: str) -> int:
    """A ``key: N kB`` line of ``/proc/PID/FILE`` in bytes (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_bytes(pid: int) -> int:
    return proc_bytes(pid, "status", "VmRSS:")


def pss_bytes(pid: int) -> int:
    """Proportional set size: pages shared with forked workers (copy-on-write) count once over the
    tree, where summing RSS counts them in every process (``analyze`` forks after loading the file)."""
    return proc_bytes(pid, "smaps_rollup", "Pss:")


def measure(cmd: list, kill_when=None, env: dict | None = None, timeout: float = 6 * 3600) -> dict:
    """Run ``cmd``; wall time, peak RSS of its process tree, exit code, output tail.  ``kill_when()``:
    polled with the run; when it turns true the whole tree gets SIGKILL (a crash mid-run)."""
    t0 = time.perf_counter()
    p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True, env={**os.environ, **(env or {})})
    peak = peak_pss = 0
    killed = False
    log = []

    def read():
        for line in p.stdout:
            log.append(line)
    import threading
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while p.poll() is None:
        pids = tree_pids(p.pid)
        peak = max(peak, sum(rss_bytes(q) for q in pids))
        peak_pss = max(peak_pss, sum(pss_bytes(q) for q in pids))
        if kill_when is not None and not killed and kill_when():
            for q in pids:
                try:
                    os.kill(q, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed = True
        if time.perf_counter() - t0 > timeout:
            os.killpg(p.pid, signal.SIGKILL)
            raise RuntimeError(f"{cmd[:4]} ran past {timeout} s")
        time.sleep(0.1)
    reader.join(5)
    wall = time.perf_counter() - t0
    tail = "".join(log)[-2000:]
    if p.returncode != 0 and not killed:
        raise RuntimeError(f"{' '.join(map(str, cmd[:6]))} failed ({p.returncode}):\n{tail}")
    last_json = next((x for x in reversed("".join(log).splitlines()) if x.startswith("{")), None)
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(peak / 2**20, 1),
            "peak_pss_mb": round(peak_pss / 2**20, 1), "rc": p.returncode,
            "killed": killed, "tail": tail[-600:], **(json.loads(last_json) if last_json else {})}


def disk(path: Path) -> tuple[int, int]:
    """(files, bytes) under ``path``."""
    n = size = 0
    for root, _, files in os.walk(path):
        for f in files:
            n += 1
            size += os.path.getsize(os.path.join(root, f))
    return n, size


# ---- the data -------------------------------------------------------------------------------
def dataset(n_max: int, n_val: int, work: Path) -> dict:
    from bench.make_coco_scale import make, render_images
    paths = {"train": work / "ann_train.json", "val": work / "ann_val.json", "images": work / "images",
             "onnx": work / "standin.onnx"}
    if not paths["train"].is_file():
        train = make(n_max, 3.85, 0)
        paths["train"].write_text(json.dumps(train))
        val = make(n_val, 3.85, 1)
        for im in val["images"]:       # other names than the training images
            im["file_name"] = "val_" + im["file_name"]
        paths["val"].write_text(json.dumps(val))
    t0 = time.perf_counter()
    for split in ("train", "val"):
        render_images(json.loads(paths[split].read_text()), paths["images"], os.cpu_count() or 1,
                      seed=0 if split == "train" else 1)
    paths["render_s"] = round(time.perf_counter() - t0, 1)
    return paths


def subset(paths: dict, n: int, work: Path) -> Path:
    """The first ``n`` training images' annotation file."""
    out = work / f"ann_train_{n}.json"
    if not out.is_file():
        d = json.loads(paths["train"].read_text())
        keep = {im["id"] for im in d["images"][:n]}
        out.write_text(json.dumps({**d, "images": d["images"][:n],
                                   "annotations": [a for a in d["annotations"] if a["image_id"] in keep]}))
    return out


def cache_cmd(ann: Path, paths: dict, out: Path, *extra) -> list:
    return CLI + ["cache", "--ann", ann, "--images", paths["images"], "--onnx", paths["onnx"], "--feature-name",
                  FEATURE, "--provider", "cpu", "--out", out, *extra]


def done_images(store: Path) -> int:
    d = store / "features"
    return sum(1 for n in os.listdir(d) if n[0].isdigit()) if d.is_dir() else 0


def same_images(a: Path, b: Path, k: int = 64) -> bool:
    """Store ``a`` equals ``b`` on ``k`` images spread over it (features, masks, RLEs)."""
    from roiseg.data.store import FeatureStore
    sa, sb = FeatureStore(a), FeatureStore(b)
    n = sa.meta.n_images
    for i in np.linspace(0, n - 1, min(k, n)).astype(int):
        if not (np.array_equal(sa.features(int(i)), sb.features(int(i)))
                and np.array_equal(sa.packed_masks(int(i)), sb.packed_masks(int(i)))
                and sa.gt_rles(int(i)) == sb.gt_rles(int(i))):
            return False
    return True


# ---- train, in its own process (--phase train) ----------------------------------------------
def train_phase(a) -> None:
    """Start-up, ``a.reads`` training reads, one validation: times and the process's own peak RSS."""
    import resource

    import torch
    torch.set_num_threads(max(1, os.cpu_count() // 2))
    import roiseg.training.loop as loop
    from roiseg.data.store import FeatureStore
    from roiseg.training.config import make_config
    t0 = time.perf_counter()
    FeatureStore(a.store).tables
    t_open = time.perf_counter() - t0
    full = loop.epoch_batches
    # a fixed number of training reads (validation, unshuffled, stays whole)
    loop.epoch_batches = lambda *x, **k: full(*x, **k)[: a.reads] if k.get("shuffle", True) else full(*x, **k)
    cfg = make_config(train_store=str(a.store), val_store=str(a.val_store), out=str(a.run), epochs=1,
                      resident=a.resident, workers=a.workers, device="cpu", visualize=False, tensorboard=False,
                      analysis=str(a.analysis), hflip=0.0, batch_size=8)
    t0 = time.perf_counter()
    tr = loop.Trainer(cfg)
    t_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = tr.train_epoch(1)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    v = tr.validate()
    t_val = time.perf_counter() - t0
    tr.checkpointer.save(1, {**m, **v, "epoch": 1})
    print(json.dumps({"store_open_s": round(t_open, 3), "startup_s": round(t_start, 2), "reads": a.reads,
                      "train_s": round(t_train, 2), "steps": m["steps"], "rois": m["train_rois"],
                      "ms_per_step": round(1000 * t_train / max(1, m["steps"]), 1), "val_s": round(t_val, 2),
                      "val_rois": v["instances"],
                      "self_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def resident_phase(a) -> None:
    """The resident cache alone: its load time and this process's peak RSS growth against the bytes
    it holds (features + cropped masks): whether loading costs more than the data."""
    import resource

    import torch
    torch.set_num_threads(1)
    from roiseg.loader.sampling import RoiSampling
    from roiseg.loader.sources import CacheIndex, ResidentSource, resident_bytes
    idx = CacheIndex(a.store)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    src = ResidentSource(idx, RoiSampling(), 56, 0, torch.device("cpu"), threads=2)
    feats = sum(m.numel() * 2 for m in src.maps.values()) / 2**20
    masks = (src.masks.nbytes + src.unions.nbytes) / 2**20
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    n = len(idx.images)
    print(json.dumps({"images": n, "load_s": round(time.perf_counter() - t0, 1), "features_mb": round(feats),
                      "masks_mb": round(masks), "mask_kb_per_image": round(masks * 2**20 / n / 1e3, 1),
                      "mask_estimate_kb_per_image": round(resident_bytes(idx, n)[1] / n / 1e3, 1),
                      "peak_growth_mb": round(grew), "held_over_peak_growth": round((feats + masks) / grew, 3)}))


def train_stage(store: Path, val: Path, analysis: Path, run: Path, resident: str, reads: int) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    r = measure([sys.executable, __file__, "--phase", "train", "--store", store, "--val-store", val,
                 "--analysis", analysis, "--run", run, "--resident", resident, "--reads", reads,
                 "--workers", 0 if resident == "cpu" else 2], env={"OMP_NUM_THREADS": "2"})
    return r


def cache_stages(ann: Path, paths: dict, work: Path, n: int, record) -> None:
    """``cache`` dense and sparse from scratch, the re-run of the finished sparse store, and a sparse
    run killed at half the images then completed (compared with the uninterrupted one)."""
    from roiseg.data.store import FeatureStore
    for kind, extra in (("dense", ()), ("sparse", ("--sparse",))):
        store = work / f"train_{n}_{kind}.zarr"
        shutil.rmtree(store, ignore_errors=True)
        r = measure(cache_cmd(ann, paths, store, *extra))
        files, size = disk(store)
        t0 = time.perf_counter()
        FeatureStore(store).tables
        record(f"cache {kind}", n, {**r, "per_image_ms": round(1000 * r["wall_s"] / n, 3), "files": files,
                                    "bytes_per_image": int(size / n), "store_open_s": round(time.perf_counter() - t0, 3)})
    shutil.rmtree(work / f"train_{n}_dense.zarr", ignore_errors=True)   # disk: keep the sparse one
    store = work / f"train_{n}_sparse.zarr"
    r = measure(cache_cmd(ann, paths, store, "--sparse"))
    record("cache re-run (done)", n, r)
    killed = work / f"train_{n}_killed.zarr"
    shutil.rmtree(killed, ignore_errors=True)
    r1 = measure(cache_cmd(ann, paths, killed, "--sparse"), kill_when=lambda: done_images(killed) >= n // 2)
    at = done_images(killed)
    r2 = measure(cache_cmd(ann, paths, killed, "--sparse"))
    record("cache resume after kill", n, {**r2, "killed_at": at, "first_killed": r1["killed"],
                                          "per_image_ms": round(1000 * r2["wall_s"] / max(1, n - at), 3),
                                          "first_wall_s": r1["wall_s"], "equal_on_sample": same_images(killed, store)})
    shutil.rmtree(killed, ignore_errors=True)


# ---- the run --------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,4000,16000,64000")
    ap.add_argument("--val", type=int, default=2700)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--reads", type=int, default=30, help="training reads (8 images each) per train stage")
    ap.add_argument("--predict-images", type=int, default=2000)
    ap.add_argument("--work", type=Path, default=OUT)
    ap.add_argument("--stages", default="analyze,cache,train,evaluate,predict",
                    help="re-measure only these (the others keep their recorded figures); "
                         "rerun: only the re-run of a finished store")
    ap.add_argument("--assume-extractor-ms", type=float, default=20.0,
                    help="YOLOv9-E time per image on one GPU for the projection (not measured here)")
    ap.add_argument("--phase", default="all")
    ap.add_argument("--store", type=Path)
    ap.add_argument("--val-store", type=Path)
    ap.add_argument("--analysis", type=Path)
    ap.add_argument("--run", type=Path)
    ap.add_argument("--resident", default="cpu")
    ap.add_argument("--workers", type=int, default=0)
    a = ap.parse_args()
    if a.phase == "train":
        return train_phase(a)
    if a.phase == "resident":    # python bench/bench_scale.py --phase resident --store STORE
        return resident_phase(a)
    sizes = [int(s) for s in a.sizes.split(",")]
    stages = set(a.stages.split(","))
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    need = (max(sizes) + a.val) * (16_000 + 2 * 2 * a.channels * 80 * 80 * 0.7) + 3 * max(sizes) * 3_000
    free = shutil.disk_usage(work).free
    print(f"disk: ~{need / 1e9:.1f} GB needed for N = {max(sizes)}, {free / 1e9:.1f} GB free")
    if need > free:
        raise SystemExit("not enough disk space")
    from roiseg.data.standin import build_standin_extractor
    paths = dataset(max(sizes), a.val, work)
    if not paths["onnx"].is_file():
        build_standin_extractor(paths["onnx"], channels=a.channels)
    results = json.loads((work / "scale.json").read_text()) if (work / "scale.json").is_file() else {}

    def record(stage: str, n: int, r: dict) -> None:
        results.setdefault(stage, {})[str(n)] = r
        (work / "scale.json").write_text(json.dumps(results, indent=1))
        print(f"{stage:>22} N={n:>6}: {r.get('wall_s', 0):8.1f} s  {r.get('peak_rss_mb', 0):8.1f} MB  "
              + " ".join(f"{k}={v}" for k, v in r.items() if k not in ("tail", "wall_s", "peak_rss_mb", "rc")))

    val_store = work / "val.zarr"
    if not (val_store / ".zattrs").is_file() or done_images(val_store) < a.val:
        measure(cache_cmd(paths["val"], paths, val_store, "--sparse"))
    for n in sizes:
        ann = subset(paths, n, work)
        analysis = work / f"analyze_{n}.json"
        if "analyze" in stages or not analysis.is_file():
            r = measure(CLI + ["analyze", "--ann", ann, "--out", analysis])
            record("analyze", n, {**r, "per_image_ms": round(1000 * r["wall_s"] / n, 3)})
        store = work / f"train_{n}_sparse.zarr"
        if "cache" in stages or not (store / ".zattrs").is_file():
            cache_stages(ann, paths, work, n, record)
        elif "rerun" in stages:     # only the re-run of the finished store
            record("cache re-run (done)", n, measure(cache_cmd(ann, paths, store, "--sparse")))
        if "train" in stages:
            for resident in ("cpu", "off"):
                r = train_stage(store, val_store, analysis, work / f"run_{n}_{resident}", resident, a.reads)
                record(f"train resident={resident}", n, r)
        if "evaluate" in stages:
            ck = sorted((work / f"run_{n}_cpu").glob("checkpoint_epoch_*.pth"))[-1]
            r = measure(CLI + ["evaluate", "--checkpoint", ck, "--val-store", val_store, "--device", "cpu"])
            record("evaluate", n, {**r, "per_image_ms": round(1000 * r["wall_s"] / a.val, 3)})
    if "predict" in stages:
        n = max(sizes)
        folder = work / "predict_src"
        if not folder.is_dir():
            folder.mkdir()
            for im in json.loads(paths["val"].read_text())["images"][: a.predict_images]:
                os.link(paths["images"] / im["file_name"], folder / im["file_name"])
        shutil.rmtree(work / "pred", ignore_errors=True)
        ck = sorted((work / f"run_{n}_cpu").glob("checkpoint_epoch_*.pth"))[-1]
        r = measure(CLI + ["predict", "--source", folder, "--checkpoint", ck,
                           "--boxes", "gt", "--ann", paths["val"], "--out", work / "pred", "--no-overlays",
                           "--device", "cpu", "--provider", "cpu"])
        record("predict", n, {**r, "per_image_ms": round(1000 * r["wall_s"] / a.predict_images, 3)})
    sizes = sorted({int(k) for per in results.values() for k in per})   # the table shows every size measured
    report(results, sizes, work)
    projection(results, work, max(sizes), a.assume_extractor_ms)


# ---- the projection to COCO train2017 with the real extractor --------------------------------
# Figures measured elsewhere, with the command that measured them (docs/benchmarks.md):
RAW_1024 = 1024 * 80 * 80 * 2          # bytes of one [1024,80,80] fp16 map
KEPT_CELL_RATIO = 0.393 / 0.497        # bench/bench_store.py: sparse lz4 stored/raw on the real features,
#                                        over the share of cells kept (0.497): bytes per kept cell vs raw
LZ4_ENCODE_GBS = 0.68                  # bench/bench_codecs.py: blosc-lz4 + byte shuffle encode, one core
GPU_ROIS_S = 20_200                    # bench/gpu_bench.sh (H100, resident, hidden 256, 64 images/step)
GPU_MEMORY_GB, AUTO_SHARE = 141, 0.6   # an H200; --resident auto takes the GPU below 60% of free memory
COCO_IMAGES = 64_115                   # COCO train2017 images with a person


def projection(results: dict, work: Path, n: int, extractor_ms: float) -> None:
    """COCO train2017 with YOLOv9-E's [1024,80,80] map, from the per-image costs measured at the
    largest N (``measured``) and the constants above (``projected``): bench/out/scale_projection.md."""
    key = str(n)
    sparse = results["cache sparse"][key]
    share = json.loads((work / f"analyze_{n}.json").read_text())["sparse_cells"]["mean"]
    store = work / f"train_{n}_sparse.zarr"
    feat_files, feat_bytes = disk(store / "features")
    all_files, all_bytes = disk(store)
    other_per_image = (all_bytes - feat_bytes) / n                      # masks, RLEs, tables
    feat_per_image = share * RAW_1024 * KEPT_CELL_RATIO
    pipeline_ms = sparse["per_image_ms"]
    compress_ms = 1000 * RAW_1024 / (LZ4_ENCODE_GBS * 1e9)
    train = results["train resident=cpu"][key]
    rois_per_image = train["rois"] / (train["reads"] * 8)
    from roiseg.loader.sources import CacheIndex, resident_bytes
    _, masks = resident_bytes(CacheIndex(store), n)
    masks_per_image = masks / n
    m, p = "measured", "projected"
    rows = [("images", f"{COCO_IMAGES:,}", "COCO train2017 images with a person"),
            ("share of feature cells a sparse store keeps", f"{share:.3f}", f"{m} (`analyze` at N={n})"),
            ("stored bytes per image, features", f"{feat_per_image / 1e6:.2f} MB",
             f"{p}: share x 13.1 MB x {KEPT_CELL_RATIO:.3f} (lz4 per kept cell, bench_store)"),
            ("stored bytes per image, masks + RLEs + tables", f"{other_per_image / 1e3:.1f} KB", f"{m} at N={n}"),
            ("store, sparse lz4 (x2 with --flip)", f"{COCO_IMAGES * (feat_per_image + other_per_image) / 1e9:.0f} GB",
             p),
            ("files in the store", f"{int(all_files / n * COCO_IMAGES):,}",
             f"{m}: {all_files / n:.2f} per image at N={n}"),
            ("cache: the pipeline's own time per image", f"{pipeline_ms:.1f} ms",
             f"{m} at N={n} (decode, resize, masks, write; the 8-channel stand-in extractor included)"),
            ("cache: lz4 of a 1024-channel map per image", f"{compress_ms:.1f} ms", f"{p} (bench_codecs encode speed)"),
            ("cache: extractor time per image", f"{extractor_ms:.0f} ms", "assumed: not measured (no GPU, no YOLOv9-E here)"),
            ("training ROIs per image and epoch", f"{rois_per_image:.1f}", f"{m} at N={n} (defaults: 2 samples per ROI)"),
            ("resident masks per image (cropped)", f"{masks_per_image / 1e3:.1f} KB", f"{p} from the ROI boxes at N={n}")]
    lines = ["| quantity | value | source |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    per_image_s = (extractor_ms + pipeline_ms + compress_ms) / 1000
    epoch_rois = rois_per_image * COCO_IMAGES
    lines += ["", "| GPUs | cache hours (projected) | training seconds per epoch (projected) | resident memory per GPU, GB "
              "(with --flip) | `--resident auto` on 141 GB H200s |", "|---|---|---|---|---|"]
    for g in (1, 2, 4, 8, 16):
        mem = COCO_IMAGES / g * (RAW_1024 + masks_per_image) / 1e9
        mem_flip = COCO_IMAGES / g * (2 * RAW_1024 + masks_per_image) / 1e9
        where = "gpu" if mem * 1.1 < AUTO_SHARE * GPU_MEMORY_GB else "not the GPU (CPU RAM, else streaming)"
        lines.append(f"| {g} | {COCO_IMAGES * per_image_s / g / 3600:.2f} | {epoch_rois / (GPU_ROIS_S * g):.0f} | "
                     f"{mem:.0f} ({mem_flip:.0f}) | {where} |")
    text = "\n".join(lines)
    print(text)
    (work.parent / "scale_projection.md").write_text(text + "\n")


def slope(ns, ys) -> float:
    ok = [(x, y) for x, y in zip(ns, ys) if y and y > 0]
    if len(ok) < 2:
        return float("nan")
    x, y = np.log([p[0] for p in ok]), np.log([p[1] for p in ok])
    return float(np.polyfit(x, y, 1)[0])


def report(results: dict, sizes: list, work: Path) -> None:
    """The table: wall time (per image where it scales with N) and peak RSS at each N, the slope of
    wall time in N (log-log), and the largest N's per-image time and peak RSS against the smallest's."""
    lo, hi = min(sizes), max(sizes)
    lines = ["| stage | " + " | ".join(f"N={n}: s (per image ms) / peak RSS MB" for n in sizes)
             + f" | slope of wall time | per image N={hi} / N={lo} | peak MB N={hi} - N={lo} |",
             "|---|" + "---|" * (len(sizes) + 3)]
    for stage, per in results.items():
        cells, walls = [], []
        for n in sizes:
            r = per.get(str(n))
            if r is None:
                cells.append("-")
                walls.append(None)
                continue
            pim = f" ({r['per_image_ms']:.2f})" if "per_image_ms" in r else ""
            pss = f" (PSS {r['peak_pss_mb']:.0f})" if r.get("peak_pss_mb") else ""
            cells.append(f"{r['wall_s']:.1f}{pim} / {r['peak_rss_mb']:.0f}{pss}")
            walls.append(r["wall_s"])
        a, b = per.get(str(lo)), per.get(str(hi))
        ratio = growth = "-"
        if a and b and lo != hi:
            key = next((k for k in ("per_image_ms", "ms_per_step") if k in a and k in b), None)
            ratio = f"{b[key] / a[key]:.2f}" if key else f"{b['wall_s'] / a['wall_s']:.2f} (whole command)"
            growth = f"{b['peak_rss_mb'] - a['peak_rss_mb']:+.0f}"
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {slope(sizes, walls):.2f} | {ratio} | {growth} |")
    text = "\n".join(lines)
    print(text)
    (work.parent / "scale.md").write_text(text + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for stage, per in results.items():
        ns = [n for n in sizes if str(n) in per]
        ys = [per[str(n)]["wall_s"] for n in ns]
        if len(ns) > 1:
            ax.loglog(ns, ys, "o-", label=f"{stage} (slope {slope(ns, ys):.2f})")
    ax.set_xlabel("images N")
    ax.set_ylabel("wall time (s)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(work.parent / "scale.png", dpi=120)


if __name__ == "__main__":
    main()
