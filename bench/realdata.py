"""Where the real-data stand-in lives (../shared/realdata beside the project) and how to read it."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "realdata"
ANN = REAL / "data/annotations/instances_train2017_person_only_no_crowd.json"
IMAGES = REAL / "data/images/train2017"
ONNX = REAL / "ext_extractor/yolox_nano_640x640.onnx"
FEATURE = "/backbone/Concat_1_output_0"   # stride 8, 128 channels; BGR, 0-255 input
