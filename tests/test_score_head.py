"""The MaskIoU score head (issue 21, part 2): its target, its output, training, checkpoints."""
from pathlib import Path

import pytest
import torch

from roiseg.modeling.decoders import build_model, mask_certainty, mask_scores
from roiseg.training.losses import LossConfig, SegLoss, grid_mask_iou


def test_grid_mask_iou_by_hand():
    logits = torch.zeros(2, 3, 4, 4)
    logits[0, 1, :2, :] = 5.0                      # ROI 0 predicts the top half as the target
    targets = torch.zeros(2, 4, 4, dtype=torch.long)
    targets[0, :, :2] = 1                          # the target is the left half: IoU 4 / 12
    assert grid_mask_iou(logits, targets).tolist() == pytest.approx([4 / 12, 1.0])   # ROI 1: both empty


def test_mask_certainty_by_hand():
    fg = torch.zeros(4, 4, 4)
    fg[1, :2] = 1.0                        # 8 sure cells: S = 8, U = 0 -> 8 / 9
    fg[2, :2] = 1.0
    fg[2, 2, :2] = 0.5                     # + 2 unsure cells: S = 9, U = 2 -> 9 / 12
    fg[3, 0, 0] = 0.76                     # on the ramp: U = (0.25 - 0.26) / 0.05 + 0.5 = 0.3
    fg[3, 0, 1] = 0.8                      # past the ramp: sure
    want = [0.0, 8 / 9, 9 / 12, 1.56 / (1.56 + 0.3 + 1)]      # an empty mask scores 0
    assert mask_certainty(fg).tolist() == pytest.approx(want, abs=1e-6)
    # continuous across the band's edges (a hard band would jump by 4 unsure cells: > 0.2 here),
    # and a blurrier copy of the same mask scores lower
    edge = torch.tensor([0.7499, 0.7501, 0.2499, 0.2501])[:, None, None].expand(4, 2, 2)
    c = mask_certainty(edge)
    assert abs(c[0] - c[1]) < 2e-3 and abs(c[2] - c[3]) < 2e-3
    sharp = torch.zeros(1, 8, 8)
    sharp[0, 2:6, 2:6] = 1.0
    blurry = torch.nn.functional.avg_pool2d(sharp[None], 3, 1, 1)[0]
    assert mask_certainty(blurry) < mask_certainty(sharp)
    # a score head's predicted IoU takes precedence; without one, the certainty
    fg = torch.rand(3, 4, 4)
    head = torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(mask_scores(fg, head), head)
    assert torch.equal(mask_scores(fg), mask_certainty(fg))


def test_score_head_output_and_masks_untouched():
    torch.manual_seed(0)
    plain = build_model("roialign", 8, hidden=16, roi_size=7, mask_size=28)
    scored = build_model("roialign", 8, hidden=16, roi_size=7, mask_size=28, score_head=True)
    scored.load_state_dict(plain.state_dict(), strict=False)
    f = torch.randn(2, 8, 20, 20)
    rois = torch.tensor([[0, 0.1, 0.1, 0.6, 0.9], [1, 0.3, 0.2, 0.9, 0.7], [1, 0.0, 0.0, 1.0, 1.0]])
    logits, scores = scored(f, rois, with_scores=True)
    assert torch.equal(logits, plain(f, rois)) and torch.equal(scored(f, rois), logits)
    assert scores.shape == (3,) and ((scores > 0) & (scores < 1)).all()
    assert plain(f, rois, with_scores=True)[1] is None
    assert build_model("prior", 8, mask_size=28)(f, rois, with_scores=True)[1] is None
    # the head learns from detached inputs: its loss moves no decoder weight
    loss = SegLoss(LossConfig(dice_weight=0.0), 3)
    targets = torch.randint(0, 3, (3, 28, 28))
    scored.zero_grad()
    out = loss(logits.detach().requires_grad_(False), targets, scores)
    out["score"].backward()
    assert all(p.grad is None or not p.grad.any() for n, p in scored.named_parameters()
               if not n.startswith("score_head."))
    assert any(p.grad is not None and p.grad.any() for p in scored.score_head.parameters())


def test_score_head_learns_the_mask_iou():
    """On fixed features and masks of varying quality, the head's error falls well below the
    spread of the IoUs it predicts."""
    g = torch.Generator().manual_seed(0)
    model = build_model("roialign", 8, hidden=16, roi_size=7, mask_size=28, score_head=True)
    head = model.score_head
    feats = torch.randn(64, 16, 7, 7, generator=g)
    logits = torch.randn(64, 3, 28, 28, generator=g) * 3
    targets = (torch.rand(64, 28, 28, generator=g) < torch.rand(64, 1, 1, generator=g)).long()
    true = grid_mask_iou(logits, targets)
    opt = torch.optim.Adam(head.parameters(), 3e-3)
    for _ in range(300):
        opt.zero_grad()
        err = torch.nn.functional.mse_loss(head(feats, logits), true)
        err.backward()
        opt.step()
    assert err.item() < 0.25 * true.var().item()


def test_score_quality_by_hand():
    import numpy as np

    from roiseg.evaluation.evaluator import score_quality
    q = score_quality(np.array([[0.1, 0.2], [0.5, 0.9], [0.3, 0.4]]))
    assert q["score_rank_corr"] == pytest.approx(1.0) and q["score_mae"] == pytest.approx(0.2)
    assert score_quality(np.array([[0.9, 0.1], [0.1, 0.9]]))["score_rank_corr"] == pytest.approx(-1.0)


def test_train_with_a_score_head_checkpoints_and_predicts(stores, synth, tmp_path):
    from roiseg.common.schema import ConfigError
    from roiseg.modeling.checkpoint import decoder_from_checkpoint, load_checkpoint
    from roiseg.training.config import make_config
    from roiseg.training.run import run_training
    base = dict(train_store=str(stores["train"]), val_store=str(stores["val"]), out=str(tmp_path / "r"),
                analysis=str(stores["analysis"]), hidden=16, roi_size=7, mask_size=28, epochs=2, batch_size=4,
                workers=0, resident="cpu", tensorboard=False, visualize=False, lr=3e-3, coco_eval=True)
    with pytest.raises(ConfigError, match="roialign"):
        make_config(**base, model="prior", score_head=True)
    res = run_training(make_config(**base, score_head=True))
    last = res.history[-1]
    assert -1 <= last["score_rank_corr"] <= 1 and 0 <= last["score_mae"] <= 1
    ck = load_checkpoint(tmp_path / "r" / "last.pth")
    assert ck.model_kwargs["score_head"] is True
    model, _ = decoder_from_checkpoint(ck)
    assert model.score_head is not None
    # a run without the head keeps the old checkpoint layout (no score_head key)
    plain = run_training(make_config(**{**base, "out": str(tmp_path / "p"), "epochs": 1}))
    assert -1 <= plain.history[-1]["score_rank_corr"] <= 1     # the masks' certainty ranks them too
    assert "score_head" not in load_checkpoint(tmp_path / "p" / "last.pth").model_kwargs

    # predict: given boxes are scored by the head's predicted mask IoU
    import json

    import numpy as np
    from click.testing import CliRunner

    from roiseg.cli import main
    from roiseg.inference.torch_decoder import predictor_from_checkpoint
    images = synth["root"] / "images/val2017"
    r = CliRunner().invoke(main, ["predict", "--source", str(images), "--checkpoint", str(tmp_path / "r" / "last.pth"),
                                  "--boxes", "gt", "--ann", str(synth["val"]), "--out", str(tmp_path / "pred"),
                                  "--provider", "cpu", "--no-overlays", "--tta", "none"])
    assert r.exit_code == 0, r.output
    preds = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    ann = json.loads(Path(synth["val"]).read_text())
    im = next(i for i in ann["images"] if any(a["image_id"] == i["id"] for a in ann["annotations"]))
    boxes = np.array([[a["bbox"][0] / im["width"], a["bbox"][1] / im["height"], (a["bbox"][0] + a["bbox"][2]) / im["width"],
                       (a["bbox"][1] + a["bbox"][3]) / im["height"]] for a in ann["annotations"] if a["image_id"] == im["id"]])
    want = predictor_from_checkpoint(tmp_path / "r" / "last.pth", provider="cpu").predict(images / im["file_name"], boxes)
    got = [p["score"] for p in preds if p["file_name"] == im["file_name"]]
    assert got == pytest.approx([round(q, 5) for q in want.quality], abs=2e-5)
    # export: the decoder graph gets a scores output (parity-checked), and predict --exported uses it
    r = CliRunner().invoke(main, ["export", "--checkpoint", str(tmp_path / "r" / "last.pth"),
                                  "--out", str(tmp_path / "s.decoder.onnx")])
    assert r.exit_code == 0, r.output
    import onnx
    assert [o.name for o in onnx.load(str(tmp_path / "s.decoder.onnx")).graph.output][-1] == "scores"
    r = CliRunner().invoke(main, ["predict", "--source", str(images), "--exported", str(tmp_path / "s.decoder.onnx"),
                                  "--boxes", "gt", "--ann", str(synth["val"]), "--out", str(tmp_path / "pred_onnx"),
                                  "--provider", "cpu", "--no-overlays", "--tta", "none"])
    assert r.exit_code == 0, r.output
    onnx_preds = json.loads((tmp_path / "pred_onnx" / "predictions.json").read_text())
    assert [p["score"] for p in onnx_preds] == pytest.approx([p["score"] for p in preds], abs=1e-4)
