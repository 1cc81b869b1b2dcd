"""Entry point of `cli.py train`: builds the Trainer with its epoch-end hooks and runs it."""
from __future__ import annotations

from .config import TrainConfig
from .loop import Trainer
from .inference.visualize import validation_png_hook


def epoch_hooks(cfg: TrainConfig) -> list:
    """Epoch-end steps after validation + checkpoint (rank 0): the validation PNG."""
    return [validation_png_hook(cfg)] if cfg.visualize else []


def run_training(cfg: TrainConfig) -> list[dict]:
    trainer = Trainer(cfg, hooks=epoch_hooks(cfg))
    try:
        return trainer.fit()
    finally:
        trainer.close()
