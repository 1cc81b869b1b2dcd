"""`train`: the decoder from the cache alone; a checkpoint (and the validation PNG) every epoch."""
from __future__ import annotations

from pathlib import Path

import click

from roiseg.cli.app import main
from roiseg.cli.common import (
    UserError,
    default_store,
    option,
    schema_options,
    user_errors,
)
from roiseg.training.config import TrainConfig


@main.command()
@option("--config", "config_file", type=click.Path(exists=True, path_type=Path), panel="Inputs",
        help="TOML or YAML file with any train setting (a [train] table or top level), the ablation-only "
             "ones too (docs/training.md).")
@option("--subset", type=click.Choice(["100", "500", "full"]), default=None, panel="Inputs",
        help="Train on cache/train2017[_subset].zarr (val: cache/val2017.zarr).")
@schema_options(TrainConfig)
@user_errors
def train(config_file, subset, **opts):
    """Train the decoder from the cache only; checkpoint (+ validation PNG) every epoch."""
    from roiseg.inference.visualize import training_hooks
    from roiseg.training.config import make_config
    from roiseg.training.run import run_training
    if subset and not opts.get("train_store"):
        opts["train_store"] = str(default_store("train", subset))
    base = None
    if opts.get("resume"):   # the run's own settings; options given now override them
        from roiseg.training.run_state import run_settings
        base = run_settings(opts["resume"], opts.get("out"))
    try:
        cfg = make_config(config_file, base=base, **opts)
    except (ValueError, TypeError) as exc:
        raise UserError(f"bad configuration: {exc}") from exc
    res = run_training(cfg, training_hooks(cfg))
    if res.trained_epochs == 0:
        click.echo(f"nothing to do: the run in {res.out} has trained {res.trained_before} epochs and is "
                   f"{res.epochs} long (pass --epochs N above {res.trained_before} with --resume to train longer)")
    elif res.history:
        last = res.history[-1]
        click.echo(f"done: epoch {last['epoch']} mIoU {last['mIoU']:.4f} "
                   f"instance_mIoU {last['instance_mIoU']:.4f} -> {res.out}")
