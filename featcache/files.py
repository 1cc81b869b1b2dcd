"""Files written safely: every write goes to a temp name and is renamed, outputs never replace
inputs, and hashes of the files a run depends on.

``atomic_write(path)`` is the one temp-then-rename helper of the project: a crash or a full disk
leaves the old file or the new one, never half of one, and an error names ``path`` (never the
temp file).  ``refuse_overlap`` is checked by every command before it writes: an output that is
an input (the same path, a hard link to it, or a folder holding it) is refused with one message.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

from .errors import FeatCacheError


class OverlapError(FeatCacheError):
    """An output would replace, or be written inside, something the command reads."""


@contextlib.contextmanager
def atomic_write(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it onto ``path`` when the block succeeds.

    ``suffix`` keeps writers that pick a format by extension happy (``.png``).  On any error the
    temp file is removed, and an ``OSError`` is re-raised naming ``path``, not the temp name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is not None and Path(exc.filename).name.startswith(f".{path.name}.tmp"):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def user_facing_name(filename: str | None) -> str | None:
    """The file a user asked for, behind a temp name in an error (ours: ``.NAME.tmpPID[.ext]``;
    zarr's chunk writes: ``KEY.UUID.partial``)."""
    if not filename:
        return filename
    p = Path(filename)
    m = re.fullmatch(r"\.(.+)\.tmp\d+(\.\w+)?", p.name)
    if m:
        return str(p.with_name(m.group(1)))
    m = re.fullmatch(r"(.+)\.[0-9a-f]{32}\.partial", p.name)
    return str(p.with_name(m.group(1))) if m else filename


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, obj, indent: int | None = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(obj, indent=indent))


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---- outputs never replace inputs -------------------------------------------------------------
def _real(p: str | Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(str(p)))))


def same_file(a: str | Path, b: str | Path) -> bool:
    """The same file or folder: equal real paths, or the same inode (a hard link)."""
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def is_inside(child: str | Path, parent: str | Path) -> bool:
    """``child`` lies strictly inside the folder ``parent`` (after resolving links)."""
    c, p = _real(child), _real(parent)
    return c != p and p in c.parents


def refuse_overlap(outputs: dict, inputs: dict, inputs_inside_outputs: bool = True) -> None:
    """Refuse before anything is written when an output (a file or folder the command writes) is
    an input, lies inside an input folder, or (``inputs_inside_outputs``) holds an input.

    ``outputs`` / ``inputs``: option name -> path (None entries are ignored).  One message that
    names both options and both paths."""
    for oname, out in outputs.items():
        if out is None or str(out) == "":
            continue
        for iname, inp in inputs.items():
            if inp is None or str(inp) == "":
                continue
            if same_file(out, inp):
                why = "is"
            elif is_inside(out, inp):
                why = "lies inside"
            elif inputs_inside_outputs and is_inside(inp, out):
                why = "holds"
            else:
                continue
            raise OverlapError(f"{oname} {out} {why} the input {iname} {inp}: the outputs could replace what "
                               f"this command reads. Pick an {oname} outside the inputs.")
