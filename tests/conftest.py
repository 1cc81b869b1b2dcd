import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """Small synthetic COCO person dataset (train 24 / val 8 images)."""
    from featcache.synthetic import make_synthetic_dataset
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_train=24, n_val=8, seed=1)


@pytest.fixture(scope="session")
def standin_onnx(tmp_path_factory):
    from featcache.standin import build_standin_extractor
    return build_standin_extractor(tmp_path_factory.mktemp("onnx") / "standin.onnx", channels=16)
