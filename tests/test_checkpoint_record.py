"""CheckpointRecord and the checkpoint file: what a record keeps through a save, what a damaged or
foreign file is called, and which inputs a run points at (fast: no training)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from roiseg.data.store_meta import StoreMeta
from roiseg.modeling.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointRecord,
    _load_failure,
    _other_format,
    checkpoint_name,
    load_checkpoint,
    miou4,
    save_checkpoint,
    tensor_digest,
    to_host,
)


def store_meta(tag: str, fine: dict | None = None) -> StoreMeta:
    return StoreMeta.from_dict({
        "onnx_path": f"/x/{tag}.onnx", "onnx_sha256": "a" * 64, "feature_name": "/f", "feature_shape": [8, 10, 10],
        "input_hw": [80, 80], "roi_padding": 0.1, "mask_hw": [20, 20], "n_images": 3, "n_rois": 5, "fine": fine,
        "preprocess": {"channel_order": "bgr", "scale": 1.0,
                       "policy": {"input_h": 80, "input_w": 80, "mode": "letterbox"}},
        "annotation_path": f"/x/{tag}.json", "images_dir": f"/x/{tag}_images", "format": "x"})


def record(**changes) -> CheckpointRecord:
    base = CheckpointRecord(
        epoch=3, metrics={"mIoU": 0.51234}, config={"train_store": "/c/train", "zero_features": False},
        resolved={"val_store": "/c/val", "analysis": "/c/data_analyze.json"}, model_name="roialign",
        model_kwargs={"num_classes": 3, "mask_size": 56}, in_channels=8, input_hw=(80, 80),
        cache_fingerprint={"feature_name": "/f"}, train_meta=store_meta("train"), val_meta=store_meta("val"),
        model={"w": torch.arange(4.0)}, optimizer={"state": {0: {"m": torch.ones(2)}}}, global_step=17,
        scaler={"scale": 2.0}, ema={"module.w": torch.full((4,), 7.0), "n_averaged": torch.tensor(5)},
        history=[{"epoch": 1}], rng={"torch": torch.tensor([1, 2], dtype=torch.uint8)}, checksum="c")
    return dataclasses.replace(base, **changes)


def test_a_record_survives_its_dict_field_by_field():
    r = record()
    back = CheckpointRecord.from_dict(r.to_dict())
    for f in dataclasses.fields(CheckpointRecord):
        if f.name != "checksum":        # to_dict leaves it to save_checkpoint
            a, b = getattr(r, f.name), getattr(back, f.name)
            assert repr(a) == repr(b), f.name
    assert back.input_hw == (80, 80) and isinstance(back.input_hw, tuple)
    assert back.global_step == 17 and r.to_dict()["scheduler"] == {"global_step": 17}
    assert back.format == CHECKPOINT_FORMAT and back.train_meta.images_dir == "/x/train_images"
    assert back.val_meta.annotation_path == "/x/val.json"


def test_optional_fields_take_their_defaults():
    d = {k: v for k, v in record().to_dict().items()
         if k in ("epoch", "model_name", "model_kwargs", "in_channels", "input_hw", "cache_fingerprint",
                  "cache_metadata", "model", "config")}
    r = CheckpointRecord.from_dict(d)
    assert (r.metrics, r.resolved, r.optimizer, r.global_step, r.scaler, r.ema, r.history, r.rng, r.checksum) == \
        ({}, {}, {}, 0, {}, None, [], {}, None)
    d["scheduler"] = {}
    assert CheckpointRecord.from_dict(d).global_step == 0


@pytest.mark.parametrize("drop", ["epoch", "model_name", "model_kwargs", "in_channels", "input_hw",
                                  "cache_fingerprint", "cache_metadata", "model", "config"])
def test_a_dict_without_a_required_field_is_not_a_checkpoint(drop):
    d = record().to_dict()
    del d[drop]
    with pytest.raises(CheckpointError, match=f"in where.pth is not a checkpoint.*missing {drop}\\):"
                                              f" retrain it with `cli.py train`"):
        CheckpointRecord.from_dict(d, "in where.pth")


def test_another_format_is_named():
    d = record().to_dict() | {"format": "roiseg-checkpoint-v0"}
    with pytest.raises(CheckpointError, match=r"format 'roiseg-checkpoint-v0'; missing nothing\)"):
        CheckpointRecord.from_dict(d)
    no_format = {k: v for k, v in record().to_dict().items() if k != "format"}
    assert CheckpointRecord.from_dict(no_format).epoch == 3     # files before the field read as v1


@pytest.mark.parametrize("damage", [lambda m: m.pop("val"), lambda m: m["train"].pop("feature_shape"),
                                    lambda m: m.__setitem__("train", 5)])
def test_damaged_store_metadata_is_one_message(damage):
    d = record().to_dict()
    damage(d["cache_metadata"])
    with pytest.raises(CheckpointError, match=r"^ck.pth: its store metadata is damaged \(.*\); use another checkpoint$"):
        CheckpointRecord.from_dict(d, "ck.pth")


def test_properties_read_the_record():
    r = record()
    assert (r.num_classes, r.mask_size, r.fuses_fine, r.zero_features) == (3, 56, False, False)
    assert record(config={"zero_features": True}).zero_features is True
    fine = {"name": "/fine", "shape": [4, 20, 20]}
    f = record(train_meta=store_meta("train", fine), cache_fingerprint={"fine": fine})
    assert f.fuses_fine and f.source.fine.name == "/fine"
    assert r.source.fine is None and record(train_meta=store_meta("train", fine)).source.fine is None


def test_decoder_state_is_the_emas_without_its_prefix():
    r = record()
    assert list(r.decoder_state()) == ["w"] and r.decoder_state()["w"][0] == 7
    assert r.decoder_state(use_ema=False) is r.model
    no_ema, empty = record(ema=None), record(ema={})
    assert no_ema.decoder_state() is no_ema.model and empty.decoder_state() is empty.model


def test_referenced_inputs_name_each_path_once():
    refs = record().referenced_inputs()
    assert refs == {"the checkpoint's extractor (train)": "/x/train.onnx",
                    "the checkpoint's annotation file (train)": "/x/train.json",
                    "the checkpoint's image folder (train)": "/x/train_images",
                    "the checkpoint's extractor (val)": "/x/val.onnx",
                    "the checkpoint's annotation file (val)": "/x/val.json",
                    "the checkpoint's image folder (val)": "/x/val_images",
                    "the checkpoint's training cache": "/c/train",
                    "the checkpoint's validation cache": "/c/val",
                    "the checkpoint's class-weight file": "/c/data_analyze.json"}
    same = record(val_meta=store_meta("train"), config={}, resolved={"train_store": "/c/s", "val_store": "/c/s"})
    assert same.referenced_inputs() == {"the checkpoint's extractor (train)": "/x/train.onnx",
                                        "the checkpoint's annotation file (train)": "/x/train.json",
                                        "the checkpoint's image folder (train)": "/x/train_images",
                                        "the checkpoint's training cache": "/c/s"}
    # the resolved value wins over the configured one
    assert record(resolved={"train_store": "/r"}).referenced_inputs()["the checkpoint's training cache"] == "/r"


def test_to_host_keeps_the_nesting():
    x = {"a": [torch.ones(1), (torch.zeros(1), 3)], "b": "s"}
    y = to_host(x)
    assert isinstance(y["a"], list) and isinstance(y["a"][1], tuple) and y["a"][1][1] == 3 and y["b"] == "s"
    assert torch.equal(y["a"][0], torch.ones(1))
    r = record().on_host()
    assert torch.equal(r.ema["module.w"], torch.full((4,), 7.0)) and r.epoch == 3


def test_checkpoint_names_truncate_the_miou():
    assert miou4(0.51239) == 5123 and miou4(0.5) == 5000 and miou4(0.99999) == 9999
    assert checkpoint_name(7, (480, 640), 0.51239) == "checkpoint_epoch_0007_480x640_5123.pth"


def test_the_digest_sees_names_values_dtypes_and_shapes():
    base = {"a": torch.arange(4.0), "b": [torch.ones(2)]}
    d = tensor_digest(base)
    assert d == tensor_digest({"b": [torch.ones(2)], "a": torch.arange(4.0)})          # order of keys
    assert d == tensor_digest(base | {"checksum": "anything"})                        # the checksum itself
    for other in ({"a": torch.arange(4.0) + 1, "b": [torch.ones(2)]}, {"a": torch.arange(4.0).double(), "b": [torch.ones(2)]},
                  {"a": torch.arange(4.0).reshape(2, 2), "b": [torch.ones(2)]}, {"c": torch.arange(4.0), "b": [torch.ones(2)]},
                  {"a": torch.arange(4.0), "b": [torch.ones(2), torch.ones(0)]}):
        assert tensor_digest(other) != d
    assert tensor_digest({"n": {"checksum": torch.ones(1)}}) != tensor_digest({"n": {}})   # only the top one is skipped


def test_save_then_load_gives_the_record_back(tmp_path):
    path = save_checkpoint(record(), tmp_path / "run")
    assert path.name == "checkpoint_epoch_0003_80x80_5123.pth"
    back = load_checkpoint(path)
    assert back.checksum == tensor_digest(torch.load(path, weights_only=True))
    assert torch.equal(back.model["w"], torch.arange(4.0)) and back.global_step == 17


def test_a_flipped_value_is_a_checksum_error(tmp_path):
    path = save_checkpoint(record(), tmp_path)
    state = torch.load(path, weights_only=True)
    state["model"]["w"][0] = 99
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="is corrupted: its tensors do not match the checksum"):
        load_checkpoint(path)


def test_files_that_are_not_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder: give a checkpoint file"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        load_checkpoint(tmp_path / "empty.pth")
    (tmp_path / "a.json").write_text(json.dumps({"model": 1}))
    with pytest.raises(CheckpointError, match="it is a JSON file"):
        load_checkpoint(tmp_path / "a.json")
    torch.save({"weights": torch.ones(1)}, tmp_path / "nomodel.pth")
    with pytest.raises(CheckpointError, match=r"not a checkpoint of this project \(no model state\)"):
        load_checkpoint(tmp_path / "nomodel.pth")
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"no model state"):
        load_checkpoint(tmp_path / "list.pth")
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    with pytest.raises(CheckpointError, match="cannot load checkpoint .*cut.pth: the file is damaged or truncated"):
        load_checkpoint(tmp_path / "cut.pth")


@pytest.mark.parametrize("name, head, kind", [
    ("a.pth", b"PK\x03\x04rest", None), ("a.pth", b"\x80\x02rest", None),
    ("a.pth", b'  {"model": 1}', "a JSON file"), ("a.pth", b"[1, 2]", "a JSON file"),
    ("m.onnx", b"\x08\x07\x12\x00", "an ONNX model"), ("m.bin", b"\x08\x07\x12\x07pytorch", "an ONNX model"),
    ("m.bin", b"\x08\x07\x12\x04onnx", "an ONNX model"), ("m.bin", b"\x08\x07\x12\x04abcd", None),
    ("n.txt", b"epoch 3\tloss 0.2\r\n", "a text file"), ("b.bin", b"\xff\xfe\x00", None),
    ("c.bin", b"text\x01with a control byte", None), ("e.bin", b"", None),
])
def test_other_formats_are_told_by_their_first_bytes(tmp_path, name, head, kind):
    p = tmp_path / name
    p.write_bytes(head)
    got = _other_format(p)
    assert (got is None) if kind is None else got.startswith(kind)


@pytest.mark.parametrize("text, want", [
    ("Weights only load failed ... weights_only=False", "holds Python objects"),
    ("Unsupported global: GLOBAL os.system", "holds Python objects"),
    ("PytorchStreamReader failed reading zip archive: failed finding central directory", "damaged or truncated"),
    ("invalid magic number; corrupt file?", "damaged or truncated"),
    ("Ran out of input: EOF", "damaged or truncated"),
    ("something else", "not a checkpoint of this project, or damaged (OSError)"),
])
def test_load_failures_are_said_in_the_users_terms(text, want):
    assert want in _load_failure(OSError(text))
