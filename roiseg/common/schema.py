"""One place for a configuration's defaults, types, allowed values and help text.

A config is a dataclass whose fields are declared with :func:`option`; :func:`validate` converts
and checks a value (one message per bad value), :func:`build` makes the dataclass from layered
sources (defaults < saved run < file < command line), and ``click_options`` (in ``cli.py``) turns
the same fields into the command's options, so a default changed here changes the config file,
``--help`` and ``args.yaml`` at once.  Types come from the annotations (``typing.get_type_hints``):
``int``, ``float``, ``bool``, ``str``, ``Literal[...]`` (choices), ``list[str]`` and ``X | None``.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

from roiseg.common.errors import RoisegError


class ConfigError(RoisegError, ValueError):
    """A configuration value of the wrong type or out of range (one message, exit code 1)."""


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """What ``option`` records of a field besides its default."""
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    cli: str | None = ""            # the option's name ("": --field-name; None: config files only)
    shown: str | None = None        # how the default reads in --help (None: the value itself)
    metavar: str | None = None
    rule: tuple | None = None       # (predicate, what it requires)
    panel: str = "Options"          # the --help panel the option is listed under


def option(default, help: str, *, ge=None, gt=None, le=None, lt=None, cli: str | None = "",
           shown: str | None = None, metavar: str | None = None, rule: tuple | None = None,
           panel: str = "Options"):
    """A config field: its default, help text and bounds.  ``cli``: the option's name (default
    ``--field-name``; None: not a generated option, a config-file setting); ``shown``: how the default
    reads in ``--help`` (default: the value itself); ``rule``: (predicate, what it requires) for
    anything else; ``panel``: the ``--help`` panel it is listed under."""
    info = OptionInfo(help, ge, gt, le, lt, cli, shown, metavar, rule, panel)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"option": info})
    return dataclasses.field(default=default, metadata={"option": info})


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a field accepts, from its annotation and ``option`` metadata."""
    name: str
    kind: type                   # int, float, bool, str, list
    choices: tuple | None
    nullable: bool
    info: OptionInfo
    default: typing.Any

    @property
    def flag(self) -> str | None:
        cli = self.info.cli
        return None if cli is None else (cli or "--" + self.name.replace("_", "-"))

    @property
    def help(self) -> str:
        shown = self.info.shown
        if shown is None:
            d = self.default
            shown = ("none" if d is None else ",".join(map(str, d)) if isinstance(d, list) else
                     str(d).lower() if isinstance(d, bool) else f"{d:g}" if isinstance(d, float) else str(d))
        return f"{self.info.help} [{shown}]"


def specs(cls) -> dict[str, Spec]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t, nullable = hints[f.name], False
        args = typing.get_args(t)
        if typing.get_origin(t) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)) \
                and type(None) in args:
            nullable = True
            t = next(a for a in args if a is not type(None))
        choices = None
        if typing.get_origin(t) is typing.Literal:
            choices = typing.get_args(t)
            t = type(choices[0])
        elif typing.get_origin(t) in (list, tuple):
            t = typing.get_origin(t)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[f.name] = Spec(f.name, t, choices, nullable, f.metadata["option"], default)
    return out


WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
         Path: "a path"}


def _convert(spec: Spec, value):
    """``value`` as the field's type (YAML reads ``1e-3`` as a string; the command line gives
    strings for choices and comma-separated lists), or ValueError."""
    k = spec.kind
    if k is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError
    if k in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        num = float(value)
        if not math.isfinite(num) and k is int:
            raise ValueError
        if k is int:
            if not num.is_integer():
                raise ValueError
            return int(num)
        if num != num:
            raise ValueError
        return num
    if k is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ValueError
    if k is Path:
        if isinstance(value, (str, Path)) and str(value) != "":
            return Path(value)
        raise ValueError
    if k is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ValueError
    return value


def validate(spec: Spec, value):
    """The converted, range-checked value, or ``ConfigError`` naming the field and the rule."""
    if value is None:
        if spec.nullable:
            return None
        raise ConfigError(f"{spec.name}: a value is required")
    try:
        v = _convert(spec, value)
    except (TypeError, ValueError):
        raise ConfigError(f"{spec.name}: expected {WORDS.get(spec.kind, spec.kind.__name__)}, got {value!r}") from None
    if spec.choices is not None and v not in spec.choices:
        raise ConfigError(f"{spec.name}: must be one of {', '.join(map(str, spec.choices))}, got {value!r}")
    m = spec.info
    rules = [(">=", m.ge, lambda a, b: a >= b), (">", m.gt, lambda a, b: a > b),
             ("<=", m.le, lambda a, b: a <= b), ("<", m.lt, lambda a, b: a < b)]
    broken = [f"{op} {bound:g}" for op, bound, ok in rules if bound is not None and not ok(v, bound)]
    if broken:
        rule = " and ".join(f"{op} {bound:g}" for op, bound, _ in rules if bound is not None)
        raise ConfigError(f"{spec.name}: must be {rule}, got {v!r}")
    if m.rule is not None and not m.rule[0](v):
        raise ConfigError(f"{spec.name}: must be {m.rule[1]}, got {v!r}")
    return v


def build(cls, *layers: dict, where: str = ""):
    """``cls`` from ``layers`` (later ones win; None values are not given), every value validated.
    Unknown keys are an error naming them."""
    sp = specs(cls)
    values = {}
    for layer in layers:
        values.update({k: v for k, v in (layer or {}).items() if v is not None})
    unknown = sorted(set(values) - set(sp))
    if unknown:
        raise ConfigError(f"unknown options: {', '.join(unknown)}{where}")
    out = {}
    for k, v in values.items():
        try:
            out[k] = validate(sp[k], v)
        except ConfigError as exc:
            raise ConfigError(f"{exc}{where}") from None
    return cls(**out)


def check(obj) -> None:
    """Validate every field of a config built directly (``__post_init__``)."""
    for name, spec in specs(type(obj)).items():
        object.__setattr__(obj, name, validate(spec, getattr(obj, name)))
