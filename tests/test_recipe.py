"""The training recipe: feature normalization, flip augmentation, ROI-counted steps, best/last."""
import os
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import ImageOps
from test_train import _cfg

from roiseg.common.errors import RoisegError
from roiseg.common.geometry import mirror_boxes
from roiseg.data.cache import CacheConfig, run_cache
from roiseg.data.extractor import Extractor
from roiseg.data.images import load_rgb, preprocess
from roiseg.data.store import FeatureStore, StoreError
from roiseg.export.export import export_decoder
from roiseg.export.graph import ExportSpec
from roiseg.export.parity import check_parity
from roiseg.loader.sampling import (
    RoiSampling,
    image_rng,
    jitter_person_boxes,
    rois_with_others,
)
from roiseg.loader.sources import (
    CacheIndex,
    PinnedStreamSource,
    ResidentSource,
    StreamingSource,
    epoch_batches,
)
from roiseg.loader.targets import sample_roi_targets, union_packed
from roiseg.modeling.checkpoint import list_checkpoints, load_checkpoint
from roiseg.modeling.decoders import build_model
from roiseg.training.loop import Trainer, expected_rois
from roiseg.training.schedule import scaled_lr


@pytest.fixture(scope="module")
def flip_store(synth, standin_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("flip") / "train_flip.zarr"
    run_cache(CacheConfig(ann=synth["train"], images=synth["root"] / "images/train2017", onnx=standin_onnx,
                          out=out, feature_name="/model.34/Concat_output_0", provider="cpu", flip=True,
                          limit=10), progress=False)
    return out


def test_feature_stats_exact_over_any_subset(stores):
    fs = FeatureStore(stores["train"])
    imgs = fs.valid_images()[::2]
    x = np.stack([fs.features(int(i)).astype(np.float64) for i in imgs])       # [N, C, H, W]
    mean, std = fs.feature_stats(imgs)
    ref_std = x.std((0, 2, 3))
    assert np.allclose(mean, x.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert np.allclose(std, np.where(ref_std > 1e-6, ref_std, 1), rtol=1e-3, atol=1e-5)


def test_stats_read_in_one_go_still_name_a_damaged_chunk(stores, tmp_path):
    """The per-image sums are read with one zarr call (start-up at 64k images); a missing sum is an
    error naming the repair (never zeros), and a damaged sum names its image."""
    from roiseg.data.store import DamagedChunkError, StoreError
    copy = tmp_path / "s.zarr"
    shutil.copytree(stores["train"], copy)
    imgs = FeatureStore(copy).valid_images()
    want = FeatureStore(copy).feature_stats(imgs)
    assert all(np.array_equal(a, b) for a, b in zip(FeatureStore(copy).feature_stats(imgs), want))
    (copy / "feature_stats" / f"{imgs[1]}.0.0").unlink()
    with pytest.raises(StoreError, match=f"statistics of 1 image.*image {imgs[1]}.*--verify"):
        FeatureStore(copy).feature_stats(imgs)
    shutil.rmtree(copy)
    shutil.copytree(stores["train"], copy)
    (copy / "feature_stats" / f"{imgs[2]}.0.0").write_bytes(b"garbage")
    with pytest.raises(DamagedChunkError, match=f"'feature_stats' chunk of image {imgs[2]}"):
        FeatureStore(copy).feature_stats(imgs)


def test_a_store_without_statistics_is_refused_with_how_to_rebuild(stores, tmp_path):
    old = tmp_path / "old.zarr"
    shutil.copytree(stores["train"], old)
    shutil.rmtree(old / "feature_stats")                       # a store from before statistics
    with pytest.raises(RoisegError, match="has no feature_stats array.*--overwrite"):
        Trainer(_cfg(stores, tmp_path / "o", train_store=str(old), epochs=1))
    assert not (old / "feature_stats").exists()                # nothing written into an input store


def test_norm_buffers_in_checkpoint_and_onnx(stores, tmp_path):
    t = Trainer(_cfg(stores, tmp_path / "n", epochs=1))
    t.fit()
    ck = load_checkpoint(list_checkpoints(tmp_path / "n")[0][1])
    mean, std = FeatureStore(stores["train"]).feature_stats(CacheIndex(stores["train"]).images)
    assert torch.allclose(ck.model["norm.mean"], torch.from_numpy(mean))
    assert torch.allclose(ck.model["norm.std"], torch.from_numpy(std))
    assert not torch.allclose(ck.model["norm.std"], torch.ones_like(ck.model["norm.std"]))
    # the exported graph applies the same normalization: parity with PyTorch, and changing the
    # buffers changes the ONNX output (they are in the graph, not dropped)
    model = t.model.cpu().eval()
    spec = ExportSpec(16, (640, 640), (80, 80), 0.1)
    onnx_path = export_decoder(model, spec, tmp_path / "d.onnx")   # the norm is folded into the first conv
    assert max(v["max_abs_diff"] for k, v in check_parity(model, onnx_path, spec).items() if k != "tolerance") < 1e-3
    plain = build_model("roialign", 16, hidden=16, roi_size=7, mask_size=28)
    plain.load_state_dict({**model.state_dict(), "norm.mean": torch.zeros(16), "norm.std": torch.ones(16)})
    feats = np.random.default_rng(0).random((1, 16, 80, 80), np.float32) * 3
    rois = np.array([[0, 0.2, 0.2, 0.6, 0.7]], np.float32)
    s = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = s.run(["logits"], {"features": feats, "rois": rois})[0]
    with torch.no_grad():
        r = torch.from_numpy(rois)
        padded = torch.cat([r[:, :1], torch.tensor([[0.16, 0.15, 0.64, 0.75]])], 1)
        want = model(torch.from_numpy(feats), padded).numpy()
        unnormed = plain(torch.from_numpy(feats), padded).numpy()
    assert np.abs(got - want).max() < 1e-3 < np.abs(got - unnormed).max()


def test_normalizing_after_roialign_equals_normalizing_the_map():
    torch.manual_seed(0)
    m = build_model("roialign", 8, (torch.rand(8) * 2, torch.rand(8) + 0.5), hidden=8, roi_size=7, mask_size=14)
    ident = build_model("roialign", 8, hidden=8, roi_size=7, mask_size=14)
    ident.load_state_dict({**m.state_dict(), "norm.mean": torch.zeros(8), "norm.std": torch.ones(8)})
    f = torch.randn(2, 8, 20, 20)
    rois = torch.tensor([[0, 0.0, 0.0, 1.0, 1.0], [1, 0.05, 0.3, 0.41, 0.99], [1, 0.9, 0.9, 1.0, 1.0]])
    pre = (f - m.norm.mean[:, None, None]) / m.norm.std[:, None, None]
    assert torch.allclose(m(f, rois), ident(pre, rois), atol=1e-4)


def test_flipped_features_equal_a_run_on_the_mirrored_image(flip_store, standin_onnx, synth):
    fs = FeatureStore(flip_store)
    assert fs.has_flip and fs.meta.flip is True
    ex = Extractor(standin_onnx, "/model.34/Concat_output_0", "cpu")
    prep = fs.meta.source.preprocess
    assert prep.policy.mode == "stretch"
    for i in (0, 3):
        name = fs.tables["file_name"][i]
        mirrored = ImageOps.mirror(load_rgb(synth["root"] / "images/train2017" / name))
        direct = ex.run(preprocess(mirrored, prep)[None])[0].astype(np.float32)
        stored = fs.features(i, flipped=True).astype(np.float32)
        assert np.abs(stored - direct).max() <= 2e-3 * max(1.0, np.abs(direct).max())
        assert not np.allclose(stored, fs.features(i).astype(np.float32))


def test_cache_refuses_to_add_flip_to_an_existing_store(flip_store, synth, standin_onnx):
    with pytest.raises(StoreError, match="flip"):
        run_cache(CacheConfig(ann=synth["train"], images=synth["root"] / "images/train2017", onnx=standin_onnx,
                              out=flip_store, feature_name="/model.34/Concat_output_0", provider="cpu",
                              limit=10), progress=False)


@pytest.mark.parametrize("use_map", [False, True])
def test_flip_batches_identical_on_every_data_path(flip_store, use_map):
    idx = CacheIndex(flip_store)
    s = RoiSampling(samples_per_roi=2, hflip=0.5, hflip_map=use_map)
    batches = epoch_batches(idx.images, 2, 0, 4)
    a = list(StreamingSource(idx, s, 28, 0, workers=1, device=torch.device("cpu")).iterate(batches, 2, True))
    b = list(ResidentSource(idx, s, 28, 0, torch.device("cpu")).iterate(batches, 2, True))
    c = list(PinnedStreamSource(idx, s, 28, 0, torch.device("cpu"), threads=2, depth=2).iterate(batches, 2, True))
    for x, y, z in zip(a, b, c):
        for k in x:
            assert torch.equal(x[k], y[k]) and torch.equal(x[k], z[k]), k
    # some images are mirrored, with mirrored features, boxes and targets
    store = FeatureStore(flip_store)
    flipped = 0
    for bt, imgs in zip(a, batches):
        for j, i in enumerate(imgs):
            plain = torch.from_numpy(store.features(i))
            mirrored = (plain.flip(-1) if use_map else torch.from_numpy(store.features(i, flipped=True)))
            if torch.equal(bt["features"][j], mirrored):
                flipped += 1
            else:
                assert torch.equal(bt["features"][j], plain)
    assert 0 < flipped < len(idx.images)


def test_mirrored_targets_equal_targets_of_mirrored_masks(flip_store):
    """Flipping a target sampled at a box == sampling the mirrored masks at the mirrored box."""
    store = FeatureStore(flip_store)
    packed = torch.from_numpy(store.packed_masks(1).copy())
    w = store.meta.mask_hw[1]
    masks = np.unpackbits(packed.numpy(), axis=-1, count=w)[..., ::-1]
    mpacked = torch.from_numpy(np.packbits(masks, axis=-1))
    rng = np.random.default_rng(0)
    k = len(packed)
    xy = rng.uniform(0, 400, (20, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(20, 240, (20, 2))], 1).clip(0, 640)
    tgt = torch.as_tensor(rng.integers(0, k, 20))
    zero = torch.zeros(20, dtype=torch.long)
    a = sample_roi_targets(packed, union_packed(packed)[None], tgt, zero, torch.as_tensor(boxes), 28, 28, w)
    mb = mirror_boxes(boxes / 640) * 640
    b = sample_roi_targets(mpacked, union_packed(mpacked)[None], tgt, zero, torch.as_tensor(mb), 28, 28, w)
    assert (a.flip(-1) == b).float().mean() > 0.999   # differ only where a cell centre hits a pixel edge


def test_jitter_is_gaussian_on_the_person_box_and_deterministic():
    boxes = np.array([[0.2, 0.2, 0.4, 0.8]] * 4000)
    j = jitter_person_boxes(boxes, 0.05, 0.1, np.random.default_rng(0))
    assert np.array_equal(j, jitter_person_boxes(boxes, 0.05, 0.1, np.random.default_rng(0)))
    cx = (j[:, 0] + j[:, 2]) / 2
    assert abs(cx.mean() - 0.3) < 0.002 and abs(cx.std() / 0.2 - 0.05) < 0.005
    logw = np.log((j[:, 2] - j[:, 0]) / 0.2)
    assert abs(logw.std() - 0.1) < 0.01
    assert image_rng(0, 1, 2).random() == image_rng(0, 1, 2).random()


def test_overlapped_rois_get_more_copies(stores):
    idx = CacheIndex(stores["train"])
    boxes = np.array([[0.1, 0.1, 0.3, 0.5], [0.25, 0.2, 0.4, 0.6], [0.7, 0.7, 0.8, 0.9]])
    padded = boxes + [-0.01, -0.01, 0.01, 0.01]
    assert rois_with_others(boxes, padded, np.array([0, 3])).tolist() == [True, True, False]
    base = expected_rois(idx, idx.images, RoiSampling(samples_per_roi=2, overlap_boost=1))
    boosted = expected_rois(idx, idx.images, RoiSampling(samples_per_roi=2, overlap_boost=3))
    n_other = sum(int(idx.has_other[a:b].sum()) for a, b in (idx.rois_of(i) for i in idx.images))
    assert n_other > 0 and boosted == base + 2 * 2 * n_other


def test_steps_are_counted_in_rois_and_lr_scales(stores, tmp_path):
    t = Trainer(_cfg(stores, tmp_path / "s", epochs=1, rois_per_step=8, lr=1e-3))
    h = t.fit()[0]
    assert h["train_rois"] == t.epoch_rois
    assert t.epoch_rois // 16 <= h["steps"] <= t.epoch_rois // 8 + len(epoch_batches(t.train_index.images, 1, 0, 4))
    assert t.lr == pytest.approx(scaled_lr(1e-3, 8)) == pytest.approx(1e-3 / 2 ** 0.5)


def test_prior_model_ignores_features():
    """One learned map for every ROI, whatever the features or the box: GAIN x its parameter."""
    m = build_model("prior", 4, mask_size=14)
    torch.nn.init.normal_(m.logits)
    rois = torch.tensor([[0, 0.1, 0.1, 0.5, 0.5], [0, 0.5, 0.5, 0.9, 0.9]])
    a, b = m(torch.randn(1, 4, 8, 8), rois), m(torch.randn(1, 4, 8, 8) * 100, rois)
    assert a.shape == (2, 3, 14, 14) and torch.equal(a, b)
    assert torch.allclose(a[0], m.GAIN * m.logits) and torch.equal(a[0], a[1]) and a.abs().sum() > 0


@pytest.mark.slow
def test_best_and_last_follow_the_metric_across_resume(stores, tmp_path):
    out = tmp_path / "bl"
    first = Trainer(_cfg(stores, out, epochs=3))
    first.fit(until=2)      # stopped after epoch 2 of a 3-epoch schedule
    resumed = Trainer(_cfg(stores, out, epochs=3, resume="auto"))
    hist = resumed.fit()
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    cks = dict(list_checkpoints(out))
    best_epoch = max(hist, key=lambda h: (h["instance_mIoU"], -h["epoch"]))["epoch"]
    assert os.path.samefile(out / "last.pth", cks[3]) or \
        (out / "last.pth").read_bytes() == cks[3].read_bytes()
    assert load_checkpoint(out / "best.pth").epoch == best_epoch
    assert load_checkpoint(out / "last.pth").epoch == 3


def test_image_lists_select_part_of_a_store(stores):
    full = CacheIndex(stores["train"])
    names = [full.tables["file_name"][i] for i in full.images[:5]]
    part = CacheIndex(stores["train"], names)
    assert part.images.tolist() == full.images[:5].tolist()
    with pytest.raises(StoreError, match="not in"):
        CacheIndex(stores["train"], names + ["nope.jpg"])


def test_auto_epochs_give_small_sets_enough_steps(stores, tmp_path):
    from roiseg.training.schedule import auto_epochs
    assert auto_epochs(60_000 * 12, 16, 600) == 12                 # full COCO: the plain 12
    assert auto_epochs(616, 16, 600) == 16                         # a 48-image fold: 16 epochs, ~600 steps
    t = Trainer(_cfg(stores, tmp_path / "a", epochs=0, min_steps=5000, rois_per_step=8))
    assert t.run.epochs == max(12, -(-5000 * 8 // t.epoch_rois)) > 12 and t.cfg.epochs == 0   # config as given
    with pytest.raises(Exception, match="epochs: must be >= 0"):
        Trainer(_cfg(stores, tmp_path / "b", epochs=-1))


@pytest.mark.slow
def test_second_run_gets_its_own_folder(stores, tmp_path):
    out = tmp_path / "ck"
    Trainer(_cfg(stores, out, epochs=1)).fit()
    second = Trainer(_cfg(stores, out, epochs=1))
    assert second.out == out / "run2"
    second.fit()
    assert [e for e, _ in list_checkpoints(out)] == [1] and [e for e, _ in list_checkpoints(out / "run2")] == [1]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    rows = (out / "run2" / "results.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,loss,lr,mIoU,iou_background") and len(rows) == 2
    from PIL import Image
    with Image.open(out / "run2" / "results.png") as im:     # the curves, drawn every epoch
        assert im.format == "PNG" and im.size[0] > 800
    import yaml
    args = yaml.safe_load((out / "run2" / "args.yaml").read_text())          # as given
    resolved = yaml.safe_load((out / "run2" / "resolved.yaml").read_text())  # what the run made of it
    assert args["out"] == str(out) and args["epochs"] == 1 and args["hidden"] == 16
    assert resolved["out"] == str(out / "run2") and resolved["epochs"] == 1 and resolved["batch_size"] == 4
    assert Trainer(_cfg(stores, out, epochs=2, resume="auto")).out == out   # --resume keeps its folder


def test_bad_best_metric_fails_before_training(stores, tmp_path):
    from click.testing import CliRunner

    from roiseg.cli import main
    r = CliRunner().invoke(main, ["train", "--train-store", str(stores["train"]), "--val-store", str(stores["val"]),
                                  "--analysis", str(stores["analysis"]), "--out", str(tmp_path / "x"),
                                  "--best-metric", "accuracy", "--no-vis"])
    assert r.exit_code == 1 and "'accuracy' is not one of 'instance_mIoU', 'mIoU'" in r.output and "instance_mIoU" in r.output
    assert not (tmp_path / "x").exists()
