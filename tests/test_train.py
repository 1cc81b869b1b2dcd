import json
from pathlib import Path

import numpy as np
import pytest
import torch

from roiseg.data.cache import CacheConfig, run_cache
from roiseg.data.store import StoreError
from roiseg.loader.sampling import RoiSampling
from roiseg.loader.sources import (
    CacheIndex,
    PinnedStreamSource,
    ResidentSource,
    StreamingSource,
    epoch_batches,
)
from roiseg.modeling.checkpoint import (
    CheckpointError,
    checkpoint_name,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from roiseg.training.config import make_config
from roiseg.training.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _cfg(stores, out, **kw):
    base = dict(train_store=str(stores["train"]), val_store=str(stores["val"]), out=str(out),
                analysis=str(stores["analysis"]), hidden=16, roi_size=7, mask_size=28, epochs=2,
                batch_size=4, workers=0, resident="cpu", tensorboard=False, visualize=False, lr=3e-3)
    base.update(kw)
    return make_config(**base)


def test_streaming_and_resident_batches_are_identical(stores):
    idx = CacheIndex(stores["train"])
    s = RoiSampling(jitter=0.15, samples_per_roi=2)
    batches = epoch_batches(idx.images, 3, 0, 4)[:3]
    a = list(StreamingSource(idx, s, 28, 0, workers=2, device=torch.device("cpu")).iterate(batches, 3, True))
    b = list(ResidentSource(idx, s, 28, 0, torch.device("cpu")).iterate(batches, 3, True))
    c = list(PinnedStreamSource(idx, s, 28, 0, torch.device("cpu"), threads=2, depth=2).iterate(batches, 3, True))
    assert len(a) == len(b) == len(c) == 3
    for x, y, z in zip(a, b, c):
        for k in x:
            assert torch.equal(x[k], y[k]) and torch.equal(x[k], z[k]), k
    assert a[0]["targets"].shape[1:] == (28, 28) and len(a[0]["rois"]) == len(a[0]["targets"])
    # two jittered samples per ROI, different boxes
    assert not torch.equal(a[0]["rois"][0], a[0]["rois"][1])


def test_epoch_batches_shard_evenly():
    imgs = np.arange(11)
    r0 = epoch_batches(imgs, 1, 0, 2, rank=0, world=2)
    r1 = epoch_batches(imgs, 1, 0, 2, rank=1, world=2)
    assert len(r0) == len(r1)
    flat = sum(r0, []) + sum(r1, [])
    assert set(flat) == set(range(11)) and len(flat) == 12
    # each rank keeps its own shard every epoch (so a resident cache holds only that shard)
    later = sum(epoch_batches(imgs, 5, 0, 2, rank=1, world=2), [])
    assert set(later) == set(sum(r1, [])) == set(range(1, 11, 2))
    assert sum(r1, []) != later                       # reshuffled


@pytest.mark.slow
def test_train_checkpoints_and_resume_identical(stores, tmp_path):
    full = Trainer(_cfg(stores, tmp_path / "a"))
    hist = full.fit()
    assert len(hist) == 2 and hist[-1]["mIoU"] > 0
    cks = list_checkpoints(tmp_path / "a")
    assert [e for e, _ in cks] == [1, 2]
    name = cks[1][1].name
    assert name == checkpoint_name(2, (640, 640), hist[-1]["mIoU"])
    assert name.startswith("checkpoint_epoch_0002_640x640_") and len(name.split("_")[-1]) == 8
    ck = load_checkpoint(cks[1][1])   # weights_only=True inside
    assert ck.epoch == 2 and ck.cache_fingerprint["feature_shape"] == [16, 80, 80]
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]

    first = Trainer(_cfg(stores, tmp_path / "b"))
    first.fit(until=1)
    resumed = Trainer(_cfg(stores, tmp_path / "b", resume="auto"))
    assert resumed.start_epoch == 2
    resumed.fit()
    for (k, v), (k2, v2) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(v, v2), k
    assert resumed.history[-1]["mIoU"] == hist[-1]["mIoU"]


def test_find_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        find_checkpoint(tmp_path, 3)
    for n in ("checkpoint_epoch_0003_640x640_4260.pth", "checkpoint_epoch_0003_640x640_4300.pth",
              "checkpoint_epoch_0004_640x640_5000.pth"):
        (tmp_path / n).write_bytes(b"")
    with pytest.raises(CheckpointError, match="several"):
        find_checkpoint(tmp_path, 3)
    assert find_checkpoint(tmp_path, 4).name.endswith("5000.pth")
    assert find_checkpoint(tmp_path).name.endswith("5000.pth")
    with pytest.raises(CheckpointError, match="epochs: 3, 4"):
        find_checkpoint(tmp_path, 7)
    assert checkpoint_name(12, (640, 480), 0.42609) == "checkpoint_epoch_0012_640x480_4260.pth"


def test_mismatched_val_cache_refused(stores, synth, standin_onnx, tmp_path):
    other = tmp_path / "val_bgr.zarr"
    run_cache(CacheConfig(ann=synth["val"], images=synth["root"] / "images/val2017", onnx=standin_onnx,
                          out=other, feature_name="/model.34/Concat_output_0", provider="cpu",
                          channel_order="bgr", limit=3), progress=False)
    with pytest.raises(StoreError, match="channel_order"):
        Trainer(_cfg(stores, tmp_path / "x", val_store=str(other)))


@pytest.mark.slow
def test_two_class_ablation_and_global_model(stores, tmp_path):
    t = Trainer(_cfg(stores, tmp_path / "g", model="global", classes=2, epochs=1, hidden=8, roi_size=14,
                     boundary_weight=0.5, focal_gamma=1.0, ema=0.9, coco_eval=True))
    h = t.fit()
    assert set(h[0]["iou"]) == {"background", "target"} and "coco_mask_AP" in h[0]
    assert load_checkpoint(list_checkpoints(tmp_path / "g")[0][1]).ema is not None


def test_missing_analysis_is_computed(stores, tmp_path):
    t = Trainer(_cfg(stores, tmp_path / "w", analysis=str(tmp_path / "da.json"), epochs=1))
    # saved in the run folder, where the run's args.yaml points; never where --analysis pointed
    assert (t.out / "da.json").is_file() and not (tmp_path / "da.json").exists()
    assert t.run.analysis == str(t.out / "da.json") and t.loss.weight is not None


def test_cli_train_errors_clearly(tmp_path):
    from click.testing import CliRunner

    from roiseg.cli import main
    r = CliRunner().invoke(main, ["train", "--train-store", str(tmp_path / "nope.zarr")])
    assert r.exit_code == 1 and "no feature cache" in r.output and "cli.py cache" in r.output
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nepochs = 3\nbogus = 1\n")
    r = CliRunner().invoke(main, ["train", "--config", str(cfg)])
    assert r.exit_code == 1 and "bogus" in r.output


def test_config_file_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 5\nlr: 0.01\nmodel: global\n")
    c = make_config(p, lr=0.02)
    assert c.epochs == 5 and c.lr == 0.02 and c.model == "global"


@pytest.mark.slow
def test_ddp_two_cpu_processes(stores, tmp_path):
    out = tmp_path / "ddp"
    from clikit import torchrun
    p = torchrun(2, "train", "--train-store", stores["train"], "--val-store", stores["val"], "--out", out,
                 "--analysis", stores["analysis"], "--epochs", "1", "--hidden", "16", "--roi-size", "7",
                 "--mask-size", "28", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--resident", "cpu",
                 "--no-vis")
    assert p.returncode == 0, p.stderr[-3000:]
    n_train = len(CacheIndex(stores["train"]).images)
    assert p.stderr.count(f"resident cache: {n_train // 2} images") == 2   # each rank holds only its shard
    cks = list_checkpoints(out)
    assert len(cks) == 1
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1                             # rank 0 alone writes
    m = json.loads(lines[0])
    n_val_rois = int(CacheIndex(stores["val"]).roi_start[-1])
    assert m["instances"] == n_val_rois                # metrics reduced over both ranks' shards
