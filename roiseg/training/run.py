"""Entry point of `cli.py train`: builds the Trainer with the caller's epoch-end hooks (the CLI adds
the validation PNG of ``roiseg.inference.visualize``: inference sits above training) and runs it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from roiseg.training.config import TrainConfig
from roiseg.training.loop import Trainer


@dataclass
class TrainResult:
    history: list[dict]          # every epoch of the run (a resumed run's earlier ones included)
    trained_epochs: int          # epochs this call trained (0: a finished run was resumed)
    out: Path                    # the run folder
    epochs: int                  # the run's length
    trained_before: int = 0      # epochs the run had already trained (a resumed run)


def run_training(cfg: TrainConfig, hooks: list | None = None) -> TrainResult:
    """``hooks``: epoch-end steps after validation and the checkpoint (rank 0)."""
    trainer = Trainer(cfg, hooks=hooks)
    try:
        start = trainer.start_epoch
        history = trainer.fit()
        return TrainResult(history, max(0, trainer.run.epochs - start + 1), trainer.out, trainer.run.epochs, start - 1)
    finally:
        trainer.close()
