"""Image decoding and the extractor's preprocessing (a recorded, configurable setting)."""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import FeatCacheError
from .geometry import LETTERBOX_PAD_VALUE, ResizePolicy


class ImageDecodeError(FeatCacheError):
    pass


@dataclass(frozen=True)
class Preprocess:
    """RGB/BGR order, pixel scale (1/255 -> 0-1 floats, 1 -> 0-255) and resize policy."""

    channel_order: str = "rgb"
    scale: float = 1 / 255
    policy: ResizePolicy = field(default_factory=ResizePolicy)

    def __post_init__(self):
        if self.channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel order must be rgb or bgr, got {self.channel_order!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["policy"] = self.policy.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(d["channel_order"], float(d["scale"]), ResizePolicy(**d["policy"]))


def load_rgb(path: str | Path) -> Image.Image:
    """Decode any Pillow-readable file as RGB (grayscale, CMYK, PNG-named-.jpg...). No EXIF rotation."""
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(f"missing image: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"undecodable image {path.name}: {exc}") from exc


def preprocess(im: Image.Image, prep: Preprocess) -> np.ndarray:
    """PIL RGB image -> float32 ``[3, H, W]`` in the model's input frame."""
    p = prep.policy
    cw, ch = p.resized_size(im.width, im.height)
    resized = im.resize((cw, ch), Image.BILINEAR)
    if (cw, ch) != (p.input_w, p.input_h):
        canvas = Image.new("RGB", (p.input_w, p.input_h), (LETTERBOX_PAD_VALUE,) * 3)
        _, _, ox, oy = p.transform(im.width, im.height)
        canvas.paste(resized, (int(ox), int(oy)))
        resized = canvas
    hwc = np.asarray(resized)
    if prep.channel_order == "bgr":
        hwc = hwc[..., ::-1]
    out = np.empty((3, hwc.shape[0], hwc.shape[1]), np.float32)
    np.multiply(hwc.transpose(2, 0, 1), np.float32(prep.scale), out=out)  # one pass: cast, scale, CHW
    return out
