"""Checkpoints: one typed record (``CheckpointRecord``), atomic writes, a self-describing name,
and loading without arbitrary pickle.  The file is the record's dict (the v1 layout every checkpoint
of this project has), with a sha256 of its tensors checked on every load."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from roiseg.common.errors import RoisegError
from roiseg.common.files import atomic_write
from roiseg.data.store import check_compatible
from roiseg.data.store_meta import FeatureSource, StoreMeta, UntrustedStoreError

NAME = re.compile(r"checkpoint_epoch_(\d{4,})_(\d+)x(\d+)_(\d{4,5})\.pth$")


class CheckpointError(RoisegError):
    pass


CHECKPOINT_FORMAT = "roiseg-checkpoint-v1"


@dataclass
class CheckpointRecord:
    """Everything a checkpoint holds: the decoder (name, constructor arguments, weights, EMA), the
    run's state for resume (optimizer, LR position, grad scaler, RNG states, history), its config
    as given and as resolved, and the stores it was trained and validated on."""
    epoch: int
    metrics: dict
    config: dict                  # the run's TrainConfig as a dict (training.config reads it back)
    resolved: dict                # and what the run made of it (training.config.Resolved)
    model_name: str
    model_kwargs: dict
    in_channels: int
    input_hw: tuple[int, int]
    cache_fingerprint: dict       # what the decoder needs of a store (FeatureSource.fingerprint)
    train_meta: StoreMeta
    val_meta: StoreMeta
    model: dict                   # state dicts
    optimizer: dict = field(default_factory=dict)
    global_step: int = 0
    scaler: dict = field(default_factory=dict)
    ema: dict | None = None
    history: list = field(default_factory=list)
    rng: dict = field(default_factory=dict)
    checksum: str | None = None
    format: str = CHECKPOINT_FORMAT

    @property
    def fuses_fine(self) -> bool:
        """The decoder fuses a fine map (its stores' fine map is part of its fingerprint)."""
        return bool(self.cache_fingerprint.get("fine"))

    @property
    def source(self) -> FeatureSource:
        """Where the decoder's features come from (the training store's source, its fine map only
        when the decoder fuses one)."""
        return self.train_meta.source.with_fine(self.fuses_fine)

    @property
    def zero_features(self) -> bool:
        """An ablation run trained on zeroed features (the no-feature baseline): its decoder must
        read zeros wherever it runs."""
        return bool(self.config.get("zero_features"))

    @property
    def num_classes(self) -> int:
        return int(self.model_kwargs["num_classes"])

    @property
    def mask_size(self) -> int:
        return int(self.model_kwargs["mask_size"])

    def decoder_state(self, use_ema: bool = True) -> dict:
        """The weights to predict with: the EMA's when the run kept one (what validation scored)."""
        if use_ema and self.ema:
            return {k[len("module."):]: v for k, v in self.ema.items() if k.startswith("module.")}
        return self.model

    def referenced_inputs(self) -> dict[str, str]:
        """Every file and folder the run points at (the extractor, the stores, annotation files,
        image folders, the class-weight file), labelled for a message: no command's output may
        replace one of them (``roiseg.common.files.refuse_overlap``)."""
        found: dict[str, str] = {}
        for split, meta in (("train", self.train_meta), ("val", self.val_meta)):
            for label, value in (("extractor", meta.source.onnx_path), ("annotation file", meta.annotation_path),
                                 ("image folder", meta.images_dir)):
                if value:
                    found.setdefault(f"the checkpoint's {label} ({split})", value)
        for key, label in (("train_store", "training cache"), ("val_store", "validation cache"),
                           ("analysis", "class-weight file")):
            value = self.resolved.get(key) or self.config.get(key)
            if value:
                found[f"the checkpoint's {label}"] = str(value)
        seen, unique = set(), {}      # the same path under two labels (train and val extractor) once
        for label, path in found.items():
            if path not in seen:
                seen.add(path)
                unique[label] = path
        return unique

    def to_dict(self) -> dict:
        return {"format": self.format, "epoch": self.epoch, "metrics": self.metrics, "config": self.config,
                "resolved": self.resolved, "model_name": self.model_name, "model_kwargs": self.model_kwargs,
                "in_channels": self.in_channels, "input_hw": list(self.input_hw),
                "cache_fingerprint": self.cache_fingerprint,
                "cache_metadata": {"train": self.train_meta.to_dict(), "val": self.val_meta.to_dict()},
                "model": self.model, "optimizer": self.optimizer, "scheduler": {"global_step": self.global_step},
                "scaler": self.scaler, "ema": self.ema, "history": self.history, "rng": self.rng}

    @classmethod
    def from_dict(cls, d: dict, where: str = "checkpoint") -> CheckpointRecord:
        """A loaded file; a dict without the v1 fields is not a checkpoint of this project."""
        required = ("epoch", "model_name", "model_kwargs", "in_channels", "input_hw", "cache_fingerprint",
                    "cache_metadata", "model", "config")
        missing = [k for k in required if k not in d]
        if missing or d.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{where} is not a checkpoint this version reads (format "
                                  f"{d.get('format', CHECKPOINT_FORMAT)!r}; missing {', '.join(missing) or 'nothing'}):"
                                  f" retrain it with `cli.py train`")
        try:
            metas = {k: StoreMeta.from_dict(d["cache_metadata"][k], f"{where}: {k} cache metadata")
                     for k in ("train", "val")}
        except (KeyError, TypeError, UntrustedStoreError) as exc:
            raise CheckpointError(f"{where}: its store metadata is damaged ({exc}); use another checkpoint") from exc
        return cls(int(d["epoch"]), dict(d.get("metrics") or {}), dict(d["config"]), dict(d.get("resolved") or {}),
                   d["model_name"], dict(d["model_kwargs"]), int(d["in_channels"]), tuple(d["input_hw"]),
                   dict(d["cache_fingerprint"]), metas["train"], metas["val"], d["model"], d.get("optimizer") or {},
                   int((d.get("scheduler") or {}).get("global_step", 0)), d.get("scaler") or {}, d.get("ema"),
                   list(d.get("history") or []), d.get("rng") or {}, d.get("checksum"))

    def on_host(self) -> CheckpointRecord:
        """Every tensor on the CPU, wherever a loader put it."""
        return dataclasses.replace(self, **{k: to_host(getattr(self, k)) for k in
                                            ("model", "optimizer", "scaler", "ema", "rng")})


def to_host(x):
    """Every tensor of a (nested) state on the CPU."""
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: to_host(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_host(v) for v in x)
    return x


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


def save_checkpoint(record: CheckpointRecord, folder: str | Path) -> Path:
    """Write to a temp name and rename: a crash or a full disk never leaves a half-written
    checkpoint, and earlier checkpoints are never touched."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / checkpoint_name(record.epoch, record.input_hw, record.metrics["mIoU"])
    state = record.to_dict()
    state["checksum"] = tensor_digest(state)
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


def load_checkpoint(path: str | Path, map_location="cpu") -> CheckpointRecord:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder: give a checkpoint file in it (best.pth, last.pth or "
                              f"checkpoint_epoch_*.pth)")
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
    return CheckpointRecord.from_dict(ck, str(path))


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
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if head and all(c >= 32 or c in (9, 10, 13) for c in head):
        return "a text file (checkpoints are the .pth files train writes into its run folder)"
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


def decoder_from_checkpoint(ck: CheckpointRecord | str | Path, use_ema: bool = True) -> tuple:
    """(decoder ``nn.Module`` in eval mode, its ``FeatureSource``: extractor, preprocessing, ROI
    padding, fine map).  The EMA weights when the checkpoint has them (what validation scored)."""
    from roiseg.modeling.decoders import build_model, load_decoder_state
    if not isinstance(ck, CheckpointRecord):
        ck = load_checkpoint(ck)
    model = build_model(ck.model_name, ck.in_channels, **ck.model_kwargs)
    load_decoder_state(model, ck.decoder_state(use_ema))
    return model.eval(), ck.source


def check_decoder_on_store(model_name: str, ck_fingerprint: dict, store_meta: StoreMeta, what: str) -> None:
    """The rules every command applies before a decoder reads a store (train, evaluate, predict):
    the same extractor tensor, channels, preprocessing and ROI padding (and fine map, for a decoder
    that fuses one); and a ``global`` decoder, which reads whole feature maps, never on a ROI-sparse
    store (its zeros would change the result)."""
    check_compatible(ck_fingerprint, store_meta.fingerprint(bool(ck_fingerprint.get("fine"))), what,
                     keys=None, labels=("checkpoint has", "store has"))
    if model_name == "global" and store_meta.sparse:
        raise RoisegError(f"{what}: a --model global decoder reads whole feature maps, but the store is ROI-sparse "
                             f"(cache --sparse): use a dense store (cache without --sparse)")
