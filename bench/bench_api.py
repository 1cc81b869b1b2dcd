"""The Python API's per-call overhead: ``Segmenter.from_end_to_end(graph)(image, boxes)`` against a
bare ``onnxruntime.InferenceSession.run`` of the same end-to-end graph on the same inputs, timed
side by side (interleaved) in one process.

    uv run python bench/bench_api.py [--checkpoint run/best.pth] [--images folder] [--persons 10]
        [--repeat 30] [--provider cpu]

Without ``--checkpoint`` a one-epoch demo run (synthetic data, the stand-in extractor) is made in a
temporary folder first; with ``ROISEG_REALDATA`` and a checkpoint trained on its yolox-nano
features (e.g. ``bench/realdata_levers.py --keep-checkpoints``) the images are real photos.

The bare runs use the Segmenter's own ``InferenceSession`` (two sessions' thread pools would spin
against each other on a small CPU).

* ``bare``: ``session.run(None, feed)``: every output of the graph (its own pasted masks, instance
  map, logits, scores), the feed already built (image letterboxed to the graph's input, boxes in its
  coordinates): the floor a caller reaches who does all of that elsewhere;
* ``bare-logits``: ``session.run(["logits", "scores"], feed)``: what the Segmenter asks the graph for;
* ``bare+letterbox``: ``bare-logits`` after the image's preprocessing (resize/letterbox, scale,
  CHW): what any caller starting from an image must do before the graph can run;
* ``segmenter``: the whole call from an HxWx3 uint8 array and pixel boxes to a ``Result``: checks,
  letterbox, the run, the paste at the image's size, the masks [N, H, W] and the records.

Each is the median over ``--repeat`` interleaved rounds per image; ratio = segmenter / bare.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from roiseg import Segmenter  # noqa: E402
from roiseg.data.images import preprocess  # noqa: E402
from roiseg.export.export import export_checkpoint  # noqa: E402


def demo_checkpoint(folder: Path) -> tuple[Path, Path]:
    """A one-epoch demo run: its best checkpoint and its validation images."""
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "demo", "--dir", str(folder), "--epochs", "1",
                    "--device", "cpu"], check=True, stdout=subprocess.DEVNULL)
    return next(folder.rglob("best.pth")), next(p.parent for p in folder.rglob("*.jpg") if "val" in str(p.parent))


def person_boxes(w: int, h: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` person-shaped boxes (taller than wide, 10-50 % of the image's height) in pixels."""
    bh = rng.uniform(0.1, 0.5, n) * h
    bw = bh * rng.uniform(0.3, 0.6, n)
    x0 = rng.uniform(0, 1, n) * (w - bw)
    y0 = rng.uniform(0, 1, n) * (h - bh)
    return np.stack([x0, y0, x0 + bw, y0 + bh], 1)


class Recorder:
    """The Segmenter's session, recording the feed of its last run (the bare runs reuse it)."""

    def __init__(self, session):
        self.session, self.feed = session, None

    def run(self, names, feed, *args):
        self.feed = feed
        return self.session.run(names, feed, *args)

    def __getattr__(self, name):
        return getattr(self.session, name)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(seg: Segmenter, bare, image: np.ndarray, boxes: np.ndarray, repeat: int) -> dict:
    seg(image, boxes)                                           # warm-up; records the feed
    feed = seg._given.decoder.session.feed
    name = bare.get_inputs()[0].name

    def letterboxed():
        x = preprocess(Image.fromarray(image), seg._given.prep)[None]
        return bare.run(["logits", "scores"], {**feed, name: x})
    calls = {"bare": lambda: bare.run(None, feed),
             "bare-logits": lambda: bare.run(["logits", "scores"], feed),
             "bare+letterbox": letterboxed,
             "segmenter": lambda: seg(image, boxes)}
    for fn in calls.values():
        fn()
    times = {k: [] for k in calls}
    for _ in range(repeat):                                     # interleaved: the VM's noise hits all alike
        for k, fn in calls.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="a trained decoder (default: a one-epoch demo run)")
    ap.add_argument("--extractor", type=Path, help="its extractor ONNX (default: the one the checkpoint names)")
    ap.add_argument("--images", type=Path, help="a folder of images (default: ROISEG_REALDATA's or the demo's)")
    ap.add_argument("--max-images", type=int, default=5)
    ap.add_argument("--persons", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--provider", default="cpu")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt, images = a.checkpoint, a.images
        if ckpt is None:
            ckpt, demo_images = demo_checkpoint(tmp / "demo")
            images = images or demo_images
        if images is None:
            images = Path(os.environ["ROISEG_REALDATA"]) / "data/images/train2017"
        e2e = export_checkpoint(ckpt, tmp / "b.decoder.onnx", end_to_end=True, extractor=a.extractor).end_to_end
        seg = Segmenter.from_end_to_end(e2e, provider=a.provider)
        seg._given.decoder.session = Recorder(seg._given.decoder.session)
        # the Segmenter's own session: a second one's idle threads would spin against the first's
        bare = seg._given.decoder.session.session
        rng = np.random.default_rng(0)
        rows = []
        for path in sorted(images.glob("*.jpg"))[: a.max_images]:
            image = np.asarray(Image.open(path).convert("RGB"))
            boxes = person_boxes(image.shape[1], image.shape[0], a.persons, rng)
            rows.append((path.name, image.shape[:2], measure(seg, bare, image, boxes, a.repeat)))
    print(f"checkpoint {ckpt} | provider {seg.provider} | {a.persons} persons | median of {a.repeat} rounds\n")
    print("| image | HxW | bare run (all outputs) ms | bare run (logits, scores) ms | letterbox + bare run ms | "
          "Segmenter call ms | Segmenter / bare | Segmenter / bare-logits | Segmenter / letterbox + bare |")
    print("|---|---|---|---|---|---|---|---|---|")
    keys = ("bare", "bare-logits", "bare+letterbox", "segmenter")
    rows.append(("all", None, {k: sum(t[k] for *_, t in rows) for k in keys}))
    for name, hw, t in rows:
        print(f"| {name} | {'' if hw is None else f'{hw[0]}x{hw[1]}'} | "
              + " | ".join(f"{t[k]:.1f}" for k in keys) + " | "
              + " | ".join(f"{t['segmenter'] / t[k]:.3f}" for k in keys[:3]) + " |")


if __name__ == "__main__":
    main()
