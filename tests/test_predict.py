"""predict / evaluate: detection decoding, COCO outputs, video, evaluate == stored metrics, padding parity."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from pycocotools.coco import COCO

from clikit import feature_source
from roiseg.common.geometry import ResizePolicy, content_rect, pad_box
from roiseg.data.coco import load_person_records
from roiseg.data.extractor import Extractor
from roiseg.data.standin import FEATURE_NAME, add_constant_output
from roiseg.export.export import export_decoder
from roiseg.export.graph import DecoderExport, ExportSpec
from roiseg.inference.torch_decoder import TorchDecoder
from roiseg.modeling.checkpoint import (
    decoder_from_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from roiseg.runtime.detection import YOLOX_STRIDES, DetectionSettings
from roiseg.runtime.pipeline import Predictor
from roiseg.runtime.predict import PredictOptions, run_predict

# Two persons (class 1 of 3) in input pixels of a 640x640 frame, plus distractors below.
PERSONS = np.array([[100.0, 120.0, 300.0, 500.0], [350.0, 80.0, 600.0, 400.0]])
SCORES = np.array([0.9, 0.8])


def _yolov8_head(person_class=1, nc=3, anchors=8400):
    out = np.zeros((1, 4 + nc, anchors), np.float32)
    rows = [(PERSONS[0], 0.9, person_class), (PERSONS[1], 0.8, person_class),
            (PERSONS[0] + 6, 0.7, person_class),          # a duplicate NMS must remove
            ([10, 10, 60, 60], 0.95, (person_class + 1) % nc),  # another class
            ([400, 500, 450, 600], 0.1, person_class)]    # under --conf
    for j, (b, s, c) in enumerate(rows):
        b = np.asarray(b, np.float32)
        out[0, :4, 100 + j] = [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]]
        out[0, 4 + c, 100 + j] = s
    return out


def _yolox_head(raw: bool, person_class=1, nc=3):
    v8 = _yolov8_head(person_class, nc)[0].T              # [A, 4+nc]
    grid, stride = [], []
    for s in YOLOX_STRIDES:
        ys, xs = np.meshgrid(np.arange(640 // s), np.arange(640 // s), indexing="ij")
        grid.append(np.stack([xs, ys], -1).reshape(-1, 2))
        stride += [s] * (640 // s) ** 2
    grid, stride = np.concatenate(grid).astype(np.float32), np.asarray(stride, np.float32)[:, None]
    out = np.zeros((len(grid), 5 + nc), np.float32)
    box = v8[:, :4].copy()
    if raw:
        box[:, :2] = box[:, :2] / stride - grid
        box[:, 2:] = np.log(np.maximum(box[:, 2:], 1e-3) / stride)
    out[:, :4] = box
    cls = v8[:, 4:]
    out[:, 4] = (cls.max(1) > 0).astype(np.float32)     # objectness 1 where anything is
    out[:, 5:] = cls
    return out[None]


def _nms_rows(score_last: bool, person_class=1):
    rows = [[0, person_class, SCORES[k], *PERSONS[k]] for k in range(2)] + [[0, 2, 0.99, 5, 5, 50, 50]]
    rows = np.asarray(rows, np.float32)
    if score_last:
        rows = rows[:, [0, 1, 3, 4, 5, 6, 2]]
    return rows


HEADS = {
    "yolov8": ("dets", lambda: _yolov8_head(), "auto"),
    "yolox": ("output", lambda: _yolox_head(True), "auto"),
    "yolox-decoded": ("output", lambda: _yolox_head(False), "yolox-decoded"),
    "nms": ("batchno_classid_score_x1y1x2y2", lambda: _nms_rows(False), "auto"),
    "nms-score-last": ("batchno_classid_x1y1x2y2_score", lambda: _nms_rows(True), "auto"),
}


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("mode", ["stretch", "letterbox"])
def test_detection_heads_give_back_the_known_boxes(standin_onnx, target_everywhere, tmp_path, head, mode):
    name, make, fmt = HEADS[head]
    onnx_path = add_constant_output(standin_onnx, tmp_path / "det.onnx", name, make())
    ex = Extractor(onnx_path, FEATURE_NAME, "cpu", extra_outputs=(name,))
    pred = Predictor(TorchDecoder(target_everywhere), feature_source(mode), ex,
                     detection=DetectionSettings(format=fmt, person_class=1))
    assert pred.det_output == name
    w, h = 640, 320
    res = pred.predict(Image.new("RGB", (w, h)))
    # input pixels -> original normalized (letterbox: content is rows 160..480 of the input frame)
    expect = ResizePolicy(640, 640, mode).input_norm_to_norm(PERSONS / 640, w, h).clip(0, 1)
    order = np.argsort(-res.scores)
    assert len(res) == 2, res.boxes
    assert np.allclose(res.boxes[order], expect, atol=1e-4)
    assert np.allclose(res.scores[order], SCORES, atol=1e-5)


def test_model_without_detection_output_is_a_clear_error(trained, tmp_path):
    from roiseg.cli import main
    (tmp_path / "src").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "src" / "a.jpg")     # the source is checked first: give it an image
    r = CliRunner().invoke(main, ["predict", "--source", str(tmp_path / "src"), "--checkpoint",
                                  str(trained / "best.pth"), "--out", str(tmp_path / "out")])
    assert r.exit_code == 1 and "no detection output" in r.output and "--boxes" in r.output


@pytest.fixture(scope="module")
def det_predictor(trained, standin_onnx, tmp_path_factory):
    """The trained decoder on an extractor whose NMS head 'detects' two fixed persons."""
    onnx_path = add_constant_output(standin_onnx, tmp_path_factory.mktemp("det") / "det.onnx",
                                    "batchno_classid_score_x1y1x2y2", _nms_rows(False, person_class=0))
    model, source = decoder_from_checkpoint(trained / "best.pth")
    ex = Extractor(onnx_path, source.feature_name, "cpu", extra_outputs=("batchno_classid_score_x1y1x2y2",))
    return Predictor(TorchDecoder(model), source, ex, detection=DetectionSettings())


def test_predict_folder_writes_coco_results_masks_polygons(det_predictor, synth, tmp_path):
    recs, _ = load_person_records(synth["val"])
    names = [r.file_name for r in recs[:2]]
    opts = PredictOptions(source=synth["root"] / "images/val2017", out=tmp_path / "p", checkpoint=None,
                          ann=synth["val"], only=names, save_masks=True, polygons=True, progress=False)
    s = run_predict(opts, det_predictor)
    assert s["images"] == 2 and s["persons"] == 4
    res = json.loads((tmp_path / "p" / "predictions.json").read_text())
    ids = {r.file_name: r.image_id for r in recs[:2]}
    assert sorted({r["image_id"] for r in res}) == sorted(ids.values())   # ids from --ann by file name
    gt = COCO(str(synth["val"]))
    dt = gt.loadRes(res)                          # pycocotools accepts the file
    assert len(dt.getAnnIds()) == 4
    masks = sorted((tmp_path / "p" / "masks").glob("*.png"))
    assert len(masks) == 4
    with Image.open(masks[0]) as m:
        assert m.size == (recs[0].width, recs[0].height)
    from pycocotools import mask as mask_utils
    m0 = np.asarray(Image.open(masks[0])) > 0
    assert (mask_utils.decode(res[0]["segmentation"]).astype(bool) == m0).all()
    poly = json.loads((tmp_path / "p" / "predictions_polygons.json").read_text())
    assert len(poly["annotations"]) >= 1 and len(poly["annotations"][0]["segmentation"][0]) >= 6
    assert {(a["image_id"], tuple(a["bbox"])) for a in poly["annotations"]} <= \
        {(r["image_id"], tuple(r["bbox"])) for r in res}
    assert (tmp_path / "p" / names[0]).is_file()          # the overlay


def test_polygons_rasterize_back_to_the_mask():
    from pycocotools import mask as mask_utils

    from roiseg.runtime.predict import polygons_of
    h, w = 120, 160
    yy, xx = np.mgrid[:h, :w]
    m = ((yy - 60) ** 2 / 40 ** 2 + (xx - 50) ** 2 / 30 ** 2 <= 1) | ((yy > 20) & (yy < 90) & (xx > 100) & (xx < 140))
    win = m[10:110, 5:150]
    polys = polygons_of(win, (5, 10))
    assert len(polys) == 2
    rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    assert mask_utils.iou([rle], [mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))], [0])[0, 0] > 0.95


def test_predict_video_writes_a_video_with_every_frame(det_predictor, tmp_path):
    import cv2
    src = tmp_path / "clip.mp4"
    vw = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"mp4v"), 5, (320, 240))
    rng = np.random.default_rng(0)
    for _ in range(4):
        vw.write(rng.integers(0, 255, (240, 320, 3), np.uint8))
    vw.release()
    s = run_predict(PredictOptions(source=str(src), out=tmp_path / "v", checkpoint=None, progress=False), det_predictor)
    assert s["images"] == 4
    cap = cv2.VideoCapture(str(tmp_path / "v" / "clip.mp4"))
    frames = 0
    while cap.read()[0]:
        frames += 1
    assert frames == 4 and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 320
    res = json.loads((tmp_path / "v" / "predictions.json").read_text())
    assert sorted({r["image_id"] for r in res}) == [0, 1, 2, 3]


def test_evaluate_reproduces_stored_metrics_and_compares(trained, stores, tmp_path):
    from roiseg.cli import main
    ck = list_checkpoints(trained)[0][1]
    stored = load_checkpoint(ck).metrics
    out = tmp_path / "ev.json"
    r = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(ck), "--checkpoint", str(trained / "*.pth"),
                                  "--json", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert len(res) == 1 + len(list(trained.glob("*.pth")))   # one row per checkpoint
    assert res[0]["mIoU"] == pytest.approx(stored["mIoU"], abs=1e-9)
    assert res[0]["instance_mIoU"] == pytest.approx(stored["instance_mIoU"], abs=1e-9)
    assert res[0]["iou"] == pytest.approx(stored["iou"], abs=1e-9)
    assert res[0]["boundary_IoU"] == pytest.approx(stored["boundary_IoU"], abs=1e-9)
    assert f"{res[0]['boundary_IoU']:.4f}" in r.output and "bIoU" in r.output
    subsets = res[0]["instance_subsets"]
    assert subsets["all"]["persons"] == subsets["small"]["persons"] + subsets["medium"]["persons"] + \
        subsets["large"]["persons"]
    assert 0 < res[0]["box_instance_mIoU"] < 1
    assert "overlap" in r.output and ck.name in r.output


def test_predict_with_gt_boxes_matches_evaluate(trained, synth, tmp_path):
    from roiseg.cli import main
    from roiseg.inference.evaluate import evaluate_checkpoint
    ck = trained / "best.pth"
    r = CliRunner().invoke(main, ["predict", "--source", str(synth["root"] / "images/val2017"), "--checkpoint",
                                  str(ck), "--boxes", "gt", "--ann", str(synth["val"]), "--out", str(tmp_path / "g"),
                                  "--provider", "cpu", "--no-overlays", "--tta", "none"])
    assert r.exit_code == 0, r.output
    got = float(r.output.split("instance mIoU with the GT boxes: ")[1].split()[0])
    got_boundary = float(r.output.split("(boundary IoU ")[1].split(")")[0])
    want = evaluate_checkpoint(ck)
    assert got == pytest.approx(want["instance_mIoU"], abs=2e-3)
    assert got_boundary == pytest.approx(want["boundary_IoU"], abs=2e-3)     # torch-free bands, same values
    assert got_boundary < got


@pytest.mark.parametrize("size", [(1280, 640), (640, 1280), (640, 480)])
@pytest.mark.parametrize("mode", ["stretch", "letterbox"])
def test_exported_roi_padding_equals_pad_box(tmp_path, target_everywhere, size, mode):
    """Edge-touching boxes: the graph pads in the input frame and clips to the image content, which
    must equal training's pad_box in the original image mapped to the input frame."""
    w, h = size
    policy = ResizePolicy(640, 640, mode)
    boxes = np.array([[0.0, 0.0, 0.4, 0.5], [0.6, 0.3, 1.0, 1.0], [0.2, 0.0, 0.8, 1.0], [0.3, 0.3, 0.5, 0.6]])
    want = policy.norm_to_input_norm(pad_box(boxes, 0.1), w, h) * 640
    rin = policy.norm_to_input_norm(boxes, w, h)
    letterbox = mode == "letterbox"
    spec = ExportSpec(4, (640, 640), (80, 80), 0.1, letterbox)
    wrapper = DecoderExport(target_everywhere, spec, as_exported=False)
    feats = torch.zeros(1, 4, 80, 80)
    rois = torch.tensor(np.concatenate([np.zeros((4, 1)), rin], 1), dtype=torch.float32)
    rect = torch.tensor(content_rect(policy, w, h)[None], dtype=torch.float32)
    args = (feats, rois, rect) if letterbox else (feats, rois)
    assert np.allclose(wrapper.decode(*args)["roi_boxes"].numpy(), want, atol=1e-3)
    path = export_decoder(_Tiny(), spec, tmp_path / "d.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names == (["features", "rois", "image_rects"] if letterbox else ["features", "rois"])
    got = sess.run(["roi_boxes"], dict(zip(names, [a.numpy() for a in args])))[0]
    assert np.allclose(got, want, atol=1e-3)


class _Tiny(torch.nn.Module):
    """A real ROIAlign decoder, tiny (exports like the trained one)."""

    def __init__(self):
        super().__init__()
        from roiseg.modeling.decoders import build_model
        self.m = build_model("roialign", 4, hidden=8, roi_size=7, mask_size=14)
        self.num_classes = 3

    def forward(self, f, r, with_scores=False):
        return self.m(f, r, with_scores)


def test_evaluate_from_annotations_and_images_equals_the_store(trained, synth, tmp_path):
    """--ann/--images caches the images with the checkpoint's extractor and preprocessing: the
    same numbers as the val store built by `cache`, and the temporary store is removed."""
    from roiseg.cli import main
    out = tmp_path / "live.json"
    r = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(trained / "best.pth"), "--ann", str(synth["val"]),
                                  "--images", str(synth["root"] / "images/val2017"), "--work-dir", str(tmp_path),
                                  "--provider", "cpu", "--device", "cpu", "--json", str(out), "--tta", "none"])
    assert r.exit_code == 0, r.output
    live = json.loads(out.read_text())[0]
    from roiseg.inference.evaluate import evaluate_checkpoint
    ref = evaluate_checkpoint(trained / "best.pth")
    assert live["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-9)
    assert live["instance_mIoU"] == pytest.approx(ref["instance_mIoU"], abs=1e-9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.json"]
    r = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(trained / "best.pth"), "--ann", str(synth["val"])])
    assert r.exit_code == 1 and "--ann and --images go together" in r.output


def test_box_files_in_every_format_give_the_same_boxes(trained, synth, tmp_path):
    """COCO detection results, COCO annotations and {file_name: normalized cxcywh} all place the
    persons where the annotations do."""
    from roiseg.cli import main
    recs, _ = load_person_records(synth["val"])
    rec = recs[0]
    w, h = rec.width, rec.height
    src = tmp_path / "one"
    src.mkdir()
    (src / rec.file_name).write_bytes((synth["root"] / "images/val2017" / rec.file_name).read_bytes())
    boxes = np.array([i.box_norm for i in rec.instances])
    results = [{"image_id": rec.image_id, "category_id": 1, "score": 0.9,
                "bbox": [b[0] * w, b[1] * h, (b[2] - b[0]) * w, (b[3] - b[1]) * h]} for b in boxes]
    cxcywh = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1)
    files = {"results.json": (results, []), "mapping.json": ({rec.file_name: cxcywh.tolist()},
                                                             ["--box-format", "cxcywh"])}
    want = sorted(np.round(boxes * [w, h, w, h], 1).tolist())
    for name, (body, extra) in files.items():
        f = tmp_path / name
        f.write_text(json.dumps(body))
        out = tmp_path / f"out_{name}"
        r = CliRunner().invoke(main, ["predict", "--source", str(src), "--checkpoint", str(trained / "best.pth"),
                                      "--boxes", str(f), "--ann", str(synth["val"]), "--out", str(out),
                                      "--provider", "cpu", "--no-overlays", *extra])
        assert r.exit_code == 0, r.output
        got = json.loads((out / "predictions.json").read_text())
        xyxy = sorted(np.round([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (g["bbox"] for g in got)], 1).tolist())
        assert np.allclose(xyxy, want, atol=0.1), name
        assert all(g["image_id"] == rec.image_id for g in got)
    r = CliRunner().invoke(main, ["predict", "--source", str(src), "--checkpoint", str(trained / "best.pth"),
                                  "--boxes", str(synth["val"]), "--out", str(tmp_path / "o3"), "--provider", "cpu",
                                  "--no-overlays"])   # COCO annotations as a box file, matched by file name
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "o3" / "predictions.json").read_text())
    assert len(got) == len(rec.instances)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = CliRunner().invoke(main, ["predict", "--source", str(src), "--checkpoint", str(trained / "best.pth"),
                                  "--boxes", str(bad)])
    assert r.exit_code == 1 and "is not JSON" in r.output


def test_numpy_nms_equals_torchvision():
    """The ORT-only runtime's NMS keeps exactly what torchvision's would."""
    from torchvision.ops import nms as tv_nms

    from roiseg.runtime.detection import nms
    rng = np.random.default_rng(3)
    for n, iou in ((1, 0.5), (60, 0.65), (300, 0.3), (300, 0.9)):
        xy = rng.uniform(0, 500, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 150, (n, 2))], 1)
        boxes[n // 2:] = boxes[: n - n // 2] + rng.normal(0, 4, (n - n // 2, 4))    # near-duplicates
        scores = rng.random(n)
        want = tv_nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()
        assert nms(boxes, scores, iou).tolist() == want.tolist()
