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

from roiseg.common.errors import RoisegError


class OverlapError(RoisegError):
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


def human_bytes(n: float) -> str:
    """``n`` bytes in the unit that shows it (``1.4 MB``, ``0.3 GB``): a small store is not "0.0 GB"."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


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


# ---- one run per output folder ------------------------------------------------------------------
LOCK_NAME = ".roiseg.lock"


class FolderBusyError(RoisegError):
    """Another live process writes into the folder a command wanted."""


class FolderClaim:
    """An output folder held by this process: ``LOCK_NAME`` inside it, locked with ``flock``.

    The kernel drops the lock when the process ends however it ends (kill -9 included), so a lock
    is never stale; the file names its owner (pid, host, start time) for the message another run
    prints.  ``token`` is random per claim: ranks of a torchrun run compare it to prove they see one
    shared folder."""

    def __init__(self, folder: Path, fd: int, token: str, created: bool = False):
        self.folder, self._fd, self.token, self.created = folder, fd, token, created

    @property
    def lock_path(self) -> Path:
        return self.folder / LOCK_NAME

    def release(self, remove_if_empty: bool = False) -> None:
        """Unlock (and remove the lock file); ``remove_if_empty``: also the folder, when the run
        left nothing else in it."""
        if self._fd is None:
            return
        import fcntl
        with contextlib.suppress(OSError):
            self.lock_path.unlink()     # while still locked: a waiting claimer re-checks the inode
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        if remove_if_empty and self.created:
            with contextlib.suppress(OSError):
                self.folder.rmdir()

    def __del__(self):   # a run object dropped without release (tests, notebooks) frees its folder
        with contextlib.suppress(Exception):
            self.release()

    def __enter__(self) -> "FolderClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_owner(folder: Path) -> str:
    """Who holds ``folder``'s lock, in words (from the lock file)."""
    try:
        info = json.loads((Path(folder) / LOCK_NAME).read_text())
        return f"process {info['pid']} on {info['host']} (started {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def try_claim(folder: str | Path, what: str = "output folder") -> FolderClaim | None:
    """Lock ``folder`` (created if missing) for this process; None when a live process holds it."""
    folder = Path(folder)
    try:
        return _try_claim(folder)
    except OSError as exc:
        if exc.errno == 28:
            raise
        raise RoisegError(f"cannot write to the {what} {folder} ({exc.strerror or exc}): pick a folder with "
                             f"write access") from exc


def _try_claim(folder: Path) -> FolderClaim | None:
    import fcntl
    import secrets
    import socket
    import time
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:   # the holder may have released (and unlinked) it between our open and our lock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    token = secrets.token_hex(8)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "token": token}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    return FolderClaim(folder, fd, token, created)


def claim_folder(folder: str | Path, what: str = "output folder") -> FolderClaim:
    """Lock ``folder`` or fail with one message naming the process that holds it."""
    claim = try_claim(folder, what)
    if claim is None:
        raise FolderBusyError(f"the {what} {folder} is in use by {lock_owner(Path(folder))}: two runs never share "
                              f"one folder; wait for it to finish or pick another folder")
    return claim


def claim_fresh_folder(candidates, used, what: str = "output folder") -> FolderClaim:
    """The first of ``candidates`` (an iterable of folders) that no live process holds and that
    ``used(folder)`` does not call taken by an earlier run, claimed: the check and the claim
    cannot race with another run choosing at the same moment (the check runs under the lock)."""
    for folder in candidates:
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            continue
        existed = folder.exists()
        claim = try_claim(folder, what)
        if claim is None:
            continue
        if not used(folder):
            return claim
        claim.release()
        if not existed:   # pragma: no cover - used() of a folder we just made
            folder.rmdir()
    raise FolderBusyError("no free output folder")   # unreachable with an endless candidates iterator


def folder_entries(folder: Path) -> list[str]:
    """The entries of ``folder`` that a run put there (its lock file aside)."""
    try:
        return sorted(n for n in os.listdir(folder) if n != LOCK_NAME)
    except FileNotFoundError:
        return []


# ---- output files replace only their own kind ---------------------------------------------------
def check_output_file(path: str | Path | None, flag: str, is_own, what: str) -> None:
    """Before any work: ``path`` (an output file) is not a folder, its folder exists (made if
    missing), and a file already there is only replaced when ``is_own(path)`` says it is ``what``
    (an earlier output of this kind), never a checkpoint, a model or a user's file."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise OverlapError(f"{flag} {path} is a folder: give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RoisegError(f"{flag} {path}: cannot create its folder ({exc.strerror or exc})") from exc
    if path.exists():
        try:
            own = bool(is_own(path))
        except Exception:  # noqa: BLE001 - unreadable as our kind: not ours
            own = False
        if not own:
            raise OverlapError(f"{flag} {path} exists and is not {what}: refusing to replace it; pick a new file "
                               f"name (or delete it yourself)")


def json_with(keys, list_of: bool = False):
    """``is_own`` for ``check_output_file``: a JSON object (or list of objects) with these keys."""
    def own(path: Path) -> bool:
        with open(path, "rb") as f:
            data = json.loads(f.read(50 << 20))
        items = data if list_of and isinstance(data, list) else [data]
        return bool(items) and all(isinstance(d, dict) and all(k in d for k in keys) for d in items)
    return own
