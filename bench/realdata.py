"""Where the real-data stand-in lives, for the benchmarks that need it: a folder laid out like a
user's project (``data/annotations``, ``data/images/train2017``, ``ext_extractor``), named by the
environment variable ``ROISEG_REALDATA`` (in this project's workplace: ``../shared/realdata``).
Read when a benchmark starts, so importing a benchmark never needs it."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FEATURE = "/backbone/Concat_1_output_0"   # YOLOX-Nano, stride 8, 128 channels; BGR, 0-255 input


@dataclass(frozen=True)
class RealData:
    root: Path

    @property
    def ann(self) -> Path:
        return self.root / "data/annotations/instances_train2017_person_only_no_crowd.json"

    @property
    def images(self) -> Path:
        return self.root / "data/images/train2017"

    @property
    def onnx(self) -> Path:
        return self.root / "ext_extractor/yolox_nano_640x640.onnx"

    @property
    def feature(self) -> str:
        return FEATURE


def realdata() -> RealData:
    """The real-data folder ``ROISEG_REALDATA`` names; one clear message when it is unset or wrong."""
    root = os.environ.get("ROISEG_REALDATA")
    if not root:
        raise SystemExit("set ROISEG_REALDATA to the real-data folder (data/annotations, data/images/train2017, "
                         "ext_extractor/yolox_nano_640x640.onnx), e.g. ROISEG_REALDATA=../shared/realdata")
    data = RealData(Path(root))
    missing = [str(p) for p in (data.ann, data.images, data.onnx) if not p.exists()]
    if missing:
        raise SystemExit(f"ROISEG_REALDATA={root} lacks {', '.join(missing)}")
    return data
