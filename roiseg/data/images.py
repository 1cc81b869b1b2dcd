"""Image decoding and the extractor's preprocessing (a recorded, configurable setting)."""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from roiseg.common.errors import RoisegError
from roiseg.common.geometry import LETTERBOX_PAD_VALUE, ResizePolicy


class ImageDecodeError(RoisegError):
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


# Pillow warns above its decompression-bomb limit and raises above twice it; load_rgb instead
# refuses anything above ``max_pixels`` with a per-image error, so Pillow's own check is off.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
Image.MAX_IMAGE_PIXELS = None


def to_rgb8(im: Image.Image) -> Image.Image:
    """8-bit RGB by the image's real range: 16-bit integers are scaled from 0-65535, floats from
    0-1 (or from their own min-max when outside it); ``convert("RGB")`` would clip them to 0-255."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        hi = 65535.0 if a.size == 0 or (a.min() >= 0 and a.max() <= 65535) else None
        lo, hi = (0.0, hi) if hi else (float(a.min()), float(a.max()))
        return _gray8((a - lo) / max(hi - lo, 1e-12))
    if im.mode == "F":
        a = np.nan_to_num(np.asarray(im, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if a.size and (a.min() < 0 or a.max() > 1):
            return _gray8((a - a.min()) / max(a.max() - a.min(), 1e-12))
        return _gray8(a)
    return im.convert("RGB")


def _gray8(unit: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(unit.clip(0, 1) * 255).astype(np.uint8), "L").convert("RGB")


def load_rgb(path: str | Path, max_pixels: int | None = None, exif: bool = False) -> Image.Image:
    """Decode any Pillow-readable file as 8-bit RGB (grayscale, 16-bit, float, CMYK, PNG named
    .jpg...).  ``exif``: apply the EXIF orientation (phone photos); off by default, because COCO
    coordinates refer to the pixels as stored.  Any failure, an image over ``max_pixels`` (default
    Pillow's limit, 89.5 MP) included, is an ``ImageDecodeError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(f"missing image: {path}")
    limit = max_pixels or DEFAULT_MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                w, h = im.size
                if w * h > limit:
                    raise ImageDecodeError(f"{path.name} declares {w}x{h} = {w * h} pixels, over the limit of "
                                           f"{limit} (a decompression bomb? raise it with --max-pixels)")
                im.load()
                if exif:
                    im = ImageOps.exif_transpose(im)
                return to_rgb8(im)
    except ImageDecodeError:
        raise
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, struct.error, EOFError ...
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
