import os
import pickle
from pathlib import Path

import pytest

from roiseg.common.threads import configure_threads

configure_threads()  # before the test modules import torch


def _folder(tmp_path_factory, name: str):
    """A fresh folder for a session fixture, and where its result is kept between runs when
    ``ROISEG_TEST_DATA`` names a folder (bench/mutation.sh: thousands of short runs must not rebuild
    the stores each time; a fixture kept there is never written to by a test)."""
    keep = os.environ.get("ROISEG_TEST_DATA")
    if not keep:
        return tmp_path_factory.mktemp(name), None
    d = Path(keep) / name
    return d, d / "fixture.pkl"


def _kept(tmp_path_factory, name: str, build):
    d, memo = _folder(tmp_path_factory, name)
    if memo is not None and memo.is_file():
        return pickle.loads(memo.read_bytes())
    d.mkdir(parents=True, exist_ok=True)
    value = build(d)
    if memo is not None:
        memo.write_bytes(pickle.dumps(value))
    return value


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """Small synthetic COCO person dataset (train 24 / val 8 images)."""
    from roiseg.data.synthetic import make_synthetic_dataset
    return _kept(tmp_path_factory, "synth", lambda d: make_synthetic_dataset(d, n_train=24, n_val=8, seed=1))


@pytest.fixture(scope="session")
def standin_onnx(tmp_path_factory):
    from roiseg.data.standin import build_standin_extractor
    return _kept(tmp_path_factory, "onnx", lambda d: build_standin_extractor(d / "standin.onnx", channels=16))


@pytest.fixture(scope="session")
def stores(synth, standin_onnx, tmp_path_factory):
    """Train/val feature caches of the synthetic data + data_analyze.json."""
    return _kept(tmp_path_factory, "stores", lambda d: _build_stores(d, synth, standin_onnx))


def _build_stores(d, synth, standin_onnx):
    from roiseg.common.files import write_json_atomic
    from roiseg.data.analyze import run_analyze
    from roiseg.data.cache import CacheConfig, run_cache
    out = {}
    for split in ("train", "val"):
        out[split] = d / f"{split}.zarr"
        run_cache(CacheConfig(ann=synth[split], images=synth["root"] / f"images/{split}2017",
                              onnx=standin_onnx, out=out[split], feature_name="/model.34/Concat_output_0",
                              provider="cpu", workers=2), progress=False)
    out["analysis"] = d / "data_analyze.json"
    write_json_atomic(out["analysis"], run_analyze(synth["train"], workers=1, progress=False))
    return out


@pytest.fixture(scope="session")
def trained(stores, tmp_path_factory):
    """One epoch of a tiny decoder on the synthetic stores (checkpoint folder)."""
    return _kept(tmp_path_factory, "ck", lambda d: _train(d, stores))


def _train(out, stores):
    from roiseg.inference.visualize import training_hooks
    from roiseg.training.config import make_config
    from roiseg.training.run import run_training
    cfg = make_config(train_store=str(stores["train"]), val_store=str(stores["val"]), out=str(out),
                      analysis=str(stores["analysis"]), hidden=16, roi_size=7, mask_size=28, epochs=1,
                      batch_size=4, workers=0, resident="cpu", tensorboard=False, visualize=True)
    run_training(cfg, training_hooks(cfg))      # as `cli.py train` runs it: with the validation PNG
    return out


@pytest.fixture
def target_everywhere():
    """A decoder that predicts 'target' on the whole ROI: what gets pasted is exactly the ROI's
    geometry (tests of paste-back and padding)."""
    import torch

    class TargetEverywhere(torch.nn.Module):
        num_classes = 3

        def forward(self, features, rois, with_scores=False):
            out = torch.zeros(len(rois), 3, 28, 28)
            out[:, 1] = 20.0
            return (out, None) if with_scores else out      # the decoder interface, no score head
    return TargetEverywhere()
