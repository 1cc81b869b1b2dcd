"""`cache`'s settings: one schema (``roiseg.common.schema``) for defaults, checks and `--help`, in a
module light enough for the command line to build its options from at start-up."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from roiseg.common.providers import PROVIDERS
from roiseg.common.schema import ConfigError, check, option
from roiseg.data.images import DEFAULT_MAX_PIXELS
from roiseg.data.sparse import DEFAULT_MARGIN
from roiseg.data.store_meta import StoreMeta

DEFAULT_FEATURE = "/model.34/Concat_output_0"   # the YOLOv9-E wholebody25 stride-8 map [1,1024,80,80]
DEFAULT_BATCH = 8
DEFAULT_ONNX = Path("ext_extractor/yolov9_e_wholebody25_0100_1x3x640x640_featext.onnx")


@dataclass
class CacheConfig:
    """`cache`'s settings: one schema (``roiseg.common.schema``) gives defaults, checks and `--help`."""
    ann: Path = option(None, "Annotation file.", cli=None)
    images: Path = option(None, "Image folder.", cli=None)
    onnx: Path = option(None, "Extractor ONNX model.", cli=None)
    out: Path = option(None, "Store path.", cli=None)
    feature_name: str = option(DEFAULT_FEATURE, "Stride-8 tensor to cache (exposed from inside the graph if needed).", panel="Extractor")
    fine_feature: str | None = option(None, "Also store this finer tensor of the same run (stride 4 or 2; 'input': the "
                                      "preprocessed image) for sharper outlines; train uses it automatically.",
                                      shown="none", panel="Extractor")
    fine_channels: int = option(0, "Reduce the fine map to this many channels by PCA fitted on a sample of the "
                                "images (for wide maps; 0 = keep all).", ge=0, panel="Extractor")
    fine_projection_from: Path | None = option(None, "Reuse the fine-map PCA of this store (or JSON file with its "
                                               "fine and fine_projection entries): cache the validation split "
                                               "with the training store's.", shown="none", panel="Extractor")
    provider: Literal[PROVIDERS] = option(
        "auto", "ONNX Runtime provider; auto tries TensorRT, CUDA, then CPU.", panel="Extractor")
    channel_order: Literal["rgb", "bgr"] = option("rgb", "Channel order the extractor expects.", panel="Extractor")
    scale: float = option(1 / 255, "Pixel scale.", gt=0, cli=None)
    resize: Literal["stretch", "letterbox"] = option("stretch", "Resize policy into the model input.", panel="Extractor")
    roi_padding: float = option(0.1, "ROI = box grown by this fraction of its width/height on each side.",
                                ge=0, lt=1, panel="Store")
    limit: int | None = option(None, "Only the first N images.", ge=1, shown="all", panel="Inputs")
    shard: tuple[int, int] = option((0, 1), "Fill only images i with i % N == I.", cli=None,
                                    rule=(lambda v: len(v) == 2 and v[1] >= 1 and 0 <= v[0] < v[1],
                                          "I/N with 0 <= I < N"))
    workers: int = option(min(4, os.cpu_count() or 1), "Decode threads.", ge=1, shown="min(4, cores)", panel="Runtime")
    batch: int = option(DEFAULT_BATCH, "Batch size for dynamic-batch models.", ge=1, panel="Extractor")
    space_check: bool = option(True, "Stop when the disk estimate says the store will not fit.", shown="on", panel="Runtime")
    overwrite: bool = option(False, "Delete the store at --out first (only a store `cache` wrote).", shown="off", panel="Outputs")
    flip: bool = option(False, "Also store features of the mirrored image, for flip augmentation (2x disk).",
                        shown="off", panel="Store")
    sparse: bool = option(False, "ROI-sparse: keep only the feature cells ROIs can read (full train2017 ~230 GB "
                          "instead of ~560 GB; not for train --model global).", shown="off", panel="Store")
    sparse_margin: float = option(DEFAULT_MARGIN, "--sparse: the largest training jitter it supports "
                                  "(train --max-jitter), fraction of the box size.", ge=0, lt=1, panel="Store")
    codec: Literal["lz4", "zstd"] = option("lz4", "Feature compression: lz4 decodes ~2.5x faster, zstd is ~20% "
                                           "smaller (bench/bench_store.py).", panel="Store")
    verify: bool = option(False, "First decode every finished image of the store (this shard) and redo the "
                          "damaged ones.", shown="off", panel="Runtime")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "Images larger than this many pixels are skipped "
                             "(decompression bombs; Pillow's limit).", ge=1, panel="Inputs")
    trt_cache: Path | None = option(None, "TensorRT engines [<out's folder>/trt_engines].", cli=None)
    device_id: int | None = option(None, "GPU [LOCAL_RANK under torchrun, else 0].", ge=0, cli=None)

    @classmethod
    def from_store_meta(cls, meta: StoreMeta, fine: bool = False, **kw) -> CacheConfig:
        """A run that caches other images exactly as ``meta``'s store was cached: the same extractor
        tensor, preprocessing and ROI padding, and with ``fine`` its fine map (``kw`` gives the rest:
        ann, images, out, provider, and ``fine_projection_from`` for a reduced fine map)."""
        src = meta.source
        pre = src.preprocess
        return cls(onnx=Path(kw.pop("onnx", None) or src.onnx_path), feature_name=src.feature_name,
                   fine_feature=src.fine.name if fine and src.fine else None, channel_order=pre.channel_order,
                   scale=float(pre.scale), resize=pre.policy.mode, roi_padding=src.roi_padding, **kw)

    def __post_init__(self):
        check(self)
        if not self.sparse and self.sparse_margin != DEFAULT_MARGIN:
            raise ConfigError("--sparse-margin sets what a ROI-sparse store keeps: it needs --sparse")
        for name, value in (("fine_channels", self.fine_channels), ("fine_projection_from", self.fine_projection_from)):
            if value and not self.fine_feature:
                raise ConfigError(f"--{name.replace('_', '-')} reduces the fine map: it needs --fine-feature TENSOR")
