"""Checkpoints: atomic writes, a self-describing name, and loading without arbitrary pickle."""
from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
from pathlib import Path

import torch

from roiseg.common.errors import FeatCacheError
from roiseg.common.files import atomic_write
from roiseg.data.store import FINGERPRINT_KEYS, check_compatible

NAME = re.compile(r"checkpoint_epoch_(\d{4,})_(\d+)x(\d+)_(\d{4,5})\.pth$")


class CheckpointError(FeatCacheError):
    pass


def miou4(miou: float) -> int:
    """The checkpoint name's 4 digits: mIoU truncated (not rounded) to 4 decimals."""
    return int(math.floor(miou * 10000 + 1e-9))


def checkpoint_name(epoch: int, input_hw, miou: float) -> str:
    h, w = input_hw
    return f"checkpoint_epoch_{epoch:04d}_{h}x{w}_{miou4(miou):04d}.pth"


def tensor_digest(obj) -> str:
    """sha256 over every tensor of a (nested) checkpoint, in a fixed order: names, dtypes, shapes
    and bytes.  Saved with the checkpoint and checked on load, so a flipped bit is an error (torch
    itself does not verify its zip records' CRCs)."""
    h = hashlib.sha256()

    def walk(x, name: str):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}|{x.dtype}|{tuple(x.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                if name or k != "checksum":
                    walk(x[k], f"{name}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{name}[{i}]")
    walk(obj, "")
    return h.hexdigest()


def save_checkpoint(state: dict, folder: str | Path, epoch: int, input_hw, miou: float) -> Path:
    """Write to a temp name and rename: a crash or a full disk never leaves a half-written
    checkpoint, and earlier checkpoints are never touched."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / checkpoint_name(epoch, input_hw, miou)
    state = {**state, "checksum": tensor_digest(state)}
    try:
        with atomic_write(path) as tmp:
            torch.save(state, tmp)
    except OSError as exc:
        raise CheckpointError(f"could not write checkpoint {path} ({exc.strerror or exc}); "
                              f"earlier checkpoints in {folder} are kept") from exc
    return path


def publish_alias(path: Path, alias: Path) -> Path:
    """Point ``alias`` (best.pth, last.pth) at checkpoint ``path`` atomically: a hard link when the
    file system allows one (no extra disk), else a copy; never a half-written file."""
    with atomic_write(alias) as tmp:
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
    return alias


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted copy or a full disk "
                              f"while it was written elsewhere; use another checkpoint")
    other = _other_format(path)
    if other:
        raise CheckpointError(f"{path} is not a checkpoint of this project: it is {other}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load checkpoint {path}: {_load_failure(exc)}") from exc
    if not isinstance(ck, dict) or "model" not in ck:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no model state)")
    if "checksum" in ck and tensor_digest(ck) != ck["checksum"]:
        raise CheckpointError(f"checkpoint {path} is corrupted: its tensors do not match the checksum saved "
                              f"with it (flipped bits or a damaged copy); use another checkpoint")
    return ck


def _other_format(path: Path) -> str | None:
    """What a file given as a checkpoint is instead, when its first bytes tell (a torch checkpoint is
    a zip archive or a pickle): an ONNX graph or a JSON file; None otherwise."""
    with open(path, "rb") as f:
        head = f.read(256)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return None
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON file (checkpoints are the .pth files train writes into its run folder)"
    if head[:1] == b"\x08" and (path.suffix.lower() == ".onnx" or b"onnx" in head.lower() or b"pytorch" in head):
        return ("an ONNX model: predict takes an exported graph with --exported, cache takes the "
                "extractor with --onnx; a checkpoint is a .pth file train writes")
    return None


def _load_failure(exc: Exception) -> str:
    """Why ``torch.load`` failed, in the user's terms (PyTorch's own message advises turning its
    safety check off, which a checkpoint of this project never needs)."""
    text = str(exc)
    if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
        return ("it holds Python objects other than tensors and plain values, so it is not a checkpoint of this "
                "project (and loading it could run code): refused")
    if "zip" in text.lower() or "central directory" in text or "magic number" in text or "EOF" in text:
        return "the file is damaged or truncated, or not a checkpoint of this project"
    return f"not a checkpoint of this project, or damaged ({type(exc).__name__})"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.match(p.name))]
    return sorted(found)


def find_checkpoint(folder: str | Path, epoch: int | None = None) -> Path:
    """The checkpoint of ``epoch`` (or the latest); clear errors when none or several match."""
    found = list_checkpoints(folder)
    if not found:
        raise CheckpointError(f"no checkpoint_epoch_*.pth in {folder}")
    if epoch is None:
        last = found[-1][0]
        matches = [p for e, p in found if e == last]
    else:
        matches = [p for e, p in found if e == epoch]
        if not matches:
            have = ", ".join(str(e) for e in sorted({e for e, _ in found}))
            raise CheckpointError(f"no checkpoint for epoch {epoch} in {folder} (epochs: {have})")
    if len(matches) > 1:
        raise CheckpointError(f"several checkpoints for epoch {epoch or found[-1][0]} in {folder}: "
                              + ", ".join(p.name for p in matches) + " - pass --checkpoint PATH")
    return matches[0]


def decoder_from_checkpoint(ck: dict | str | Path, use_ema: bool = True) -> tuple:
    """(decoder ``nn.Module`` in eval mode, the training cache's metadata: preprocessing, ROI
    padding, extractor).

    The EMA weights when the checkpoint has them (what validation scored)."""
    from roiseg.modeling.decoders import build_model, load_decoder_state
    if not isinstance(ck, dict):
        ck = load_checkpoint(ck)
    model = build_model(ck["model_name"], ck["in_channels"], **ck["model_kwargs"])
    state = ck["model"]
    if use_ema and ck.get("ema"):
        state = {k[len("module."):]: v for k, v in ck["ema"].items() if k.startswith("module.")}
    load_decoder_state(model, state)
    return model.eval(), ck["cache_metadata"]["train"]


def fingerprint(meta: dict, fine: bool = False) -> dict:
    """What a decoder needs of a store; ``fine``: the fine map too (a decoder that fuses one)."""
    return {k: meta.get(k) for k in FINGERPRINT_KEYS} | ({"fine": meta.get("fine")} if fine else {})


def check_decoder_on_store(model_name: str, ck_fingerprint: dict, store_meta: dict, what: str) -> None:
    """The rules every command applies before a decoder reads a store (train, evaluate, predict):
    the same extractor tensor, channels, preprocessing and ROI padding (and fine map, for a decoder
    that fuses one); and a ``global`` decoder, which reads whole feature maps, never on a ROI-sparse
    store (its zeros would change the result)."""
    check_compatible(ck_fingerprint, fingerprint(store_meta, bool(ck_fingerprint.get("fine"))), what,
                     keys=None, labels=("checkpoint has", "store has"))
    if model_name == "global" and store_meta.get("sparse"):
        raise FeatCacheError(f"{what}: a --model global decoder reads whole feature maps, but the store is ROI-sparse "
                             f"(cache --sparse): use a dense store (cache without --sparse)")


def referenced_inputs(ck: dict) -> dict[str, str]:
    """Every file and folder a checkpoint's run points at (the extractor, the stores, annotation
    files, image folders, the class-weight file), labelled for a message: no command's output may
    replace one of them (``roiseg.common.files.refuse_overlap``)."""
    found: dict[str, str] = {}
    for split, meta in (ck.get("cache_metadata") or {}).items():
        for key, label in (("onnx_path", "extractor"), ("annotation_path", "annotation file"),
                           ("images_dir", "image folder")):
            if isinstance(meta, dict) and meta.get(key):
                found.setdefault(f"the checkpoint's {label} ({split})", str(meta[key]))
    config, resolved = ck.get("config") or {}, ck.get("resolved") or {}
    for key, label in (("train_store", "training cache"), ("val_store", "validation cache"),
                       ("analysis", "class-weight file")):
        value = resolved.get(key) or config.get(key)
        if value:
            found[f"the checkpoint's {label}"] = str(value)
    # the same path under two labels (train and val extractor) is named once
    seen, unique = set(), {}
    for label, path in found.items():
        if path not in seen:
            seen.add(path)
            unique[label] = path
    return unique
