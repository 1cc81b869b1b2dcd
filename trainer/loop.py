"""The training loop: AdamW, warmup + cosine, AMP, clipping, EMA, per-epoch validation/checkpoint."""
from __future__ import annotations

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
from featcache.geometry import normalized_to_pixel
from featcache.store import FINGERPRINT_KEYS, FeatureStore, check_compatible
from featcache.targets import native_crop

from . import distributed as D
from .checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import CacheIndex, epoch_batches, make_source, rank_images
from .losses import LossConfig, SegLoss
from .metrics import IoUAccumulator, instance_iou
from .models import build_model, paste_masks
from .roi_targets import sample_roi_targets, union_packed
from .sampling import RoiSampling
from .weights import load_class_weights

log = logging.getLogger(__name__)
EpochHook = Callable[[int, Path, dict, "Trainer"], None]


def fingerprint(meta: dict) -> dict:
    return {k: meta.get(k) for k in FINGERPRINT_KEYS}


def model_kwargs(cfg: TrainConfig) -> dict:
    return {"hidden": cfg.hidden, "roi_size": cfg.roi_size, "mask_size": cfg.mask_size,
            "num_classes": cfg.classes}


def warmup_cosine(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


class Trainer:
    def __init__(self, cfg: TrainConfig, hooks: list[EpochHook] | None = None):
        self.cfg = cfg
        self.hooks = list(hooks or [])
        self.dist, self.device = D.setup(cfg.device)
        self.train_index = CacheIndex(cfg.train_store)
        self.val_index = CacheIndex(cfg.val_store)
        check_compatible(self.train_index.meta, fingerprint(self.val_index.meta),
                         f"validation cache {cfg.val_store} vs training cache {cfg.train_store}")
        if cfg.classes not in (2, 3):
            raise FeatCacheError("--classes must be 2 or 3")
        self.input_hw = tuple(self.train_index.meta["input_hw"])
        self.cuda = self.device.type == "cuda"
        # Small steps leave a GPU waiting on kernel launches (bench/gpu_bench.sh: 16 images/step
        # reach 40% of the in-memory rate, 64 reach 98%); a CPU wants small ones.
        self.batch_size = cfg.batch_size or (64 if self.cuda else 8)
        self.amp = cfg.amp and self.cuda
        if cfg.amp and not self.cuda and self.dist.is_main:
            log.info("AMP is a CUDA feature: training in fp32 on %s", self.device)
        weights = load_class_weights(cfg.analysis, cfg.class_weights, cfg.classes, self.train_index.meta)
        self.loss = SegLoss(LossConfig(tuple(weights) if weights else None, cfg.dice_weight,
                                       tuple(cfg.dice_classes), cfg.focal_gamma, cfg.boundary_weight),
                            cfg.classes).to(self.device)
        torch.manual_seed(cfg.seed)
        in_ch = self.train_index.feature_shape[0]
        self.model = build_model(cfg.model, in_ch, **model_kwargs(cfg)).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = len(epoch_batches(self.train_index.images, 1, cfg.seed, self.batch_size,
                                                 self.dist.rank, self.dist.world))
        total = max(1, cfg.epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(total, max(1, int(cfg.warmup_epochs * self.steps_per_epoch))))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.ema = None
        if cfg.ema > 0:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema))
        self.start_epoch = 1
        self.history: list[dict] = []
        if cfg.resume:
            self._resume(cfg.resume)
        self.net = DistributedDataParallel(self.model) if self.dist.enabled else self.model
        sampling = RoiSampling(cfg.jitter, cfg.samples_per_roi, cfg.min_roi_px, cfg.max_rois_per_image)
        r, w = self.dist.rank, self.dist.world
        self.train_source = make_source(cfg.resident, self.train_index, sampling, cfg.mask_size, cfg.seed,
                                        cfg.workers, self.device, rank_images(self.train_index.images, r, w))
        self.val_source = make_source(cfg.resident, self.val_index, sampling, cfg.mask_size, cfg.seed,
                                      cfg.workers, self.device, rank_images(self.val_index.images, r, w))
        self.out = Path(cfg.out)
        self._tb = None
        if self.dist.is_main:
            log.info("train: %d images (%s), val: %d images, model %s (%d params), device %s, world %d",
                     len(self.train_index.images), self.train_source.kind, len(self.val_index.images),
                     cfg.model, sum(p.numel() for p in self.model.parameters()), self.device, self.dist.world)

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
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
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
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
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

    def train_epoch(self, epoch: int) -> dict:
        self.net.train()
        batches = epoch_batches(self.train_index.images, epoch, self.cfg.seed, self.batch_size,
                                self.dist.rank, self.dist.world)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        steps = rois = 0
        t0 = time.perf_counter()
        bar = tqdm(total=len(batches), desc=f"epoch {epoch}", unit="step", disable=not self.dist.is_main,
                   leave=False)
        for batch in self.train_source.iterate(batches, epoch, True):
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                logits = self.net(self._inputs(batch), batch["rois"])
            losses = self.loss(logits, self._targets(batch["targets"]))
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(losses["loss"]).backward()
            if self.cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema:
                self.ema.update_parameters(self.model)
            loss_sum += losses["loss"].detach()  # no .item(): a host sync per step would stall the GPU
            steps += 1
            rois += batch["rois"].shape[0]
            bar.update(1)
            if steps % 20 == 1:
                bar.set_postfix(loss=f"{losses['loss'].item():.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        bar.close()
        sums = torch.stack([loss_sum, loss_sum.new_tensor(steps), loss_sum.new_tensor(rois)])
        D.all_reduce_([sums], self.dist)
        dt = time.perf_counter() - t0
        return {"loss": float(sums[0] / sums[1].clamp_min(1)), "train_rois": int(sums[2]),
                "train_s": round(dt, 2), "rois_per_s": round(float(sums[2]) / dt, 1),
                "lr": self.scheduler.get_last_lr()[0]}

    @torch.no_grad()
    def validate(self) -> dict:
        model = self.ema.module if self.ema else self.model
        model.eval()
        k = self.cfg.classes
        acc = IoUAccumulator(k, self.device)
        store = FeatureStore(self.val_index.path)
        idx = self.val_index
        h, w = self.input_hw
        batches = epoch_batches(idx.images, 0, 0, self.batch_size, self.dist.rank, self.dist.world,
                                shuffle=False, pad=False)
        coco_dets = []
        for batch in self.val_source.iterate(batches, 0, False):
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                logits = model(self._inputs(batch), batch["rois"])
            probs = logits.float().softmax(1)
            roi_ids = batch["roi_ids"].cpu().numpy()
            masks_cache = {}
            for r, rid in enumerate(roi_ids):
                i = int(idx.tables["roi_image"][rid])
                local = int(idx.tables["roi_inst"][rid])
                if i not in masks_cache:
                    p = torch.from_numpy(store.packed_masks(i).copy()).to(self.device)
                    masks_cache[i] = (p, union_packed(p)[None], store.gt_rles(i))
                packed, union, rles = masks_cache[i]
                # mIoU: model-input resolution, the padded ROI's pixels
                box = normalized_to_pixel(idx.padded_input[rid], w, h)
                x0, y0, x1, y1 = native_crop(box, h, w)
                if x1 <= x0 or y1 <= y0:
                    continue
                pasted = paste_masks(probs[r:r + 1], torch.as_tensor(
                    box - [x0, y0, x0, y0], device=self.device)[None], y1 - y0, x1 - x0)
                gt = sample_roi_targets(packed, union, torch.tensor([local], device=self.device),
                                        torch.zeros(1, dtype=torch.long, device=self.device),
                                        torch.tensor([[x0, y0, x1, y1]], device=self.device),
                                        y1 - y0, x1 - x0, w)[0]
                acc.add_labels(pasted[0].argmax(0), self._targets(gt))
                # instance IoU: original resolution
                oh, ow = (int(v) for v in idx.tables["orig_hw"][i])
                obox = normalized_to_pixel(idx.tables["roi_padded"][rid].astype(np.float64), ow, oh)
                ox0, oy0, ox1, oy1 = native_crop(obox, oh, ow)
                if ox1 <= ox0 or oy1 <= oy0:
                    acc.add_instance(0.0)
                    continue
                fg = paste_masks(probs[r:r + 1, 1:2], torch.as_tensor(
                    obox - [ox0, oy0, ox0, oy0], device=self.device)[None], oy1 - oy0, ox1 - ox0,
                    fill_background=False)[0, 0]
                pred = (fg > 0.5).cpu().numpy()
                rle = {"size": rles[local]["size"], "counts": rles[local]["counts"].encode()}
                acc.add_instance(instance_iou(pred, (ox0, oy0, ox1, oy1), rle))
                if self.cfg.coco_eval:
                    coco_dets.append((int(idx.tables["image_id"][i]), (ox0, oy0, ox1, oy1), pred,
                                      float(fg[fg > 0.5].mean()) if pred.any() else 0.0, (oh, ow)))
        D.all_reduce_(acc.tensors(), self.dist)
        res = acc.result()
        if self.cfg.coco_eval:
            from .coco_eval import coco_mask_ap
            res["coco_mask_AP"] = coco_mask_ap(store, coco_dets)
        return res

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

    def _log(self, metrics: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
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
