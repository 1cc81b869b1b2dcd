"""Training configuration: defaults < --config FILE (TOML or YAML) < command-line options."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from roiseg.featcache.errors import FeatCacheError
from roiseg.featcache.sparse import DEFAULT_MARGIN


class ConfigError(FeatCacheError, ValueError):
    """A configuration value of the wrong type or out of range (one message, exit code 1)."""


@dataclass
class TrainConfig:
    train_store: str = "cache/train2017.zarr"
    val_store: str = "cache/val2017.zarr"
    out: str = "checkpoints"
    model: str = "roialign"              # roialign | global | prior (learned mean shape, baseline)
    hidden: int = 0                      # 0 = auto: 128 for roialign, 32 for global (a U-Net over the whole map)
    roi_size: int = 14
    mask_size: int = 56
    classes: int = 3                     # 3: bg/target/other persons; 2: bg/target ablation
    epochs: int = 0                      # 0 = auto: 12, more on small sets (>= min_steps optimizer steps)
    min_steps: int = 600                 # auto epochs: at least this many optimizer steps
    batch_size: int = 0                  # images per read (all their ROIs); 0 = auto: 64 on CUDA, 8 on CPU
    rois_per_step: int = 0               # ROIs per optimizer step; 0 = auto: 16 on CPU, 256 on CUDA
    lr: float = 1e-3                     # AdamW rate at 16 ROIs/step; scaled by sqrt(rois_per_step / 16)
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    grad_clip: float = 1.0
    amp: bool = True                     # CUDA only (fp16 autocast + GradScaler)
    ema: float = 0.99                    # EMA decay per step, 0 = off; validation and best.pth use the EMA weights
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    resident: str = "auto"               # auto | gpu | cpu | off
    feature_norm: str = "channel"        # channel: per-channel mean/std of the training cache | none
    hflip: float = 0.5                   # probability of using an image mirrored
    hflip_source: str = "auto"           # auto | stored (cache --flip) | map (mirror the feature map)
    jitter: float = 0.05                 # person-box centre shift sigma (fraction of its size)
    jitter_scale: float = 0.10           # person-box log-size sigma
    max_jitter: float = DEFAULT_MARGIN   # jittered boxes stay inside the person box grown by this (each side)
    samples_per_roi: int = 2
    overlap_boost: int = 2               # ROIs with another person inside get this many times the copies
    min_roi_px: float = 8.0
    max_rois_per_image: int = 64
    analysis: str = "data_analyze.json"
    class_weights: str = "log_scaled"    # inverse_frequency | log_scaled | inverse_clipped | none
    dice_weight: float = 1.0
    dice_classes: list = field(default_factory=lambda: [1])
    focal_gamma: float = 0.0
    boundary_weight: float = 0.0
    best_metric: str = "instance_mIoU"   # best.pth follows this validation metric
    coco_eval: bool = False
    zero_features: bool = False          # ablation: box-conditioned shape prior only
    tensorboard: bool = True
    resume: str | None = None            # None | auto | PATH
    train_images: list | None = None     # only these file names of the training store (k-fold)
    val_images: list | None = None       # only these file names of the validation store
    vis_images: list | None = None       # file names for the validation PNG (visualization)
    vis_ann: str | None = None
    vis_image_dir: str | None = None
    vis_onnx: str | None = None
    visualize: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Allowed values: (low, high, low inclusive, high inclusive) or a tuple of choices.
RANGES = {
    "hidden": (0, None, True, None), "roi_size": (1, None, True, None), "mask_size": (1, None, True, None),
    "classes": (2, 3), "epochs": (0, None, True, None), "min_steps": (1, None, True, None),
    "batch_size": (0, None, True, None), "rois_per_step": (0, None, True, None), "lr": (0, None, False, None),
    "weight_decay": (0, None, True, None), "warmup_epochs": (0, None, True, None), "grad_clip": (0, None, True, None),
    "ema": (0, 1, True, False), "workers": (0, None, True, None), "hflip": (0, 1, True, True),
    "jitter": (0, None, True, None), "jitter_scale": (0, None, True, None),
    "max_jitter": (0, None, True, None), "samples_per_roi": (1, None, True, None),
    "overlap_boost": (1, None, True, None), "min_roi_px": (0, None, True, None),
    "max_rois_per_image": (1, None, True, None), "dice_weight": (0, None, True, None),
    "focal_gamma": (0, None, True, None), "boundary_weight": (0, None, True, None),
    "model": ("roialign", "global", "prior"), "resident": ("auto", "gpu", "cpu", "off"),
    "feature_norm": ("channel", "none"), "hflip_source": ("auto", "stored", "map"),
    "class_weights": ("inverse_frequency", "log_scaled", "inverse_clipped", "none"),
}
_TYPES = {f.name: f.type.replace(" | None", "").replace("None | ", "") for f in dataclasses.fields(TrainConfig)}
_NULLABLE = {f.name for f in dataclasses.fields(TrainConfig) if "None" in f.type}


def _coerce(name: str, value):
    """Convert one value to its field's type (YAML reads ``1e-3`` as a string) or explain why not."""
    kind = _TYPES[name]
    if value is None:
        if name in _NULLABLE:
            return None
        raise ConfigError(f"{name}: a value is required")
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if kind in ("int", "float"):
            if isinstance(value, bool):
                raise ValueError
            num = float(value) if kind == "float" else (int(value) if isinstance(value, (int, str)) else
                                                         int(value) if float(value).is_integer() else None)
            if num is None or (kind == "float" and num != num):
                raise ValueError
            return num
        if kind == "str":
            if isinstance(value, (str, Path)):
                return str(value)
            raise ValueError
        if kind == "list":
            if isinstance(value, (list, tuple)):
                return list(value)
            raise ValueError
    except (TypeError, ValueError):
        pass
    else:
        return value
    words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "list": "a list"}
    raise ConfigError(f"{name}: expected {words.get(kind, kind)}, got {value!r}")


def _check_range(name: str, value) -> None:
    rule = RANGES.get(name)
    if rule is None or value is None:
        return
    if isinstance(rule[0], str) or len(rule) == 2:
        if value not in rule:
            raise ConfigError(f"{name}: must be one of {', '.join(map(str, rule))}, got {value!r}")
        return
    lo, hi, lo_in, hi_in = rule
    ok = (lo is None or (value >= lo if lo_in else value > lo)) and (hi is None or (value <= hi if hi_in else value < hi))
    if not ok:
        lo_s = "" if lo is None else f"{'>=' if lo_in else '>'} {lo}"
        hi_s = "" if hi is None else f"{'<=' if hi_in else '<'} {hi}"
        raise ConfigError(f"{name}: must be {' and '.join(x for x in (lo_s, hi_s) if x)}, got {value!r}")


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
    except Exception as exc:  # yaml.YAMLError, TOMLDecodeError: both say where
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("train", data), dict):
        raise ConfigError(f"{path} must hold a table of train options (top level or [train])")
    data = data.get("train", data)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown keys in {path}: {', '.join(unknown)}")
    return data


def make_config(file: str | Path | None = None, base: dict | None = None, **overrides) -> TrainConfig:
    """Defaults < ``base`` (a resumed run's saved settings) < ``file`` < ``overrides``; every value
    converted to its type and range-checked."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in (base or {}).items() if k in known}   # a run saved by an older version
    values.update(load_config_file(file) if file else {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown options: {', '.join(unknown)}")
    where = f" (in {file} or the command line)" if file else ""
    out = {}
    for k, v in values.items():
        try:
            out[k] = _coerce(k, v)
            _check_range(k, out[k])
        except ConfigError as exc:
            raise ConfigError(f"{exc}{where}") from None
    return TrainConfig(**out)
