"""Training configuration: defaults < --config FILE (TOML or YAML) < command-line options."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path


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


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml
        data = yaml.safe_load(text) or {}
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        data = tomllib.loads(text)
    data = data.get("train", data)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown keys in {path}: {', '.join(unknown)}")
    return data


def make_config(file: str | Path | None = None, **overrides) -> TrainConfig:
    values = load_config_file(file) if file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)
