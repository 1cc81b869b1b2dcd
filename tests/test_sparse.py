"""ROI-sparse stores: every ROI training or validation can draw reads only stored cells, so ROIAlign
on a sparse map equals ROIAlign on the dense map exactly, and training is identical."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from roiseg.common.errors import RoisegError
from roiseg.common.geometry import ResizePolicy, mirror_boxes, pad_box
from roiseg.data.cache import CacheConfig, run_cache
from roiseg.data.sparse import readable_cells, zero_unreadable
from roiseg.data.standin import FEATURE_NAME
from roiseg.data.store import FeatureStore
from roiseg.loader.sampling import RoiSampling, train_rois
from roiseg.modeling.decoders import roi_features
from roiseg.training.config import make_config

ROOT = Path(__file__).resolve().parents[1]
# person boxes (normalized, original image): image borders, a tiny person, a large one, overlaps
BOXES = np.array([[0.0, 0.0, 0.12, 0.5], [0.88, 0.4, 1.0, 1.0], [0.45, 0.45, 0.452, 0.455],
                  [0.3, 0.25, 0.55, 0.8], [0.5, 0.6, 0.62, 0.99], [0.3, 0.0, 0.4, 0.06]])


def _align(feats: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
    rois = torch.as_tensor(np.concatenate([np.zeros((len(boxes), 1)), boxes], 1), dtype=torch.float32)
    return roi_features(torch.from_numpy(feats.astype(np.float32))[None], rois, 14)


def _training_rois(policy, wh, margin, padding, rng, n=200):
    """ROIs as training draws them, with jitter far wider than the defaults (clamps bite often),
    plus the extreme ones: each box grown by exactly the margin."""
    cfg = RoiSampling(jitter=0.3, jitter_scale=0.5, samples_per_roi=n, overlap_boost=1, min_roi_px=0,
                      max_rois_per_image=64, max_jitter=margin)
    drawn = train_rois(BOXES, policy.norm_to_input_norm(pad_box(BOXES, padding), *wh), np.zeros(len(BOXES), bool),
                       wh, policy, padding, cfg, rng).boxes
    extreme = policy.norm_to_input_norm(pad_box(pad_box(BOXES, margin), padding), *wh)
    val = policy.norm_to_input_norm(pad_box(BOXES, padding), *wh)
    return np.concatenate([drawn, extreme, val])


@pytest.mark.parametrize("mode,wh", [("stretch", (640, 480)), ("letterbox", (500, 375)), ("letterbox", (427, 640)),
                                     ("stretch", (333, 500))])
def test_roialign_on_sparse_equals_dense_for_every_training_roi(mode, wh):
    rng = np.random.default_rng(0)
    policy, padding, margin = ResizePolicy(640, 640, mode), 0.1, 0.2
    dense = rng.standard_normal((64, 80, 80)).astype(np.float16)
    keep = readable_cells(BOXES, wh, policy, margin, padding, (80, 80))
    assert 0.2 < keep.mean() < 0.95                     # really sparse, and not empty
    sparse = zero_unreadable(dense, keep)
    rois = _training_rois(policy, wh, margin, padding, rng)
    assert torch.equal(_align(dense, rois), _align(sparse, rois))
    # stored mirrored features: mirrored ROIs on the mirrored map's own readable cells
    dense_m = rng.standard_normal((64, 80, 80)).astype(np.float16)
    sparse_m = zero_unreadable(dense_m, readable_cells(BOXES, wh, policy, margin, padding, (80, 80), mirrored=True))
    assert torch.equal(_align(dense_m, mirror_boxes(rois)), _align(sparse_m, mirror_boxes(rois)))
    # --hflip-source map: the stored map mirrored, ROIs mirrored
    flip = lambda a: np.ascontiguousarray(a[..., ::-1])  # noqa: E731
    assert torch.equal(_align(flip(dense), mirror_boxes(rois)), _align(flip(sparse), mirror_boxes(rois)))
    # the test can fail: jitter past the store's margin reads cells the store dropped
    wider = _training_rois(policy, wh, 0.6, padding, rng)
    assert not torch.equal(_align(dense, wider), _align(sparse, wider))


def _sparse_stores(synth, standin_onnx, d, **kw):
    out = {}
    for split in ("train", "val"):
        out[split] = d / f"{split}_sparse.zarr"
        run_cache(CacheConfig(ann=synth[split], images=synth["root"] / f"images/{split}2017", onnx=standin_onnx,
                              out=out[split], feature_name=FEATURE_NAME, provider="cpu", workers=2, sparse=True,
                              **kw), progress=False)
    return out


@pytest.fixture(scope="module")
def sparse_stores(synth, standin_onnx, stores, tmp_path_factory):
    out = _sparse_stores(synth, standin_onnx, tmp_path_factory.mktemp("sparse"))
    out["analysis"] = stores["analysis"]
    return out


def test_sparse_store_layout_and_size(sparse_stores, stores):
    sp, de = FeatureStore(sparse_stores["train"]), FeatureStore(stores["train"])
    assert sp.meta.sparse_margin == 0.2 and sp.meta.codec == "lz4"
    assert json.loads((sparse_stores["train"] / "features/.zarray").read_text())["compressor"]["cname"] == "lz4"
    for i in sp.valid_images()[:5]:
        keep = sp.readable(int(i))
        a, b = sp.features(int(i)), de.features(int(i))
        assert np.array_equal(a[:, keep], b[:, keep]) and not a[:, ~keep].any()
    # the statistics are the dense map's: normalization is identical
    imgs = sp.valid_images()
    assert all(np.array_equal(x, y) for x, y in zip(sp.feature_stats(imgs), de.feature_stats(imgs)))
    size = lambda p: sum(f.stat().st_size for f in (p / "features").iterdir())  # noqa: E731
    assert size(sparse_stores["train"]) < size(stores["train"])


@pytest.mark.slow
@pytest.mark.parametrize("resident", ["cpu", "off"])
def test_training_on_sparse_equals_dense(sparse_stores, stores, tmp_path, resident):
    from roiseg.training.run import run_training
    runs = []
    for name, st in (("dense", stores), ("sparse", sparse_stores)):
        cfg = make_config(train_store=str(st["train"]), val_store=str(st["val"]), out=str(tmp_path / name),
                          analysis=str(st["analysis"]), hidden=16, roi_size=7, mask_size=28, epochs=1,
                          batch_size=4, workers=0, resident=resident, tensorboard=False, visualize=False,
                          device="cpu", hflip=0.5, hflip_source="map")
        runs.append(run_training(cfg).history[-1])
    for k in ("mIoU", "instance_mIoU", "loss"):
        assert runs[0][k] == runs[1][k], k


def test_sparse_store_refusals(sparse_stores):
    from roiseg.training.loop import Trainer
    base = dict(train_store=str(sparse_stores["train"]), val_store=str(sparse_stores["val"]), out="unused",
                analysis=str(sparse_stores["analysis"]), epochs=1, device="cpu", tensorboard=False, visualize=False)
    with pytest.raises(RoisegError, match="--model global reads whole feature maps"):
        Trainer(make_config(**base, model="global"))
    with pytest.raises(RoisegError, match="exceeds the sparse training cache's margin 0.2"):
        Trainer(make_config(**base, max_jitter=0.3))


def test_sparse_cache_by_shards_and_resume_equals_one_run(synth, standin_onnx, sparse_stores, tmp_path):
    out = tmp_path / "sharded.zarr"
    cfg = dict(ann=synth["val"], images=synth["root"] / "images/val2017", onnx=standin_onnx, out=out,
               feature_name=FEATURE_NAME, provider="cpu", workers=2, sparse=True)
    for shard in ((1, 2), (0, 2)):
        run_cache(CacheConfig(**cfg, shard=shard), progress=False)
    assert FeatureStore(out).done_mask().all()
    assert np.array_equal(FeatureStore(out).root["features"][:], FeatureStore(sparse_stores["val"]).root["features"][:])
    with pytest.raises(RoisegError, match="sparse"):       # a dense re-run into a sparse store
        run_cache(CacheConfig(**{**cfg, "sparse": False}), progress=False)


def test_cache_cli_sparse_estimate_and_options(synth, standin_onnx, sparse_stores, tmp_path):
    sparse_store = sparse_stores["val"]
    from roiseg.cli import main
    base = ["cache", "--ann", str(synth["val"]), "--images", str(synth["root"] / "images/val2017"), "--onnx",
            str(standin_onnx), "--feature-name", FEATURE_NAME, "--provider", "cpu"]
    r = CliRunner().invoke(main, base + ["--out", str(tmp_path / "s.zarr"), "--sparse", "--codec", "zstd"])
    assert r.exit_code == 0, r.output
    assert "(sparse: " in r.output and "with zstd" in r.output
    st = FeatureStore(tmp_path / "s.zarr")
    assert st.meta.codec == "zstd"
    assert json.loads((tmp_path / "s.zarr/features/.zarray").read_text())["compressor"]["cname"] == "zstd"
    assert np.array_equal(st.root["features"][:], FeatureStore(sparse_store).root["features"][:])
    r = CliRunner().invoke(main, base + ["--out", str(tmp_path / "t.zarr"), "--sparse", "--sparse-margin", "1.5"])
    assert r.exit_code == 1 and "sparse_margin: must be >= 0 and < 1" in r.output


@pytest.mark.slow
def test_ddp_on_sparse_store(sparse_stores, tmp_path):
    from clikit import torchrun
    p = torchrun(2, "train", "--train-store", sparse_stores["train"], "--val-store", sparse_stores["val"], "--out",
                 tmp_path / "ddp", "--analysis", sparse_stores["analysis"], "--epochs", "1", "--hidden", "16",
                 "--roi-size", "7", "--mask-size", "28", "--batch-size", "2", "--workers", "0", "--device", "cpu",
                 "--resident", "off", "--no-vis")
    assert p.returncode == 0, p.stderr[-3000:]
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 1
