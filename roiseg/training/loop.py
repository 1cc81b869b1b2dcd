"""The training loop: AdamW, warmup + cosine, AMP, clipping, EMA; per epoch: train, validate, hooks.

Pieces with one job each live beside it: ``checkpointer.py`` (what a checkpoint holds, resume),
``hooks.py`` (checkpoint/best/last, logs and curves, the validation PNG), ``inference/evaluator.py``
(the metrics, shared with `evaluate`)."""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from roiseg.common.errors import RoisegError
from roiseg.common.files import refuse_overlap, same_file
from roiseg.data.store import FeatureStore, check_compatible
from roiseg.data.store_meta import StoreMeta
from roiseg.evaluation.evaluator import RoiEvaluator, run_evaluator
from roiseg.loader.sampling import RoiSampling, roi_copies
from roiseg.loader.sources import CacheIndex, epoch_batches, make_source, rank_images
from roiseg.modeling.decoders import build_model, decode_rois
from roiseg.modeling.devices import default_batch_size
from roiseg.training import distributed as D
from roiseg.training.class_weights import load_class_weights
from roiseg.training.config import Resolved, TrainConfig
from roiseg.training.ema import Ema
from roiseg.training.hooks import CheckpointHook, LogHook, as_hook
from roiseg.training.losses import LossConfig, SegLoss
from roiseg.training.run_folder import claim_run_folder
from roiseg.training.run_state import Checkpointer, model_kwargs
from roiseg.training.schedule import (
    DEFAULT_HIDDEN,
    REFERENCE_ROIS_PER_STEP,
    auto_epochs,
    rois_before_step,
    scaled_lr,
    warmup_cosine,
)

log = logging.getLogger(__name__)
# Without stored mirrored features (cache --flip), whether mirroring the feature map is used instead.
FLIP_MAP_BY_DEFAULT = True  # bench/ablate.py: within noise of stored flips, far better than none
EpochHook = Callable[[int, Path, dict, "Trainer"], None]


def check_output_folder(out: Path, checkpoint_bytes: int, keep: int = 3) -> None:
    """Before epoch 1: the run folder is writable and has room for a few checkpoints (a read-only
    or full folder would otherwise fail only after a whole epoch)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test{os.getpid()}"
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as exc:
        raise RoisegError(f"cannot write to the checkpoint folder {out} ({exc.strerror or exc}): "
                             f"pass --out DIR with write access") from exc
    free = shutil.disk_usage(out).free
    if free < keep * checkpoint_bytes:
        raise RoisegError(f"not enough disk space in {out}: {free / 1e6:.0f} MB free, a checkpoint takes "
                             f"~{checkpoint_bytes / 1e6:.0f} MB and a run writes one per epoch; free space or "
                             f"pass --out DIR")


def expected_rois(index: CacheIndex, images, sampling: RoiSampling) -> int:
    """Training ROIs one pass over ``images`` yields (what the LR schedule counts progress in)."""
    total = 0
    for i in images:
        a, b = index.rois_of(int(i))
        _, copies = roi_copies(index.padded_input[a:b], index.has_other[a:b], index.policy, sampling)
        n = len(copies)
        total += int(copies.sum() if n <= sampling.max_rois_per_image
                     else copies.mean() * sampling.max_rois_per_image)
    return max(total, 1)


def check_sparse_stores(cfg: TrainConfig, train_meta: StoreMeta, val_meta: StoreMeta) -> None:
    """A ROI-sparse store holds only the cells its ROIs can read: the global model (whole maps) cannot
    use one, and training may not jitter further than the store's margin."""
    for what, meta in (("training", train_meta), ("validation", val_meta)):
        if meta.sparse and cfg.model == "global":
            raise RoisegError(f"--model global reads whole feature maps, but the {what} cache is ROI-sparse "
                                 f"(cache --sparse); cache it without --sparse for this model")
    margin = train_meta.sparse_margin
    if margin is not None and cfg.max_jitter > margin + 1e-9:
        raise RoisegError(f"--max-jitter {cfg.max_jitter} exceeds the sparse training cache's margin {margin}: "
                             f"its ROIs could read cells it does not hold (use --max-jitter {margin} or re-cache "
                             f"with --sparse-margin {cfg.max_jitter})")


def check_ranks(world: int, n_train: int, n_val: int) -> None:
    """Every rank owns at least one training and one validation image: a rank with an empty shard
    would leave the others waiting in their collectives (a hang, not an error)."""
    if world > min(n_train, n_val):
        raise RoisegError(f"{world} ranks but only {n_train} training / {n_val} validation images: every rank "
                             f"needs an image of each; launch at most {min(n_train, n_val)} processes")


@dataclass
class _EpochTally:
    """An epoch's running sums on the device (read once, at its end)."""
    loss_sum: torch.Tensor
    loss_steps: int = 0
    steps: int = 0
    rois: int = 0


class Trainer:
    """One run: its stores, model, optimizer and sources, built in ``__init__`` from ``cfg`` (never
    changed: what the run makes of it is ``self.run``, a ``Resolved``), then ``fit``."""

    def __init__(self, cfg: TrainConfig, hooks: list[EpochHook] | None = None):
        self.cfg = cfg
        # checkpoint and logs first: later hooks see this epoch's checkpoint
        self.hooks = [CheckpointHook(), LogHook()] + [as_hook(h) for h in hooks or []]
        self.checkpointer = Checkpointer(self)
        self.last_checkpoint: Path | None = None
        if cfg.deterministic:
            D.deterministic()
        self.dist, self.device = D.setup(cfg.device, cfg.dist_timeout)
        self.cuda = self.device.type == "cuda"
        self.out = self._run_folder()
        try:
            self._build(cfg)
        except BaseException:
            self._abandon()
            raise

    def _build(self, cfg: TrainConfig) -> None:
        """Everything after the run folder: a failure here leaves no trace (``_abandon``)."""
        self.train_index, self.val_index = self._stores()
        self.input_hw = self.train_index.input_hw
        self.run = self._resolve()
        self.batch_size, self.rois_per_step, self.lr, self.amp = (self.run.batch_size, self.run.rois_per_step,
                                                                  self.run.lr, self.run.amp)
        self.loss = self._loss()
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, self.train_index.feature_shape[0], self._feature_stats(),
                                 self._fine_stats(), **model_kwargs(cfg, self.run.hidden, self.fine_channels)
                                 ).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=cfg.weight_decay)
        self.amp_dtype = getattr(torch, self.run.amp_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.ema = Ema(self.model, cfg.ema) if cfg.ema > 0 else None
        self.start_epoch, self.global_step, self.history = 1, 0, []
        if cfg.resume:
            self.checkpointer.resume(cfg.resume)
        self.net = DistributedDataParallel(self.model) if self.dist.enabled else self.model
        self.train_source, self.val_source = self._sources()
        if self.dist.is_main:
            check_output_folder(self.out, self._checkpoint_bytes())
            self._log_plan()

    def _abandon(self) -> None:
        """A run that failed before its first epoch: remove what it wrote (the folder, when this run
        created it; else a class-weight file it computed there) and release the folder."""
        folder = getattr(self, "folder", None)
        if folder is None:
            return
        if folder.claim.created:      # everything in it is this run's
            folder.release()
            shutil.rmtree(folder.path, ignore_errors=True)
            return
        run = getattr(self, "run", None)
        if run is not None and Path(run.analysis).parent == self.out and Path(run.analysis) != Path(self.cfg.analysis):
            Path(run.analysis).unlink(missing_ok=True)
        folder.release()

    # ---- construction steps ---------------------------------------------------------------------
    def _run_folder(self) -> Path:
        """The run folder (``run_folder.claim_run_folder``): ``--out``, ``<out>/run2`` ... next to
        another run, or the resumed run's own; rank 0 claims it and every other rank must see the
        same folder (its lock file's token), else the run stops before anything is written."""
        cfg = self.cfg
        refuse_overlap({"--out": cfg.out}, {"--train-store": cfg.train_store, "--val-store": cfg.val_store,
                                            "--analysis": cfg.analysis, "--vis-ann": cfg.vis_ann,
                                            "--vis-image-dir": cfg.vis_image_dir, "--vis-onnx": cfg.vis_onnx,
                                            "--resume": cfg.resume if cfg.resume != "auto" else None},
                       inputs_inside_outputs=False)
        self.folder = None
        if self.dist.is_main:
            self.folder = claim_run_folder(cfg.out, cfg.resume)
            shared = (str(self.folder.path), self.folder.claim.token,
                      str(self.folder.branch_of) if self.folder.branch_of else None)
        else:
            shared = None
        out, token, branch = D.broadcast_object(shared, self.dist)
        self.branch_of = Path(branch) if branch else None
        D.check_shared_folder(Path(out), token, self.dist)
        if Path(out) != Path(cfg.out) and self.dist.is_main:
            log.warning("%s holds another run's checkpoints: this run writes to %s", cfg.out, out)
        return Path(out)

    def _stores(self) -> tuple[CacheIndex, CacheIndex]:
        cfg = self.cfg
        train = CacheIndex(cfg.train_store, cfg.train_images, cfg.allow_partial)
        val = CacheIndex(cfg.val_store, cfg.val_images, cfg.allow_partial)
        # the fine path: automatic when the training store has a fine map (roialign only)
        self.fine_channels = (train.fine_shape[0] if train.fine_shape and cfg.fine == "auto"
                              and cfg.model == "roialign" else 0)
        fine = bool(self.fine_channels)
        default_width = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "fine_width")
        if not fine and cfg.fine_width != default_width:
            raise RoisegError(f"--fine-width sizes the fine path, but {cfg.train_store} has no fine map "
                                 f"(cache --fine-feature)")
        check_compatible(train.meta.fingerprint(fine), val.meta.fingerprint(fine),
                         f"validation cache {cfg.val_store} vs training cache {cfg.train_store}", keys=None,
                         labels=("training cache has", "validation cache has"))
        check_sparse_stores(cfg, train.meta, val.meta)
        if same_file(train.path, val.path) and set(train.images) & set(val.images) and self.dist.is_main:
            log.warning("validating on %d of the training images (--val-store is the training cache): the metrics "
                        "then measure the fit, not how the decoder does on new images",
                        len(set(train.images) & set(val.images)))
        if len(train.images) == 0 or len(val.images) == 0:
            raise RoisegError("no cached images to train or validate on (check the stores / image lists)")
        check_ranks(self.dist.world, len(train.images), len(val.images))
        return train, val

    def _resolve(self) -> Resolved:
        """The auto values: width, steps and batches by device, epochs by the data's size."""
        cfg = self.cfg
        # Small steps leave a GPU waiting on kernel launches (bench/gpu_bench.sh: 16 images/step
        # reach 40% of the in-memory rate, 64 reach 98%); a CPU wants small ones.  Optimizer steps
        # are counted in ROIs, not images, so small subsets still get many updates.
        batch_size = cfg.batch_size or default_batch_size(self.device)
        rois_per_step = cfg.rois_per_step or (256 if self.cuda else REFERENCE_ROIS_PER_STEP)
        amp = cfg.amp and (self.cuda or cfg.amp_dtype == "bfloat16")
        if cfg.amp and not amp and self.dist.is_main:
            log.info("AMP in float16 is a CUDA feature: training in fp32 on %s (--amp-dtype bfloat16 runs it "
                     "here)", self.device)
        self.sampling = self._sampling()
        # The LR schedule's progress counts ROIs of all ranks together: every replica then steps
        # with the same rate (DDP averages gradients, not rates).
        self.epoch_rois = D.sum_int(expected_rois(self.train_index, rank_images(
            self.train_index.images, self.dist.rank, self.dist.world), self.sampling), self.dist, self.device)
        epochs = cfg.epochs or auto_epochs(self.epoch_rois // self.dist.world, rois_per_step, cfg.min_steps)
        return Resolved(out=str(self.out), hidden=cfg.hidden or DEFAULT_HIDDEN.get(cfg.model, 128), epochs=epochs,
                        batch_size=batch_size, rois_per_step=rois_per_step, lr=scaled_lr(cfg.lr, rois_per_step),
                        amp=amp, amp_dtype=cfg.amp_dtype, device=str(self.device), analysis=cfg.analysis)

    def _loss(self) -> SegLoss:
        cfg = self.cfg
        weights, analysis = load_class_weights(cfg.analysis, cfg.class_weights, cfg.classes, self.train_index.meta,
                                               self.train_index.tables["image_id"][self.train_index.images],
                                               self.out, self.dist.is_main)
        self.run = dataclasses.replace(self.run, analysis=analysis)
        return SegLoss(LossConfig(tuple(weights) if weights else None, cfg.dice_weight, tuple(cfg.dice_classes),
                                  cfg.focal_gamma, cfg.boundary_weight, cfg.score_weight),
                       cfg.classes).to(self.device)

    def _sources(self):
        cfg, r, w = self.cfg, self.dist.rank, self.dist.world
        fine = bool(self.fine_channels)
        train = make_source(cfg.resident, self.train_index, self.sampling, cfg.mask_size, cfg.seed, cfg.workers,
                            self.device, rank_images(self.train_index.images, r, w), fine)
        val = make_source(cfg.resident, self.val_index, dataclasses.replace(self.sampling, hflip=0.0), cfg.mask_size,
                          cfg.seed, cfg.workers, self.device, rank_images(self.val_index.images, r, w), fine)
        return train, val

    def _log_plan(self) -> None:
        cfg, run = self.cfg, self.run
        log.info("train: %d images (%s), val: %d images, model %s (%d params), device %s, world %d",
                 len(self.train_index.images), self.train_source.kind, len(self.val_index.images),
                 cfg.model, sum(p.numel() for p in self.model.parameters()), self.device, self.dist.world)
        if self.fine_channels:
            fine = self.train_index.meta.fine
            log.info("fine path: %s %s fused at %dx%d (--fine off: without it)", fine.name, list(fine.shape),
                     cfg.mask_size, cfg.mask_size)
        log.info("%d epochs of ~%d training ROIs, %d ROIs per step (~%d steps; lr %.2e = %.0e x sqrt(%d/%d)), "
                 "%d images per read, flip %s", run.epochs, self.epoch_rois, run.rois_per_step,
                 run.epochs * self.epoch_rois // run.rois_per_step, run.lr, cfg.lr,
                 run.rois_per_step, REFERENCE_ROIS_PER_STEP, run.batch_size, self._flip_desc())

    def _checkpoint_bytes(self) -> int:
        """About one checkpoint: weights, two Adam moments and the EMA copy, in fp32, and its records
        (history, RNG states, store metadata: ~100 KB)."""
        return 4 * 4 * sum(p.numel() for p in self.model.parameters()) + (128 << 10)

    def _feature_stats(self):
        if self.cfg.feature_norm == "none":
            return None
        return FeatureStore(self.train_index.path).feature_stats(self.train_index.images)

    def _fine_stats(self):
        if not self.fine_channels or self.cfg.feature_norm == "none":
            return None
        return FeatureStore(self.train_index.path).fine_stats(self.train_index.images)

    def _sampling(self) -> RoiSampling:
        cfg = self.cfg
        p, src = cfg.hflip, cfg.hflip_source
        has = self.train_index.has_flip
        if p > 0 and src == "stored" and not has:
            raise RoisegError(f"{cfg.train_store} has no mirrored features: cache it with --flip, or set "
                              f"hflip_source = \"map\" (a --config file) or pass --hflip 0")
        use_map = src == "map" or (src == "auto" and not has and FLIP_MAP_BY_DEFAULT)
        if p > 0 and src == "auto" and not has and not use_map:
            log.info("%s has no mirrored features (cache --flip): training without flip augmentation",
                     cfg.train_store)
            p = 0.0
        return RoiSampling(cfg.jitter, cfg.jitter_scale, cfg.samples_per_roi, cfg.overlap_boost,
                           cfg.min_roi_px, cfg.max_rois_per_image, p, use_map, cfg.max_jitter)

    def _flip_desc(self) -> str:
        s = self.sampling
        return "off" if s.hflip == 0 else f"p={s.hflip} ({'mirrored feature map' if s.hflip_map else 'stored mirrored features'})"

    # ---- steps ---------------------------------------------------------------------------
    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features, fine map or None) as the model takes them."""
        maps = [batch["features"], batch.get("fine")]
        if self.cfg.zero_features:
            maps = [None if m is None else torch.zeros_like(m) for m in maps]
        return tuple(m if m is None or self.amp else m.float() for m in maps)

    def _targets(self, t: torch.Tensor) -> torch.Tensor:
        return torch.where(t == 2, 0, t) if self.cfg.classes == 2 else t

    def _set_lr(self, progress: float) -> float:
        lr = self.lr * warmup_cosine(progress, self.run.epochs, self.cfg.warmup_epochs)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _chunks(self, n: int, epoch: int, read: int) -> tuple[list[torch.Tensor], list[int]]:
        """A read's ROIs, shuffled, in steps of ``rois_per_step`` to 2x that, and every rank's ROI
        count of this read.  Under DDP every rank takes the same number of steps (the fewest any
        rank can make), and a rank whose read has no trainable ROI takes them with empty selections:
        skipping them would leave the others waiting in their gradient all-reduce (a hang)."""
        k = max(1, n // self.rois_per_step)
        counts = [n]
        if self.dist.enabled:
            both = D.all_gather_ints([k, n], self.dist, self.device)
            k, counts = min(r[0] for r in both), [r[1] for r in both]
        if sum(counts) == 0:   # no rank has anything to learn from this read
            return [], counts
        g = torch.Generator().manual_seed(hash((self.cfg.seed, epoch, read, self.dist.rank)) % 2 ** 62)
        order = torch.randperm(n, generator=g).to(self.device)
        return list(torch.tensor_split(order, k)), counts

    def train_epoch(self, epoch: int) -> dict:
        """One pass over this rank's training images: every read split into optimizer steps
        (``run_step``), the LR advanced by the ROIs all ranks have trained on."""
        self.net.train()
        batches = epoch_batches(self.train_index.images, epoch, self.cfg.seed, self.batch_size,
                                self.dist.rank, self.dist.world)
        tally = _EpochTally(torch.zeros((), dtype=torch.float64, device=self.device))
        done = 0      # training ROIs of all ranks before this read: the LR schedule's clock
        t0 = time.perf_counter()
        bar = tqdm(total=len(batches), desc=f"epoch {epoch}", unit="read", disable=not self.dist.is_main,
                   leave=False)
        lr, losses = self._set_lr(epoch - 1), None
        for read, batch in enumerate(self.train_source.iterate(batches, epoch, True)):
            feats, fine = self._inputs(batch)
            targets = self._targets(batch["targets"])
            chunks, counts = self._chunks(batch["rois"].shape[0], epoch, read)
            for j, sel in enumerate(chunks):
                lr = self._set_lr(epoch - 1 + min(1.0, (done + rois_before_step(counts, len(chunks), j))
                                                  / self.epoch_rois))
                losses = self.run_step(feats, fine, batch["rois"][sel], targets[sel], tally) or losses
            done += sum(counts)
            bar.update(1)
            if read % 5 == 0 and losses is not None:
                bar.set_postfix(loss=f"{losses['loss'].item():.4f}", lr=f"{lr:.2e}", steps=tally.steps)
        bar.close()
        return self._epoch_summary(tally, time.perf_counter() - t0, lr)

    def run_step(self, feats, fine, rois: torch.Tensor, targets: torch.Tensor, tally: _EpochTally) -> dict | None:
        """One optimizer step on ``rois`` (as detectron2's ``run_step``): forward under autocast, the
        loss, scaled backward, clipping, the step, EMA.  An empty selection still steps with a zero
        loss: DDP's gradient all-reduce must run on every rank.  The losses, or None when empty."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            logits, scores = decode_rois(self.net, feats, rois, fine)
        losses = self.loss(logits, targets, scores) if len(rois) else None
        loss = losses["loss"] if losses else logits.float().sum() * 0.0 + (
            scores.sum() * 0.0 if scores is not None else 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema:
            self.ema.update(self.model)
        if losses:
            tally.loss_sum += loss.detach()  # no .item(): a host sync per step would stall the GPU
            tally.loss_steps += 1
        tally.steps += 1
        tally.rois += len(rois)
        self.global_step += 1
        return losses

    def _epoch_summary(self, tally: _EpochTally, seconds: float, lr: float) -> dict:
        """The epoch's loss and speed over all ranks (one all-reduce), and the replica check."""
        sums = torch.stack([tally.loss_sum, tally.loss_sum.new_tensor(tally.loss_steps),
                            tally.loss_sum.new_tensor(tally.rois)])
        D.all_reduce_([sums], self.dist)
        out = {"loss": float(sums[0] / sums[1].clamp_min(1)), "train_rois": int(sums[2]), "steps": tally.steps,
               "train_s": round(seconds, 2), "rois_per_s": round(float(sums[2]) / seconds, 1), "lr": lr}
        if self.dist.enabled:   # DDP keeps replicas equal only if every rank did the same: check it
            out["replicas"] = D.check_replicas(self.model, self.optimizer, self.dist)
        return out

    @torch.no_grad()
    def validate(self, model: torch.nn.Module | None = None, details: bool = False) -> dict:
        """Metrics of ``model`` (default: the EMA weights when on, else the trained ones).
        ``details``: also ``per_roi`` records (image, ROI, instance IoU, per-class I/U, GT area,
        another person inside) for bootstrap statistics over images."""
        model = model or (self.ema.module if self.ema else self.model)
        batches = epoch_batches(self.val_index.images, 0, 0, self.batch_size, self.dist.rank, self.dist.world,
                                shuffle=False, pad=False)
        evaluator = run_evaluator(model, self.val_source.iterate(batches, 0, False),
                                  self.evaluator.keep_records(details), self.amp, self.cfg.zero_features,
                                  self.amp_dtype)
        D.all_reduce_(evaluator.tensors(), self.dist)
        if self.dist.enabled:   # per-ROI records and COCO detections of every rank's share of the images
            evaluator.records = D.all_gather_lists(evaluator.records, self.dist)
            evaluator.coco_dets = D.all_gather_lists(evaluator.coco_dets, self.dist)
            evaluator.score_pairs = D.all_gather_lists(evaluator.score_pairs, self.dist)
        return evaluator.result()

    @functools.cached_property
    def evaluator(self) -> RoiEvaluator:
        """One per run (``run_evaluator`` resets it): the val store is opened and checked once."""
        return RoiEvaluator(self.val_index, FeatureStore(self.val_index.path), self.cfg.classes, self.device,
                            self.cfg.coco_eval)

    # ---- epochs --------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> list[dict]:
        """Epoch = train, validate, then the hooks: checkpoint, logs, and the caller's (rank 0).
        ``until``: stop after this epoch (default: the run's last; the LR schedule stays the run's)."""
        last = self.run.epochs if until is None else min(until, self.run.epochs)
        if self.start_epoch > last and self.dist.is_main:
            log.warning("nothing to do: the run in %s has trained %d epochs and is %d long", self.out,
                        self.start_epoch - 1, self.run.epochs)
        for epoch in range(self.start_epoch, last + 1):
            metrics = {"epoch": epoch, **self.train_epoch(epoch), **self.validate()}
            self.history.append(metrics)
            if self.dist.is_main:
                for hook in self.hooks:
                    hook.after_epoch(self, epoch, metrics)
            D.barrier(self.dist)
            self.start_epoch = epoch + 1
        for hook in self.hooks:
            hook.after_train(self)
        D.barrier(self.dist)
        self.release_folder()
        return self.history

    def close(self):
        self.release_folder()
        D.teardown(self.dist)

    def release_folder(self) -> None:
        """Let another run have the run folder (after the last epoch; ``close`` does it too)."""
        if getattr(self, "folder", None) is not None:
            self.folder.release()
