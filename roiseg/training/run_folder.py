"""The folder a training run writes into: chosen, claimed for the run's length, and never shared.

A new run takes ``--out``, or ``<out>/run2``, ``run3`` ... next to an earlier run (as YOLO's
train2), and holds it with a lock file (``roiseg.common.files.claim_fresh_folder``): two runs started at
the same moment never pick the same folder.  A resumed run continues its own folder's history, from
its latest checkpoint; resuming an older checkpoint of the run is refused in place (it would rewrite
the history after it) and, with another ``--out``, branches into a new run folder that starts with
the history up to that checkpoint.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from roiseg.common.files import FolderClaim, claim_folder, claim_fresh_folder, same_file
from roiseg.modeling.checkpoint import (
    NAME,
    CheckpointError,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
)

RUN_FILES = ("metrics.jsonl", "last.pth", "best.pth", "results.csv")


def holds_run(folder: Path) -> bool:
    """``folder`` holds an earlier run's checkpoints or logs."""
    return folder.is_dir() and (any(folder.glob("checkpoint_epoch_*.pth"))
                                or any((folder / f).exists() for f in RUN_FILES))


def run_candidates(out: Path):
    """``out``, then ``out/run2``, ``out/run3`` ... (endless)."""
    yield out
    k = 2
    while True:
        yield out / f"run{k}"
        k += 1


def last_epoch(folder: Path) -> int:
    """The last epoch a run folder recorded: its newest checkpoint or metrics row (0: none)."""
    epochs = [e for e, _ in list_checkpoints(folder)]
    try:
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            try:
                epochs.append(int(json.loads(line)["epoch"]))
            except (ValueError, KeyError, TypeError):
                continue
    except OSError:
        pass
    return max(epochs, default=0)


def checkpoint_epoch(path: Path) -> int:
    m = NAME.match(path.name)
    return int(m.group(1)) if m else load_checkpoint(path).epoch


@dataclass
class RunFolder:
    path: Path
    claim: FolderClaim
    branch_of: Path | None = None     # a branched run: the checkpoint it starts from

    def release(self) -> None:
        self.claim.release()


def claim_run_folder(out: str | Path, resume: str | None) -> RunFolder:
    """The run folder for ``--out`` (and ``--resume``), claimed by this process."""
    out = Path(out)
    if not resume:
        return RunFolder(*_fresh(out))
    if resume == "auto":
        newest = find_checkpoint(out)     # a clear error when there is nothing to resume
        return _claim_in_place(out, newest, lambda epoch, last: (
            f"the run in {out} recorded epoch {last}, but its newest checkpoint is epoch {epoch} ({newest.name}; the "
            f"later ones are missing): resuming would rewrite the history after it. Branch from it into a new run "
            f"with --resume {newest} --out NEW_FOLDER"))
    ck = Path(resume)
    if not ck.is_file():
        raise CheckpointError(f"checkpoint not found: {ck}")
    if not same_file(ck.parent, out):       # another --out: a new run that starts from ``ck``
        path, claim = _fresh(out)
        return RunFolder(path, claim, branch_of=ck)
    return _claim_in_place(out, ck, lambda epoch, last: (
        f"{ck.name} is epoch {epoch}, but the run in {out} has reached epoch {last}: resuming it there would rewrite "
        f"the history after it. Continue the run with --resume auto, or branch from epoch {epoch} into a new run "
        f"with --out NEW_FOLDER"))


def _claim_in_place(out: Path, ck: Path, older: Callable[[int, int], str]) -> RunFolder:
    """Claim ``out`` to resume ``ck`` in it; a checkpoint older than the run's last recorded epoch is
    refused with ``older(epoch, last)`` (resuming it there would fork the run's history)."""
    claim = claim_folder(out, "checkpoint folder")
    epoch, last = checkpoint_epoch(ck), last_epoch(out)
    if epoch < last:
        claim.release()
        raise CheckpointError(older(epoch, last))
    return RunFolder(out, claim)


def _fresh(out: Path) -> tuple[Path, FolderClaim]:
    claim = claim_fresh_folder(run_candidates(out), holds_run, "checkpoint folder")
    return claim.folder, claim
