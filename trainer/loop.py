"""The training loop: AdamW, warmup + cosine, AMP, clipping, EMA, per-epoch validation/checkpoint."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from featcache.errors import FeatCacheError
from featcache.store import FINGERPRINT_KEYS, FeatureStore, check_compatible

from . import distributed as D
from .checkpoint import (CheckpointError, find_checkpoint, load_checkpoint, publish_alias, save_checkpoint,
                         write_text_atomic)
from .config import TrainConfig
from .inference.evaluate import run_evaluator
from .inference.evaluator import RoiEvaluator
from .data import CacheIndex, epoch_batches, make_source, rank_images
from .losses import LossConfig, SegLoss
from .plots import plot_results
from .models import build_model, load_decoder_state
from .sampling import RoiSampling, roi_copies
from .weights import load_class_weights

log = logging.getLogger(__name__)
# Without stored mirrored features (cache --flip), whether mirroring the feature map is used instead.
FLIP_MAP_BY_DEFAULT = True  # bench/ablate.py: within noise of stored flips, far better than none
EpochHook = Callable[[int, Path, dict, "Trainer"], None]


def fingerprint(meta: dict) -> dict:
    return {k: meta.get(k) for k in FINGERPRINT_KEYS}


def model_kwargs(cfg: TrainConfig) -> dict:
    return {"hidden": cfg.hidden, "roi_size": cfg.roi_size, "mask_size": cfg.mask_size,
            "num_classes": cfg.classes}


REFERENCE_ROIS_PER_STEP = 16
# The global model runs a U-Net over the whole 80x80 map per ROI: 128 channels there train at
# 0.5 ROIs/s on a CPU core (roialign: 28), 32 at 8.
DEFAULT_HIDDEN = {"roialign": 128, "global": 32, "prior": 0}
DEFAULT_EPOCHS = 12
BEST_METRICS = ("instance_mIoU", "mIoU")   # higher is better


def auto_epochs(epoch_rois: int, rois_per_step: int, min_steps: int) -> int:
    """12 epochs, or as many as it takes to make ``min_steps`` optimizer steps on a small set."""
    return max(DEFAULT_EPOCHS, math.ceil(min_steps * rois_per_step / max(epoch_rois, 1)))


def scaled_lr(lr: float, rois_per_step: int) -> float:
    """Square-root scaling for adaptive optimizers: ``lr`` is the rate at 16 ROIs per step."""
    return lr * math.sqrt(rois_per_step / REFERENCE_ROIS_PER_STEP)


def warmup_cosine(progress: float, epochs: int, warmup_epochs: float) -> float:
    """LR factor at ``progress`` epochs done (fractional): linear warm-up, then cosine to 0."""
    if progress < warmup_epochs:
        return max(progress / warmup_epochs, 1e-3)
    span = max(epochs - warmup_epochs, 1e-9)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup_epochs) / span)))


RUN_FILES = ("metrics.jsonl", "last.pth", "best.pth", "results.csv")


def fresh_run_folder(out: Path) -> Path:
    """``out`` if it holds no earlier run, else the first free ``out/run2``, ``out/run3``... (as
    YOLO's train2): two runs never mix checkpoints or metrics.  Every rank computes the same folder
    before anything is written."""
    def used(d: Path) -> bool:
        return d.is_dir() and (any(d.glob("checkpoint_epoch_*.pth")) or any((d / f).exists() for f in RUN_FILES))
    if not used(out):
        return out
    k = 2
    while used(out / f"run{k}"):
        k += 1
    return out / f"run{k}"


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


class Trainer:
    def __init__(self, cfg: TrainConfig, hooks: list[EpochHook] | None = None):
        self.cfg = cfg
        self.hooks = list(hooks or [])
        self.dist, self.device = D.setup(cfg.device)
        self.train_index = CacheIndex(cfg.train_store, cfg.train_images)
        self.val_index = CacheIndex(cfg.val_store, cfg.val_images)
        check_compatible(self.train_index.meta, fingerprint(self.val_index.meta),
                         f"validation cache {cfg.val_store} vs training cache {cfg.train_store}")
        if cfg.classes not in (2, 3):
            raise FeatCacheError("--classes must be 2 or 3")
        if cfg.best_metric not in BEST_METRICS:  # checked before training, not after epoch 1
            raise FeatCacheError(f"--best-metric {cfg.best_metric!r} is not a validation metric "
                                 f"({', '.join(BEST_METRICS)})")
        if cfg.hidden == 0:
            cfg.hidden = DEFAULT_HIDDEN.get(cfg.model, 128)
        if len(self.train_index.images) == 0 or len(self.val_index.images) == 0:
            raise FeatCacheError("no cached images to train or validate on (check the stores / image lists)")
        self.input_hw = tuple(self.train_index.meta["input_hw"])
        self.cuda = self.device.type == "cuda"
        # Small steps leave a GPU waiting on kernel launches (bench/gpu_bench.sh: 16 images/step
        # reach 40% of the in-memory rate, 64 reach 98%); a CPU wants small ones.
        self.batch_size = cfg.batch_size or (64 if self.cuda else 8)
        # Optimizer steps are counted in ROIs, not images, so small subsets still get many updates;
        # one read is split into several steps.  A GPU needs bigger steps to stay busy.
        self.rois_per_step = cfg.rois_per_step or (256 if self.cuda else REFERENCE_ROIS_PER_STEP)
        self.lr = scaled_lr(cfg.lr, self.rois_per_step)
        self.amp = cfg.amp and self.cuda
        if cfg.amp and not self.cuda and self.dist.is_main:
            log.info("AMP is a CUDA feature: training in fp32 on %s", self.device)
        weights = load_class_weights(cfg.analysis, cfg.class_weights, cfg.classes, self.train_index.meta)
        self.loss = SegLoss(LossConfig(tuple(weights) if weights else None, cfg.dice_weight,
                                       tuple(cfg.dice_classes), cfg.focal_gamma, cfg.boundary_weight),
                            cfg.classes).to(self.device)
        torch.manual_seed(cfg.seed)
        in_ch = self.train_index.feature_shape[0]
        self.model = build_model(cfg.model, in_ch, self._feature_stats(), **model_kwargs(cfg)).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=cfg.weight_decay)
        self.sampling = self._sampling()
        self.epoch_rois = expected_rois(self.train_index, rank_images(self.train_index.images, self.dist.rank,
                                                                      self.dist.world), self.sampling)
        if cfg.epochs < 0:
            raise FeatCacheError(f"--epochs must be >= 1 (0 = auto), got {cfg.epochs}")
        if cfg.epochs == 0:
            cfg.epochs = auto_epochs(self.epoch_rois, self.rois_per_step, cfg.min_steps)
        self.schedule_epochs = cfg.epochs  # the LR schedule's length, fixed at start
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.ema = None
        if cfg.ema > 0:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema))
        self.start_epoch = 1
        self.global_step = 0
        self.history: list[dict] = []
        if cfg.resume:
            self._resume(cfg.resume)
        self.net = DistributedDataParallel(self.model) if self.dist.enabled else self.model
        r, w = self.dist.rank, self.dist.world
        self.train_source = make_source(cfg.resident, self.train_index, self.sampling, cfg.mask_size, cfg.seed,
                                        cfg.workers, self.device, rank_images(self.train_index.images, r, w))
        val_sampling = dataclasses.replace(self.sampling, hflip=0.0)
        self.val_source = make_source(cfg.resident, self.val_index, val_sampling, cfg.mask_size, cfg.seed,
                                      cfg.workers, self.device, rank_images(self.val_index.images, r, w))
        self.out = Path(cfg.out) if cfg.resume else fresh_run_folder(Path(cfg.out))
        if str(self.out) != str(cfg.out) and self.dist.is_main:
            log.warning("%s holds another run's checkpoints: this run writes to %s", cfg.out, self.out)
        cfg.out = str(self.out)
        self._tb = None
        if self.dist.is_main:
            log.info("train: %d images (%s), val: %d images, model %s (%d params), device %s, world %d",
                     len(self.train_index.images), self.train_source.kind, len(self.val_index.images),
                     cfg.model, sum(p.numel() for p in self.model.parameters()), self.device, self.dist.world)
            log.info("%d epochs of ~%d training ROIs, %d ROIs per step (~%d steps; lr %.2e = %.0e x sqrt(%d/%d)), "
                     "%d images per read, flip %s", cfg.epochs, self.epoch_rois, self.rois_per_step,
                     cfg.epochs * self.epoch_rois // self.rois_per_step, self.lr, cfg.lr,
                     self.rois_per_step, REFERENCE_ROIS_PER_STEP, self.batch_size, self._flip_desc())

    def _feature_stats(self):
        if self.cfg.feature_norm == "none":
            return None
        if self.cfg.feature_norm != "channel":
            raise FeatCacheError(f"--feature-norm must be channel or none, got {self.cfg.feature_norm!r}")
        try:  # writable: an old store gets its statistics saved once
            store = FeatureStore(self.train_index.path, "r+")
        except (OSError, PermissionError):
            store = FeatureStore(self.train_index.path)
        return store.feature_stats(self.train_index.images)

    def _sampling(self) -> RoiSampling:
        cfg = self.cfg
        p, src = cfg.hflip, cfg.hflip_source
        if not 0 <= p <= 1:
            raise FeatCacheError(f"--hflip must be a probability in [0, 1], got {p}")
        if src not in ("auto", "stored", "map"):
            raise FeatCacheError(f"--hflip-source must be auto, stored or map, got {src!r}")
        has = self.train_index.has_flip
        if p > 0 and src == "stored" and not has:
            raise FeatCacheError(f"{cfg.train_store} has no mirrored features: cache it with --flip, or "
                                 f"pass --hflip-source map or --hflip 0")
        use_map = src == "map" or (src == "auto" and not has and FLIP_MAP_BY_DEFAULT)
        if p > 0 and src == "auto" and not has and not use_map:
            log.info("%s has no mirrored features (cache --flip): training without flip augmentation",
                     cfg.train_store)
            p = 0.0
        return RoiSampling(cfg.jitter, cfg.jitter_scale, cfg.samples_per_roi, cfg.overlap_boost,
                           cfg.min_roi_px, cfg.max_rois_per_image, p, use_map)

    def _flip_desc(self) -> str:
        s = self.sampling
        return "off" if s.hflip == 0 else f"p={s.hflip} ({'mirrored feature map' if s.hflip_map else 'stored mirrored features'})"

    # ---- state ---------------------------------------------------------------------------
    def state(self, epoch: int, metrics: dict) -> dict:
        np_state = np.random.get_state()
        return {
            "epoch": epoch, "metrics": metrics, "config": self.cfg.to_dict(),
            "model_name": self.cfg.model, "model_kwargs": model_kwargs(self.cfg),
            "in_channels": self.train_index.feature_shape[0], "input_hw": list(self.input_hw),
            "cache_fingerprint": fingerprint(self.train_index.meta),
            "cache_metadata": {"train": self._plain(self.train_index.meta), "val": self._plain(self.val_index.meta)},
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": {"global_step": self.global_step}, "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "history": self.history,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.cuda else [],
                    "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                    "python": random.getstate()},
        }

    @staticmethod
    def _plain(meta: dict) -> dict:
        return json.loads(json.dumps(meta))

    def _resume(self, spec: str) -> None:
        path = find_checkpoint(self.cfg.out) if spec == "auto" else Path(spec)
        ck = load_checkpoint(path, map_location=self.device)
        check_compatible(ck["cache_fingerprint"], fingerprint(self.train_index.meta),
                         f"checkpoint {path.name} vs training cache {self.cfg.train_store}")
        if ck["model_name"] != self.cfg.model or ck["model_kwargs"] != model_kwargs(self.cfg):
            raise CheckpointError(f"checkpoint {path.name} holds model {ck['model_name']} "
                                  f"{ck['model_kwargs']}, asked for {self.cfg.model} {model_kwargs(self.cfg)}")
        load_decoder_state(self.model, ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.global_step = int(ck.get("scheduler", {}).get("global_step", 0))
        self.scaler.load_state_dict(ck["scaler"])
        if self.ema and ck.get("ema"):
            self.ema.load_state_dict(ck["ema"])
        rng = ck["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if self.cuda and rng["cuda"]:
            torch.cuda.set_rng_state_all([t.cpu() for t in rng["cuda"]])
        n = rng["numpy"]
        np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))
        self.history = list(ck.get("history", []))
        self.start_epoch = int(ck["epoch"]) + 1
        log.info("resumed from %s: continuing at epoch %d", path, self.start_epoch)

    # ---- steps ---------------------------------------------------------------------------
    def _inputs(self, batch: dict) -> torch.Tensor:
        f = batch["features"]
        if self.cfg.zero_features:
            f = torch.zeros_like(f)
        return f if self.amp else f.float()

    def _targets(self, t: torch.Tensor) -> torch.Tensor:
        return torch.where(t == 2, 0, t) if self.cfg.classes == 2 else t

    def _set_lr(self, progress: float) -> float:
        lr = self.lr * warmup_cosine(progress, self.schedule_epochs, self.cfg.warmup_epochs)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _chunks(self, n: int, epoch: int, read: int) -> list[torch.Tensor]:
        """A read's ROIs, shuffled, in steps of ``rois_per_step`` to 2x that (every rank the same
        number of steps under DDP)."""
        k = max(1, n // self.rois_per_step)
        if self.dist.enabled:
            t = torch.tensor([k], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            k = int(t)
        g = torch.Generator().manual_seed(hash((self.cfg.seed, epoch, read, self.dist.rank)) % 2 ** 62)
        order = torch.randperm(n, generator=g).to(self.device)
        return list(torch.tensor_split(order, k)) if n else []

    def train_epoch(self, epoch: int) -> dict:
        self.net.train()
        batches = epoch_batches(self.train_index.images, epoch, self.cfg.seed, self.batch_size,
                                self.dist.rank, self.dist.world)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        steps = rois = 0
        t0 = time.perf_counter()
        bar = tqdm(total=len(batches), desc=f"epoch {epoch}", unit="read", disable=not self.dist.is_main,
                   leave=False)
        lr = self._set_lr(epoch - 1)
        for read, batch in enumerate(self.train_source.iterate(batches, epoch, True)):
            feats = self._inputs(batch)
            targets = self._targets(batch["targets"])
            for sel in self._chunks(batch["rois"].shape[0], epoch, read):
                lr = self._set_lr(epoch - 1 + min(1.0, rois / self.epoch_rois))
                with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                    logits = self.net(feats, batch["rois"][sel])
                losses = self.loss(logits, targets[sel])
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(losses["loss"]).backward()
                if self.cfg.grad_clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.ema:
                    self.ema.update_parameters(self.model)
                loss_sum += losses["loss"].detach()  # no .item(): a host sync per step would stall the GPU
                steps += 1
                self.global_step += 1
                rois += len(sel)
            bar.update(1)
            if read % 5 == 0 and steps:
                bar.set_postfix(loss=f"{losses['loss'].item():.4f}", lr=f"{lr:.2e}", steps=steps)
        bar.close()
        sums = torch.stack([loss_sum, loss_sum.new_tensor(steps), loss_sum.new_tensor(rois)])
        D.all_reduce_([sums], self.dist)
        dt = time.perf_counter() - t0
        return {"loss": float(sums[0] / sums[1].clamp_min(1)), "train_rois": int(sums[2]),
                "steps": int(sums[1]) // max(1, self.dist.world),
                "train_s": round(dt, 2), "rois_per_s": round(float(sums[2]) / dt, 1), "lr": lr}

    @torch.no_grad()
    def validate(self, model: torch.nn.Module | None = None, details: bool = False) -> dict:
        """Metrics of ``model`` (default: the EMA weights when on, else the trained ones).
        ``details``: also ``per_roi`` records (image, ROI, instance IoU, per-class I/U, GT area,
        another person inside) for bootstrap statistics over images."""
        model = model or (self.ema.module if self.ema else self.model)
        batches = epoch_batches(self.val_index.images, 0, 0, self.batch_size, self.dist.rank, self.dist.world,
                                shuffle=False, pad=False)
        evaluator = run_evaluator(model, self.val_source.iterate(batches, 0, False),
                                  self.evaluator().keep_records(details), self.amp, self.cfg.zero_features)
        D.all_reduce_(evaluator.tensors(), self.dist)
        return evaluator.result()

    def evaluator(self) -> RoiEvaluator:
        return RoiEvaluator(self.val_index, FeatureStore(self.val_index.path), self.cfg.classes, self.device,
                            self.cfg.coco_eval)

    # ---- epochs --------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        for epoch in range(self.start_epoch, self.cfg.epochs + 1):
            tr = self.train_epoch(epoch)
            val = self.validate()
            metrics = {"epoch": epoch, **tr, **val}
            self.history.append(metrics)
            if self.dist.is_main:
                path = save_checkpoint(self.state(epoch, metrics), self.out, epoch, self.input_hw,
                                       val["mIoU"])
                self._publish(path, metrics)
                self._log(metrics)
                log.info("epoch %d: loss %.4f  mIoU %.4f (bg %.3f, target %.3f%s)  instance_mIoU %.4f  -> %s",
                         epoch, tr["loss"], val["mIoU"], val["iou"]["background"], val["iou"]["target"],
                         f", other {val['iou']['non_target']:.3f}" if "non_target" in val["iou"] else "",
                         val["instance_mIoU"], path.name)
                for hook in self.hooks:
                    hook(epoch, path, metrics, self)
            D.barrier(self.dist)
        if self._tb:
            self._tb.close()
        return self.history

    def _publish(self, path: Path, metrics: dict) -> None:
        """last.pth = this epoch; best.pth = the best epoch so far by ``best_metric`` (ties: the earlier)."""
        publish_alias(path, self.out / "last.pth")
        key = self.cfg.best_metric
        if all(metrics[key] > h.get(key, -math.inf) for h in self.history[:-1]) or not (self.out / "best.pth").exists():
            publish_alias(path, self.out / "best.pth")
            log.info("best.pth -> epoch %d (%s %.4f)", metrics["epoch"], key, metrics[key])

    def _log(self, metrics: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if not (self.out / "args.yaml").exists():
            import yaml
            write_text_atomic(self.out / "args.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        row = {"epoch": metrics["epoch"], "loss": metrics["loss"], "lr": metrics["lr"], "mIoU": metrics["mIoU"],
               **{f"iou_{k}": v for k, v in metrics["iou"].items()}, "instance_mIoU": metrics["instance_mIoU"],
               "steps": metrics.get("steps"), "train_s": metrics["train_s"], "rois_per_s": metrics["rois_per_s"]}
        csv = self.out / "results.csv"
        old = csv.read_text() if csv.exists() else ",".join(row) + "\n"
        write_text_atomic(csv, old + ",".join(f"{v:.6g}" if isinstance(v, float) else str(v)
                                              for v in row.values()) + "\n")
        try:
            plot_results(csv)
        except Exception as exc:  # a plot must never stop training
            log.warning("results.png not drawn: %s", exc)
        if not self.cfg.tensorboard:
            return
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.out / "tb"))
        e = metrics["epoch"]
        for key in ("loss", "mIoU", "instance_mIoU", "rois_per_s", "lr"):
            self._tb.add_scalar(f"{'train' if key in ('loss', 'rois_per_s', 'lr') else 'val'}/{key}",
                                metrics[key], e)
        for c, v in metrics["iou"].items():
            self._tb.add_scalar(f"val/iou_{c}", v, e)
        self._tb.flush()

    def close(self):
        D.teardown(self.dist)
