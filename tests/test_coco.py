import json

import numpy as np
from pycocotools import mask as mask_utils

from roiseg.data.coco import decode_masks, load_person_records, segmentation_to_rle


def _write(tmp_path, anns, images=None):
    images = images or [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}]
    d = {"images": images, "annotations": anns,
         "categories": [{"id": 1, "name": "person", "supercategory": "person"}]}
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(d))
    return p


def _ann(i, seg, bbox=(5, 5, 10, 10), crowd=0, cat=1):
    return {"id": i, "image_id": 1, "category_id": cat, "iscrowd": crowd, "bbox": list(bbox),
            "area": 1.0, "segmentation": seg}


def test_polygon_and_rle_forms_agree(tmp_path):
    poly = [[5, 5, 15, 5, 15, 15, 5, 15]]
    m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, 30, 40)))
    fortran = np.asfortranarray(m)
    compressed = mask_utils.encode(fortran)
    compressed_str = {"size": [30, 40], "counts": compressed["counts"].decode()}
    # uncompressed RLE: column-major run lengths starting with zeros
    flat = fortran.ravel(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n); n, cur = 0, v
        n += 1
    runs.append(n)
    uncompressed = {"size": [30, 40], "counts": runs}
    p = _write(tmp_path, [_ann(1, poly), _ann(2, compressed_str), _ann(3, uncompressed)])
    recs, skips = load_person_records(p)
    assert skips.total == 0 and len(recs[0].instances) == 3
    masks = decode_masks(recs[0].instances)
    assert (masks[0] == m.astype(bool)).all() and (masks[1] == masks[0]).all() and (masks[2] == masks[0]).all()


def test_bad_instances_are_skipped_and_counted(tmp_path):
    good = [[5, 5, 15, 5, 15, 15, 5, 15]]
    anns = [
        _ann(1, good),
        _ann(2, good, crowd=1),
        _ann(3, [], bbox=(1, 1, 5, 5)),                 # empty segmentation
        _ann(4, [[1, 2, 3]]),                           # degenerate polygon
        _ann(5, good, bbox=(5, 5, 0, 10)),              # zero-area box
        _ann(6, {"size": [30, 40], "counts": "garbage!"}),
        _ann(7, [[50, 50, 60, 50, 60, 60]], bbox=(1, 1, 2, 2)),  # polygon fully outside -> empty
        _ann(8, good, cat=3),                           # not a person: ignored, not counted
    ]
    recs, skips = load_person_records(_write(tmp_path, anns))
    assert [i.ann_id for i in recs[0].instances] == [1]
    assert skips.counts["iscrowd"] == 1
    assert skips.counts["zero-area box"] == 1
    assert skips.counts["invalid segmentation"] + skips.counts["empty segmentation"] == 4


def test_boxes_normalized_and_clipped(tmp_path):
    poly = [[30, 20, 40, 20, 40, 30, 30, 30]]
    recs, _ = load_person_records(_write(tmp_path, [_ann(1, poly, bbox=(30, 20, 25, 25))]))
    assert np.allclose(recs[0].instances[0].box_norm, [30 / 40, 20 / 30, 1.0, 1.0])


def test_segmentation_size_mismatch_rejected():
    assert segmentation_to_rle({"size": [10, 10], "counts": [100]}, 30, 40) is None


def test_synthetic_dataset_layout(synth):
    recs, skips = load_person_records(synth["val"])
    names = {r.file_name: len(r.instances) for r in recs}
    assert names["000000020992.jpg"] == 1 and names["000000413552.jpg"] == 2
    assert names["000000109118.jpg"] == 3 and names["000000162732.jpg"] == 5
    assert skips.total == 0
    sub = synth["root"] / "annotations" / "instances_train2017_person_only_no_crowd_100.json"
    assert sub.is_file()
    for r in recs:
        assert (synth["root"] / "images" / "val2017" / r.file_name).is_file()
