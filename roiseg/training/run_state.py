"""Everything a resumable run saves and restores: model, optimizer, LR position, grad scaler, EMA,
RNG states, history, and what the checkpoint was trained on (config, cache metadata)."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from roiseg.data.store_meta import StoreMeta
from roiseg.modeling.checkpoint import (
    CheckpointError,
    CheckpointRecord,
    check_decoder_on_store,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from roiseg.modeling.decoders import load_decoder_state

log = logging.getLogger(__name__)


def model_kwargs(cfg, hidden: int, fine_channels: int = 0) -> dict:
    """The decoder's constructor arguments (``hidden``: the resolved width; ``fine_channels``: of
    the fine map the decoder fuses, 0 = none)."""
    kw = {"hidden": hidden, "roi_size": cfg.roi_size, "mask_size": cfg.mask_size, "num_classes": cfg.classes}
    # only when on: checkpoints from before the score head / fine path keep their kwargs (and resume)
    if fine_channels:
        kw |= {"fine_channels": fine_channels, "fine_width": cfg.fine_width}
    return kw | ({"score_head": True} if cfg.score_head else {})


def training_set(meta: StoreMeta, names: list[str] | None) -> dict:
    """What identifies a run's training data beyond the extractor (checked on resume): the store's
    annotations, size and limit, and the image list (``train_images``) it was given."""
    return {"annotation_sha256": meta.annotation_sha256, "images": meta.n_images,
            "limit": meta.limit, "train_images": None if names is None else len(names),
            "train_images_hash": None if names is None else hash_names(names)}


def hash_names(names) -> str:
    import hashlib
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]


# Settings of where and how a run executes, not of what it trains: a resumed run takes them from
# the command line (or their defaults), not from the run it continues.
RUNTIME_KEYS = ("resume", "device", "workers", "resident", "allow_partial", "dist_timeout")


def run_settings(resume: str, out: str | None = None) -> dict:
    """The settings a run was started with (its ``args.yaml``, else the checkpoint's own copy),
    for ``train --resume``: the stores, model and recipe need not be repeated."""
    path = find_checkpoint(out or "checkpoints") if resume == "auto" else Path(resume)
    args = path.parent / "args.yaml"
    saved = _read_yaml(args) if args.is_file() else {}
    if not saved:
        if args.is_file():
            log.warning("%s is unreadable: using the settings saved in %s", args, path.name)
        saved = load_checkpoint(path).config
    settings = {k: v for k, v in saved.items() if k not in RUNTIME_KEYS}
    settings["out"] = str(path.parent)
    # the class weights the run used (computed into its folder when its --analysis was missing)
    resolved = _read_yaml(path.parent / "resolved.yaml")
    if resolved.get("analysis") and Path(resolved["analysis"]).is_file():
        settings["analysis"] = resolved["analysis"]
    return settings


def _read_yaml(path: Path) -> dict:
    import yaml
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def restore_rng(rng: dict, cuda: bool) -> None:
    """torch, CUDA (as many devices as both runs have), numpy and Python RNG states, from tensors
    on any device."""
    torch.set_rng_state(rng["torch"].cpu())
    states = [x.cpu() for x in rng.get("cuda") or []]
    if cuda and states:
        n = min(len(states), torch.cuda.device_count())
        for d in range(n):
            torch.cuda.set_rng_state(states[d], d)
    n = rng["numpy"]
    np.random.set_state((n[0], n[1].cpu().numpy().astype(np.uint32), *n[2:]))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))


def restore_scaler(scaler, state: dict) -> None:
    """AMP's grad scaler across AMP on/off: a run saved without AMP (CPU, --no-amp) has an empty
    state, with which an enabled scaler starts fresh; a disabled scaler ignores a saved one."""
    if not scaler.is_enabled():
        return
    if not state:
        log.info("the checkpoint was trained without AMP: the grad scaler starts at its initial scale")
        return
    scaler.load_state_dict(state)


class Checkpointer:
    def __init__(self, trainer):
        self.t = trainer

    def record(self, epoch: int, metrics: dict) -> CheckpointRecord:
        """This epoch's checkpoint: the decoder, the run's state, its config and its stores."""
        t = self.t
        np_state = np.random.get_state()
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if t.cuda else [],
               "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
               "python": random.getstate()}
        return CheckpointRecord(
            epoch, metrics, t.cfg.to_dict(), t.run.to_dict(), t.cfg.model,
            model_kwargs(t.cfg, t.run.hidden, t.fine_channels), t.train_index.feature_shape[0], tuple(t.input_hw),
            t.train_index.meta.fingerprint(fine=bool(t.fine_channels)), t.train_index.meta, t.val_index.meta,
            t.model.state_dict(), t.optimizer.state_dict(), t.global_step, t.scaler.state_dict(),
            t.ema.state_dict() if t.ema else None, t.history, rng)

    def save(self, epoch: int, metrics: dict) -> Path:
        return save_checkpoint(self.record(epoch, metrics), self.t.out)

    def resume(self, spec: str) -> None:
        """Restore a run from ``spec`` ("auto": the latest checkpoint in the run folder)."""
        t = self.t
        path = find_checkpoint(t.cfg.out) if spec == "auto" else Path(spec)
        # on the host: the RNG states must be CPU tensors (numpy, torch.set_rng_state), and
        # load_state_dict moves weights and optimizer state to the parameters' device itself
        ck = load_checkpoint(path, map_location="cpu").on_host()
        check_decoder_on_store(ck.model_name, ck.cache_fingerprint, t.train_index.meta,
                               f"checkpoint {path.name} vs training cache {t.cfg.train_store}")
        # Same extractor is not enough: another training set (other annotations, another subset or
        # image list) would continue a schedule that belongs to a different run.
        have = training_set(ck.train_meta, ck.config.get("train_images"))
        want = training_set(t.train_index.meta, t.cfg.train_images)
        if have != want:
            diffs = [f"{k}: checkpoint {have[k]!r}, now {want[k]!r}" for k in have if have[k] != want[k]]
            raise CheckpointError(f"checkpoint {path.name} was trained on another training set:\n  "
                                  + "\n  ".join(diffs) + "\nresume with the same training cache, or start a new run "
                                  "(without --resume)")
        want = model_kwargs(t.cfg, t.run.hidden, t.fine_channels)
        if ck.model_name != t.cfg.model or ck.model_kwargs != want:
            raise CheckpointError(f"checkpoint {path.name} holds model {ck.model_name} "
                                  f"{ck.model_kwargs}, asked for {t.cfg.model} {want}")
        load_decoder_state(t.model, ck.model)
        t.optimizer.load_state_dict(ck.optimizer)   # moves its state to the parameters' device
        t.global_step = ck.global_step
        restore_scaler(t.scaler, ck.scaler)
        if t.ema and ck.ema:
            t.ema.load_state_dict(ck.ema)
        restore_rng(ck.rng, t.cuda)
        t.history = list(ck.history)
        t.start_epoch = ck.epoch + 1
        if t.branch_of is not None and ck.epoch >= t.run.epochs:
            raise CheckpointError(f"{path.name} is epoch {ck.epoch} and the run is {t.run.epochs} epochs long: a branch "
                                  f"would train nothing; pass --epochs above {ck.epoch}")
        if t.branch_of is not None:
            if t.dist.is_main:
                from roiseg.training.hooks import LogHook
                LogHook.seed(t.out, t.history)
            log.info("branched from %s into %s: continuing at epoch %d", path, t.out, t.start_epoch)
        else:
            log.info("resumed from %s: continuing at epoch %d", path, t.start_epoch)
