"""Epoch-end hooks of the Trainer (rank 0, in order): checkpoint + best/last, logs and curves, then
anything else (the validation PNG, benchmarks' extra validations).  A hook is a ``HookBase`` (as
detectron2's: methods that do nothing until overridden), or a plain function ``(epoch,
checkpoint_path, metrics, trainer)`` that ``as_hook`` wraps."""
from __future__ import annotations

import csv as csv_module
import io
import json
import logging
import math

from roiseg.common.files import write_text_atomic
from roiseg.modeling.checkpoint import publish_alias
from roiseg.training.plots import plot_results

log = logging.getLogger(__name__)


class HookBase:
    """What a hook may do at each point of a run; each method does nothing until overridden."""

    def after_epoch(self, trainer, epoch: int, metrics: dict) -> None:
        """After an epoch's training, validation and the hooks before this one (rank 0)."""

    def after_train(self, trainer) -> None:
        """After the run's last epoch (every rank)."""


class CheckpointHook(HookBase):
    """checkpoint_epoch_*.pth, last.pth = this epoch, best.pth = the best epoch so far by
    ``best_metric`` (ties: the earlier)."""

    def after_epoch(self, trainer, epoch: int, metrics: dict) -> None:
        path = trainer.checkpointer.save(epoch, metrics)
        trainer.last_checkpoint = path
        out = trainer.out
        publish_alias(path, out / "last.pth")
        key = trainer.cfg.best_metric
        if all(metrics[key] > h.get(key, -math.inf) for h in trainer.history[:-1]) or not (out / "best.pth").exists():
            publish_alias(path, out / "best.pth")
            log.info("best.pth -> epoch %d (%s %.4f)", epoch, key, metrics[key])


class LogHook(HookBase):
    """args.yaml (once), metrics.jsonl, results.csv + results.png, TensorBoard, and the log line."""

    def __init__(self):
        self._tb = None

    def after_epoch(self, trainer, epoch: int, metrics: dict) -> None:
        out, cfg = trainer.out, trainer.cfg
        out.mkdir(parents=True, exist_ok=True)
        import yaml
        # args.yaml: the settings as given (what the next --resume reads; a resume may extend
        # --epochs); resolved.yaml: what the run made of them (auto values, run folder, analysis)
        for name, values in (("args.yaml", cfg.to_dict()), ("resolved.yaml", trainer.run.to_dict())):
            text = yaml.safe_dump(values, sort_keys=False)
            if not (out / name).is_file() or (out / name).read_text() != text:
                write_text_atomic(out / name, text)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        self._csv(out / "results.csv", metrics)
        if cfg.tensorboard:
            self._tensorboard(out, metrics)
        iou = metrics["iou"]
        log.info("epoch %d: loss %.4f  mIoU %.4f (bg %.3f, target %.3f%s)  instance_mIoU %.4f  boundary_IoU %.4f"
                 "  -> %s", epoch, metrics["loss"], metrics["mIoU"], iou["background"], iou["target"],
                 f", other {iou['non_target']:.3f}" if "non_target" in iou else "", metrics["instance_mIoU"],
                 metrics.get("boundary_IoU", float("nan")),
                 trainer.last_checkpoint.name if trainer.last_checkpoint else "-")

    @classmethod
    def seed(cls, out, history: list[dict]) -> None:
        """A branched run's folder starts with the history it branched from (its metrics.jsonl and
        results.csv rows up to the checkpoint)."""
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))
        (out / "results.csv").unlink(missing_ok=True)
        for m in history:
            cls._csv(out / "results.csv", m)

    @staticmethod
    def _csv(csv, metrics: dict) -> None:
        row = {"epoch": metrics["epoch"], "loss": metrics["loss"], "lr": metrics["lr"], "mIoU": metrics["mIoU"],
               **{f"iou_{k}": v for k, v in metrics["iou"].items()}, "instance_mIoU": metrics["instance_mIoU"],
               "boundary_IoU": metrics.get("boundary_IoU"),
               "steps": metrics.get("steps"), "train_s": metrics["train_s"], "rois_per_s": metrics["rois_per_s"]}
        write_text_atomic(csv, _csv_with_row(csv.read_text() if csv.exists() else "", row))
        try:
            plot_results(csv)
        except Exception as exc:  # a plot must never stop training
            log.warning("results.png not drawn: %s", exc)

    def _tensorboard(self, out, metrics: dict) -> None:
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(out / "tb"))
        e = metrics["epoch"]
        for key in ("loss", "mIoU", "instance_mIoU", "boundary_IoU", "rois_per_s", "lr"):
            self._tb.add_scalar(f"{'train' if key in ('loss', 'rois_per_s', 'lr') else 'val'}/{key}",
                                metrics[key], e)
        for c, v in metrics["iou"].items():
            self._tb.add_scalar(f"val/iou_{c}", v, e)
        self._tb.flush()

    def after_train(self, trainer) -> None:
        if self._tb:
            self._tb.close()


def _csv_with_row(old: str, row: dict) -> str:
    """``old`` CSV text plus ``row``.  A run resumed by a newer version may log more columns: the
    header becomes the union and older rows get empty cells, so every column stays aligned."""
    cell = lambda v: "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)  # noqa: E731
    reader = csv_module.DictReader(io.StringIO(old))
    rows = list(reader)
    header = list(reader.fieldnames or [])
    header += [k for k in row if k not in header]
    lines = [",".join(header)] + [",".join(r.get(k) or "" for k in header) for r in rows]
    lines.append(",".join(cell(row.get(k)) for k in header))
    return "\n".join(lines) + "\n"


class FunctionHook(HookBase):
    """A plain function ``(epoch, checkpoint_path, metrics, trainer)`` as a hook."""

    def __init__(self, fn):
        self.fn = fn

    def after_epoch(self, trainer, epoch: int, metrics: dict) -> None:
        self.fn(epoch, trainer.last_checkpoint, metrics, trainer)


def as_hook(h) -> HookBase:
    """A ``HookBase`` as it is; a function wrapped in one."""
    if isinstance(h, HookBase):
        return h
    if callable(h):
        return FunctionHook(h)
    raise TypeError(f"a hook is a HookBase or a function (epoch, checkpoint, metrics, trainer), not {h!r}")
