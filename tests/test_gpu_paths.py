"""GPU and multi-GPU behaviour, checked on a CPU: what each CUDA path must do is pinned down here with
fakes, CPU autocast and gloo, so CI guards it without a GPU (bench/gpu_bench.sh runs the real thing)."""
import logging
import os
import random

import numpy as np
import onnx
import pytest
import torch

from roiseg.common import providers
from roiseg.data.standin import build_standin_extractor


# ---- ONNX Runtime providers: the options the code builds ----------------------------------------
@pytest.fixture
def fake_gpu(monkeypatch):
    """A machine where CUDA and TensorRT look available; sessions are recorded, not built."""
    import onnxruntime as ort
    made = []

    class Session:
        def __init__(self, data, opts=None, providers=None):
            if getattr(Session, "fail_tensorrt", False) and providers[0][0] == "TensorrtExecutionProvider":
                raise RuntimeError("TensorRT EP failed to create engine from network\nmore detail")
            made.append(providers)
            self.chain = providers

        def get_providers(self):
            return [p[0] if isinstance(p, tuple) else p for p in self.chain]

    monkeypatch.setattr(providers, "cuda_available", lambda: True)
    monkeypatch.setattr(providers, "load_tensorrt", lambda: None)
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", Session)
    Session.made = made
    return Session


def _options(chain, name):
    return next(p[1] for p in chain if isinstance(p, tuple) and p[0] == name)


def test_engine_cache_is_per_model_not_per_graph_shape(fake_gpu, tmp_path):
    """Two extractors with the same architecture and other weights: same graph names, so ORT's own
    engine name would match; each must get its own engine folder."""
    a = onnx.load(str(build_standin_extractor(tmp_path / "a.onnx", channels=8, seed=0)))
    b = onnx.load(str(build_standin_extractor(tmp_path / "b.onnx", channels=8, seed=1)))
    dirs = []
    for m in (a, b, a):
        providers.make_session(m, provider="tensorrt", trt_cache=tmp_path / "engines")
        dirs.append(_options(fake_gpu.made[-1], "TensorrtExecutionProvider")["trt_engine_cache_path"])
    assert dirs[0] != dirs[1] and dirs[0] == dirs[2]
    assert all(d.startswith(str(tmp_path / "engines")) for d in dirs)


def test_profiles_cover_every_batch_the_cache_sends(fake_gpu, tmp_path, synth):
    """cache --flip runs 2 x --batch images at once on a dynamic-batch extractor."""
    from roiseg.data.cache import CacheConfig, run_cache
    dyn = build_standin_extractor(tmp_path / "dyn.onnx", channels=8, dynamic_batch=True)
    cfg = CacheConfig(ann=synth["val"], images=synth["root"] / "images/val2017", onnx=dyn, out=tmp_path / "s.zarr",
                      provider="tensorrt", batch=12, flip=True, limit=1)
    with pytest.raises(Exception):   # the fake session cannot run: only the options matter here
        run_cache(cfg, progress=False)
    trt = _options(fake_gpu.made[0], "TensorrtExecutionProvider")
    assert trt["trt_profile_max_shapes"].startswith("images:24x3x640x640"), trt["trt_profile_max_shapes"]


@pytest.fixture(scope="module")
def exported_decoder(trained, tmp_path_factory):
    from clikit import cli, succeeded
    dec = tmp_path_factory.mktemp("dec") / "d.decoder.onnx"
    succeeded(cli("export", "--checkpoint", trained / "best.pth", "--out", dec))   # real ORT checks, on CPU
    return dec


def test_fp16_only_where_the_graph_allows_it(exported_decoder, fake_gpu, tmp_path):
    """The extractor may run in fp16 (its features are stored as fp16); the exported decoder's fp32
    geometry and paste may not: TensorRT must not be told to use fp16 for it."""
    from roiseg.data.extractor import Extractor
    from roiseg.data.standin import FEATURE_NAME
    from roiseg.runtime.onnx_decoder import OnnxDecoder
    with pytest.raises(Exception):   # the fake session cannot run: only the options matter here
        Extractor(build_standin_extractor(tmp_path / "e.onnx", channels=8), FEATURE_NAME, "tensorrt")
    assert _options(fake_gpu.made[-1], "TensorrtExecutionProvider")["trt_fp16_enable"] is True
    OnnxDecoder(exported_decoder, "tensorrt")
    assert _options(fake_gpu.made[-1], "TensorrtExecutionProvider")["trt_fp16_enable"] is False


def test_auto_falls_back_to_cuda_when_tensorrt_fails(fake_gpu, tmp_path, caplog):
    m = onnx.load(str(build_standin_extractor(tmp_path / "a.onnx", channels=8)))
    fake_gpu.fail_tensorrt = True
    with caplog.at_level(logging.WARNING, logger="roiseg.common.providers"):
        sess = providers.make_session(m, provider="auto", trt_cache=tmp_path / "e", label="a.onnx")
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    fallback = [r.message for r in caplog.records if "-> CUDA" in r.message]
    assert fallback == ["provider auto: TensorRT failed for a.onnx (TensorRT EP failed to create engine from "
                        "network) -> CUDA"]
    with pytest.raises(providers.ProviderError, match="TensorRT cannot build an engine"):   # asked for: an error
        providers.make_session(m, provider="tensorrt", trt_cache=tmp_path / "e")


def test_device_id_follows_the_torch_device_and_local_rank(fake_gpu, tmp_path, monkeypatch):
    m = onnx.load(str(build_standin_extractor(tmp_path / "a.onnx", channels=8)))
    assert providers.device_id_for("cuda:1") == 1 and providers.device_id_for(torch.device("cuda", 3)) == 3
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert providers.device_id_for(None) == 5 and providers.device_id_for("cuda") == 5
    providers.make_session(m, provider="cuda")
    assert _options(fake_gpu.made[-1], "CUDAExecutionProvider") == {"device_id": 5}
    providers.make_session(m, provider="tensorrt", trt_cache=tmp_path, device_id=2)
    assert _options(fake_gpu.made[-1], "TensorrtExecutionProvider")["device_id"] == 2
    assert _options(fake_gpu.made[-1], "CUDAExecutionProvider") == {"device_id": 2}


def test_evaluate_keeps_tensorrt_engines_out_of_its_temp_folder(trained, synth, tmp_path, monkeypatch):
    from roiseg.data import cache as cache_mod
    seen = {}
    real = cache_mod.run_cache

    def spy(cfg, progress=True):
        seen["cfg"] = cfg
        return real(cfg, progress)
    monkeypatch.setattr(cache_mod, "run_cache", spy)
    from roiseg.inference.evaluate import live_store
    with live_store(trained / "best.pth", synth["val"], synth["root"] / "images/val2017", tmp_path, None, "cpu", 1):
        pass
    assert seen["cfg"].trt_cache == providers.TRT_CACHE and tmp_path not in seen["cfg"].trt_cache.parents


def test_store_records_the_provider_and_precision(stores):
    from roiseg.data.store import FeatureStore
    meta = FeatureStore(stores["val"]).meta
    assert meta.extractor_provider == "CPUExecutionProvider" and meta.extractor_precision == "fp32"


# ---- resume from any device, AMP on and off -----------------------------------------------------
class OnGpu(torch.Tensor):
    """Stands in for a CUDA tensor on a CPU machine: ``.numpy()`` fails as it does on CUDA."""

    def numpy(self, *a, **k):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")

    def cpu(self, *a, **k):
        return self.as_subclass(torch.Tensor).clone()


def _on_gpu(x):
    if isinstance(x, torch.Tensor):
        return x.as_subclass(OnGpu)
    if isinstance(x, dict):
        return {k: _on_gpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_on_gpu(v) for v in x)
    return x


def test_resume_from_a_checkpoint_mapped_to_another_device(trained, stores, tmp_path, monkeypatch):
    """load_checkpoint(map_location=cuda) put the numpy RNG state on the GPU and every resume on a
    GPU crashed; restoring must work whatever device the loader put the tensors on."""
    from roiseg.training import run_state as checkpointer
    from roiseg.training.config import make_config
    from roiseg.training.loop import Trainer
    real = checkpointer.load_checkpoint
    monkeypatch.setattr(checkpointer, "load_checkpoint", lambda *a, **k: _on_gpu(real(*a, **k)))
    ck = real(trained / "last.pth")
    random.seed(123)
    np.random.seed(7)
    t = Trainer(make_config(train_store=str(stores["train"]), val_store=str(stores["val"]), out=str(trained),
                            analysis=str(stores["analysis"]), hidden=16, roi_size=7, mask_size=28, epochs=2,
                            batch_size=4, workers=0, resident="cpu", tensorboard=False, visualize=False,
                            resume=str(trained / "last.pth")))
    assert t.start_epoch == 2
    assert torch.equal(torch.get_rng_state(), ck.rng["torch"])
    n = ck.rng["numpy"]
    assert np.array_equal(np.random.get_state()[1], n[1].numpy().astype(np.uint32))
    assert random.getstate()[1] == tuple(ck.rng["python"][1])


@pytest.mark.parametrize("saved_amp,now_amp", [(False, True), (True, False), (True, True)])
def test_grad_scaler_across_amp_on_and_off(saved_amp, now_amp):
    """A CPU or --no-amp run saves an empty scaler state: resuming it with AMP starts a fresh
    scaler; an AMP run resumed without AMP ignores the saved one.  (CPU GradScalers stand in for CUDA.)"""
    from roiseg.training.run_state import restore_scaler
    saved = torch.amp.GradScaler("cpu", enabled=saved_amp, init_scale=1024.0)
    if saved_amp:
        saved.scale(torch.ones(()))       # lazily creates the scale tensor
        saved.update(new_scale=512.0)
    now = torch.amp.GradScaler("cpu", enabled=now_amp)
    restore_scaler(now, _on_gpu(saved.state_dict()))
    if now_amp:
        assert now.get_scale() == (512.0 if saved_amp else 65536.0)


# ---- AMP: geometry and losses stay fp32 ------------------------------------------------------------
def test_roi_geometry_stays_fp32_under_autocast():
    """Boxes cast to fp16/bf16 move by up to ~1/32 cell (bf16: 1/4 cell near 60); a map whose value is
    the x coordinate shows where ROIAlign sampled."""
    from roiseg.modeling.decoders import roi_features
    hw = 80
    xs = (torch.arange(hw, dtype=torch.float32) + 0.5 - 58.0)         # values near 0: fine in bf16
    feats = xs.expand(1, 1, hw, hw).contiguous()
    rois = torch.tensor([[0.0, 0.7371, 0.2113, 0.7469, 0.3377]])      # x 58.97 .. 59.75 cells
    want = roi_features(feats, rois, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = roi_features(feats.bfloat16(), rois, 4)
    # only the values' bf16 rounding (~0.004 here) remains; a bf16 box would be off by ~0.1
    assert (got.float() - want).abs().max() < 0.01
    got_half = roi_features(feats.half(), rois, 4)                      # fp16 features, no autocast
    assert got_half.dtype == torch.float16 and (got_half.float() - want).abs().max() < 2e-3


def test_losses_accumulate_in_fp32():
    from roiseg.training.losses import LossConfig, SegLoss
    loss = SegLoss(LossConfig((0.5, 1.0, 2.0), 1.0, (1, 2), 0.0, 0.5), 3)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 56, 56, generator=g)
    t = torch.randint(0, 3, (4, 56, 56), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(logits.bfloat16(), t)
    ref = loss(logits.bfloat16().float(), t)
    assert out["loss"].dtype == torch.float32 and torch.allclose(out["loss"], ref["loss"], rtol=1e-6)


# ---- data paths -------------------------------------------------------------------------------------
def test_resident_auto_counts_masks_and_shares_ram_between_local_ranks(stores):
    from roiseg.loader.sampling import RoiSampling
    from roiseg.loader.sources import (
        CacheIndex,
        ResidentSource,
        resident_bytes,
        resident_choice,
    )
    idx = CacheIndex(stores["train"])
    feats, masks = resident_bytes(idx, len(idx.images))
    assert feats == len(idx.images) * int(np.prod(idx.feature_shape)) * 2 and masks > 0
    # the mask estimate (from the ROI boxes) bounds what the resident cache really holds, not by much
    src = ResidentSource(idx, RoiSampling(), 28, 0, torch.device("cpu"), keep_features=False)
    held = src.masks.nbytes + src.unions.nbytes
    assert held <= masks < 3 * held
    need = feats + masks
    # the GPU must hold the masks too: features alone would fit, features + masks do not
    gpu_free = int(feats * 1.1 / 0.6) + 1
    assert resident_choice("auto", feats, "cuda", gpu_free, 0) == "gpu"
    assert resident_choice("auto", need, "cuda", gpu_free, 10 * need) == "cpu"
    # 8 ranks on one node: each may use 1/8 of the RAM budget
    ram = int(need * 1.1 / 0.5) + 8
    assert resident_choice("auto", need, "cpu", 0, ram, 1) == "cpu"
    assert resident_choice("auto", need, "cpu", 0, ram, 8) == "off"


def test_pinned_copy_event_is_recorded_on_the_copying_devices_stream(monkeypatch):
    """The H2D copy to cuda:1 is queued on cuda:1's current stream; recording the event on the
    current device's (cuda:0) stream would let the pinned buffer be refilled mid-copy."""
    from roiseg.loader import sources as data
    calls = {}

    class Stream:
        def __init__(self, device):
            self.device = device

    class Event:
        def record(self, stream=None):
            calls["recorded_on"] = stream

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    data.copy_done_event(torch.device("cuda", 1))
    assert isinstance(calls["recorded_on"], Stream) and calls["recorded_on"].device == torch.device("cuda", 1)


def test_ema_update_never_syncs_with_the_host(monkeypatch):
    """torch's AveragedModel tests a tensor counter every step (a GPU->host sync); the EMA must not
    turn any tensor into a Python value while updating."""
    from roiseg.modeling.decoders import build_model
    from roiseg.training.ema import Ema
    model = build_model("roialign", 8, hidden=8, roi_size=7, mask_size=14)
    ema = Ema(model, 0.9)

    def no_sync(self, *a, **k):
        raise AssertionError("host sync: a tensor was read as a Python value")
    for name in ("__bool__", "item", "__int__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    for _ in range(3):
        ema.update(model)
    monkeypatch.undo()
    assert ema.updates == 3 and int(ema.state_dict()["n_averaged"]) == 3
    # the same arithmetic and state as AveragedModel with get_ema_multi_avg_fn (old checkpoints load)
    ref = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    ema = Ema(model, 0.9)
    with torch.no_grad():
        for k in range(3):
            for p in model.parameters():
                p.add_(0.01 * (k + 1))
            ref.update_parameters(model)
            ema.update(model)
    mine = ema.state_dict()
    assert list(mine) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(v, mine[k]), k


# ---- DDP with gloo: equal replicas, no hang on empty reads, metrics equal one process -----------------
@pytest.mark.slow
def test_ddp_empty_reads_identical_replicas_and_one_process_metrics(stores, tmp_path):
    """Two gloo ranks, one image per read, and a --min-roi-size that leaves some images without a
    trainable ROI: a rank whose read is empty must still take the others' steps (it used to skip them:
    a hang), every replica must end bit-identical (checked every epoch), and the validation metrics
    and COCO AP reduced over the ranks must equal one process scoring the same checkpoint."""
    import json

    from clikit import torchrun
    from roiseg.loader.sources import CacheIndex, epoch_batches
    idx = CacheIndex(stores["train"])
    h, w = idx.input_hw
    size = (idx.padded_input[:, 2:] - idx.padded_input[:, :2]) * [w, h]     # what --min-roi-size compares
    side = size.min(1)
    largest = np.array([side[a:b].max() for a, b in zip(idx.roi_start[:-1], idx.roi_start[1:])])
    min_roi = float(np.median(largest[idx.images]))
    empty = {int(i): largest[i] < min_roi for i in idx.images}
    reads = [epoch_batches(idx.images, 1, 0, 1, r, 2) for r in (0, 1)]
    assert any(empty[a[0]] != empty[b[0]] for a, b in zip(*reads)), "the scenario needs uneven reads"
    out = tmp_path / "ddp"
    p = torchrun(2, "train", "--train-store", stores["train"], "--val-store", stores["val"], "--out", out,
                 "--analysis", stores["analysis"], "--epochs", "2", "--hidden", "16", "--roi-size", "7",
                 "--mask-size", "28", "--batch-size", "1", "--rois-per-step", "4", "--min-roi-size", min_roi,
                 "--workers", "0", "--device", "cpu", "--resident", "cpu", "--no-vis", "--coco-eval", timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    epochs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["replicas"].startswith("identical on 2 ranks") for m in epochs] == [True, True]
    # one process with the ranks' thread count and batches (oneDNN's conv results depend on the
    # thread count in the last bit, which can flip a pixel sitting exactly at a decision)
    import subprocess
    import sys

    from clikit import ROOT
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "evaluate", "--checkpoint", out / "last.pth",
                    "--coco-eval", "--batch-size", "1", "--json", tmp_path / "one.json"], check=True, cwd=ROOT,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=200)
    one = json.loads((tmp_path / "one.json").read_text())[0]
    last = epochs[-1]
    for k in ("mIoU", "instance_mIoU", "box_instance_mIoU"):
        assert last[k] == pytest.approx(one[k], abs=1e-9), k
    assert last["instances"] == one["instances"] == int(CacheIndex(stores["val"]).roi_start[-1])
    assert last["coco_mask_AP"]["AP"] == pytest.approx(one["coco_mask_AP"]["AP"], abs=1e-9)


# ---- round-2 review findings (issue 29), each on the CPU -------------------------------------------
def test_overwrite_under_torchrun_other_shards_take_the_stores_projection(synth, standin_onnx, tmp_path,
                                                                          monkeypatch):
    """``cache --overwrite --fine-channels`` under torchrun: rank 0 rebuilds the store and fits the
    PCA; the other ranks must take it from the new store, never refit (the store refuses any bit
    difference)."""
    from roiseg.data import cache, fine_projection
    from roiseg.data.cache import CacheConfig, complete_store_meta, run_cache
    cfg = CacheConfig(ann=synth["val"], images=synth["root"] / "images/val2017", onnx=standin_onnx,
                      out=tmp_path / "s.zarr", provider="cpu", fine_feature="input", fine_channels=2, limit=3)
    run_cache(cfg, progress=False)
    stored = complete_store_meta(cfg.out).source.fine_projection

    def no_fit(*a, **k):
        raise AssertionError("a shard other than 0 refitted the projection")
    monkeypatch.setattr(fine_projection, "fit_pca", no_fit)
    import dataclasses
    rank1 = dataclasses.replace(cfg, overwrite=True, shard=(1, 2))
    assert cache.choose_fine_projection(rank1, None, [], None) == stored
    with pytest.raises(AssertionError, match="refitted"):       # rank 0 of --overwrite does fit anew
        cache.choose_fine_projection(dataclasses.replace(rank1, shard=(0, 2)), None, [None] * 3, None)


def test_process_group_gets_the_long_timeout(monkeypatch):
    from datetime import timedelta

    from roiseg.training import distributed as D
    seen = {}
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    D.setup("cpu", 7.5)
    assert seen == {"backend": "gloo", "timeout": timedelta(minutes=7.5)}
    from roiseg.training.config import make_config
    assert make_config().dist_timeout == 120.0      # NCCL's own default (10 minutes) aborted slow resident loads


def test_resident_auto_reads_memavailable_not_memfree(tmp_path):
    from roiseg.loader.sources import available_ram
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24000000 kB\nMemFree:          500000 kB\nMemAvailable:   20000000 kB\n")
    assert available_ram(str(info)) == 20000000 * 1024      # the page cache a store's read left counts
    info.write_text("MemTotal: 1 kB\n")                     # no MemAvailable (old kernels): sysconf's figure
    assert available_ram(str(info)) > 0


@pytest.mark.parametrize("world,train,val,ok", [(2, 5, 3, True), (3, 2, 9, False), (4, 9, 3, False)])
def test_more_ranks_than_images_is_refused(world, train, val, ok):
    from roiseg.common.errors import RoisegError
    from roiseg.training.loop import check_ranks
    if ok:
        check_ranks(world, train, val)
    else:
        with pytest.raises(RoisegError, match=f"{world} ranks but only {train} training / {val} validation"):
            check_ranks(world, train, val)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_feature_norm_runs_in_fp32_under_autocast(dtype):
    from roiseg.modeling.decoders import FeatureNorm
    norm = FeatureNorm(3)
    norm.set([0.0, 1000.0, -5.0], [1e-6, 1e-3, 300.0])     # a near-dead channel, a large mean, a wide one
    x = torch.tensor([[[[1e-4]], [[1000.5]], [[60000.0]]]], dtype=torch.float16)
    ref = (x.double() - norm.mean.double()[:, None, None]) / norm.std.double()[:, None, None]
    with torch.autocast("cpu", dtype=dtype):
        y = norm(x)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert torch.allclose(y.double(), ref, rtol=1e-3)        # fp16 arithmetic would give inf / 0 here


def test_ranks_that_do_not_see_the_run_folder_are_refused(tmp_path, monkeypatch):
    from roiseg.common.errors import RoisegError
    from roiseg.common.files import claim_folder
    from roiseg.training import distributed as D
    info = D.DistInfo(rank=0, world=3)
    with claim_folder(tmp_path / "run") as claim:
        def gather(out, mine):            # rank 2 is on a node whose --out is another folder
            out[:] = [mine, mine, False]
        monkeypatch.setattr(D.dist, "all_gather_object", gather)
        with pytest.raises(RoisegError, match=r"rank\(s\) \[2\] do not see the run folder"):
            D.check_shared_folder(tmp_path / "run", claim.token, info)
        monkeypatch.setattr(D.dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), [mine] * 3))
        D.check_shared_folder(tmp_path / "run", claim.token, info)      # all see it: fine


def test_deterministic_switch_sets_cublas_workspace(monkeypatch):
    from roiseg.training import distributed as D
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        D.deterministic()
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_bfloat16_amp_trains_on_a_cpu(stores, tmp_path):
    from roiseg.training.config import make_config
    from roiseg.training.loop import Trainer
    cfg = make_config(train_store=str(stores["train"]), val_store=str(stores["val"]), out=str(tmp_path / "ck"),
                      analysis=str(stores["analysis"]), hidden=8, roi_size=7, mask_size=14, epochs=1, batch_size=4,
                      workers=0, resident="cpu", tensorboard=False, visualize=False, amp_dtype="bfloat16",
                      device="cpu")
    t = Trainer(cfg)
    assert t.run.amp and t.run.amp_dtype == "bfloat16" and t.scaler.is_enabled()
    hist = t.fit()
    assert np.isfinite(hist[-1]["loss"]) and t.scaler.get_scale() >= 1
    t.close()
