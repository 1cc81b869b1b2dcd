"""Entry point of `cli.py train`: builds the Trainer with its epoch-end hooks and runs it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfig
from .loop import Trainer
from .inference.visualize import validation_png_hook


def epoch_hooks(cfg: TrainConfig) -> list:
    """Epoch-end steps after validation + checkpoint (rank 0): the validation PNG."""
    return [validation_png_hook(cfg)] if cfg.visualize else []


@dataclass
class TrainResult:
    history: list[dict]          # every epoch of the run (a resumed run's earlier ones included)
    trained_epochs: int          # epochs this call trained (0: a finished run was resumed)
    out: Path                    # the run folder
    epochs: int                  # the run's length


def run_training(cfg: TrainConfig) -> TrainResult:
    trainer = Trainer(cfg, hooks=epoch_hooks(cfg))
    try:
        start = trainer.start_epoch
        history = trainer.fit()
        return TrainResult(history, max(0, trainer.cfg.epochs - start + 1), trainer.out, trainer.cfg.epochs)
    finally:
        trainer.close()
