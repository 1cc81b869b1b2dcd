"""Fault suite, part 5 (hardening round 3): the demo and export never delete what the user keeps,
runs never share a folder, resume keeps its history, stores are complete, no option is silently
ignored, and a run that did nothing useful fails.  Every case asserts the exit code, the message,
and that every file the user pointed at is unchanged (sha256 before and after)."""
import errno
import hashlib
import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from clikit import cli, succeeded, user_error
from roiseg.common.files import LOCK_NAME, claim_folder, claim_fresh_folder, try_claim


def digest(*paths) -> dict:
    """sha256 of every file under ``paths`` (files or folders; lock files aside), by path."""
    out = {}
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for f in files:
            if f.name != LOCK_NAME:
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


class Unchanged:
    """``with Unchanged(a, b):`` every file under a and b has the same bytes afterwards."""

    def __init__(self, *paths):
        self.paths = [p for p in paths if p is not None]

    def __enter__(self):
        self.before = digest(*self.paths)
        assert self.before, "nothing to guard"
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            assert digest(*self.paths) == self.before


def cache_args(synth, onnx, out, *extra, split="val"):
    return ["cache", "--ann", synth[split], "--images", synth["root"] / f"images/{split}2017", "--onnx", onnx,
            "--out", out, "--provider", "cpu", *extra]


def train_args(stores, out, *extra):
    return ["train", "--train-store", stores["train"], "--val-store", stores["val"], "--analysis", stores["analysis"],
            "--out", out, "--hidden", "8", "--roi-size", "7", "--mask-size", "14", "--batch-size", "4",
            "--workers", "0", "--no-vis", "--no-tensorboard", "--resident", "cpu", *extra]


@pytest.fixture
def project(tmp_path, synth, standin_onnx):
    """A user's project folder: notes, data/, ext_extractor/ (the files a demo must never touch)."""
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    shutil.copytree(synth["root"] / "annotations", root / "data" / "annotations")
    (root / "ext_extractor").mkdir()
    shutil.copyfile(standin_onnx, root / "ext_extractor" / "model.onnx")
    (root / "notes.md").write_text("my notes")
    return root


# ---- 1. the demo owns only what it creates --------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["--fresh"]])
def test_demo_refuses_a_folder_it_did_not_create(project, extra):
    with Unchanged(project):
        r = user_error(cli("demo", "--dir", project, *extra), "holds files the demo did not create", "notes.md")
    assert "Traceback" not in r.output
    assert not (project / ".roiseg-demo").exists()


def test_demo_refuses_dot_inside_a_project(project, monkeypatch):
    monkeypatch.chdir(project)
    with Unchanged(project):
        user_error(cli("demo", "--dir", ".", "--fresh"), "holds files the demo did not create", "data")


def test_demo_refuses_a_file_as_its_folder(project):
    with Unchanged(project):
        user_error(cli("demo", "--dir", project / "notes.md"), "is a file, not a folder")


def test_demo_fresh_deletes_only_its_own_entries(tmp_path):
    from roiseg.demo import DEMO_ENTRIES, MARKER, claim_demo_folder
    folder = tmp_path / "demo"
    claim_demo_folder(folder, fresh=False).release()          # a new folder: marked as the demo's
    assert (folder / MARKER).is_file()
    for name in DEMO_ENTRIES[:4]:
        (folder / name).mkdir()
        (folder / name / "x").write_text("demo output")
    (folder / "my_notes.txt").write_text("added by the user")
    with Unchanged(folder / "my_notes.txt"):
        claim_demo_folder(folder, fresh=True).release()
    assert sorted(os.listdir(folder)) == sorted([MARKER, "my_notes.txt"])


def test_demo_folder_in_use_is_refused(tmp_path):
    folder = tmp_path / "demo"
    with claim_folder(folder):
        user_error(cli("demo", "--dir", folder), "in use by process", str(os.getpid()))


# ---- 2. export --out never replaces a file the checkpoint's run points at -------------------------
@pytest.fixture
def run_copy(stores, tmp_path):
    """A user's run: its own extractor, stores and analysis, and a 1-epoch checkpoint of them."""
    from roiseg.data.store import FeatureStore
    user = tmp_path / "user"
    user.mkdir()
    for k in ("train", "val"):
        shutil.copytree(stores[k], user / f"{k}.zarr")
    shutil.copyfile(stores["analysis"], user / "data_analyze.json")
    copy = {"train": user / "train.zarr", "val": user / "val.zarr", "analysis": user / "data_analyze.json"}
    succeeded(cli(*train_args(copy, user / "ck", "--epochs", "1")))
    ck = next((user / "ck").glob("checkpoint_epoch_0001_*.pth"))
    meta = FeatureStore(copy["train"]).meta
    return {**copy, "ck": ck, "onnx": Path(meta.source.onnx_path), "ann": Path(meta.annotation_path), "user": user}


@pytest.mark.parametrize("target", ["onnx", "onnx-absolute", "onnx-with-flag", "analysis", "train-store-file",
                                    "ann"])
def test_export_never_replaces_what_the_run_points_at(run_copy, target, monkeypatch):
    onnx = run_copy["onnx"]
    extra = []
    if target.startswith("onnx"):
        monkeypatch.chdir(onnx.parent)
        out = onnx.name if target == "onnx" else onnx
        if target == "onnx-with-flag":
            extra = ["--end-to-end", "--onnx", onnx]
    elif target == "train-store-file":
        out = run_copy["train"] / "decoder.onnx"
    else:
        out = run_copy[target]
    guarded = [onnx, run_copy["analysis"], run_copy["ann"], run_copy["ck"], run_copy["train"]]
    with Unchanged(*guarded):
        user_error(cli("export", "--checkpoint", run_copy["ck"], "--out", out, *extra),
                   "the outputs could replace what this command reads")


def test_visualize_and_evaluate_outputs_are_checked_too(run_copy):
    with Unchanged(run_copy["analysis"], run_copy["ck"]):
        user_error(cli("evaluate", "--checkpoint", run_copy["ck"], "--json", run_copy["analysis"]),
                   "the checkpoint's class-weight file")
        user_error(cli("visualize", "--checkpoint", run_copy["ck"], "--out-dir", run_copy["val"]),
                   "is the input the checkpoint's validation cache")


# ---- 3. two runs never share a folder -------------------------------------------------------------
def _claimer(base, barrier, queue):
    barrier.wait()
    claim = claim_fresh_folder((base / f"out{k}" for k in range(100)), lambda d: False)
    queue.put(str(claim.folder))
    barrier.wait()          # hold it until every process has claimed
    claim.release()


def test_folders_claimed_at_the_same_moment_are_distinct(tmp_path):
    ctx = mp.get_context("fork")
    n = 6
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(tmp_path, barrier, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=60) for _ in range(n))
    for p in procs:
        p.join(60)
    assert len(set(got)) == n, got


def test_a_killed_claimer_leaves_no_stale_lock(tmp_path):
    ctx = mp.get_context("fork")
    p = ctx.Process(target=lambda: (try_claim(tmp_path / "out"), os._exit(0)))   # dies holding it
    p.start()
    p.join(60)
    assert (tmp_path / "out" / LOCK_NAME).exists()        # the file stays, the kernel's lock went with it
    claim = try_claim(tmp_path / "out")
    assert claim is not None
    claim.release()


def test_train_next_to_a_running_train_takes_another_folder(stores, tmp_path):
    out = tmp_path / "ck"
    with claim_folder(out, "checkpoint folder"):       # another train holds it (no checkpoint yet)
        r = succeeded(cli(*train_args(stores, out, "--epochs", "1")))
    assert not list(out.glob("checkpoint_epoch_*.pth"))
    assert len(list((out / "run2").glob("checkpoint_epoch_0001_*.pth"))) == 1, r.output
    rows = (out / "run2" / "results.csv").read_text().splitlines()
    assert len(rows) == 2                               # header + one epoch: no other run's rows


def test_resume_of_a_run_another_process_trains_is_refused(stores, tmp_path):
    out = tmp_path / "ck"
    succeeded(cli(*train_args(stores, out, "--epochs", "1")))
    with claim_folder(out, "checkpoint folder"):
        with Unchanged(out):
            user_error(cli("train", "--out", out, "--resume", "auto", "--epochs", "2"), "is in use by process")


def test_predict_next_to_a_running_predict_takes_another_folder(trained, synth, tmp_path):
    out = tmp_path / "pred"
    with claim_folder(out):
        r = succeeded(cli("predict", "--source", synth["root"] / "images/val2017", "--checkpoint",
                          trained / "best.pth", "--out", out, "--boxes", "gt", "--ann", synth["val"],
                          "--no-overlays", "--device", "cpu", "--provider", "cpu"))
    assert os.listdir(out) == [LOCK_NAME] or not os.listdir(out)
    assert (tmp_path / "pred2" / "predictions.json").is_file(), r.output


# ---- 4. train refuses an incomplete store ---------------------------------------------------------
@pytest.mark.parametrize("array,which", [("features", "train"), ("masks", "train"), ("gt_rle", "val")])
def test_train_refuses_a_store_with_a_missing_chunk(stores, tmp_path, array, which):
    copy = {k: tmp_path / f"{k}.zarr" for k in ("train", "val")}
    for k in copy:
        shutil.copytree(stores[k], copy[k])
    copy["analysis"] = stores["analysis"]
    victim = next(p for p in sorted((copy[which] / array).iterdir()) if p.name[0].isdigit())
    victim.unlink()
    with Unchanged(copy["train"], copy["val"]):
        r = user_error(cli(*train_args(copy, tmp_path / "ck", "--epochs", "1")), "not completely cached",
                       f"({array})", "--allow-partial", "--verify")
    assert "1 of" in r.output
    assert not (tmp_path / "ck").exists()            # nothing was written


def test_allow_partial_trains_on_the_complete_images(stores, tmp_path, caplog):
    copy = {"train": tmp_path / "train.zarr", "val": stores["val"], "analysis": stores["analysis"]}
    shutil.copytree(stores["train"], copy["train"])
    next(p for p in sorted((copy["train"] / "features").iterdir()) if p.name[0].isdigit()).unlink()
    succeeded(cli(*train_args(copy, tmp_path / "ck", "--epochs", "1", "--allow-partial")))
    assert "--allow-partial: using the other" in caplog.text


# ---- 5. resume continues the run's own history ----------------------------------------------------
@pytest.fixture
def two_epochs(stores, tmp_path):
    out = tmp_path / "ck"
    succeeded(cli(*train_args(stores, out, "--epochs", "2")))
    return out


@pytest.mark.parametrize("extra", [["--epochs", "3"], ["--epochs", "3", "--lr", "5e-4"], []])
def test_resume_of_an_older_checkpoint_in_place_is_refused(two_epochs, extra):
    first = next(two_epochs.glob("checkpoint_epoch_0001_*.pth"))
    with Unchanged(two_epochs):
        user_error(cli("train", "--resume", first, *extra), "is epoch 1, but the run in", "has reached epoch 2",
                   "--out NEW_FOLDER")


def test_resume_of_an_older_checkpoint_elsewhere_branches(two_epochs, tmp_path):
    first = next(two_epochs.glob("checkpoint_epoch_0001_*.pth"))
    branch = tmp_path / "branch"
    with Unchanged(two_epochs):
        succeeded(cli("train", "--resume", first, "--out", branch, "--epochs", "2", "--lr", "5e-4"))
    epochs = [json.loads(line)["epoch"] for line in (branch / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]                            # epoch 1 inherited, epoch 2 trained here
    assert [p.name[:22] for p in sorted(branch.glob("checkpoint_epoch_*.pth"))] == ["checkpoint_epoch_0002_"]
    assert len((branch / "results.csv").read_text().splitlines()) == 3
    import yaml
    assert yaml.safe_load((branch / "args.yaml").read_text())["lr"] == 5e-4
    assert yaml.safe_load((two_epochs / "args.yaml").read_text())["lr"] == 1e-3


def test_evaluate_after_a_refused_resume_still_finds_one_checkpoint_per_epoch(two_epochs):
    first = next(two_epochs.glob("checkpoint_epoch_0001_*.pth"))
    user_error(cli("train", "--resume", first, "--epochs", "3"), "has reached epoch 2")
    assert len(list(two_epochs.glob("checkpoint_epoch_0002_*.pth"))) == 1


# ---- 6. no tracebacks: devices, sizes, damaged stores, files without categories ---------------------
@pytest.mark.parametrize("device,msg", [("cuda", "sees no CUDA GPU"), ("cuda:3", "sees no CUDA GPU"),
                                        ("tpu", "not a device this program runs on")])
@pytest.mark.parametrize("command", ["train", "predict", "evaluate", "demo"])
def test_devices_that_do_not_exist_here_are_errors(command, device, msg, stores, trained, synth, tmp_path):
    import torch
    if torch.cuda.is_available() and device != "tpu":
        pytest.skip("this machine has a GPU")
    args = {"train": train_args(stores, tmp_path / "ck", "--epochs", "1"),
            "predict": ["predict", "--source", synth["root"] / "images/val2017", "--checkpoint", trained / "best.pth",
                        "--out", tmp_path / "p", "--provider", "cpu"],
            "evaluate": ["evaluate", "--checkpoint", trained / "best.pth"],
            "demo": ["demo", "--dir", tmp_path / "demo"]}[command]
    with Unchanged(trained, stores["train"]):
        user_error(cli(*args, "--device", device), f"--device {device}", msg)
    assert not any((tmp_path / d).exists() for d in ("ck", "p", "demo"))


def test_exported_graph_with_a_device_is_an_error(trained, synth, tmp_path):
    user_error(cli("predict", "--source", synth["root"] / "images/val2017", "--exported", tmp_path / "x.onnx",
                   "--device", "cpu", "--out", tmp_path / "p"), "--device is the PyTorch decoder's device")


@pytest.mark.parametrize("mask,roi", [("57", "14"), ("30", "7"), ("7", "14")])
def test_mask_size_not_a_power_of_2_of_the_roi_is_refused_before_anything_is_written(stores, tmp_path, mask, roi,
                                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a if a not in ("14", "7") else a for a in train_args(stores, tmp_path / "ck", "--epochs", "1")]
    args[args.index("--mask-size") + 1], args[args.index("--roi-size") + 1] = mask, roi
    args[args.index("--analysis") + 1] = tmp_path / "data_analyze.json"      # missing: would be computed
    with Unchanged(stores["train"]):
        user_error(cli(*args), f"mask_size: {mask} must be --roi-size {roi} x a power of 2")
    assert os.listdir(tmp_path) == []                # no run folder, no data_analyze.json


def test_cache_on_a_store_with_damaged_attributes(synth, standin_onnx, tmp_path):
    out = tmp_path / "s.zarr"
    succeeded(cli(*cache_args(synth, standin_onnx, out, "--limit", "2")))
    (out / ".zattrs").write_text((out / ".zattrs").read_text()[:40])
    with Unchanged(out):
        user_error(cli(*cache_args(synth, standin_onnx, out, "--limit", "2")), ".zattrs is damaged", "--overwrite")


@pytest.mark.parametrize("command", ["cache", "analyze"])
@pytest.mark.parametrize("categories,msgs", [(None, ["no 'categories' list"]),
                                             ([{"id": 1, "name": "dog"}], ["no category named 'person'", "dog"]),
                                             ([{"id": 1, "name": "cat"}, {"id": 2, "name": "car"}],
                                              ["no category named 'person'", "car, cat"])])
def test_annotation_files_without_a_person_category_are_refused(synth, standin_onnx, tmp_path, command,
                                                                categories, msgs):
    data = json.loads(Path(synth["val"]).read_text())
    if categories is None:
        del data["categories"]
    else:
        data["categories"] = categories
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    args = (["analyze", "--ann", ann, "--out", tmp_path / "a.json", "--workers", "1"] if command == "analyze" else
            ["cache", "--ann", ann, "--images", synth["root"] / "images/val2017", "--onnx", standin_onnx,
             "--out", tmp_path / "s.zarr", "--provider", "cpu"])
    with Unchanged(ann):
        user_error(cli(*args), *msgs)
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "a.json").exists()


# ---- 7. no option ignored, no failure reported as success ------------------------------------------
@pytest.mark.parametrize("extra,msg", [(["--fine-channels", "8"], "--fine-channels reduces the fine map"),
                                       (["--fine-projection-from", "x.zarr"], "--fine-projection-from reduces")])
def test_fine_options_without_a_fine_feature_are_errors(synth, standin_onnx, tmp_path, extra, msg):
    user_error(cli(*cache_args(synth, standin_onnx, tmp_path / "s.zarr", *extra)), msg, "--fine-feature")
    assert not (tmp_path / "s.zarr").exists()


def test_fine_channels_other_than_the_stores_are_refused(synth, standin_onnx, tmp_path):
    out = tmp_path / "s.zarr"
    fine = ["--fine-feature", "input", "--limit", "3"]
    succeeded(cli(*cache_args(synth, standin_onnx, out, *fine, "--fine-channels", "2")))
    with Unchanged(out):
        user_error(cli(*cache_args(synth, standin_onnx, out, *fine, "--fine-channels", "1")),
                   "was built with --fine-channels 2, asked for 1")
        user_error(cli(*cache_args(synth, standin_onnx, out, *fine)), "other settings")   # left out: refused too
    succeeded(cli(*cache_args(synth, standin_onnx, out, *fine, "--fine-channels", "2")))   # the same: fine


def _resized_images(synth, tmp_path):
    d = tmp_path / "small"
    d.mkdir()
    for p in (synth["root"] / "images/val2017").iterdir():
        Image.open(p).resize((17, 13)).save(d / p.name)
    return d


@pytest.mark.parametrize("why", ["empty folder", "sizes", "max-pixels"])
def test_cache_that_caches_no_image_fails_and_leaves_no_store(synth, standin_onnx, tmp_path, why):
    images = synth["root"] / "images/val2017"
    extra = []
    if why == "empty folder":
        images = tmp_path / "empty"
        images.mkdir()
    elif why == "sizes":
        images = _resized_images(synth, tmp_path)
    else:
        extra = ["--max-pixels", "10"]
    out = tmp_path / "s.zarr"
    args = ["cache", "--ann", synth["val"], "--images", images, "--onnx", standin_onnx, "--out", out,
            "--provider", "cpu", *extra]
    with Unchanged(synth["val"]):
        r = user_error(cli(*args), "no image could be cached", "the empty store was removed")
    assert "First reasons" in r.output and not out.exists()


def test_train_warns_when_validating_on_its_training_images(stores, tmp_path, caplog):
    copy = {"train": stores["train"], "val": stores["train"], "analysis": stores["analysis"]}
    succeeded(cli(*train_args(copy, tmp_path / "ck", "--epochs", "1")))
    assert "validating on" in caplog.text and "the training images" in caplog.text


# ---- 8. messages that say what is true -------------------------------------------------------------
def test_disk_estimate_of_a_small_store_is_in_a_unit_that_shows_it(tmp_path, capsys, monkeypatch):
    import numpy as np

    from roiseg.common.errors import RoisegError
    from roiseg.data import cache
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 6, 0, 40_000))
    with pytest.raises(RoisegError) as exc:
        cache.check_disk(tmp_path, np.ones((12, 1)), [(8, 80, 80)], (640, 640), 20, True)
    text = capsys.readouterr().out + str(exc.value)
    assert "0.0 GB" not in text and "KB" in text and "MB" in text, text


@pytest.mark.parametrize("command", ["export", "evaluate", "visualize", "train-resume"])
@pytest.mark.parametrize("kind,msg", [("onnx", "it is an ONNX model"), ("json", "it is a JSON file")])
def test_onnx_or_json_given_as_a_checkpoint_is_named(command, kind, msg, standin_onnx, stores, tmp_path):
    path = standin_onnx if kind == "onnx" else stores["analysis"]
    args = ["train", "--resume", path] if command == "train-resume" else [command, "--checkpoint", path]
    with Unchanged(path):
        r = user_error(cli(*args), "is not a checkpoint of this project", msg)
    assert "could run code" not in r.output


def test_overwrite_through_a_link_names_the_link_and_keeps_the_store(synth, standin_onnx, tmp_path):
    store = tmp_path / "real.zarr"
    succeeded(cli(*cache_args(synth, standin_onnx, store, "--limit", "2")))
    link = tmp_path / "link.zarr"
    link.symlink_to(store)
    with Unchanged(store):
        user_error(cli(*cache_args(synth, standin_onnx, link, "--limit", "2", "--overwrite")),
                   f"--out {link} is a symbolic link", str(store))


def test_predict_on_a_full_disk_says_where_the_part_is_and_where_a_rerun_goes(trained, synth, tmp_path,
                                                                              monkeypatch):
    from roiseg.runtime import predict as P
    real = P.Outputs.add
    calls = []

    def add(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.out / "x.jpg"))
        return real(self, *a, **k)
    monkeypatch.setattr(P.Outputs, "add", add)
    out = tmp_path / "pred"
    with Unchanged(trained / "best.pth", synth["val"]):
        r = user_error(cli("predict", "--source", synth["root"] / "images/val2017", "--checkpoint",
                           trained / "best.pth", "--out", out, "--boxes", "gt", "--ann", synth["val"],
                           "--device", "cpu", "--provider", "cpu"),
                       f"disk full while writing into {out}", "the 2 image(s) done before it are there",
                       "writes to a new folder next to it")
    assert "re-run the same command" not in r.output
    assert len(json.loads((out / "predictions.json").read_text())) > 0


# ---- 7b. an option that would do nothing in the given combination is an error ---------------------
@pytest.mark.parametrize("extra,config,msg", [
    ([], "score_weight = 2", "score_weight: it weighs the score head's loss"),
    (["--epochs", "2", "--min-steps", "50"], "", "min_steps: it sizes auto epochs"),
    (["--hflip", "0"], 'hflip_source = "map"', "hflip_source: it picks the mirrored features"),
    (["--vis-images", "a.jpg"], "", "vis_images: it sets the validation PNG"),
    (["--dice-weight", "0"], "dice_classes = [1, 2]", "dice_classes: Dice is off"),
    (["--fine-width", "16"], "", "--fine-width sizes the fine path, but"),
    (["--model", "prior", "--hidden", "16"], "", "hidden: the prior has no layers to size"),
    (["--model", "prior", "--roi-size", "7"], "", "roi_size: --model prior reads no ROI grid"),
    (["--model", "prior"], "zero_features = true", "zero_features: the prior reads no features"),
    (["--model", "global", "--roi-size", "7"], "", "roi_size: --model global reads no ROI grid"),
    (["--workers", "3"], "", "workers: they stream the store, and --resident cpu keeps it in memory"),
    (["--class-weights", "none"], "", "analysis: it gives the class weights, and --class-weights is none"),
    (["--jitter", "0", "--jitter-scale", "0", "--max-jitter", "0.1"], "", "max_jitter: it bounds the box jitter"),
])
def test_train_options_that_would_do_nothing_are_errors(stores, tmp_path, extra, config, msg):
    args = train_args(stores, tmp_path / "ck", *extra)
    drop = {"prior": ("--hidden", "--roi-size"), "global": ("--roi-size",)}.get(
        extra[extra.index("--model") + 1] if "--model" in extra else "", ())
    for flag in drop:              # train_args' own sizes, which these models would not use
        k = args.index(flag)
        args = args[:k] + args[k + 2:]
    if config:
        (tmp_path / "c.toml").write_text(config + "\n")
        args += ["--config", tmp_path / "c.toml"]
    with Unchanged(stores["train"], stores["analysis"]):
        user_error(cli(*args), msg)
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("args,msg", [
    (["--boxes", "gt", "--conf", "0.1"], "--conf: they set the extractor's own detections"),
    (["--boxes", "gt", "--det-format", "yolox"], "--det-format: they set the extractor's own detections"),
    (["--box-format", "cxcywh"], "--box-format: it reads normalized boxes of a --boxes FILE only"),
    (["--no-overlays", "--hide-scores"], "--hide-scores: they change the overlays"),
    (["--max-frames", "3"], "--max-frames: it limits a video or camera"),
])
def test_predict_options_that_would_do_nothing_are_errors(trained, synth, tmp_path, args, msg):
    user_error(cli("predict", "--source", synth["root"] / "images/val2017", "--checkpoint", trained / "best.pth",
                   "--out", tmp_path / "p", "--ann", synth["val"], *args), msg)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("args,msg", [
    (["export", "--onnx", "x.onnx"], "--onnx: the extractor is part of the end-to-end graph only"),
    (["evaluate", "--limit", "3"], "--limit: they build a temporary store from --ann/--images"),
    (["evaluate", "--val-store", "v.zarr", "--ann", "a.json", "--images", "i"], "--val-store or --ann"),
])
def test_export_and_evaluate_options_that_would_do_nothing_are_errors(trained, args, msg):
    with Unchanged(trained / "best.pth"):
        user_error(cli(*args[:1], "--checkpoint", trained / "best.pth", *args[1:]), msg)


def test_sparse_margin_without_sparse_is_an_error(synth, standin_onnx, tmp_path):
    user_error(cli(*cache_args(synth, standin_onnx, tmp_path / "s.zarr", "--sparse-margin", "0.3")),
               "--sparse-margin sets what a ROI-sparse store keeps: it needs --sparse")


# ---- a second probe of the same kinds: links, own-kind outputs, damaged stores, paths of the wrong kind
def test_demo_never_writes_through_a_link_in_its_own_folder(project, tmp_path):
    from roiseg.demo import claim_demo_folder
    folder = tmp_path / "demo"
    claim_demo_folder(folder, fresh=False).release()
    (folder / "data").symlink_to(project / "data")           # the user's data, linked into the demo folder
    with Unchanged(project):
        user_error(cli("demo", "--dir", folder, "--epochs", "1"), "holds links the demo did not make", "data")
        claim_demo_folder(folder, fresh=True).release()       # --fresh removes the link, not what it points at
    assert not (folder / "data").exists()


@pytest.mark.parametrize("target", ["extractor", "checkpoint", "store-attributes", "annotations"])
def test_analyze_replaces_only_an_earlier_analysis(run_copy, synth, target):
    out = {"extractor": run_copy["onnx"], "checkpoint": run_copy["ck"], "annotations": run_copy["user"] / "notes.json",
           "store-attributes": run_copy["train"] / ".zattrs"}[target]
    if target == "annotations":
        out.write_text(json.dumps({"images": [], "annotations": []}))
    with Unchanged(out):
        user_error(cli("analyze", "--ann", synth["val"], "--out", out, "--workers", "1"),
                   "exists and is not a data_analyze.json that analyze wrote")
    succeeded(cli("analyze", "--ann", synth["val"], "--out", run_copy["analysis"], "--workers", "1"))  # its own kind


@pytest.mark.parametrize("target", ["last.pth", "args.yaml", "metrics.jsonl", "folder"])
def test_evaluate_json_replaces_only_an_earlier_evaluation(run_copy, target):
    ck = run_copy["ck"]
    out = ck.parent if target == "folder" else ck.parent / target
    with Unchanged(ck.parent):
        user_error(cli("evaluate", "--checkpoint", ck, "--json", out), "--json", str(out))


def test_evaluate_json_into_a_new_folder_and_over_its_own(run_copy, tmp_path):
    out = tmp_path / "new" / "dir" / "m.json"
    succeeded(cli("evaluate", "--checkpoint", run_copy["ck"], "--json", out))
    succeeded(cli("evaluate", "--checkpoint", run_copy["ck"], "--json", out))      # its own output: replaced
    assert json.loads(out.read_text())[0]["checkpoint"] == str(run_copy["ck"])


@pytest.mark.parametrize("target", ["args.yaml", "notes"])
def test_export_replaces_only_an_earlier_export(run_copy, target):
    out = run_copy["ck"].parent / "args.yaml" if target == "args.yaml" else run_copy["user"] / "notes.txt"
    if target == "notes":
        out.write_text("mine")
    with Unchanged(out):
        user_error(cli("export", "--checkpoint", run_copy["ck"], "--out", out),
                   "exists and is not an ONNX graph `cli.py export` wrote")


@pytest.mark.parametrize("damage", ["features/.zarray", ".zgroup"])
@pytest.mark.parametrize("command", ["cache", "cache-verify", "evaluate"])
def test_a_store_without_its_structure_is_one_message_and_keeps_its_chunks(run_copy, synth, standin_onnx, damage,
                                                                          command):
    store = run_copy["val"]
    (store / damage).unlink()
    before = digest(store)
    args = {"cache": cache_args(synth, standin_onnx, store), "cache-verify": cache_args(synth, standin_onnx, store,
                                                                                        "--verify"),
            "evaluate": ["evaluate", "--checkpoint", run_copy["ck"], "--val-store", store]}[command]
    user_error(cli(*args), str(store))
    assert digest(store) == before                           # no chunk deleted ("redone") on the way


@pytest.mark.parametrize("held,asked", [("shared", ["--overwrite"]), ("exclusive", [])])
def test_a_store_being_written_is_never_deleted_under_its_writer(synth, standin_onnx, tmp_path, held, asked):
    import fcntl
    out = tmp_path / "s.zarr"
    succeeded(cli(*cache_args(synth, standin_onnx, out, "--limit", "2")))
    lock = os.open(tmp_path / ".s.zarr.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_SH if held == "shared" else fcntl.LOCK_EX)   # another cache at work
    try:
        with Unchanged(out):
            user_error(cli(*cache_args(synth, standin_onnx, out, "--limit", "2", *asked)), "by another `cache`")
    finally:
        os.close(lock)
    succeeded(cli(*cache_args(synth, standin_onnx, out, "--limit", "2", "--overwrite")))   # free again


@pytest.mark.parametrize("command", ["predict", "export", "visualize"])
def test_checkpoint_and_epoch_together_are_an_error(trained, synth, tmp_path, command):
    extra = {"predict": ["--source", synth["root"] / "images/val2017", "--out", tmp_path / "p"],
             "export": ["--out", tmp_path / "d.onnx"], "visualize": ["--out-dir", tmp_path / "v"]}[command]
    user_error(cli(command, "--checkpoint", trained / "best.pth", "--epoch", "1", "--checkpoints", trained, *extra),
               "give --checkpoint or --epoch, not both")


def test_cache_batch_with_a_fixed_batch_model_is_an_error(synth, standin_onnx, tmp_path):
    user_error(cli(*cache_args(synth, standin_onnx, tmp_path / "s.zarr", "--batch", "4")),
               "--batch 4", "fixed batch size")
    assert not (tmp_path / "s.zarr").exists()


def test_branching_a_checkpoint_past_the_runs_length_is_refused_before_any_folder(two_epochs, tmp_path):
    last = next(two_epochs.glob("checkpoint_epoch_0002_*.pth"))
    user_error(cli("train", "--resume", last, "--out", tmp_path / "b", "--epochs", "1"),
               "is epoch 2 and the run is 1 epochs long", "--epochs above 2")
    assert not (tmp_path / "b").exists()


def test_resume_auto_refuses_when_the_newest_checkpoints_are_gone(two_epochs):
    for p in two_epochs.glob("checkpoint_epoch_0002_*.pth"):
        p.unlink()
    (two_epochs / "last.pth").write_bytes(b"")
    with Unchanged(two_epochs):
        user_error(cli("train", "--out", two_epochs, "--resume", "auto", "--epochs", "3"),
                   "recorded epoch 2, but its newest checkpoint is epoch 1", "--out NEW_FOLDER")


def test_nothing_to_do_says_the_runs_own_numbers(two_epochs):
    r = succeeded(cli("train", "--out", two_epochs, "--resume", "auto", "--epochs", "1"))
    assert "has trained 2 epochs and is 1 long" in r.output, r.output


def test_evaluate_from_another_folder_never_scores_another_dataset(stores, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for k in ("train", "val"):
        shutil.copytree(stores[k], a / f"{k}.zarr")
    shutil.copytree(stores["train"], b / "val.zarr")             # another dataset under the same relative name
    monkeypatch.chdir(a)
    rel = {"train": Path("train.zarr"), "val": Path("val.zarr"), "analysis": stores["analysis"]}
    succeeded(cli(*train_args(rel, "ck", "--epochs", "1")))
    monkeypatch.chdir(b)
    user_error(cli("evaluate", "--checkpoint", a / "ck" / "best.pth"),
               "is not the validation store this checkpoint was validated on", "--val-store")


def test_evaluate_on_a_partial_store_names_only_what_evaluate_can_do(run_copy):
    next(p for p in sorted((run_copy["val"] / "gt_rle").iterdir()) if p.name[0].isdigit()).unlink()
    r = user_error(cli("evaluate", "--checkpoint", run_copy["ck"]), "not completely cached", "--verify")
    assert "--allow-partial" not in r.output


@pytest.mark.parametrize("case,msg", [
    ("checkpoint-folder", "is a folder: pass a checkpoint file in it"),
    ("text-checkpoint", "it is a text file"),
    ("val-store-file", "is a file, not a feature store"),
    ("analysis-onnx", "not a text file"),
    ("images-file", "is a file: give the folder"),
    ("ann-folder", "is a folder: give the file"),
    ("onnx-json", "is not an ONNX model: it is a JSON file"),
    ("source-text", "is not an image file"),
    ("out-file", "is a file: give a folder"),
])
def test_paths_of_the_wrong_kind_say_what_they_are(case, msg, trained, stores, synth, standin_onnx, tmp_path):
    notes = tmp_path / "README.md"
    notes.write_text("# notes\n")
    val_images = synth["root"] / "images/val2017"
    args = {"checkpoint-folder": ["evaluate", "--checkpoint", trained],
            "text-checkpoint": ["export", "--checkpoint", notes],
            "val-store-file": ["evaluate", "--checkpoint", trained / "best.pth", "--val-store", stores["analysis"]],
            "analysis-onnx": train_args({**stores, "analysis": standin_onnx}, tmp_path / "ck", "--epochs", "1"),
            "images-file": cache_args(synth, standin_onnx, tmp_path / "s.zarr")[:-2],
            "ann-folder": ["cache", "--ann", val_images, "--images", val_images, "--onnx", standin_onnx, "--out",
                           tmp_path / "s.zarr", "--provider", "cpu"],
            "onnx-json": cache_args(synth, stores["analysis"], tmp_path / "s.zarr"),
            "source-text": ["predict", "--source", notes, "--checkpoint", trained / "best.pth", "--out", tmp_path / "p"],
            "out-file": ["predict", "--source", val_images, "--checkpoint", trained / "best.pth", "--out", notes,
                         "--boxes", "gt", "--ann", synth["val"]]}[case]
    if case == "images-file":
        args[args.index("--images") + 1] = synth["val"]
    with Unchanged(notes, standin_onnx, stores["analysis"]):
        r = user_error(cli(*args), msg)
    assert len(r.output) < 1500, r.output                      # a message, not a file's bytes


def test_predict_full_disk_before_any_image_says_so(trained, synth, tmp_path, monkeypatch):
    from roiseg.runtime import predict as P

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.out / "x.jpg"))
    monkeypatch.setattr(P.Outputs, "add", full)
    out = tmp_path / "pred"
    r = user_error(cli("predict", "--source", synth["root"] / "images/val2017", "--checkpoint", trained / "best.pth",
                       "--out", out, "--boxes", "gt", "--ann", synth["val"], "--device", "cpu", "--provider", "cpu"),
                   "no image was finished (nothing is kept there)")
    assert "delete" not in r.output and not out.exists()


def test_export_on_a_full_disk_names_the_file_and_replaces_nothing(trained, tmp_path, monkeypatch):
    import onnx
    out = tmp_path / "d.onnx"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(out))
    monkeypatch.setattr(onnx, "save", full)
    user_error(cli("export", "--checkpoint", trained / "best.pth", "--out", out),
               f"disk full while writing {out}", "nothing was written")
    assert not out.exists()


def test_a_zero_features_decoder_reads_zeros_in_predict_and_is_not_exported(stores, synth, tmp_path):
    """The no-feature ablation (zero_features in a config file) is scored as trained: predict with
    the annotated boxes equals evaluate (which zeroes the features), and export refuses it (the
    graph would read the real features)."""
    import numpy as np

    from roiseg.inference.evaluate import evaluate_checkpoint
    from roiseg.inference.torch_decoder import predictor_from_checkpoint
    from roiseg.runtime.decoding import DecoderInput
    (tmp_path / "c.toml").write_text("zero_features = true\n")
    succeeded(cli(*train_args(stores, tmp_path / "ck", "--epochs", "1", "--config", tmp_path / "c.toml")))
    ck = tmp_path / "ck" / "best.pth"
    decoder = predictor_from_checkpoint(ck, provider="cpu").decoder
    seen = []
    model = decoder.model
    decoder.model = lambda f, r, **k: seen.append(float(f.abs().max())) or model(f, r, **k)
    r = succeeded(cli("predict", "--source", synth["root"] / "images/val2017", "--checkpoint", ck, "--boxes", "gt",
                      "--ann", synth["val"], "--out", tmp_path / "p", "--provider", "cpu", "--no-overlays"))
    got = float(r.output.split("instance mIoU with the GT boxes: ")[1].split()[0])
    assert got == pytest.approx(evaluate_checkpoint(ck)["instance_mIoU"], abs=2e-3)
    decoder(DecoderInput(np.ones((1, 16, 80, 80), np.float32), np.array([[0.1, 0.1, 0.5, 0.5]]),
                         np.array([[0.05, 0.05, 0.55, 0.55]]), np.array([0, 0, 1, 1.0])))
    assert seen == [0.0]                          # ones in, zeros to the decoder
    user_error(cli("export", "--checkpoint", ck, "--out", tmp_path / "d.onnx"), "trained on zeroed features")
    assert not (tmp_path / "d.onnx").exists()
