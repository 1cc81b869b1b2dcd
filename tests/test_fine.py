"""The fine-detail path (issue 21): `cache --fine-feature` stores a finer tensor of the same extractor
run, `train` fuses it automatically, and every path that runs a decoder feeds it (evaluate,
predict from a checkpoint, the exported decoder and the end-to-end graph)."""
import json

import numpy as np
import pytest
import torch

from roiseg.common.errors import RoisegError
from roiseg.data.cache import CacheConfig, mirror_input, run_cache
from roiseg.data.extractor import INPUT_TENSOR, Extractor, ExtractorError
from roiseg.data.images import load_rgb, preprocess
from roiseg.data.standin import FEATURE_NAME, FINE_NAME
from roiseg.data.store import FeatureStore
from roiseg.loader.sampling import RoiSampling
from roiseg.loader.sources import (
    CacheIndex,
    PinnedStreamSource,
    ResidentSource,
    StreamingSource,
    epoch_batches,
)
from roiseg.modeling.checkpoint import (
    check_decoder_on_store,
    decoder_from_checkpoint,
    load_checkpoint,
)
from roiseg.modeling.decoders import RoiAlignDecoder, roi_features, uses_fine
from roiseg.training.config import make_config
from roiseg.training.loop import Trainer


def _cache(synth, onnx, out, split="train", **kw):
    cfg = CacheConfig(ann=synth[split], images=synth["root"] / f"images/{split}2017", onnx=onnx, out=out,
                      feature_name=FEATURE_NAME, provider="cpu", workers=2, **kw)
    return run_cache(cfg, progress=False)


@pytest.fixture(scope="module")
def fine_stores(synth, standin_onnx, tmp_path_factory):
    """Train (with mirrored maps) and val stores holding the stand-in's stride-4 map."""
    d = tmp_path_factory.mktemp("fine")
    out = {"train": d / "train.zarr", "val": d / "val.zarr"}
    _cache(synth, standin_onnx, out["train"], fine_feature=FINE_NAME, flip=True)
    _cache(synth, standin_onnx, out["val"], "val", fine_feature=FINE_NAME)
    return out


def _train_cfg(fine_stores, stores, out, **kw):
    base = dict(train_store=str(fine_stores["train"]), val_store=str(fine_stores["val"]), out=str(out),
                analysis=str(stores["analysis"]), hidden=16, roi_size=7, mask_size=28, epochs=1, batch_size=4,
                workers=0, resident="cpu", tensorboard=False, visualize=False)
    if kw.get("fine") != "off":
        base["fine_width"] = 8
    return make_config(**{**base, **kw})


@pytest.fixture(scope="module")
def fine_run(fine_stores, stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("fine_run")
    Trainer(_train_cfg(fine_stores, stores, out)).fit()
    return out


def _same_masks_everywhere(ck, dec, e2e, onnx, image):
    """Predict from the checkpoint, the exported decoder and the end-to-end graph: the same masks."""
    from roiseg.inference.torch_decoder import predictor_from_checkpoint
    from roiseg.runtime.pipeline import Predictor
    boxes = np.array([[0.1, 0.15, 0.5, 0.9], [0.4, 0.2, 0.8, 0.7]])
    probs = [p.predict(image, boxes).probs for p in (predictor_from_checkpoint(ck, onnx, "cpu"),
                                                     Predictor.from_onnx(dec, onnx, "cpu"),
                                                     Predictor.from_onnx(e2e, None, "cpu"))]
    for other in probs[1:]:
        for u, v in zip(probs[0], other):
            np.testing.assert_allclose(u, v, atol=2e-3)


def test_unknown_fine_tensor_lists_the_finer_candidates(standin_onnx):
    with pytest.raises(ExtractorError) as e:
        Extractor(standin_onnx, FEATURE_NAME, "cpu", fine_name="/nope")
    msg = str(e.value)
    assert "--fine-feature" in msg and FINE_NAME in msg and INPUT_TENSOR in msg
    assert FEATURE_NAME not in msg          # stride 8 is not a fine candidate
    with pytest.raises(ExtractorError, match="the feature map itself"):
        Extractor(standin_onnx, FEATURE_NAME, "cpu", fine_name=FEATURE_NAME)
    with pytest.raises(ExtractorError, match="finer than the feature map"):   # stride 8 under another name
        Extractor(standin_onnx, FEATURE_NAME, "cpu", fine_name="/model.1/act")


def test_fine_store_holds_the_extractor_maps_of_both_inputs(fine_stores, synth, standin_onnx):
    fs = FeatureStore(fine_stores["train"])
    assert fs.has_fine and fs.meta.fine.to_dict() == {"name": FINE_NAME, "shape": [8, 160, 160]}
    ex = Extractor(standin_onnx, FEATURE_NAME, "cpu", fine_name=FINE_NAME)
    prep = fs.meta.source.preprocess
    i = 3
    x = preprocess(load_rgb(synth["root"] / "images/train2017" / fs.tables["file_name"][i]), prep)[None]
    feats, fine = ex.run_fine(x)
    _, fine_m = ex.run_fine(mirror_input(x))
    np.testing.assert_array_equal(fs.fine(i), fine[0])
    np.testing.assert_array_equal(fs.fine(i, flipped=True), fine_m[0])
    np.testing.assert_array_equal(fs.features(i), feats[0])   # the coarse map is unchanged by the fine one
    mean, std = fs.fine_stats(fs.valid_images())
    all_fine = np.stack([fs.fine(j).astype(np.float32) for j in fs.valid_images()])
    np.testing.assert_allclose(mean, all_fine.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(std, all_fine.std((0, 2, 3)), rtol=1e-3, atol=1e-5)


def test_input_as_fine_map_is_the_preprocessed_image(synth, standin_onnx, tmp_path):
    _cache(synth, standin_onnx, tmp_path / "rgb.zarr", "val", fine_feature=INPUT_TENSOR, limit=2)
    fs = FeatureStore(tmp_path / "rgb.zarr")
    prep = fs.meta.source.preprocess
    x = preprocess(load_rgb(synth["root"] / "images/val2017" / fs.tables["file_name"][1]), prep)
    assert fs.meta.fine.shape == (3, 640, 640)
    np.testing.assert_array_equal(fs.fine(1), x.astype(np.float16))


def test_sparse_fine_store_gives_the_dense_roi_features(fine_stores, synth, standin_onnx, tmp_path):
    """Every ROI training or validation can read sees the same fine (and coarse) features in a
    sparse store as in a dense one, mirrored maps included; the rest is zero."""
    _cache(synth, standin_onnx, tmp_path / "sparse.zarr", fine_feature=FINE_NAME, flip=True, sparse=True)
    dense, sparse = FeatureStore(fine_stores["train"]), FeatureStore(tmp_path / "sparse.zarr")
    idx = CacheIndex(tmp_path / "sparse.zarr")
    s = RoiSampling(jitter=0.15, jitter_scale=0.2, samples_per_roi=4, hflip=0.5)
    src_d = ResidentSource(CacheIndex(fine_stores["train"]), s, 28, 0, torch.device("cpu"), fine=True)
    src_s = ResidentSource(idx, s, 28, 0, torch.device("cpu"), fine=True)
    kept = []
    for b in epoch_batches(idx.images, 1, 0, 6):
        a, c = src_d.batch(b, 1, True), src_s.batch(b, 1, True)
        for name, size in (("features", 7), ("fine", 28)):
            fa = roi_features(a[name].float(), a["rois"], size)
            fc = roi_features(c[name].float(), c["rois"], size)
            torch.testing.assert_close(fa, fc, rtol=0, atol=0)
    for i in idx.images[:6]:
        zero = sparse.fine(int(i)) == 0
        kept.append(1 - zero.all(0).mean())
        np.testing.assert_array_equal(sparse.fine(int(i))[:, ~zero.all(0)], dense.fine(int(i))[:, ~zero.all(0)])
    assert 0 < np.mean(kept) < 1           # it is sparse: part of the map is gone


def test_shards_and_resume_fill_the_same_fine_store(fine_stores, synth, standin_onnx, tmp_path):
    out = tmp_path / "sh.zarr"
    for k in range(2):
        _cache(synth, standin_onnx, out, fine_feature=FINE_NAME, flip=True, shard=(k, 2))
    fs, ref = FeatureStore(out, "r+"), FeatureStore(fine_stores["train"])
    fs.forget(5)                            # an image lost mid-write: resume redoes it
    assert not fs.done_mask()[5]
    s = _cache(synth, standin_onnx, out, fine_feature=FINE_NAME, flip=True)
    assert s["processed_now"] == 1 and s["complete"]
    for i in ref.valid_images():
        for flipped in (False, True):
            np.testing.assert_array_equal(fs.fine(int(i), flipped), ref.fine(int(i), flipped))
    with pytest.raises(RoisegError, match="fine"):   # another fine map is another store
        _cache(synth, standin_onnx, out, fine_feature=INPUT_TENSOR, flip=True)


def test_streaming_resident_and_pinned_batches_carry_the_same_fine_maps(fine_stores):
    idx = CacheIndex(fine_stores["train"])
    s = RoiSampling(jitter=0.15, samples_per_roi=2, hflip=0.5)
    batches = epoch_batches(idx.images, 3, 0, 4)[:3]
    a = list(StreamingSource(idx, s, 28, 0, workers=1, device=torch.device("cpu"), fine=True).iterate(batches, 3, True))
    b = list(ResidentSource(idx, s, 28, 0, torch.device("cpu"), fine=True).iterate(batches, 3, True))
    c = list(PinnedStreamSource(idx, s, 28, 0, torch.device("cpu"), threads=2, depth=2, fine=True)
             .iterate(batches, 3, True))
    flips = 0
    for x, y, z in zip(a, b, c):
        assert x["fine"].shape[1:] == (8, 160, 160)
        for k in x:
            assert torch.equal(x[k], y[k]) and torch.equal(x[k], z[k]), k
    fs = FeatureStore(fine_stores["train"])
    for batch, imgs in zip(a, batches):       # mirrored images come with the stored mirrored fine map
        for j, i in enumerate(imgs):
            plain = torch.equal(batch["fine"][j], torch.from_numpy(fs.fine(i)))
            mirrored = torch.equal(batch["fine"][j], torch.from_numpy(fs.fine(i, flipped=True)))
            assert plain or mirrored
            flips += mirrored
    assert flips > 0


def test_decoder_fine_path_needs_the_map_starts_neutral_and_learns_from_it():
    torch.manual_seed(0)
    m = RoiAlignDecoder(16, hidden=16, roi_size=7, mask_size=28, fine_channels=8, fine_width=8)
    feats, fine = torch.randn(2, 16, 80, 80), torch.randn(2, 8, 160, 160)
    rois = torch.tensor([[0, 0.1, 0.1, 0.5, 0.6], [1, 0.3, 0.2, 0.9, 0.9]])
    with pytest.raises(ValueError, match="fine map"):
        m(feats, rois)
    logits = m(feats, rois, fine=fine)
    assert logits.shape == (2, 3, 28, 28)
    # zero-init residual: at the start the fine map changes nothing
    with torch.no_grad():
        assert torch.equal(m(feats, rois, fine=fine + 3.0), logits)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for _ in range(2):          # the last conv learns first, then the gradient reaches the reduction
        opt.zero_grad()
        m(feats, rois, fine=fine).logsumexp(1).mean().backward()
        opt.step()
    assert m.fine.reduce[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        before = m(feats, rois, fine=fine)
        fine2 = fine.clone()
        fine2[1] += 1.0                     # the fine map changes only image 1's masks
        other = m(feats, rois, fine=fine2)
    assert torch.equal(other[0], before[0]) and not torch.equal(other[1], before[1])
    assert not uses_fine(RoiAlignDecoder(16, hidden=16, roi_size=7, mask_size=28))


def test_training_uses_the_fine_map_and_records_it(fine_run, fine_stores, stores, tmp_path):
    ck = load_checkpoint(fine_run / "last.pth")
    assert ck.model_kwargs["fine_channels"] == 8 and ck.cache_fingerprint["fine"]["name"] == FINE_NAME
    model, _ = decoder_from_checkpoint(ck)
    assert uses_fine(model)
    # --fine off: the same store, a decoder without the path, as before
    tr = Trainer(_train_cfg(fine_stores, stores, tmp_path / "off", fine="off"))
    assert not uses_fine(tr.model) and tr.fine_channels == 0
    # a fine decoder refuses a store without that fine map; a plain decoder reads any store
    with pytest.raises(RoisegError, match="fine"):
        check_decoder_on_store("roialign", ck.cache_fingerprint, FeatureStore(stores["val"]).meta, "x")
    check_decoder_on_store("roialign", FeatureStore(stores["val"]).meta.fingerprint(),
                           FeatureStore(fine_stores["val"]).meta, "x")


def test_resume_keeps_the_fine_path(fine_stores, stores, tmp_path):
    out = tmp_path / "r"
    Trainer(_train_cfg(fine_stores, stores, out, epochs=2)).fit(until=1)
    tr = Trainer(_train_cfg(fine_stores, stores, out, epochs=2, resume="auto"))
    assert uses_fine(tr.model) and tr.start_epoch == 2
    hist = tr.fit()
    assert [h["epoch"] for h in hist] == [1, 2]


def test_every_inference_path_feeds_the_fine_map(fine_run, fine_stores, synth, standin_onnx, tmp_path):
    """evaluate (store and --ann/--images), predict from the checkpoint, the exported decoder and
    the end-to-end graph give the same masks."""
    from roiseg.export.export import export_checkpoint
    from roiseg.inference.evaluate import evaluate_checkpoint, live_store
    ck = fine_run / "last.pth"
    stored = load_checkpoint(ck).metrics["instance_mIoU"]
    assert evaluate_checkpoint(ck, fine_stores["val"])["instance_mIoU"] == pytest.approx(stored, abs=1e-9)
    with live_store(ck, synth["val"], synth["root"] / "images/val2017", tmp_path, standin_onnx, "cpu") as live:
        assert FeatureStore(live).meta.fine.name == FINE_NAME
        assert evaluate_checkpoint(ck, live)["instance_mIoU"] == pytest.approx(stored, abs=1e-6)
    dec, e2e = tmp_path / "d.decoder.onnx", tmp_path / "d.e2e.onnx"
    res = export_checkpoint(ck, dec, end_to_end=True, extractor=standin_onnx, e2e_out=e2e)
    assert res.spec.inputs == ["features", "rois", "fine"]
    assert res.parity["N=5"]["max_abs_diff"] < 1e-3
    image = synth["root"] / "images/val2017" / json.loads(synth["val"].read_text())["images"][0]["file_name"]
    _same_masks_everywhere(ck, dec, e2e, standin_onnx, image)


@pytest.mark.slow
def test_ddp_streams_the_fine_map_to_every_rank(fine_stores, stores, tmp_path):
    """Two gloo ranks streaming a fine store (DataLoader workers): replicas stay identical and the
    checkpoint's decoder fuses the fine map."""
    from clikit import torchrun
    out = tmp_path / "ddp"
    p = torchrun(2, "train", "--train-store", fine_stores["train"], "--val-store", fine_stores["val"], "--out", out,
                 "--analysis", stores["analysis"], "--epochs", "1", "--hidden", "16", "--roi-size", "7",
                 "--mask-size", "28", "--fine-width", "8", "--batch-size", "2", "--workers", "1", "--device", "cpu",
                 "--resident", "off", "--no-vis", timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert m["replicas"].startswith("identical on 2 ranks")
    assert "fine path: " + FINE_NAME in p.stderr
    assert uses_fine(decoder_from_checkpoint(out / "last.pth")[0])


def test_pca_keeps_the_leading_components_and_is_reproducible():
    from roiseg.data import fine_projection as fp
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(6, 2))
    maps = [(basis @ rng.normal(size=(2, 40 * 40)) + 0.01 * rng.normal(size=(6, 1600)) + 3.0).reshape(6, 40, 40)
            for _ in range(5)]
    p = fp.fit_pca(maps, 2)
    assert p["explained"] > 0.999 and p["images"] == 5
    w = np.asarray(p["components"])
    np.testing.assert_allclose(w @ w.T, np.eye(2), atol=1e-5)        # orthonormal rows
    # they span the data's plane: projecting the basis out of it leaves ~nothing
    resid = basis - w.T @ (w @ basis)
    assert np.abs(resid).max() < 0.01
    x = np.stack(maps[:2]).astype(np.float16)
    y = fp.apply(p, x)
    want = np.einsum("kc,bchw->bkhw", w, x.astype(np.float64) - np.asarray(p["mean"])[None, :, None, None])
    np.testing.assert_allclose(y.astype(np.float64), want, atol=2e-2)
    assert fp.sha256(p) == fp.sha256(fp.fit_pca(maps, 2)) and fp.sample_indices(100, 4) == [0, 33, 66, 99]
    with pytest.raises(ValueError, match="fine-channels"):
        fp.fit_pca(maps, 6)


def test_fine_channels_reduce_the_map_everywhere(synth, standin_onnx, stores, tmp_path):
    """cache --fine-channels: a PCA fitted once, recorded in the store; the validation store reuses it
    (--fine-projection-from) and one with its own is refused by train; checkpoint, exported decoder
    and end-to-end graph apply it and agree."""
    from roiseg.data import fine_projection as fp
    from roiseg.export.export import export_checkpoint
    from roiseg.inference.evaluate import evaluate_checkpoint, live_store
    tr, va, own = tmp_path / "tr.zarr", tmp_path / "va.zarr", tmp_path / "own.zarr"
    _cache(synth, standin_onnx, tr, fine_feature=FINE_NAME, fine_channels=3)
    _cache(synth, standin_onnx, va, "val", fine_feature=FINE_NAME, fine_projection_from=tr)
    _cache(synth, standin_onnx, own, "val", fine_feature=FINE_NAME, fine_channels=3)
    a, b = FeatureStore(tr), FeatureStore(va)
    assert a.meta.fine.shape == (3, 160, 160) and a.meta.fine.source_channels == 8
    assert a.meta.fine == b.meta.fine and a.meta.source.fine_projection == b.meta.source.fine_projection
    ex = Extractor(standin_onnx, FEATURE_NAME, "cpu", fine_name=FINE_NAME)
    prep = a.meta.source.preprocess
    x = preprocess(load_rgb(synth["root"] / "images/train2017" / a.tables["file_name"][2]), prep)[None]
    np.testing.assert_array_equal(a.fine(2), fp.apply(a.meta.source.fine_projection, ex.run_fine(x)[1])[0])
    with pytest.raises(RoisegError, match="fine"):
        Trainer(_train_cfg({"train": tr, "val": own}, stores, tmp_path / "bad"))
    out = tmp_path / "run"
    Trainer(_train_cfg({"train": tr, "val": va}, stores, out)).fit()
    ck = out / "last.pth"
    stored = load_checkpoint(ck).metrics["instance_mIoU"]
    with live_store(ck, synth["val"], synth["root"] / "images/val2017", tmp_path, standin_onnx, "cpu") as live:
        assert evaluate_checkpoint(ck, live)["instance_mIoU"] == pytest.approx(stored, abs=1e-6)
    dec, e2e = tmp_path / "r.decoder.onnx", tmp_path / "r.e2e.onnx"
    export_checkpoint(ck, dec, end_to_end=True, extractor=standin_onnx, e2e_out=e2e)
    _same_masks_everywhere(ck, dec, e2e, standin_onnx, synth["root"] / "images/val2017" / b.tables["file_name"][0])
