"""The Python API (``roiseg.Segmenter``): the docs' examples run, results equal `predict`'s outputs
on the same inputs (masks bit for bit, scores to 1e-6) with given and automatic boxes, calls from
several threads give the sequential results, and every bad argument is one ``ValueError`` naming it."""
import json
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clikit import ROOT, cli, succeeded
from roiseg.data.standin import add_constant_output

DETECTIONS = np.array([[0, 0, 0.9, 100.0, 120.0, 300.0, 500.0],      # batch, class, score, x1 y1 x2 y2 (input px)
                       [0, 0, 0.8, 350.0, 80.0, 600.0, 400.0]], np.float32)


@pytest.fixture(scope="module")
def project(synth, stores, standin_onnx, tmp_path_factory):
    """A user's project as the docs assume it: an extractor with a person detection head, a decoder
    trained on its features and exported (decoder and end-to-end graphs), photos, a video."""
    d = tmp_path_factory.mktemp("api")
    (d / "ext_extractor").mkdir()
    onnx = add_constant_output(standin_onnx, d / "ext_extractor" / "detector.onnx",
                               "batchno_classid_score_x1y1x2y2", DETECTIONS)
    for split in ("train", "val"):
        succeeded(cli("cache", "--ann", synth[split], "--images", synth["root"] / f"images/{split}2017", "--onnx", onnx,
                      "--out", d / f"cache/{split}.zarr", "--provider", "cpu"))
    succeeded(cli("train", "--train-store", d / "cache/train.zarr", "--val-store", d / "cache/val.zarr", "--analysis",
                  stores["analysis"], "--out", d / "checkpoints", "--epochs", "1", "--hidden", "8", "--roi-size", "7",
                  "--mask-size", "14", "--batch-size", "4", "--workers", "0", "--no-vis", "--resident", "cpu"))
    succeeded(cli("export", "--checkpoint", d / "checkpoints/best.pth", "--end-to-end"))
    shutil.copytree(synth["root"] / "images/val2017", d / "data/images/val2017")
    (d / "data/annotations").mkdir(parents=True)
    shutil.copyfile(synth["val"], d / "data/annotations/instances_val2017_person_only_no_crowd.json")
    shutil.copyfile(d / "data/images/val2017/000000109118.jpg", d / "photo.jpg")
    _video(d / "video.mp4", sorted((d / "data/images/val2017").glob("*.jpg"))[:3])
    return d


def _video(path: Path, frames: list[Path]) -> None:
    import cv2
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5, (320, 240))
    for f in frames:
        writer.write(np.asarray(Image.open(f).convert("RGB").resize((320, 240)))[..., ::-1].copy())
    writer.release()


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "python.md").read_text(), flags=re.S)


@pytest.mark.parametrize("k", range(3))
def test_the_docs_examples_run(project, monkeypatch, capsys, k):
    monkeypatch.chdir(project)
    exec(compile(_examples()[k], f"docs/python.md example {k + 1}", "exec"), {})
    out = capsys.readouterr().out
    if k == 0:
        w, h = Image.open(project / "photo.jpg").size
        assert f"(2, {h}, {w})" in out and Image.open(project / "photo_masks.jpg").size == (w, h)
    if k == 1:
        assert out.count("persons") == 3
    if k == 2:
        results = json.loads((project / "results.json").read_text())
        n = len(list((project / "data/images/val2017").glob("*.jpg")))
        assert len(results) == 2 * n and {r["file_name"] for r in results} == {
            p.name for p in (project / "data/images/val2017").glob("*.jpg")}


def _predict(project, tmp_path, *args) -> Path:
    out = tmp_path / "pred"
    succeeded(cli("predict", "--source", project / "data/images/val2017", "--exported",
                  project / "checkpoints/best.decoder.onnx", "--ann",
                  project / "data/annotations/instances_val2017_person_only_no_crowd.json", "--out", out,
                  "--save-masks", "--no-overlays", "--provider", "cpu", *args))
    return out


@pytest.mark.parametrize("boxes", ["given", "auto"])
def test_results_equal_predicts_outputs(project, tmp_path, boxes):
    from roiseg import Segmenter
    ann = json.loads((project / "data/annotations/instances_val2017_person_only_no_crowd.json").read_text())
    given = {}
    if boxes == "given":     # a {file_name: normalized xyxy boxes} file: the same numbers for both
        sizes = {im["id"]: (im["width"], im["height"]) for im in ann["images"]}
        for a in ann["annotations"]:
            w, h = sizes[a["image_id"]]
            x, y, bw, bh = a["bbox"]
            name = next(im["file_name"] for im in ann["images"] if im["id"] == a["image_id"])
            given.setdefault(name, []).append([x / w, y / h, (x + bw) / w, (y + bh) / h])
        (tmp_path / "boxes.json").write_text(json.dumps(given))
    out = _predict(project, tmp_path, "--boxes", tmp_path / "boxes.json" if given else "auto")
    written = json.loads((out / "predictions.json").read_text())
    seg = Segmenter(project / "checkpoints/best.decoder.onnx", provider="cpu")
    ids = {im["file_name"]: im["id"] for im in ann["images"]}
    mine = []
    for path in sorted((project / "data/images/val2017").glob("*.jpg")):
        r = seg(path, given[path.name], normalized=True) if given else seg(path)
        mine += r.to_coco(ids[path.name], file_name=path.name)
        for k, m in enumerate(r.masks):
            assert np.array_equal(np.asarray(Image.open(out / "masks" / f"{path.stem}_{k:03d}.png")) > 0, m > 0)
        theirs = [x["score"] for x in written if x["file_name"] == path.name]
        assert np.allclose(theirs, r.scores, atol=1e-6)
    want = len(ann["annotations"]) if given else 2 * len(ids)     # the stand-in detector finds two each
    assert mine == written and len(mine) == want


def test_end_to_end_graph_and_the_decoder_graph_agree(project):
    from roiseg import Segmenter
    image = np.asarray(Image.open(project / "photo.jpg").convert("RGB"))
    boxes = [[40, 30, 200, 300], [220, 60, 330, 320]]
    a = Segmenter(project / "checkpoints/best.decoder.onnx", provider="cpu")(image, boxes)
    b = Segmenter.from_end_to_end(project / "checkpoints/best.e2e.onnx", provider="cpu")(image, boxes)
    assert np.allclose(a.scores, b.scores, atol=1e-4) and (a.masks != b.masks).mean() < 1e-3
    assert a.instance_map.shape == image.shape[:2] and set(np.unique(a.instance_map)) <= {0, 1, 2}
    assert np.array_equal(a.instance_map > 0, a.masks.any(0))
    assert len(a.polygons()) == 2 and a.draw().size == image.shape[1::-1]
    bgr = Segmenter(project / "checkpoints/best.decoder.onnx", provider="cpu")(image[..., ::-1].copy(), boxes,
                                                                               channels="bgr")
    assert np.array_equal(bgr.masks, a.masks)


def test_save_writes_overlay_results_and_masks(project, tmp_path):
    from roiseg import Segmenter
    r = Segmenter(project / "checkpoints/best.decoder.onnx", provider="cpu")(project / "photo.jpg")
    r.save(tmp_path / "out", "photo", image_id=7)
    assert (tmp_path / "out/photo.jpg").is_file()
    assert [x["image_id"] for x in json.loads((tmp_path / "out/photo.json").read_text())] == [7] * len(r)
    assert len(list((tmp_path / "out/masks").glob("photo_*.png"))) == len(r) == 2


def test_calls_from_several_threads_give_the_sequential_results(project):
    from roiseg import Segmenter
    seg = Segmenter(project / "checkpoints/best.decoder.onnx", provider="cpu")
    paths = sorted((project / "data/images/val2017").glob("*.jpg"))
    want = {p.name: seg(p) for p in paths}
    got, errors = {}, []

    def work(k):
        try:
            for p in paths[k % 2::2] * 2:
                got[(k, p.name)] = seg(p)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(got) == 2 * len(paths)
    for (_, name), r in got.items():
        assert np.array_equal(r.masks, want[name].masks) and np.array_equal(r.scores, want[name].scores)


@pytest.mark.parametrize("call,msg", [
    (lambda s, p: s(np.zeros((10, 10), np.uint8), [[0, 0, 5, 5]]), "HxWx3 uint8"),
    (lambda s, p: s(np.zeros((10, 10, 3), np.float32), [[0, 0, 5, 5]]), "HxWx3 uint8"),
    (lambda s, p: s(np.zeros((0, 10, 3), np.uint8), [[0, 0, 5, 5]]), "image is empty"),
    (lambda s, p: s(p, [[0, 0, 5]]), "boxes must be [N, 4]"),
    (lambda s, p: s(p, "abc"), "boxes must be"),
    (lambda s, p: s(p, [[10, 10, 5, 50]]), "box 0 has no area"),
    (lambda s, p: s(p, [[0, 0, 5, 5], [0, 0, float("nan"), 4]]), "box 1 is not finite"),
    (lambda s, p: s(p, [[900, 900, 950, 950]]), "box 0 lies outside the 427x480 image"),
    (lambda s, p: s([p, p], [[[0, 0, 5, 5]]]), "needs a list of 2 box arrays"),
    (lambda s, p: s(p, [[0, 0, 5, 5]], box_format="ltrb"), "box_format must be one of"),
    (lambda s, p: s(p, [[0, 0, 5, 5]], channels="rgba"), "channels must be"),
    (lambda s, p: s(p, [[0, 0, 5, 5]], scores=[0.5, 0.2]), "scores has 2 values for 1 boxes"),
    (lambda s, p: s(p.with_name("missing.jpg"), [[0, 0, 5, 5]]), "image not found"),
    (lambda s, p: s(p, [[0, 0, 5, 5]], scores=["high"]), "scores must be numbers"),
    (lambda s, p: s(p, scores=[0.9]), "scores are your detector's scores of your boxes"),
    (lambda s, p: s(p, [[0, 0, 5, 5]], scores=[float("inf")]), "scores must be finite and >= 0"),
    (lambda s, p: s(p, [[0.1, 0.1, 0.5, 0.9]]), "0-1 coordinates? pass normalized=True"),
    (lambda s, p: s(p, [[], [], []]), "boxes must be [N, 4], got shape [3, 0]"),
    (lambda s, p: s(p, [[0, 0, 5, 5]], channels="bgr"), "is the channel order of an array"),
    (lambda s, p: s(p.with_name("broken.jpg"), [[0, 0, 5, 5]]), "undecodable image broken.jpg"),
    (lambda s, p: s(42, [[0, 0, 5, 5]]), "image must be a path"),
])
def test_bad_arguments_are_one_value_error_naming_them(project, call, msg):
    from roiseg import Segmenter
    (project / "broken.jpg").write_bytes(b"not a jpeg")
    seg = Segmenter(project / "checkpoints/best.decoder.onnx", provider="cpu")
    with pytest.raises(ValueError, match=re.escape(msg)):
        call(seg, project / "photo.jpg")


@pytest.mark.parametrize("what,msg", [("checkpoint", "is a training checkpoint: export it first"),
                                      ("extractor", "not a decoder exported by `cli.py export`"),
                                      ("wrong-extractor", "is not the extractor this decoder was trained on"),
                                      ("e2e-as-decoder", "is a decoder graph, not an end-to-end one"),
                                      ("missing", "decoder_onnx not found")])
def test_graphs_that_are_not_ours_are_one_error(project, what, msg):
    from roiseg import Segmenter
    with pytest.raises(ValueError, match=re.escape(msg)):
        if what == "e2e-as-decoder":
            Segmenter.from_end_to_end(project / "checkpoints/best.decoder.onnx", provider="cpu")
        elif what == "wrong-extractor":
            Segmenter(project / "checkpoints/best.decoder.onnx", project / "checkpoints/best.e2e.onnx", provider="cpu")
        else:
            Segmenter({"checkpoint": project / "checkpoints/best.pth", "missing": project / "nope.onnx",
                       "extractor": project / "ext_extractor/detector.onnx"}[what], provider="cpu")


def test_automatic_boxes_need_a_detection_head(trained, standin_onnx, tmp_path):
    from roiseg import Segmenter
    succeeded(cli("export", "--checkpoint", trained / "best.pth", "--out", tmp_path / "d.decoder.onnx"))
    seg = Segmenter(tmp_path / "d.decoder.onnx", standin_onnx, provider="cpu")
    image = np.zeros((64, 64, 3), np.uint8)
    assert len(seg(image, [[0, 0, 32, 32]])) == 1           # given boxes work
    with pytest.raises(ValueError, match="boxes=None asks for the extractor's own person boxes, but .*no detection"):
        seg(image)


def test_the_docstring_examples_run(project, monkeypatch):
    import doctest

    import roiseg.runtime.segmenter as module
    monkeypatch.chdir(project)
    failed, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=True)
    assert tried >= 9 and failed == 0


def test_flip_tta_through_both_graphs(project):
    from roiseg import Segmenter
    image = np.asarray(Image.open(project / "photo.jpg").convert("RGB"))
    boxes = [[40, 30, 200, 300], [220, 60, 330, 320]]
    plain = Segmenter(project / "checkpoints/best.decoder.onnx", provider="cpu", tta="none")(image, boxes)
    a = Segmenter(project / "checkpoints/best.decoder.onnx", provider="cpu", tta="flip")(image, boxes)
    b = Segmenter.from_end_to_end(project / "checkpoints/best.e2e.onnx", provider="cpu", tta="flip")(image, boxes)
    assert np.allclose(a.scores, b.scores, atol=1e-4) and (a.masks != b.masks).mean() < 1e-3
    assert not np.allclose(a.scores, plain.scores, atol=1e-6)
    with pytest.raises(ValueError, match="tta must be one of none, flip"):
        Segmenter(project / "checkpoints/best.decoder.onnx", provider="cpu", tta="mirror")


def test_no_boxes_given_is_an_empty_result_without_running_the_graphs(project):
    from roiseg import Segmenter
    seg = Segmenter(project / "checkpoints/best.decoder.onnx", provider="cpu", tta="flip")
    runs = []
    run_all = seg._given.extractor.run_all
    seg._given.extractor.run_all = lambda x: runs.append(1) or run_all(x)
    r = seg(project / "photo.jpg", np.zeros((0, 4)))
    assert len(r) == 0 and r.masks.shape[0] == 0 and r.to_coco() == [] and runs == []
    assert r.instance_map.max() == 0 and r.draw().size == Image.open(project / "photo.jpg").size
    seg(project / "photo.jpg", [[40, 30, 200, 300]])
    assert runs == [1, 1]                                   # flip TTA: the image and its mirror
