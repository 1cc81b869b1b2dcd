"""Full-resolution inference: original image + person boxes -> live extractor -> decoder -> masks.

Uses the preprocessing recorded in the checkpoint's cache metadata, pads each box by the training
ROI padding, and pastes the per-ROI 3-class probabilities back at the *original* resolution.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featcache.analyze import file_sha256
from featcache.errors import FeatCacheError
from featcache.extractor import Extractor
from featcache.geometry import ResizePolicy, as_xyxy, pad_box
from featcache.images import Preprocess, load_rgb, preprocess

from .checkpoint import load_checkpoint
from .models import build_model, load_decoder_state, paste_masks

log = logging.getLogger(__name__)


def model_from_checkpoint(ck: dict, use_ema: bool = True) -> torch.nn.Module:
    model = build_model(ck["model_name"], ck["in_channels"], **ck["model_kwargs"])
    state = ck["model"]
    if use_ema and ck.get("ema"):
        state = {k[len("module."):]: v for k, v in ck["ema"].items() if k.startswith("module.")}
    load_decoder_state(model, state)
    return model.eval()


class Predictor:
    def __init__(self, model: torch.nn.Module, meta: dict, extractor: Extractor, device="cpu"):
        self.model = model.to(device).eval()
        self.meta, self.extractor, self.device = meta, extractor, torch.device(device)
        self.prep = Preprocess.from_dict(meta["preprocess"])
        self.policy: ResizePolicy = self.prep.policy
        self.roi_padding = float(meta["roi_padding"])

    @classmethod
    def from_checkpoint(cls, path, onnx_path=None, provider="auto", device="cpu") -> "Predictor":
        ck = load_checkpoint(path)
        meta = ck["cache_metadata"]["train"]
        return cls(model_from_checkpoint(ck), meta, open_extractor(meta, onnx_path, provider), device)

    @torch.no_grad()
    def predict(self, image, boxes, box_format: str = "xyxy") -> dict:
        """``image``: path or PIL image; ``boxes``: normalized person boxes [N, 4] of that image.

        Returns ``probs`` [N, K, H, W] float32 and ``masks`` [N, H, W] bool (class-1 prob > 0.5),
        both at the image's original resolution, and ``rois`` (the padded ROIs, normalized).
        """
        im = load_rgb(image) if not isinstance(image, Image.Image) else image.convert("RGB")
        w, h = im.size
        boxes = as_xyxy(np.asarray(boxes, np.float64).reshape(-1, 4), box_format).clip(0, 1)
        rois = pad_box(boxes, self.roi_padding)
        k = self.model.num_classes
        if len(rois) == 0:
            return {"probs": np.zeros((0, k, h, w), np.float32), "masks": np.zeros((0, h, w), bool), "rois": rois}
        feats = self.extractor.run(preprocess(im, self.prep)[None])
        rin = self.policy.norm_to_input_norm(rois, w, h)
        r = torch.as_tensor(np.concatenate([np.zeros((len(rin), 1)), rin], 1), dtype=torch.float32,
                            device=self.device)
        probs = self.model(torch.from_numpy(feats).float().to(self.device), r).softmax(1)
        px = torch.as_tensor(rois * [w, h, w, h], dtype=torch.float32, device=self.device)
        full = paste_masks(probs, px, h, w).cpu().numpy()
        return {"probs": full, "masks": full[:, 1] > 0.5, "rois": rois}


def open_extractor(meta: dict, onnx_path=None, provider="auto") -> Extractor:
    path = Path(onnx_path or meta["onnx_path"])
    if not path.is_file():
        raise FeatCacheError(f"extractor ONNX not found: {path} (pass --onnx)")
    if file_sha256(path) != meta["onnx_sha256"]:
        raise FeatCacheError(f"{path} is not the extractor this decoder was trained on "
                             f"(sha256 differs from the cache's {meta['onnx_sha256'][:12]}...)")
    return Extractor(path, meta["feature_name"], provider, streams=1)
