"""Person boxes for `predict` from the annotations or a file, validated once, when loaded.

``--boxes gt --ann FILE``: the annotated persons.  ``--boxes FILE``: COCO detection results
(``image_id``, ``bbox`` [x, y, w, h] pixels, ``score``; matched to images by id, which needs
``--ann``), COCO annotations (matched by file name), or ``{file_name: [[4 normalized numbers], ...]}``
in ``box_format`` (``xyxy`` or ``cxcywh``).

Rules: an entry that is not 4 numbers makes the file unusable (refused, naming the entry); a box
that is not finite, has no area, or lies outside its image is skipped and counted (detector outputs
hold a few such boxes; one must not stop a run).  Entries that match no image of ``--source`` are
reported; when none match, the run is refused.
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np

from roiseg.common.errors import RoisegError
from roiseg.common.geometry import as_xyxy

log = logging.getLogger(__name__)


class BoxFileError(RoisegError):
    pass


def _four_numbers(v, where: str) -> list[float]:
    if (not isinstance(v, (list, tuple)) or len(v) != 4
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
        raise BoxFileError(f"{where}: bbox must be 4 numbers, got {v!r}")
    return [float(x) for x in v]


def _score(v, where: str) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise BoxFileError(f"{where}: score must be a finite number, got {v!r}")
    return float(v)


class BoxSource:
    """Boxes per image: ``boxes_for(name, (h, w))`` -> (normalized xyxy [N, 4], scores [N],
    annotation ids or None), or None for ``auto`` (the extractor detects)."""

    def __init__(self, spec: str, ann: Path | None, box_format: str = "xyxy"):
        self.spec, self.fmt = spec, box_format
        self.label = "--boxes gt" if spec == "gt" else f"--boxes {spec}"
        self.ids: dict[str, int] = {}          # file name -> image id (from --ann)
        self.person_cat = 1
        self.by_name: dict[str, tuple] = {}    # name -> (rows [N, 4], scores [N], ann ids | None, kind)
        self.skipped: Counter = Counter()      # reason -> boxes skipped
        self.unknown_ids: Counter = Counter()  # COCO-results image ids that --ann does not know
        self.gt_rles: dict[str, list] = {}
        if spec == "gt" and ann is None:
            raise RoisegError("--boxes gt needs --ann (the annotation file with the person boxes)")
        if ann is not None:
            self._load_ann(Path(ann))
        if spec not in ("auto", "gt"):
            self._load_file(Path(spec))

    # ---- loading ----------------------------------------------------------------------------
    def _load_ann(self, ann: Path) -> None:
        from roiseg.data.coco import load_person_records
        if not ann.is_file():
            raise RoisegError(f"--ann not found: {ann}")
        records, _ = load_person_records(ann, keep_empty_images=True)
        for r in records:
            self.ids[r.file_name] = r.image_id
            if self.spec == "gt":
                self.by_name[r.file_name] = (np.array([i.box_norm for i in r.instances]).reshape(-1, 4),
                                             np.ones(len(r.instances)), [i.ann_id for i in r.instances], "xyxy")
                self.gt_rles[r.file_name] = [i.rle for i in r.instances]
        cats = [c["id"] for c in json.loads(ann.read_text()).get("categories", []) if c.get("name") == "person"]
        self.person_cat = cats[0] if cats else 1

    def _load_file(self, path: Path) -> None:
        if not path.is_file():
            raise RoisegError(f"--boxes: not an existing file, 'auto' or 'gt': {path}")
        try:
            d = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise RoisegError(f"--boxes {path} is not JSON: {exc}") from exc
        try:
            if isinstance(d, dict) and "annotations" in d:
                self._coco_annotations(d)
            elif isinstance(d, list):
                self._coco_results(d)
            elif isinstance(d, dict):
                self._mapping(d)
            else:
                raise BoxFileError(f"found a JSON {type(d).__name__}")
        except BoxFileError as exc:
            raise BoxFileError(f"--boxes {path}: {exc} (expected COCO detection results, COCO annotations or "
                               f"{{file_name: [[4 normalized numbers], ...]}})") from None

    def _add(self, name: str, row, score: float, kind: str) -> None:
        rows, scores, _, _ = self.by_name.setdefault(name, ([], [], None, kind))
        rows.append(row)
        scores.append(score)

    def _coco_annotations(self, d: dict) -> None:
        """Pixel boxes, matched by file name; crowd regions are not persons to segment."""
        ims = {im.get("id"): im for im in d.get("images", []) if isinstance(im, dict)}
        for k, a in enumerate(d["annotations"]):
            where = f"annotation {k}"
            if not isinstance(a, dict) or a.get("image_id") not in ims:
                raise BoxFileError(f"{where}: no image_id of its 'images' list")
            if a.get("iscrowd"):
                continue
            self._add(str(ims[a["image_id"]].get("file_name")), _four_numbers(a.get("bbox"), where),
                      _score(a.get("score", 1.0), where), "coco")
        self._finish()

    def _coco_results(self, d: list) -> None:
        """Pixel boxes, matched by image id: the id of each image comes from ``--ann``."""
        if not self.ids:
            raise BoxFileError("COCO detection results are matched by image id, so this file needs --ann (the "
                               "annotations that give each image file its id)")
        names = {v: k for k, v in self.ids.items()}
        for k, a in enumerate(d):
            where = f"entry {k}"
            if not isinstance(a, dict) or "image_id" not in a:
                raise BoxFileError(f"{where}: no image_id")
            row, score = _four_numbers(a.get("bbox"), where), _score(a.get("score", 1.0), where)
            if a["image_id"] not in names:
                self.unknown_ids[str(a["image_id"])] += 1
                continue
            self._add(names[a["image_id"]], row, score, "coco")
        self._finish()

    def _mapping(self, d: dict) -> None:
        for name, rows in d.items():
            if not isinstance(rows, list):
                raise BoxFileError(f"entry {name!r}: a list of boxes, got {rows!r}")
            for j, row in enumerate(rows):
                self._add(str(name), _four_numbers(row, f"entry {name!r} box {j}"), 1.0, self.fmt)
        self._finish()

    def _finish(self) -> None:
        """Rows -> arrays in xyxy (pixels for COCO kinds), dropping the ones that are no box."""
        out = {}
        for name, (rows, scores, ids, kind) in self.by_name.items():
            a = np.asarray(rows, np.float64).reshape(-1, 4)
            if kind == "coco":                             # x, y, w, h -> x1, y1, x2, y2
                a = np.concatenate([a[:, :2], a[:, :2] + a[:, 2:]], 1)
            else:
                a = as_xyxy(a, kind)
            keep = self._valid(a)
            out[name] = (a[keep], np.asarray(scores, np.float64)[keep], ids, "pixels" if kind == "coco" else "norm")
        self.by_name = out

    def _valid(self, a: np.ndarray) -> np.ndarray:
        finite = np.isfinite(a).all(1)
        self.skipped["not finite"] += int((~finite).sum())
        safe = np.where(finite[:, None], a, 0)
        area = finite & (safe[:, 2] > safe[:, 0]) & (safe[:, 3] > safe[:, 1])
        self.skipped["no area (x2 <= x1 or y2 <= y1)"] += int((finite & ~area).sum())
        return area

    # ---- matching ---------------------------------------------------------------------------
    def check_matches(self, names: list[str]) -> None:
        """Before the run: entries that name no image of ``--source`` are reported; a box source
        that matches none of them is refused (it would give 0 persons everywhere)."""
        if self.spec == "auto":
            return
        have = set(names)
        keys = list(self.by_name) if self.spec != "gt" else [n for n in self.by_name if self.by_name[n][0].size]
        matched = [k for k in keys if k in have]
        extra = len(self.unknown_ids)
        if self.spec == "gt":
            if not matched and names:
                raise RoisegError(f"--boxes gt: none of the {len(names)} images of --source are in --ann "
                                     f"(another dataset? e.g. {names[0]})")
            missing = [n for n in names if n not in self.by_name]
            if missing:
                log.warning("%d image(s) of --source are not in --ann and get no persons (e.g. %s)", len(missing),
                            ", ".join(missing[:3]))
            return
        unmatched = [k for k in keys if k not in have] + [f"image_id {i}" for i in self.unknown_ids]
        total = len(keys) + extra
        if total and not matched:
            raise RoisegError(f"{self.label}: its {total} entries match none of the {len(names)} images of "
                                 f"--source (e.g. {', '.join(unmatched[:3])})")
        if unmatched:
            log.warning("%d of the %d entries of %s name no image in --source (e.g. %s): their boxes are not used",
                        len(unmatched), total, self.label, ", ".join(unmatched[:3]))

    def boxes_for(self, name: str, size) -> tuple | None:
        """(normalized xyxy [N, 4] clipped to the image, scores [N], annotation ids or None);
        None for ``auto``.  Boxes left without area by the clipping are skipped and counted."""
        if self.spec == "auto":
            return None
        rows, scores, ids, unit = self.by_name.get(name, (np.zeros((0, 4)), np.zeros(0), None, "norm"))
        if unit == "pixels":
            h, w = size
            rows = rows / [w, h, w, h]
        clipped = rows.clip(0, 1)
        inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        self.skipped["outside the image"] += int((~inside).sum())
        if ids is not None:
            ids = [a for a, k in zip(ids, inside) if k]
        return clipped[inside], scores[inside], ids

    def skipped_summary(self) -> str | None:
        n = sum(self.skipped.values())
        if not n:
            return None
        return f"{n} box(es) skipped: " + ", ".join(f"{v} {k}" for k, v in self.skipped.items() if v)
