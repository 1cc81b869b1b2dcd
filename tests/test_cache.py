import json
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from roiseg.common.errors import RoisegError
from roiseg.common.geometry import ResizePolicy
from roiseg.data.cache import CacheConfig, run_cache
from roiseg.data.coco import decode_masks, load_person_records
from roiseg.data.extractor import Extractor, ExtractorError
from roiseg.data.images import Preprocess, load_rgb, preprocess
from roiseg.data.rasterize import masks_to_input_frame
from roiseg.data.standin import FEATURE_NAME, build_standin_extractor
from roiseg.data.store import FeatureStore, StoreError

ROOT = Path(__file__).resolve().parents[1]


def _cfg(synth, onnx, out, **kw):
    return CacheConfig(ann=synth["val"], images=synth["root"] / "images/val2017", onnx=onnx, out=out,
                       feature_name=FEATURE_NAME, provider="cpu", workers=2, **kw)


def _arrays(path):
    s = FeatureStore(path)
    n = s.meta.n_images
    return (s.root["features"][:], [s.root["masks"][i] for i in range(n)],
            [s.root["gt_rle"][i] for i in range(n)])


@pytest.fixture(scope="module")
def val_store(synth, standin_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "val.zarr"
    summary = run_cache(_cfg(synth, standin_onnx, out), progress=False)
    return out, summary


def test_store_features_equal_direct_ort(synth, standin_onnx, val_store):
    out, summary = val_store
    assert summary["complete"] and summary["provider"] == "CPUExecutionProvider"
    s = FeatureStore(out)
    assert s.meta.source.feature_shape == (16, 80, 80) and s.meta.source.input_hw == (640, 640)
    import onnx

    from roiseg.data.extractor import expose_tensor
    sess = ort.InferenceSession(expose_tensor(onnx.load(str(standin_onnx)), FEATURE_NAME).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    prep = Preprocess()
    for i, name in enumerate(s.tables["file_name"]):
        x = preprocess(load_rgb(synth["root"] / "images/val2017" / name), prep)[None]
        ref = sess.run(None, {"images": x})[0][0]
        got = s.features(i).astype(np.float32)
        assert s.features(i).dtype == np.float16
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)


def test_store_masks_equal_rasterizer_and_tables(synth, val_store):
    s = FeatureStore(val_store[0])
    recs, _ = load_person_records(synth["val"])
    assert list(s.tables["image_id"]) == [r.image_id for r in recs]
    for i, r in enumerate(recs):
        ref = masks_to_input_frame(decode_masks(r.instances), ResizePolicy())
        assert (s.masks(i) == ref).all()
        a, b = s.tables["image_roi_start"][i], s.tables["image_roi_start"][i + 1]
        assert list(s.tables["roi_ann_id"][a:b]) == [x.ann_id for x in r.instances]
        assert np.allclose(s.tables["roi_box"][a:b], [x.box_norm for x in r.instances], atol=1e-6)
        assert (s.tables["roi_padded"][a:b, :2] <= s.tables["roi_box"][a:b, :2]).all()
        assert len(s.gt_rles(i)) == b - a


def test_rerun_is_noop_and_mismatch_refused(synth, standin_onnx, val_store):
    out, _ = val_store
    before = (out / "features" / "0.0.0.0").stat().st_mtime_ns
    s2 = run_cache(_cfg(synth, standin_onnx, out), progress=False)
    assert s2["processed_now"] == 0 and (out / "features" / "0.0.0.0").stat().st_mtime_ns == before
    with pytest.raises(StoreError, match="channel_order"):
        run_cache(_cfg(synth, standin_onnx, out, channel_order="bgr"), progress=False)
    with pytest.raises(StoreError, match="roi_padding"):
        run_cache(_cfg(synth, standin_onnx, out, roi_padding=0.2), progress=False)


def test_rerun_of_a_finished_store_does_not_parse_the_annotations(synth, standin_onnx, val_store, tmp_path,
                                                                  monkeypatch):
    """Nothing to do (complete, same annotation file): the polygons are not parsed again (~35 s at
    COCO scale), the summary is the one a full re-run gives, and other settings are still refused;
    an edited annotation file (another sha256) is parsed and refused as before."""
    import roiseg.data.cache as cache_mod
    out, first = val_store
    full = run_cache(_cfg(synth, standin_onnx, out), progress=False)
    monkeypatch.setattr(cache_mod, "load_person_records", lambda *a, **k: pytest.fail("annotations parsed"))
    fast = run_cache(_cfg(synth, standin_onnx, out), progress=False)
    same = ("images", "cached", "skipped", "processed_now", "newly_skipped", "complete", "provider")
    assert {k: fast[k] for k in same} == {k: full[k] for k in same}
    assert fast["cached"] == first["images"] and fast["processed_now"] == 0
    with pytest.raises(StoreError, match="channel_order"):
        run_cache(_cfg(synth, standin_onnx, out, channel_order="bgr"), progress=False)
    monkeypatch.undo()
    edited = tmp_path / "ann.json"
    edited.write_text(Path(synth["val"]).read_text() + "\n")
    cfg = _cfg(synth, standin_onnx, out)
    cfg.ann = edited
    with pytest.raises(StoreError, match="annotation_sha256"):
        run_cache(cfg, progress=False)


def test_kill9_midway_then_resume_equals_uninterrupted(synth, standin_onnx, val_store, tmp_path):
    out = tmp_path / "killed.zarr"
    # A real SIGKILL after the 3rd image write, in a separate process running the CLI.
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from roiseg.data import store
orig = store.FeatureStore.write_image
n = [0]
def write(self, *a):
    orig(self, *a)
    n[0] += 1
    if n[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
store.FeatureStore.write_image = write
from roiseg.cli import main
main(["cache", "--ann", {str(synth['val'])!r}, "--images", {str(synth['root'] / 'images/val2017')!r},
      "--onnx", {str(standin_onnx)!r}, "--out", {str(out)!r}, "--provider", "cpu", "--workers", "1"])
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == -9, p.stderr
    partial = FeatureStore(out).done_mask()
    assert 3 <= partial.sum() < len(partial)
    s = run_cache(_cfg(synth, standin_onnx, out), progress=False)
    assert s["complete"] and s["processed_now"] == len(partial) - partial.sum()
    fa, ma, ga = _arrays(out)
    fb, mb, gb = _arrays(val_store[0])
    assert (fa == fb).all() and ma == mb and ga == gb


def test_shards_fill_one_store(synth, standin_onnx, val_store, tmp_path):
    out = tmp_path / "sharded.zarr"
    a = run_cache(_cfg(synth, standin_onnx, out, shard=(0, 2)), progress=False)
    assert not a["complete"]
    b = run_cache(_cfg(synth, standin_onnx, out, shard=(1, 2)), progress=False)
    assert b["complete"]
    assert (_arrays(out)[0] == _arrays(val_store[0])[0]).all()


def test_bad_images_skipped_and_reported(synth, standin_onnx, tmp_path):
    img_dir = tmp_path / "imgs"
    shutil.copytree(synth["root"] / "images/val2017", img_dir)
    recs, _ = load_person_records(synth["val"])
    names = [r.file_name for r in recs]
    (img_dir / names[0]).write_bytes(b"not an image at all")               # corrupt
    (img_dir / names[1]).unlink()                                          # missing
    Image.open(img_dir / names[2]).convert("L").save(img_dir / names[2], "JPEG")     # grayscale
    Image.open(img_dir / names[3]).convert("CMYK").save(img_dir / names[3], "JPEG")  # CMYK
    Image.open(img_dir / names[4]).save(img_dir / names[4], "PNG")         # PNG inside .jpg
    cfg = _cfg(synth, standin_onnx, tmp_path / "bad.zarr")
    cfg.images = img_dir
    s = run_cache(cfg, progress=False)
    assert set(s["skipped"]) == {names[0], names[1]}
    assert "missing" in s["skipped"][names[1]] and "undecodable" in s["skipped"][names[0]]
    st = FeatureStore(cfg.out)
    assert set(st.skipped()) == {0, 1}
    assert list(st.valid_images()) == list(range(2, len(names)))
    assert s["complete"]
    again = run_cache(cfg, progress=False)          # nothing to do: the skips are still reported
    assert again["skipped"] == s["skipped"] and again["processed_now"] == 0 and again["complete"]


def test_cli_cache_errors(synth, standin_onnx, tmp_path):
    from click.testing import CliRunner

    from roiseg.cli import main
    base = ["cache", "--ann", str(synth["val"]), "--images", str(synth["root"] / "images/val2017"),
            "--provider", "cpu"]
    r = CliRunner().invoke(main, base + ["--onnx", str(standin_onnx), "--feature-name", "/nope",
                                         "--out", str(tmp_path / "x.zarr")])
    assert r.exit_code == 1 and "/model.34/Concat_output_0" in r.output and "[1, 16, 80, 80]" in r.output
    r = CliRunner().invoke(main, base + ["--onnx", str(tmp_path / "missing.onnx")])
    assert r.exit_code == 1 and "ONNX model not found" in r.output
    r = CliRunner().invoke(main, base + ["--onnx", str(standin_onnx), "--shard", "3/2"])
    assert r.exit_code == 1 and "0 <= I < N" in r.output     # usage errors exit 1 like every user error


def test_disk_space_check(synth, standin_onnx, tmp_path, monkeypatch):
    import roiseg.data.cache as cache_mod
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 1000))
    with pytest.raises(RoisegError, match="not enough disk space"):
        run_cache(_cfg(synth, standin_onnx, tmp_path / "full.zarr"), progress=False)
    assert not (tmp_path / "full.zarr").exists()      # the store this run made holds nothing: removed


def test_dynamic_batch_model_batches(synth, tmp_path):
    onnx_path = build_standin_extractor(tmp_path / "dyn.onnx", channels=8, dynamic_batch=True)
    ex = Extractor(onnx_path, FEATURE_NAME, "cpu")
    assert ex.fixed_batch is None and ex.feature_shape == (8, 80, 80)
    s = run_cache(_cfg(synth, onnx_path, tmp_path / "dyn.zarr", batch=3), progress=False)
    assert s["complete"]
    single = Extractor(onnx_path, FEATURE_NAME, "cpu")
    st = FeatureStore(tmp_path / "dyn.zarr")
    x = preprocess(load_rgb(synth["root"] / "images/val2017" / st.tables["file_name"][5]), Preprocess())
    np.testing.assert_allclose(st.features(5).astype(np.float32), single.run(x[None])[0], atol=2e-3, rtol=1e-3)


def test_unknown_tensor_lists_stride8_candidates(standin_onnx):
    with pytest.raises(ExtractorError) as e:
        Extractor(standin_onnx, "/model.99/missing", "cpu")
    msg = str(e.value)
    assert FEATURE_NAME in msg and "/model.1/act" in msg and "output0" not in msg


@pytest.mark.slow
def test_cache_rank_killed_mid_run_is_completed_by_a_rerun(synth, standin_onnx, tmp_path):
    """A rank SIGKILLed mid-run (the others frozen first, so some images are done and some are not)
    makes torchrun fail; a re-run of the same command completes the store, equal bitwise to a
    one-process run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from bench.proctree import descendants
    from clikit import ROOT, torchrun
    out = tmp_path / "ddp.zarr"
    args = ["cache", "--ann", synth["train"], "--images", synth["root"] / "images/train2017", "--onnx", standin_onnx,
            "--provider", "cpu", "--flip", "--workers", "1", "--out", out]
    n = len(json.loads(Path(synth["train"]).read_text())["images"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "cli.py"), *map(str, args)]
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def done() -> int:
        return int(FeatureStore(out).done_mask().sum()) if (out / ".zattrs").is_file() else 0

    def ranks() -> dict[int, int]:
        """rank -> pid of the processes torchrun started (its direct children)."""
        found = {}
        for pid in descendants(p.pid):
            try:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            rank = [int(e[5:]) for e in env if e.startswith(b"RANK=")]
            if ppid == p.pid and rank:
                found[rank[0]] = pid
        return found

    try:
        deadline = time.time() + 240
        while done() == 0:
            assert p.poll() is None and time.time() < deadline, "the first run ended before any image was cached"
            time.sleep(0.005)
        workers = ranks()
        for pid in workers.values():
            os.kill(pid, signal.SIGSTOP)
        at = done()
        assert 0 < at < n, at          # mid-run: the rerun below has real work left
        os.kill(workers[1], signal.SIGKILL)
        os.kill(workers[0], signal.SIGCONT)
        p.wait(timeout=120)
    finally:
        for pid in [p.pid, *descendants(p.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert p.returncode != 0
    r = torchrun(2, *args, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{n}/{n} images cached" in r.stdout
    run_cache(CacheConfig(ann=synth["train"], images=synth["root"] / "images/train2017", onnx=standin_onnx,
                          out=tmp_path / "one.zarr", feature_name=FEATURE_NAME, provider="cpu", workers=1, flip=True),
              progress=False)
    a, b = FeatureStore(out), FeatureStore(tmp_path / "one.zarr")
    for i in range(n):
        np.testing.assert_array_equal(a.features(i), b.features(i))
        np.testing.assert_array_equal(a.features(i, flipped=True), b.features(i, flipped=True))
        np.testing.assert_array_equal(a.packed_masks(i), b.packed_masks(i))
        assert a.gt_rles(i) == b.gt_rles(i)


@pytest.mark.slow
def test_cache_under_torchrun_equals_one_process(synth, standin_onnx, tmp_path):
    """`torchrun --nproc-per-node 2 cli.py cache`: one shard per rank, rank 0 reports for both, and
    the store equals a one-process run bitwise (fine and mirrored maps included); --shard is refused
    under torchrun; a re-run of the finished store has nothing to do."""
    from clikit import torchrun
    from roiseg.data.standin import FINE_NAME
    args = ["cache", "--ann", synth["train"], "--images", synth["root"] / "images/train2017", "--onnx", standin_onnx,
            "--provider", "cpu", "--flip", "--fine-feature", FINE_NAME, "--workers", "1"]
    p = torchrun(2, *args, "--out", tmp_path / "ddp.zarr", timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    n = len(json.loads(Path(synth["train"]).read_text())["images"])
    assert f"{n}/{n} images cached" in p.stdout and "by 2 ranks" in p.stdout
    assert p.stdout.count("images cached") == 1                  # rank 0 alone reports
    run_cache(CacheConfig(ann=synth["train"], images=synth["root"] / "images/train2017", onnx=standin_onnx,
                          out=tmp_path / "one.zarr", feature_name=FEATURE_NAME, provider="cpu", workers=1, flip=True,
                          fine_feature=FINE_NAME), progress=False)
    a, b = FeatureStore(tmp_path / "ddp.zarr"), FeatureStore(tmp_path / "one.zarr")
    for i in range(n):
        np.testing.assert_array_equal(a.features(i), b.features(i))
        np.testing.assert_array_equal(a.features(i, flipped=True), b.features(i, flipped=True))
        np.testing.assert_array_equal(a.fine(i), b.fine(i))
        np.testing.assert_array_equal(a.packed_masks(i), b.packed_masks(i))
        assert a.gt_rles(i) == b.gt_rles(i)
    p = torchrun(2, *args, "--out", tmp_path / "ddp.zarr", "--shard", "0/2", timeout=120)
    assert p.returncode != 0 and "--shard and torchrun" in p.stderr
    p = torchrun(2, *args, "--out", tmp_path / "ddp.zarr", timeout=120)
    assert p.returncode == 0 and "0 this run" in p.stdout
