"""What every command shares: one message and exit code 1 for every error a user can cause, options
listed in ``--help`` panels, the checks of option values and combinations, and the default paths of
the design's project folders (``data/``, ``cache/``, ``checkpoints/``)."""
from __future__ import annotations

import functools
from pathlib import Path

import click

from roiseg.common.providers import PROVIDERS

ANN_DIR = Path("data/annotations")
MAX_PIXELS_HELP = "Images larger than this many pixels are skipped (decompression bombs) [89478485, Pillow's]."
# --help panels, in the order they are listed: what most runs need first, the rest after
PANELS = ("Inputs", "Outputs", "Options", "Extractor", "Store", "Model", "Training", "Augmentation", "Loss",
          "Validation", "Detection", "Overlays", "Runtime", "Help")


class UserError(click.ClickException):
    """One clear message, exit code 1, no traceback."""


def user_errors(fn):
    """A command whose expected failures (``RoisegError``, an ``OSError`` of a path) end in one
    clear message."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from roiseg.common.errors import RoisegError
        try:
            return fn(*args, **kwargs)
        except RoisegError as exc:
            raise UserError(str(exc)) from exc
        except OSError as exc:
            from roiseg.common.files import user_facing_name
            name = user_facing_name(exc.filename)
            if getattr(exc, "errno", None) == 28:
                raise UserError(f"disk full while writing {name or 'an output'}: no finished file was replaced (each "
                                f"is written to a temp name first); free space and re-run") from exc
            raise UserError(f"{exc.strerror or exc}: {name or ''}".strip()) from exc
    return wrapper


# ---- --help in panels ----------------------------------------------------------------------------
class PanelOption(click.Option):
    """An option that says which ``--help`` panel lists it."""

    def __init__(self, *args, panel: str = "Options", **kwargs):
        super().__init__(*args, **kwargs)
        self.panel = panel


class PanelCommand(click.Command):
    """``--help`` lists the options in panels (``PANELS`` order), common ones first."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        panels: dict[str, list] = {}
        help_option = self.get_help_option(ctx)
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                panel = "Help" if param is help_option else getattr(param, "panel", "Options")
                panels.setdefault(panel, []).append(record)
        for name in sorted(panels, key=lambda p: PANELS.index(p) if p in PANELS else len(PANELS)):
            with formatter.section(name):
                formatter.write_dl(panels[name])


def option(*decls, panel: str = "Options", **kwargs):
    """``click.option`` listed under ``panel`` in ``--help``."""
    return click.option(*decls, cls=PanelOption, panel=panel, **kwargs)


def schema_options(cls):
    """Click options for every field of a config schema (``roiseg.common.schema``) that has a flag:
    names, choices, help, shown defaults and panels all come from the schema; values are checked by
    it (one message each).  Every option defaults to None: only what the user gives overrides a
    config file or a resumed run."""
    from roiseg.common.schema import specs
    metavars = {int: "INTEGER", float: "FLOAT", str: "TEXT", list: "A,B,..."}

    def decorate(fn):
        for spec in reversed(list(specs(cls).values())):
            if spec.flag is None:
                continue
            kw = {"default": None, "help": spec.help, "panel": spec.info.panel}
            if spec.kind is bool:
                opt = option(f"{spec.flag}/--no-{spec.flag[2:]}", spec.name, **kw)
            elif spec.choices is not None:
                opt = option(spec.flag, spec.name, type=click.Choice([str(c) for c in spec.choices]), **kw)
            else:
                opt = option(spec.flag, spec.name, metavar=spec.info.metavar or metavars.get(spec.kind, "TEXT"), **kw)
            fn = opt(fn)
        return fn
    return decorate


def provider_option(panel: str = "Runtime"):
    """--provider of the commands that run an extractor or an exported graph."""
    return option("--provider", type=click.Choice(list(PROVIDERS)), default="auto", show_default=True, panel=panel,
                  help="ONNX Runtime provider; auto tries TensorRT, CUDA, then CPU.")


# ---- value and combination checks ------------------------------------------------------------------
def at_least(low: float, strict: bool = False):
    """Option check: a number >= low (> low when strict)."""
    def check(ctx, param, value):
        if value is not None and (value <= low if strict else value < low):
            raise UserError(f"--{param.name.replace('_', '-')} must be {'>' if strict else '>='} {low:g}, got {value}")
        return value
    return check


def unit(ctx, param, value):
    if value is not None and not 0 <= value <= 1:
        raise UserError(f"--{param.name.replace('_', '-')} must be in [0, 1], got {value}")
    return value


def padding(ctx, param, value):
    if value is not None and not 0 <= value < 1:
        raise UserError(f"--{param.name.replace('_', '-')} must be in [0, 1), got {value}")
    return value


def flag_of(param_name: str) -> str:
    return "--" + {"onnx_path": "onnx", "mask_format": "masks", "json_out": "json",
                   "config_file": "config"}.get(param_name, param_name).replace("_", "-")


def given(ctx: click.Context, names) -> list[str]:
    """The options of ``names`` the user gave (command line or environment), not their defaults."""
    from click.core import ParameterSource
    return [n for n in names if ctx.get_parameter_source(n) in (ParameterSource.COMMANDLINE,
                                                                ParameterSource.ENVIRONMENT)]


def refuse_unused(ctx: click.Context, names, why: str) -> None:
    """Options the user gave that would do nothing here: an error that says why, never a silent
    no-op."""
    used = given(ctx, names)
    if used:
        raise UserError(f"{', '.join(flag_of(n) for n in used)}: {why}")


# ---- paths ----------------------------------------------------------------------------------------
def ann_path(split: str, subset: str) -> Path:
    suffix = "" if subset == "full" else f"_{subset}"
    return ANN_DIR / f"instances_{split}2017_person_only_no_crowd{suffix}.json"


def default_store(split: str, subset: str) -> Path:
    return Path("cache") / f"{split}2017{'' if subset == 'full' else '_' + subset}.zarr"


def checkpoint_options(fn):
    """--checkpoint / --epoch / --checkpoints: which checkpoint a command reads."""
    for opt in reversed((
            option("--checkpoint", help="A checkpoint file, or best / last in --checkpoints.", panel="Inputs"),
            option("--epoch", type=int, help="The checkpoint of this epoch in --checkpoints.", panel="Inputs"),
            option("--checkpoints", type=click.Path(path_type=Path), default=Path("checkpoints"), show_default=True,
                   help="The run folder --epoch, best and last refer to.", panel="Inputs"))):
        fn = opt(fn)
    return fn


def checkpoint_from(epoch, checkpoint, folder, default: str | None = None) -> Path:
    """--checkpoint PATH | best | last (in --checkpoints), or --epoch N; ``default`` when neither;
    both given is an error (one would be ignored)."""
    from roiseg.modeling.checkpoint import find_checkpoint
    if checkpoint and epoch is not None:
        raise UserError("give --checkpoint or --epoch, not both (one of them would be ignored)")
    checkpoint = str(checkpoint) if checkpoint else (None if epoch is not None else default)
    if checkpoint in ("best", "last") and not Path(checkpoint).is_file():
        path = Path(folder) / f"{checkpoint}.pth"
        if not path.is_file():
            raise UserError(f"no {checkpoint}.pth in {folder} (pass --checkpoints DIR, --epoch N or --checkpoint PATH)")
        return path
    if checkpoint:
        path = Path(checkpoint)
        if path.is_dir():
            raise UserError(f"--checkpoint {path} is a folder: pass a checkpoint file in it (best, last or "
                            f"checkpoint_epoch_*.pth), or --checkpoints {path} with --epoch N")
        return path
    if epoch is None:
        raise UserError("pass --epoch N or --checkpoint PATH")
    return find_checkpoint(folder, epoch)
