"""Faults a user can cause: each ends in one message (exit code 1) and loses no earlier result."""
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from roiseg.cli import main
from roiseg.modeling.checkpoint import list_checkpoints, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    """The CLI in-process; whatever the outcome, never an unhandled exception (a traceback)."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), f"unhandled {r.exception!r}\n{r.output}"
    assert "Traceback" not in r.output, r.output
    return r


def train_args(stores, out, *extra):
    return ["train", "--train-store", stores["train"], "--val-store", stores["val"], "--analysis",
            stores["analysis"], "--out", out, "--hidden", "8", "--roi-size", "7", "--mask-size", "14",
            "--batch-size", "4", "--workers", "0", "--no-vis", *extra]


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_filter_store_is_refused_without_decoding(stores, tmp_path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(stores["val"], bad)
    proof = tmp_path / "code_ran"
    spec = json.loads((bad / "gt_rle" / ".zarray").read_text())
    spec["filters"] = [{"id": "pickle", "protocol": 5}]
    (bad / "gt_rle" / ".zarray").write_text(json.dumps(spec))
    for chunk in (bad / "gt_rle").iterdir():
        if chunk.name[0].isdigit():
            chunk.write_bytes(pickle.dumps(_Payload(str(proof))))
    args = train_args(stores, tmp_path / "ck", "--epochs", "1")
    args[args.index("--val-store") + 1] = bad
    r = run(*args)
    assert r.exit_code == 1, r.output
    assert "pickle" in r.output and "refusing to decode" in r.output and "Traceback" not in r.output
    assert not proof.exists()
    r = run("evaluate", "--checkpoint", tmp_path / "none.pth", "--val-store", bad)
    assert r.exit_code == 1 and not proof.exists()
    # a wrong shape is refused too
    spec = json.loads((stores["val"] / "features" / ".zarray").read_text())
    bad2 = tmp_path / "bad2.zarr"
    shutil.copytree(stores["val"], bad2)
    spec["shape"][1] = 3
    (bad2 / "features" / ".zarray").write_text(json.dumps(spec))
    from roiseg.data.store import FeatureStore
    with pytest.raises(Exception, match="shape"):
        FeatureStore(bad2)


def test_unwritable_checkpoint_folder_fails_before_epoch_1(stores, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = run(*train_args(stores, blocker / "ck", "--epochs", "1"))   # a real OS failure: parent is a file
    assert r.exit_code == 1 and "cannot write to the checkpoint folder" in r.output, r.output
    assert "epoch 1" not in r.output
    if os.getuid() != 0:   # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        r = run(*train_args(stores, ro, "--epochs", "1"))
        assert r.exit_code == 1 and "cannot write to the checkpoint folder" in r.output


def test_full_disk_while_saving_keeps_earlier_checkpoints(stores, tmp_path, monkeypatch):
    import torch
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:      # epoch 2: half a file, then the disk is full
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "ck"
    r = run(*train_args(stores, out, "--epochs", "2"))
    assert r.exit_code == 1 and "could not write checkpoint" in r.output and "No space left" in r.output
    assert "earlier checkpoints" in r.output
    assert [e for e, _ in list_checkpoints(out)] == [1]
    assert load_checkpoint(list_checkpoints(out)[0][1]).epoch == 1
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_export_on_full_disk_keeps_the_previous_onnx(trained, tmp_path, monkeypatch):
    out = tmp_path / "dec.onnx"
    ck = trained / "best.pth"
    assert run("export", "--checkpoint", ck, "--out", out).exit_code == 0
    before = out.read_bytes()
    import onnx

    def full(model, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"\x08\x07")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    monkeypatch.setattr(onnx, "save", full)
    r = run("export", "--checkpoint", ck, "--out", out)
    assert r.exit_code == 1 and "disk full" in r.output
    assert out.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("args,msg", [
    (["cache", "--limit", "0"], "limit: must be >= 1, got 0"),
    (["cache", "--limit", "-3"], "limit: must be >= 1, got -3"),
    (["cache", "--batch", "0"], "batch: must be >= 1"),
    (["cache", "--sparse-margin", "1.5"], "sparse_margin: must be >= 0 and < 1, got 1.5"),
    (["cache", "--roi-padding", "x"], "roi_padding: expected a number, got 'x'"),
    (["train", "--hflip", "2"], "hflip: must be >= 0 and <= 1, got 2.0"),
    (["train", "--epochs", "2.5"], "epochs: expected an integer, got '2.5'"),
    (["analyze", "--roi-padding", "1.5"], "--roi-padding must be in [0, 1)"),
    (["train", "--lr", "-1"], "lr: must be > 0"),
    (["train", "--epochs", "-2"], "epochs: must be >= 0"),
    (["train", "--ema", "1"], "ema: must be >= 0 and < 1"),
    (["train", "--samples-per-roi", "0"], "samples_per_roi: must be >= 1"),
    (["predict", "--source", ".", "--conf", "2"], "--conf must be in [0, 1]"),
])
def test_numeric_options_are_checked(args, msg, tmp_path):
    r = run(*args)
    assert r.exit_code == 1 and msg in r.output, r.output


@pytest.mark.parametrize("text,msg", [
    ("epochs: three\n", "epochs: expected an integer, got 'three'"),
    ("lr: [1, 2]\n", "lr: expected a number"),
    ("epochs: 2\n  bad: [indent\n", "cannot parse"),
    ("- 1\n- 2\n", "must hold a table"),
])
def test_bad_config_files(stores, tmp_path, text, msg):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    r = run(*train_args(stores, tmp_path / "ck"), "--config", cfg)
    assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output


def test_yaml_strings_are_converted():
    """YAML reads 1e-3 as a string: converted, not a crash later."""
    import tempfile

    from roiseg.training.config import load_config_file, make_config
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("lr: 1e-3\nepochs: '3'\nhflip: 0\namp: 'false'\n")
    cfg = make_config(f.name)
    assert cfg.lr == 1e-3 and cfg.epochs == 3 and cfg.hflip == 0.0 and cfg.amp is False
    assert load_config_file(f.name)["lr"] == "1e-3"
    os.unlink(f.name)


def test_analyze_refuses_files_without_persons(tmp_path):
    person = [{"id": 1, "name": "person"}]
    for body, msg in (({"images": [], "categories": person}, "no 'annotations' list"),
                      ({"annotations": [], "categories": person}, "no 'images' list"),
                      ({"images": [{"id": 1, "width": 8, "height": 8, "file_name": "a.jpg"}], "annotations": [],
                        "categories": [{"id": 1, "name": "person"}]}, "no usable person instances")):
        ann = tmp_path / "a.json"
        ann.write_text(json.dumps(body))
        out = tmp_path / "out.json"
        r = run("analyze", "--ann", ann, "--out", out, "--workers", "1")
        assert r.exit_code == 1 and msg in r.output, r.output
        assert not out.exists()


def test_analysis_of_another_dataset_is_refused(stores, synth, tmp_path):
    from roiseg.common.files import write_json_atomic
    from roiseg.data.analyze import run_analyze
    other = tmp_path / "other_analyze.json"
    write_json_atomic(other, run_analyze(synth["val"], workers=1, progress=False))   # val images only
    args = train_args(stores, tmp_path / "ck", "--epochs", "1")
    args[args.index("--analysis") + 1] = other
    r = run(*args)
    assert r.exit_code == 1 and "lacks" in r.output and "another dataset" in r.output, r.output
    assert not list(tmp_path.glob("ck/*.pth"))


def test_resume_with_another_training_cache_is_refused(stores, tmp_path):
    out = tmp_path / "ck"

    def no_weights(*extra):      # without class weights: no --analysis (it would do nothing)
        args = train_args(stores, out, *extra, "--class-weights", "none")
        k = args.index("--analysis")
        return args[:k] + args[k + 2:]
    assert run(*no_weights("--epochs", "1")).exit_code == 0
    args = no_weights("--epochs", "2", "--resume", "auto")
    args[args.index("--train-store") + 1] = stores["val"]       # same extractor, other images
    r = run(*args)
    assert r.exit_code == 1 and "another training set" in r.output, r.output
    assert [e for e, _ in list_checkpoints(out)] == [1]


def test_flipped_bit_and_empty_checkpoints_are_errors(trained, tmp_path):
    src = list_checkpoints(trained)[0][1]
    ck = load_checkpoint(src)
    raw = bytearray(src.read_bytes())
    w = next(v for k, v in ck.model.items() if v.numel() > 64 and v.dtype.is_floating_point)
    needle = w.flatten()[16:24].numpy().tobytes()
    at = bytes(raw).find(needle)
    assert at > 0
    raw[at + 2] ^= 0x04
    bad = tmp_path / "checkpoint_epoch_0001_640x640_0000.pth"
    bad.write_bytes(bytes(raw))
    for cmd in (["export", "--checkpoint", bad, "--out", tmp_path / "x.onnx"],
                ["visualize", "--checkpoint", bad, "--out-dir", tmp_path],
                ["evaluate", "--checkpoint", bad]):
        r = run(*cmd)
        assert r.exit_code == 1 and "is corrupted" in r.output, r.output
    assert not (tmp_path / "x.onnx").exists()
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    r = run("export", "--checkpoint", empty)
    assert r.exit_code == 1 and "empty (0 bytes)" in r.output


def test_lock_of_a_killed_cache_recovers(synth, standin_onnx, tmp_path):
    """kill -9 while creating a store leaves .create.lock: the next run sees its process is gone."""
    out = tmp_path / "s.zarr"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    (out / ".create.lock").write_text(f"pid {dead.pid} host {socket.gethostname()}\n")
    r = run("cache", "--ann", synth["val"], "--images", synth["root"] / "images/val2017", "--onnx", standin_onnx,
            "--out", out, "--provider", "cpu", "--limit", "2")
    assert r.exit_code == 0, r.output
    assert not (out / ".create.lock").exists()


def test_help_texts():
    r = run("cache", "--help")
    assert "i % N == I" in r.output and "%%" not in r.output


@pytest.mark.parametrize("command,schema", [("train", "roiseg.training.config:TrainConfig"),
                                            ("cache", "roiseg.data.cache_config:CacheConfig")])
def test_options_help_and_defaults_come_from_the_schema(command, schema):
    """Every schema field with an option is in --help with the schema's help and default, so a
    default changed in the schema changes --help, the config file and args.yaml together."""
    import importlib

    from roiseg.common.schema import specs
    mod, cls = schema.split(":")
    cls = getattr(importlib.import_module(mod), cls)
    text = " ".join(run(command, "--help").output.split())
    for spec in specs(cls).values():
        if spec.flag is None:
            continue
        help_text = " ".join(spec.help.split())
        after = text.split(spec.flag + " ", 1)[1] if spec.flag + " " in text else text.split(spec.flag, 1)[1]
        assert help_text in after[: len(help_text) + 80], (spec.name, after[:200])


def test_args_yaml_round_trips_through_the_schema():
    import yaml

    from roiseg.training.config import TrainConfig, make_config
    cfg = make_config(lr=2e-3, epochs=3, vis_images="a.jpg,b.jpg", classes="2", amp="false")
    assert (cfg.lr, cfg.epochs, cfg.vis_images, cfg.classes, cfg.amp) == (2e-3, 3, ["a.jpg", "b.jpg"], 2, False)
    again = make_config(base=yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg and TrainConfig() == make_config()


def test_fallback_images_logged_once_and_in_words(synth, caplog):
    import logging

    from roiseg.data.coco import load_person_records
    from roiseg.inference.visualize import choose_images
    recs, _ = load_person_records(synth["val"])
    kept = [r for r in recs if r.file_name != "000000020992.jpg"]     # the 1-person image is missing
    with caplog.at_level(logging.INFO):
        choose_images(kept)
        first = caplog.text
        caplog.clear()
        choose_images(kept, quiet=True)
    assert "000000020992.jpg is not in the val annotations" in first and "(1 persons)" not in first
    assert caplog.text == ""


def test_stride_16_tensor_is_warned(standin_onnx, tmp_path, caplog):
    import logging

    import onnx
    from onnx import helper

    from roiseg.data.extractor import Extractor
    from roiseg.data.standin import FEATURE_NAME
    m = onnx.load(str(standin_onnx))
    m.graph.node.append(helper.make_node("AveragePool", [FEATURE_NAME], ["/model.40/stride16"],
                                         kernel_shape=[2, 2], strides=[2, 2]))
    path = tmp_path / "s16.onnx"
    onnx.save(m, str(path))
    with caplog.at_level(logging.WARNING):
        ex = Extractor(path, "/model.40/stride16", "cpu")
    assert ex.feature_shape[1:] == (40, 40) and "stride 16" in caplog.text
