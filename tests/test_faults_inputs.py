"""Fault suite, part 3: inputs are validated once, when loaded.  Images of any bit depth or size,
box files, exported-decoder metadata and damaged stores give the right result or one message."""
import json
import shutil
import struct
import zlib

import numpy as np
import onnx
import pytest
from PIL import Image

from clikit import cli, succeeded, user_error
from roiseg.data.coco import load_person_records
from roiseg.data.images import ImageDecodeError, load_rgb


# ---- images -----------------------------------------------------------------------------------
def png_declaring(path, width, height):
    """A tiny PNG whose header declares ``width`` x ``height`` (the decompression-bomb check reads it)."""
    Image.new("L", (1, 1)).save(path, format="PNG")
    raw = bytearray(path.read_bytes())
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    raw[ihdr + 17: ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr: ihdr + 17])))
    path.write_bytes(bytes(raw))
    return path


def test_16_bit_and_float_images_are_read_by_their_range(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "gray16.png")
    got = np.asarray(load_rgb(tmp_path / "gray16.png")).astype(float)
    assert got.shape == (48, 64, 3)
    assert np.abs(got[..., 0] - ramp / 257.0).max() <= 1.0      # was nearly white: clipped at 255
    unit = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    Image.fromarray(unit, mode="F").save(tmp_path / "unit.tif")
    got = np.asarray(load_rgb(tmp_path / "unit.tif")).astype(float)
    assert np.abs(got[..., 1] - unit * 255).max() <= 1.0          # was black: 0-1 floats clipped
    wide = (unit * 4000 - 1000).astype(np.float32)                # any other range: min..max
    Image.fromarray(wide, mode="F").save(tmp_path / "wide.tif")
    got = np.asarray(load_rgb(tmp_path / "wide.tif")).astype(float)
    assert got.min() == 0 and got.max() == 255 and np.abs(got[..., 2] - unit * 255).max() <= 1.0


def test_decompression_bomb_is_a_per_image_skip(tmp_path):
    bomb = png_declaring(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(ImageDecodeError, match="400000000 pixels"):
        load_rgb(bomb)
    big = png_declaring(tmp_path / "big.png", 12000, 12000)       # over the default limit, under a raised one
    with pytest.raises(ImageDecodeError, match="144000000 pixels"):
        load_rgb(big)
    with pytest.raises(ImageDecodeError) as e:                     # allowed now; its 1-pixel data is truncated
        load_rgb(big, max_pixels=2 * 10 ** 8)
    assert "pixels" not in str(e.value)


@pytest.fixture
def mixed_folder(synth, tmp_path):
    """Two real images, one with a clashing stem, a bomb, a corrupt file and a 16-bit PNG."""
    d = tmp_path / "mixed"
    d.mkdir()
    names = sorted(p.name for p in (synth["root"] / "images/val2017").iterdir())[:2]
    for n in names:
        shutil.copyfile(synth["root"] / "images/val2017" / n, d / n)
    Image.open(d / names[0]).save(d / (names[0][:-4] + ".png"))             # same stem, other extension
    png_declaring(d / "bomb.png", 20000, 20000)
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return d, names


def test_predict_skips_bad_images_and_keeps_the_rest(trained, mixed_folder, tmp_path):
    d, names = mixed_folder
    out = tmp_path / "out"
    r = succeeded(cli("predict", "--source", d, "--checkpoint", trained / "best.pth", "--boxes", "gt", "--ann",
                      json_ann_for(d, tmp_path), "--out", out, "--provider", "cpu", "--device", "cpu", "--save-masks"))
    assert "bomb.png" in r.output and "pixels" in r.output and "broken.jpg" in r.output
    preds = json.loads((out / "predictions.json").read_text())
    assert {p["file_name"] for p in preds} == {names[0], names[1], names[0][:-4] + ".png"}
    # same stem, two files: two overlays, never one over the other
    overlays = sorted(p.name for p in out.glob("*.jpg"))
    assert len(overlays) == 3, overlays
    stems = {p.name.split("_")[0] for p in (out / "masks").iterdir()}
    assert len(stems) == 3


def json_ann_for(folder, tmp_path):
    """COCO annotations with one person box per image of ``folder`` (for --boxes gt)."""
    images, anns = [], []
    for k, p in enumerate(sorted(folder.iterdir()), 1):
        images.append({"id": k, "file_name": p.name, "width": 640, "height": 480})
        anns.append({"id": k, "image_id": k, "category_id": 1, "iscrowd": 0, "bbox": [100, 100, 200, 300],
                     "area": 60000, "segmentation": [[100, 100, 300, 100, 300, 400, 100, 400]]})
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}))
    return path


def test_one_undecodable_source_is_an_error(trained, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    user_error(cli("predict", "--source", bad, "--checkpoint", trained / "best.pth", "--boxes", "gt", "--ann",
                   json_ann_for(tmp_path, tmp_path), "--out", tmp_path / "o", "--provider", "cpu"),
               "no image could be read", "bad.jpg")


@pytest.mark.parametrize("source,msg", [("", "--source is empty"), ("missing_dir/", "--source not found")])
def test_bad_source_is_refused_before_the_model_loads(tmp_path, source, msg):
    # the checkpoint does not exist either: the source is checked first
    user_error(cli("predict", "--source", source, "--checkpoint", tmp_path / "none.pth"), msg)


def test_image_ids_without_ann_are_unique(trained, synth, tmp_path):
    d = tmp_path / "cams"
    d.mkdir()
    src = sorted((synth["root"] / "images/val2017").iterdir())[:2]
    shutil.copyfile(src[0], d / "cam1_0001.jpg")
    shutil.copyfile(src[1], d / "cam2_0001.jpg")
    boxes = {"cam1_0001.jpg": [[0.1, 0.1, 0.5, 0.9]], "cam2_0001.jpg": [[0.5, 0.2, 0.9, 0.8], [0.1, 0.1, 0.3, 0.3]]}
    (tmp_path / "b.json").write_text(json.dumps(boxes))
    out = tmp_path / "o"
    succeeded(cli("predict", "--source", d, "--checkpoint", trained / "best.pth", "--boxes", tmp_path / "b.json",
                  "--out", out, "--provider", "cpu", "--polygons", "--no-overlays"))
    preds = json.loads((out / "predictions.json").read_text())
    ids = {p["file_name"]: p["image_id"] for p in preds}
    assert len(set(ids.values())) == 2
    polys = json.loads((out / "predictions_polygons.json").read_text())
    assert sorted(im["id"] for im in polys["images"]) == sorted(set(ids.values()))


# ---- box files --------------------------------------------------------------------------------
def _one_image(synth, tmp_path):
    rec = load_person_records(synth["val"])[0][0]
    d = tmp_path / "one"
    d.mkdir()
    shutil.copyfile(synth["root"] / "images/val2017" / rec.file_name, d / rec.file_name)
    return d, rec


def _results(rec, bboxes):
    return [{"image_id": rec.image_id, "category_id": 1, "score": 0.9, "bbox": b} for b in bboxes]


GOOD = [10, 20, 100, 200]


@pytest.mark.parametrize("kind,body,needs_ann,msg", [
    ("nan in mapping", lambda rec: {rec.file_name: [[0.1, float("nan"), 0.5, 0.9], [0.1, 0.1, 0.5, 0.9]]}, False,
     "1 box(es) skipped"),
    ("inf in mapping", lambda rec: {rec.file_name: [[0.1, 0.1, float("inf"), 0.9], [0.1, 0.1, 0.5, 0.9]]}, False,
     "1 box(es) skipped"),
    ("inverted box", lambda rec: {rec.file_name: [[0.6, 0.1, 0.2, 0.9], [0.1, 0.1, 0.5, 0.9]]}, False,
     "1 box(es) skipped"),
    ("nan in results", lambda rec: _results(rec, [[float("nan"), 20, 100, 200], GOOD]), True, "1 box(es) skipped"),
    ("negative w", lambda rec: _results(rec, [[50, 20, -30, 200], GOOD]), True, "1 box(es) skipped"),
    ("negative h", lambda rec: _results(rec, [[50, 20, 30, -5], GOOD]), True, "1 box(es) skipped"),
    ("outside image", lambda rec: _results(rec, [[5000, 5000, 10, 10], GOOD]), True, "1 box(es) skipped"),
])
def test_invalid_boxes_are_skipped_with_a_count(trained, synth, tmp_path, kind, body, needs_ann, msg):
    d, rec = _one_image(synth, tmp_path)
    f = tmp_path / "boxes.json"
    f.write_text(json.dumps(body(rec)).replace("NaN", "NaN").replace("Infinity", "Infinity"))
    out = tmp_path / "o"
    args = ["predict", "--source", d, "--checkpoint", trained / "best.pth", "--boxes", f, "--out", out,
            "--provider", "cpu"] + (["--ann", synth["val"]] if needs_ann else [])
    r = succeeded(cli(*args))
    assert msg in r.output, r.output
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == 1
    assert all(np.isfinite(p["bbox"]).all() and p["bbox"][2] > 0 and p["bbox"][3] > 0 for p in preds)


@pytest.mark.parametrize("kind,body,msg", [
    ("two numbers", lambda rec: _results(rec, [GOOD, [10, 20]]), "entry 1: bbox must be 4 numbers"),
    ("bbox a string", lambda rec: _results(rec, ["10,20,30,40"]), "entry 0: bbox must be 4 numbers"),
    ("mapping row of 3", lambda rec: {rec.file_name: [[0.1, 0.2, 0.3]]}, "must be 4 numbers"),
    ("no image_id", lambda rec: [{"bbox": GOOD}], "entry 0: no image_id"),
    ("a number", lambda rec: 7, "expected COCO detection results"),
])
def test_malformed_box_files_are_refused_with_the_entry(trained, synth, tmp_path, kind, body, msg):
    d, rec = _one_image(synth, tmp_path)
    f = tmp_path / "boxes.json"
    f.write_text(json.dumps(body(rec)))
    user_error(cli("predict", "--source", d, "--checkpoint", trained / "best.pth", "--boxes", f, "--ann",
                   synth["val"], "--out", tmp_path / "o", "--provider", "cpu"), msg)


def test_box_files_that_match_nothing(trained, synth, tmp_path, caplog):
    d, rec = _one_image(synth, tmp_path)
    ck = trained / "best.pth"
    f = tmp_path / "b.json"
    f.write_text(json.dumps({"elsewhere.jpg": [[0.1, 0.1, 0.5, 0.9]]}))
    user_error(cli("predict", "--source", d, "--checkpoint", ck, "--boxes", f, "--out", tmp_path / "o1",
                   "--provider", "cpu"), "match none of the", "elsewhere.jpg")
    f.write_text(json.dumps({"elsewhere.jpg": [[0.1, 0.1, 0.5, 0.9]], rec.file_name: [[0.1, 0.1, 0.5, 0.9]]}))
    succeeded(cli("predict", "--source", d, "--checkpoint", ck, "--boxes", f, "--out", tmp_path / "o2",
                  "--provider", "cpu"))
    assert "1 of the 2 entries" in caplog.text and "name no image in --source" in caplog.text
    f.write_text(json.dumps(_results(rec, [GOOD])[:0] + [{"image_id": 99999, "bbox": GOOD, "score": 1}]))
    user_error(cli("predict", "--source", d, "--checkpoint", ck, "--boxes", f, "--ann", synth["val"],
                   "--out", tmp_path / "o3", "--provider", "cpu"), "match none of the")
    # COCO results are matched by image id: without --ann there are no ids to match
    user_error(cli("predict", "--source", d, "--checkpoint", ck, "--boxes", f, "--out", tmp_path / "o4",
                   "--provider", "cpu"), "needs --ann")
    # ground truth of another dataset
    user_error(cli("predict", "--source", d, "--checkpoint", ck, "--boxes", "gt", "--ann", synth["train"],
                   "--out", tmp_path / "o5", "--provider", "cpu"), "--boxes gt", "none of the")


# ---- exported decoder metadata ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "d.decoder.onnx"
    succeeded(cli("export", "--checkpoint", trained / "best.pth", "--out", out))
    return out


def _with_meta(exported, tmp_path, edit):
    m = onnx.load(str(exported))
    props = {p.key: p.value for p in m.metadata_props}
    edit(props)
    del m.metadata_props[:]
    for k, v in props.items():
        m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    path = tmp_path / "edited.decoder.onnx"
    onnx.save(m, str(path))
    return path


def _set(key, value):
    def edit(props):
        meta = json.loads(props["featcache"])
        meta[key] = value
        props["featcache"] = json.dumps(meta)
    return edit


def _set_pre(key, value):
    def edit(props):
        meta = json.loads(props["featcache"])
        meta["preprocess"][key] = value
        props["featcache"] = json.dumps(meta)
    return edit


@pytest.mark.parametrize("edit,msg", [
    (_set("roi_padding", -5), "roi_padding"),
    (_set("roi_padding", 0.3), "roi_padding"),        # not the padding the graph was exported with
    (_set("feature_shape", [16, 80]), "feature_shape"),
    (_set("onnx_sha256", 42), "onnx_sha256"),
    (_set_pre("channel_order", "grb"), "channel_order"),
    (_set_pre("scale", -1), "scale"),
    (lambda p: p.update(featcache="{not json"), "not JSON"),
    (lambda p: p.update(featcache="[1, 2]"), "JSON object"),
    (lambda p: p.pop("featcache"), "no featcache metadata"),
])
def test_exported_metadata_is_checked(exported, synth, tmp_path, edit, msg):
    path = _with_meta(exported, tmp_path, edit)
    r = cli("predict", "--source", synth["root"] / "images/val2017", "--exported", path, "--boxes", "gt", "--ann",
            synth["val"], "--out", tmp_path / "o", "--provider", "cpu")
    user_error(r, msg)


# ---- evaluate ---------------------------------------------------------------------------------
def test_evaluate_ann_without_any_image(trained, synth, tmp_path):
    empty = tmp_path / "noimages"
    empty.mkdir()
    user_error(cli("evaluate", "--checkpoint", trained / "best.pth", "--ann", synth["val"], "--images", empty,
                   "--provider", "cpu", "--work-dir", tmp_path / "w"), "none of the", "could be read")


def test_evaluate_creates_its_work_dir(trained, synth, tmp_path):
    work = tmp_path / "not" / "yet"
    succeeded(cli("evaluate", "--checkpoint", trained / "best.pth", "--ann", synth["val"], "--images",
                  synth["root"] / "images/val2017", "--provider", "cpu", "--work-dir", work, "--limit", "2"))
    assert work.is_dir() and not any(work.iterdir())


@pytest.mark.slow
def test_global_checkpoint_on_a_sparse_store_is_refused_everywhere(stores, synth, standin_onnx, tmp_path):
    sparse = tmp_path / "sparse.zarr"
    succeeded(cli("cache", "--ann", synth["val"], "--images", synth["root"] / "images/val2017", "--onnx", standin_onnx,
                  "--out", sparse, "--provider", "cpu", "--sparse"))
    ck = tmp_path / "ck"
    succeeded(cli("train", "--train-store", stores["train"], "--val-store", stores["val"], "--out", ck, "--model",
                  "global", "--hidden", "8", "--mask-size", "14", "--epochs", "1", "--batch-size", "4", "--workers",
                  "0", "--no-vis", "--class-weights", "none"))
    user_error(cli("evaluate", "--checkpoint", ck / "best.pth", "--val-store", sparse), "ROI-sparse", "global")


def test_evaluate_mismatch_names_checkpoint_and_store_the_right_way(trained, stores, tmp_path, synth):
    import zarr
    other = tmp_path / "other.zarr"
    shutil.copytree(stores["val"], other)
    g = zarr.open_group(str(other), mode="r+")
    meta = dict(g.attrs["metadata"])
    meta["roi_padding"] = 0.25
    g.attrs["metadata"] = meta
    r = user_error(cli("evaluate", "--checkpoint", trained / "best.pth", "--val-store", other))
    assert "checkpoint has 0.1, store has 0.25" in r.output, r.output


# ---- damaged stores ---------------------------------------------------------------------------
def _damage(store, array="features", image=1):
    chunk = next(p for p in (store / array).iterdir() if p.name.split(".")[0] == str(image))
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = b"\x00" * 64
    raw[20:40] = b"\xff" * 20
    chunk.write_bytes(bytes(raw))
    return chunk


def _no_norm(folder):
    """A config file with the ablation-only setting feature_norm = none (no statistics read)."""
    path = folder / "no_norm.toml"
    path.write_text('feature_norm = "none"\n')
    return path


@pytest.mark.parametrize("resident", ["off", "cpu"])
def test_damaged_chunk_names_the_image_in_train(stores, tmp_path, resident):
    bad = tmp_path / "train.zarr"
    shutil.copytree(stores["train"], bad)
    _damage(bad, "features", 1)
    r = cli("train", "--train-store", bad, "--val-store", stores["val"], "--analysis", stores["analysis"], "--out",
            tmp_path / "ck", "--epochs", "1", "--hidden", "8", "--roi-size", "7", "--mask-size", "14",
            "--batch-size", "4", "--workers", "0", "--no-vis", "--resident", resident, "--config", _no_norm(tmp_path))
    user_error(r, "image 1", "features", "--verify")


def test_damaged_chunk_names_the_image_in_evaluate(trained, stores, tmp_path):
    bad = tmp_path / "val.zarr"
    shutil.copytree(stores["val"], bad)
    _damage(bad, "masks", 2)
    user_error(cli("evaluate", "--checkpoint", trained / "best.pth", "--val-store", bad), "image 2", "masks")


def test_cache_verify_redoes_damaged_chunks(synth, standin_onnx, tmp_path):
    out = tmp_path / "s.zarr"
    args = ["cache", "--ann", synth["val"], "--images", synth["root"] / "images/val2017", "--onnx", standin_onnx,
            "--out", out, "--provider", "cpu", "--limit", "4"]
    succeeded(cli(*args))
    good = {p.name: p.read_bytes() for p in (out / "features").iterdir() if p.name[0].isdigit()}
    chunk = _damage(out, "features", 2)
    _damage(out, "gt_rle", 3)
    r = succeeded(cli(*args))
    assert "4 already cached" in r.output        # a plain re-run does not decode what it skips
    r = succeeded(cli(*args, "--verify"))
    assert "2 damaged" in r.output and "0 to do" not in r.output, r.output
    assert chunk.read_bytes() == good[chunk.name]
    from roiseg.data.store import FeatureStore
    s = FeatureStore(out)
    assert len(s.gt_rles(3)) > 0


def test_cache_skips_bombs_and_reads_16_bit_images(synth, standin_onnx, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(synth["root"] / "images/val2017", root)
    names = sorted(p.name for p in root.iterdir())
    png_declaring(root / names[0], 20000, 20000)                  # a bomb under a .jpg name
    rgb = np.asarray(Image.open(root / names[1]).convert("L")).astype(np.uint16) * 257
    Image.fromarray(rgb).save(root / names[1], format="PNG")       # 16-bit grayscale, same size
    out = tmp_path / "s.zarr"
    r = succeeded(cli("cache", "--ann", synth["val"], "--images", root, "--onnx", standin_onnx, "--out", out,
                      "--provider", "cpu", "--limit", "3"))
    assert "1 image(s) skipped" in r.output and "pixels" in r.output and names[0] in r.output
    from roiseg.data.store import FeatureStore
    st = FeatureStore(out)
    k = list(st.tables["file_name"]).index(names[1])
    assert k in st.valid_images() and np.abs(st.features(k)).sum() > 0


def test_exported_metadata_naming_a_missing_tensor(exported, synth, tmp_path):
    path = _with_meta(exported, tmp_path, _set("feature_name", "/model.99/Nope_output_0"))
    r = user_error(cli("predict", "--source", synth["root"] / "images/val2017", "--exported", path, "--boxes", "gt",
                       "--ann", synth["val"], "--out", tmp_path / "o", "--provider", "cpu"), "/model.99/Nope_output_0")
    assert "--feature-name" not in r.output          # predict has no such option


def test_damaged_chunk_read_by_a_dataloader_worker(stores, tmp_path):
    """Worker processes: the DataLoader would re-raise with the worker's traceback in the text."""
    bad = tmp_path / "train.zarr"
    shutil.copytree(stores["train"], bad)
    _damage(bad, "features", 1)
    r = cli("train", "--train-store", bad, "--val-store", stores["val"], "--analysis", stores["analysis"], "--out",
            tmp_path / "ck", "--epochs", "1", "--hidden", "8", "--roi-size", "7", "--mask-size", "14",
            "--batch-size", "4", "--workers", "1", "--no-vis", "--resident", "off", "--config", _no_norm(tmp_path))
    user_error(r, "image 1", "features", "--verify")
    assert "DataLoader worker" not in r.output and "Original Traceback" not in r.output
