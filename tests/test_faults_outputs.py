"""Fault suite, part 2: outputs never replace inputs.  Every command resolves real paths before it
writes; an output that is an input (same path, hard link), lies inside an input folder, or (where it
is a folder) holds an input is refused with one message, and nothing the user pointed at changes."""
import json
import os
import shutil

import pytest

from clikit import cli, succeeded, user_error


def cache_args(synth, out, *extra, split="val"):
    return ["cache", "--ann", synth[split], "--images", synth["root"] / f"images/{split}2017", "--onnx",
            synth["onnx"], "--out", out, "--provider", "cpu", "--limit", "2", *extra]


@pytest.fixture
def synth_onnx(synth, standin_onnx):
    return {**synth, "onnx": standin_onnx}


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- cache ------------------------------------------------------------------------------------
def test_cache_overwrite_never_deletes_a_folder_that_is_not_a_store(synth_onnx, tmp_path):
    thesis = tmp_path / "thesis"
    (thesis / "chapter1").mkdir(parents=True)
    (thesis / "thesis.txt").write_text("four years")
    (thesis / "chapter1" / "notes.md").write_text("!")
    before = snapshot(thesis)
    user_error(cli(*cache_args(synth_onnx, thesis, "--overwrite")), "not a feature store", "thesis.txt")
    assert snapshot(thesis) == before
    # without --overwrite a non-empty folder that is not a store is refused too (no mixing)
    user_error(cli(*cache_args(synth_onnx, thesis)), "not a feature store")
    assert snapshot(thesis) == before


def test_cache_overwrite_replaces_a_real_store_and_an_interrupted_one(synth_onnx, tmp_path):
    out = tmp_path / "s.zarr"
    succeeded(cli(*cache_args(synth_onnx, out)))
    succeeded(cli(*cache_args(synth_onnx, out, "--overwrite")))
    assert (out / ".zattrs").is_file()
    # an empty folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    succeeded(cli(*cache_args(synth_onnx, empty)))
    # a store killed while being created (arrays, no metadata yet) can be overwritten
    broken = tmp_path / "broken.zarr"
    shutil.copytree(out, broken)
    attrs = json.loads((broken / ".zattrs").read_text())
    del attrs["metadata"]
    (broken / ".zattrs").write_text(json.dumps(attrs))
    succeeded(cli(*cache_args(synth_onnx, broken, "--overwrite")))


@pytest.mark.parametrize("where", ["images", "inside_images", "ann", "onnx", "holds_images"])
def test_cache_out_may_not_be_or_hold_an_input(synth_onnx, tmp_path, where):
    root = tmp_path / "proj"
    shutil.copytree(synth_onnx["root"], root)
    images = root / "images/val2017"
    ann = root / "annotations" / synth_onnx["val"].name
    onnx = tmp_path / "ext.onnx"
    shutil.copyfile(synth_onnx["onnx"], onnx)
    out = {"images": images, "inside_images": images / "store.zarr", "ann": ann, "onnx": onnx,
           "holds_images": root}[where]
    before = snapshot(root), onnx.read_bytes()
    r = cli("cache", "--ann", ann, "--images", images, "--onnx", onnx, "--out", out, "--provider", "cpu",
            "--limit", "2", "--overwrite")
    user_error(r, "the input")
    assert (snapshot(root), onnx.read_bytes()) == before


# ---- analyze ----------------------------------------------------------------------------------
def test_analyze_out_may_not_be_the_annotation_file(synth, tmp_path):
    ann = tmp_path / "a.json"
    shutil.copyfile(synth["val"], ann)
    before = ann.read_bytes()
    user_error(cli("analyze", "--ann", ann, "--out", ann, "--workers", "1"), "--out", "is the input --ann")
    assert ann.read_bytes() == before
    link = tmp_path / "hardlink.json"
    os.link(ann, link)
    user_error(cli("analyze", "--ann", ann, "--out", link, "--workers", "1"), "is the input --ann")
    assert ann.read_bytes() == before


# ---- predict ----------------------------------------------------------------------------------
def _photos(synth, tmp_path, n=2):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((synth["root"] / "images/val2017").iterdir())[:n]:
        shutil.copyfile(p, photos / p.name)
    return photos


@pytest.mark.parametrize("where", ["same", "inside", "holds_source_file"])
def test_predict_out_may_not_overwrite_the_source(trained, synth, tmp_path, where):
    photos = _photos(synth, tmp_path)
    before = snapshot(photos)
    source = photos / sorted(os.listdir(photos))[0] if where == "holds_source_file" else photos
    out = {"same": photos, "inside": photos / "out", "holds_source_file": photos}[where]
    r = cli("predict", "--source", source, "--checkpoint", trained / "best.pth", "--boxes", "gt", "--ann",
            synth["val"], "--out", out, "--provider", "cpu", "--device", "cpu")
    user_error(r, "--out", "the input --source")
    assert snapshot(photos) == before


def test_predict_out_may_not_hold_the_checkpoint(trained, synth, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    shutil.copyfile(trained / "best.pth", ck / "best.pth")
    before = snapshot(ck)
    r = cli("predict", "--source", synth["root"] / "images/val2017", "--checkpoint", ck / "best.pth", "--boxes", "gt",
            "--ann", synth["val"], "--out", ck, "--provider", "cpu", "--device", "cpu")
    user_error(r, "the input --checkpoint")
    assert snapshot(ck) == before


def test_predict_into_a_used_folder_starts_a_new_one(trained, synth, tmp_path):
    photos = _photos(synth, tmp_path, 1)
    out = tmp_path / "pred"
    args = ["predict", "--source", photos, "--checkpoint", trained / "best.pth", "--boxes", "gt", "--ann",
            synth["val"], "--out", out, "--provider", "cpu", "--device", "cpu"]
    succeeded(cli(*args))
    first = snapshot(out)
    r = succeeded(cli(*args))
    assert snapshot(out) == first
    assert (tmp_path / "pred2" / "predictions.json").is_file() and "pred2" in r.output


# ---- export -----------------------------------------------------------------------------------
def test_export_out_may_not_be_the_checkpoint(trained, tmp_path):
    ck = tmp_path / "model.pth"
    shutil.copyfile(trained / "best.pth", ck)
    before = ck.read_bytes()
    user_error(cli("export", "--checkpoint", ck, "--out", ck), "--out", "is the input --checkpoint")
    assert ck.read_bytes() == before
    link = tmp_path / "link.onnx"
    os.link(ck, link)
    user_error(cli("export", "--checkpoint", ck, "--out", link), "is the input --checkpoint")
    assert ck.read_bytes() == before


def test_export_end_to_end_may_not_replace_the_extractor(trained, standin_onnx, tmp_path):
    ext = tmp_path / "model.e2e.onnx"          # the name the joined graph of model.decoder.onnx gets
    shutil.copyfile(standin_onnx, ext)
    before = ext.read_bytes()
    r = cli("export", "--checkpoint", trained / "best.pth", "--out", tmp_path / "model.decoder.onnx",
            "--end-to-end", "--onnx", ext)
    user_error(r, "the end-to-end graph", "is the input --onnx")
    assert ext.read_bytes() == before and not (tmp_path / "model.decoder.onnx").exists()


# ---- evaluate, visualize, train -------------------------------------------------------------------
def test_evaluate_json_may_not_be_the_checkpoint(trained, tmp_path):
    ck = tmp_path / "c.pth"
    shutil.copyfile(trained / "best.pth", ck)
    before = ck.read_bytes()
    user_error(cli("evaluate", "--checkpoint", ck, "--json", ck), "--json", "is the input --checkpoint")
    assert ck.read_bytes() == before


def test_visualize_out_dir_may_not_be_the_image_folder(trained, synth, tmp_path):
    images = tmp_path / "val"
    shutil.copytree(synth["root"] / "images/val2017", images)
    before = snapshot(images)
    r = cli("visualize", "--checkpoint", trained / "best.pth", "--images", images, "--ann", synth["val"],
            "--out-dir", images, "--provider", "cpu")
    user_error(r, "--out-dir", "the input --images")
    assert snapshot(images) == before


@pytest.mark.parametrize("where", ["store", "inside_store"])
def test_train_out_may_not_be_a_store(stores, tmp_path, where):
    store = tmp_path / "train.zarr"
    shutil.copytree(stores["train"], store)
    before = snapshot(store)
    out = store if where == "store" else store / "ck"
    r = cli("train", "--train-store", store, "--val-store", stores["val"], "--analysis", stores["analysis"],
            "--out", out, "--epochs", "1", "--hidden", "8", "--roi-size", "7", "--mask-size", "14",
            "--batch-size", "4", "--workers", "0", "--no-vis")
    user_error(r, "--out", "the input --train-store")
    assert snapshot(store) == before
