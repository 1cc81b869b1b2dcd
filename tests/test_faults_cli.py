"""Fault suite, part 4: the command line itself.  Usage errors exit 1 like every user error; export
validates before it replaces; resume takes its run's settings; messages say what the user can do."""
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from clikit import cli, succeeded, user_error
from roiseg.modeling.checkpoint import list_checkpoints, load_checkpoint


@pytest.mark.parametrize("args,msg", [
    (["train", "--model", "unet"], "'unet' is not one of"),
    (["cache", "--codec", "gzip"], "'gzip' is not one of"),
    (["cache", "--shard", "3"], "use I/N"),
    (["cache", "--shard", "4/2"], "0 <= I < N"),
    (["predict"], "Missing option '--source'"),
    (["train", "--no-such-option"], "No such option"),
    (["frobnicate"], "No such command"),
    (["evaluate", "--epoch", "x"], "'x' is not a valid integer"),
])
def test_usage_errors_exit_1(args, msg):
    user_error(cli(*args), msg)


def test_help_still_exits_0():
    assert succeeded(cli("--help")).output.startswith("Usage")
    succeeded(cli("train", "--help"))


class NotAllowed:
    """Any class outside torch's safe list: weights-only loading refuses it."""


def test_checkpoint_message_has_no_pytorch_advice(tmp_path):
    path = tmp_path / "weird.pth"
    torch.save({"model": NotAllowed()}, path)
    r = user_error(cli("export", "--checkpoint", path), "cannot load checkpoint", "weird.pth")
    assert "weights_only" not in r.output and "unless you" not in r.output.lower(), r.output
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    user_error(cli("evaluate", "--checkpoint", text), "not a checkpoint of this project")


# ---- export -----------------------------------------------------------------------------------
@pytest.fixture
def exported_copy(trained, tmp_path):
    ck = tmp_path / "model.pth"
    shutil.copyfile(trained / "best.pth", ck)
    succeeded(cli("export", "--checkpoint", ck))
    out = tmp_path / "model.decoder.onnx"
    return ck, out, out.read_bytes()


@pytest.mark.parametrize("opset", ["21", "22", "23", "25", "99", "15"])
def test_unsupported_opset_is_refused_before_anything_is_replaced(exported_copy, opset):
    ck, out, before = exported_copy
    user_error(cli("export", "--checkpoint", ck, "--opset", opset), "--opset")
    assert out.read_bytes() == before
    assert not [p for p in out.parent.iterdir() if ".tmp" in p.name]


def test_failed_parity_keeps_the_previous_export(exported_copy, monkeypatch):
    ck, out, before = exported_copy
    from roiseg.export import export as ex

    def broken(*a, **k):
        raise ex.ExportError("ONNX/PyTorch parity failed for N=5: max abs difference 0.3 > 0.001")
    monkeypatch.setattr(ex, "check_parity", broken)
    user_error(cli("export", "--checkpoint", ck), "parity failed", "kept")
    assert out.read_bytes() == before
    assert not [p for p in out.parent.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("which", ["missing", "other"])
def test_end_to_end_inputs_are_checked_before_any_work(exported_copy, tmp_path, which):
    ck, out, before = exported_copy
    onnx_path = tmp_path / "nope.onnx"
    if which == "other":
        from roiseg.data.standin import build_standin_extractor
        build_standin_extractor(onnx_path, channels=16, seed=5)
    r = user_error(cli("export", "--checkpoint", ck, "--end-to-end", "--onnx", onnx_path))
    assert ("not found" in r.output) if which == "missing" else ("not the extractor" in r.output), r.output
    assert "parity" not in r.output and "latency" not in r.output
    assert out.read_bytes() == before


def test_export_prints_no_tracer_warnings(trained, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        succeeded(cli("export", "--checkpoint", trained / "best.pth", "--out", tmp_path / "d.onnx"))
    noisy = [str(w.message)[:80] for w in caught if "onnx" in w.filename or "jit" in w.filename
             or "Tracer" in type(w.message).__name__]
    assert not noisy, noisy


# ---- train: resume and the analysis file ---------------------------------------------------------
def _train(stores, out, *extra):
    return cli("train", "--train-store", stores["train"], "--val-store", stores["val"], "--analysis",
               stores["analysis"], "--out", out, "--hidden", "8", "--roi-size", "7", "--mask-size", "14",
               "--batch-size", "4", "--workers", "0", "--no-vis", "--seed", "3", *extra)


def test_resume_takes_the_runs_settings(stores, tmp_path):
    out = tmp_path / "ck"
    succeeded(_train(stores, out, "--epochs", "1"))
    # nothing but the run folder: stores, model and recipe come from its args.yaml
    r = succeeded(cli("train", "--out", out, "--resume", "auto", "--epochs", "2"))
    assert [e for e, _ in list_checkpoints(out)] == [1, 2], r.output
    ck = load_checkpoint(list_checkpoints(out)[-1][1])
    assert ck.model_kwargs["hidden"] == 8 and ck.config["seed"] == 3
    assert ck.config["train_store"] == str(stores["train"])
    # a finished run says so and changes nothing
    files = sorted(p.name for p in out.iterdir())
    r = succeeded(cli("train", "--out", out, "--resume", "auto"))
    assert "nothing to do" in r.output and "has trained 2 epochs and is 2 long" in r.output, r.output
    assert sorted(p.name for p in out.iterdir()) == files


def test_missing_analysis_goes_to_the_run_folder_not_the_working_directory(stores, tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    r = cli("train", "--train-store", stores["train"], "--val-store", stores["val"], "--out", tmp_path / "ck",
            "--hidden", "8", "--roi-size", "7", "--mask-size", "14", "--batch-size", "4", "--workers", "0",
            "--no-vis", "--epochs", "1")
    succeeded(r)
    assert not (work / "data_analyze.json").exists()
    assert (tmp_path / "ck" / "data_analyze.json").is_file()
    assert f"saved as {tmp_path / 'ck' / 'data_analyze.json'}" in caplog.text
    ck = load_checkpoint(tmp_path / "ck" / "last.pth")
    assert ck.resolved["analysis"] == str(tmp_path / "ck" / "data_analyze.json")   # what the run used
    assert ck.config["analysis"] == "data_analyze.json"                              # what was asked


# ---- predict: EXIF and many boxes ------------------------------------------------------------------
def test_predict_applies_exif_orientation_when_asked(trained, synth, tmp_path):
    src = sorted((synth["root"] / "images/val2017").iterdir())[0]
    im = Image.open(src)
    exif = Image.Exif()
    exif[0x0112] = 6                          # "rotate 90 CW to display": a phone held upright
    d = tmp_path / "phone"
    d.mkdir()
    im.save(d / "IMG_0001.jpg", exif=exif)
    boxes = tmp_path / "b.json"
    boxes.write_text(json.dumps({"IMG_0001.jpg": [[0.2, 0.1, 0.8, 0.9]]}))
    for flag, size in (("--exif", (im.height, im.width)), ("--no-exif", (im.width, im.height))):
        out = tmp_path / f"o{flag}"
        succeeded(cli("predict", "--source", d, "--checkpoint", trained / "best.pth", "--boxes", boxes,
                      "--out", out, "--provider", "cpu", flag))
        assert Image.open(out / "IMG_0001.jpg").size == size, flag


def test_many_boxes_are_decoded_in_chunks_with_the_same_masks(trained, synth):
    from roiseg.inference.torch_decoder import predictor_from_checkpoint
    p = predictor_from_checkpoint(trained / "best.pth", provider="cpu")
    src = sorted((synth["root"] / "images/val2017").iterdir())[1]
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 0.6, (40, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.05, 0.4, (40, 2))], 1).clip(0, 1)
    whole = p.predict(src, boxes)
    p.max_rois_per_run = 7
    chunked = p.predict(src, boxes)
    assert len(whole.probs) == len(chunked.probs) == 40
    for a, b in zip(whole.probs, chunked.probs):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_errors_name_the_file_asked_for_not_a_temp_file(trained, tmp_path, monkeypatch):
    import errno
    import pathlib
    real = pathlib.Path.write_text

    def full(self, *a, **k):
        if ".tmp" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *a, **k)
    monkeypatch.setattr(pathlib.Path, "write_text", full)
    out = tmp_path / "metrics.json"
    r = user_error(cli("evaluate", "--checkpoint", trained / "best.pth", "--json", out), "disk full", str(out))
    assert ".tmp" not in r.output and not list(tmp_path.iterdir())
    from roiseg.common.files import user_facing_name
    assert user_facing_name("/s/features/3.0.0.0.0123456789abcdef0123456789abcdef.partial") == "/s/features/3.0.0.0"
