"""A checkpoint's decoder as the inference pipeline's decoder (PyTorch), and the pipeline built
from a checkpoint: its extractor (sha256-checked) on the same GPU."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from roiseg.modeling.checkpoint import decoder_from_checkpoint, load_checkpoint
from roiseg.modeling.decoders import decode_rois, uses_fine
from roiseg.runtime.decoding import DecoderInput, RoiGrids
from roiseg.runtime.detection import DetectionSettings
from roiseg.runtime.pipeline import Predictor, open_extractor


class TorchDecoder:
    """A checkpoint's decoder (``nn.Module``) on ``device``."""

    def __init__(self, model, device="cpu", zero_features: bool = False):
        self.device = torch.device(device)
        self.zero_features = zero_features       # an ablation decoder trained without features
        self.model = model.to(self.device).eval()
        self.provider = f"torch {self.device}"
        self.fine = uses_fine(model)     # the pipeline then hands it the fine map too

    def __call__(self, inp: DecoderInput) -> RoiGrids:
        """The class-1 probability on each ROI's grid, and the score head's scores or the
        certainty (the module reads the padded ROIs)."""
        r = torch.as_tensor(np.concatenate([np.zeros((len(inp), 1)), inp.rois], 1), dtype=torch.float32,
                            device=self.device)
        fine = None if inp.fine is None else torch.from_numpy(inp.fine).float().to(self.device)
        feats = torch.from_numpy(inp.image).float().to(self.device)
        if self.zero_features:
            feats, fine = torch.zeros_like(feats), None if fine is None else torch.zeros_like(fine)
        with torch.no_grad():
            logits, quality = decode_rois(self.model, feats, r, fine)
            fg = logits.float().softmax(1)[:, 1].cpu().numpy()
        return RoiGrids(fg, None if quality is None else quality.float().cpu().numpy(), quality is None)



def predictor_from_checkpoint(path: str | Path, onnx_path=None, provider: str = "auto", device: str = "cpu",
                              detection: DetectionSettings | None = None) -> Predictor:
    """The pipeline of a checkpoint: its decoder (EMA weights) on ``device`` and its extractor."""
    ck = load_checkpoint(path)
    model, source = decoder_from_checkpoint(ck)
    return Predictor(TorchDecoder(model, device, ck.zero_features), source,
                     open_extractor(source, onnx_path, provider, detection is not None, device, uses_fine(model)),
                     detection)


def checkpoint_predictor(opts):
    """For ``run_predict``: the checkpoint's pipeline, built once the inputs are checked."""
    return lambda detection: predictor_from_checkpoint(opts.checkpoint, opts.onnx, opts.provider, opts.device,
                                                       detection)
