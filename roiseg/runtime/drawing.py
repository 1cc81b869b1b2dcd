"""How persons are drawn (overlays of `predict`, the validation PNG): per-person colours, the box
red, the mask opacity, a font that exists on every machine."""
from __future__ import annotations

from PIL import ImageFont

BOX_RED = (255, 0, 0)
# matplotlib's tab10 without its red, so boxes stay the only red.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232)]
ALPHA = 0.55


def person_colour(k: int) -> tuple:
    return PALETTE[k % len(PALETTE)]


def font(size: int, bold: bool = False):
    for name in (("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"),
                 "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size)
    except TypeError:  # old Pillow
        return ImageFont.load_default()
