"""`train`'s configuration: one schema (``roiseg.common.schema``) for defaults, types, ranges and help.

Defaults < a resumed run's ``args.yaml`` < ``--config FILE`` (TOML or YAML, a ``[train]`` table or
top level) < command-line options.  ``cli.py`` builds `train`'s options from these fields, and the
run writes them to ``args.yaml``; what the run resolves from them (auto epochs and width, the run
folder, the analysis file) is ``Resolved``, saved beside them, never written back into the config.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from roiseg.common.schema import ConfigError, build, option, specs
from roiseg.data.sparse import DEFAULT_MARGIN

__all__ = ["ConfigError", "TrainConfig", "Resolved", "load_config_file", "make_config"]


@dataclass
class TrainConfig:
    train_store: str = option("cache/train2017.zarr", "Training cache (overrides --subset).", panel="Inputs")
    val_store: str = option("cache/val2017.zarr", "Validation cache.", panel="Inputs")
    out: str = option("checkpoints", "Checkpoint folder; a used one gets <out>/run2, run3 ...", panel="Outputs")
    model: Literal["roialign", "global", "prior"] = option(
        "roialign", "Decoder; prior = one learned mean shape, no features (a baseline).", panel="Model")
    hidden: int = option(0, "Decoder width, 0 = auto.", ge=0, shown="auto: 128 roialign, 32 global", panel="Model")
    roi_size: int = option(14, "ROIAlign output size.", ge=1, panel="Model")
    mask_size: int = option(56, "ROI mask size = roi size x 2^k.", ge=1, panel="Model")
    classes: Literal[3, 2] = option(3, "3 = bg/target/others, 2 = bg/target.", panel="Model")
    fine: Literal["auto", "off"] = option("auto", "Fuse the store's fine map into the mask (roialign model): "
                                          "auto = when the store has one.", panel="Model")
    fine_width: int = option(32, "Channels the fine map is reduced to before the fusion.", ge=1, panel="Model")
    epochs: int = option(0, "Epochs, 0 = auto.", ge=0,
                         shown="auto: 12, more on small sets so that training makes >= --min-steps steps", panel="Training")
    min_steps: int = option(600, "Optimizer steps auto epochs aim for at least.", ge=1, panel="Training")
    batch_size: int = option(0, "Images per read, with all their ROIs; 0 = auto.", ge=0,
                             shown="auto: 64 on CUDA, 8 on CPU", panel="Training")
    rois_per_step: int = option(0, "ROIs per optimizer step; a read is split into several steps; 0 = auto.",
                                ge=0, shown="auto: 16 on CPU, 256 on CUDA", panel="Training")
    lr: float = option(1e-3, "AdamW rate at 16 ROIs/step, scaled by sqrt(ROIs per step / 16).", gt=0, shown="1e-3", panel="Training")
    weight_decay: float = option(1e-4, "AdamW weight decay.", ge=0, shown="1e-4", panel="Training")
    warmup_epochs: float = option(0.5, "Linear warm-up, then cosine.", ge=0, panel="Training")
    grad_clip: float = option(1.0, "Max gradient norm, 0 = off.", ge=0, shown="1.0", panel="Training")
    amp: bool = option(True, "Mixed precision (autocast + grad scaler): on CUDA in --amp-dtype; a CPU trains in "
                       "fp32 unless --amp-dtype bfloat16.", shown="on", panel="Runtime")
    amp_dtype: Literal["float16", "bfloat16"] = option("float16", "Autocast type of --amp; bfloat16 also runs "
                                                       "on a CPU.", panel="Runtime")
    deterministic: bool = option(False, "Deterministic algorithms only (torch.use_deterministic_algorithms; CUDA: "
                                 "a resumed run is then bit-identical to an uninterrupted one, a little slower).",
                                 shown="off", panel="Runtime")
    dist_timeout: float = option(120.0, "Minutes a torchrun rank waits for the others (loading a resident cache "
                                 "at different speeds can take long).", gt=0, shown="120", panel="Runtime")
    ema: float = option(0.99, "EMA decay per step, 0 = off; validation and best.pth use the EMA weights.",
                        ge=0, lt=1, panel="Training")
    seed: int = option(0, "Seed of sampling, jitter and initialization.", panel="Training")
    workers: int = option(2, "DataLoader workers when streaming.", ge=0, panel="Runtime")
    device: str = option("auto", "auto, cpu, cuda, cuda:1.", panel="Runtime")
    resident: Literal["auto", "gpu", "cpu", "off"] = option(
        "auto", "Keep the cache in GPU/CPU memory (auto: if it fits) or stream it.", panel="Runtime")
    feature_norm: Literal["channel", "none"] = option(
        "channel", "Standardize features per channel with the training cache's statistics.", cli=None)
    hflip: float = option(0.5, "Probability of training on an image mirrored.", ge=0, le=1, panel="Augmentation")
    hflip_source: Literal["auto", "stored", "map"] = option(
        "auto", "Mirrored features: stored by `cache --flip`, or the mirrored map.", shown="auto: stored if cached", cli=None)
    jitter: float = option(0.05, "Person-box centre jitter sigma, fraction of its size.", ge=0, panel="Augmentation")
    jitter_scale: float = option(0.10, "Person-box log-size jitter sigma.", ge=0, shown="0.1", panel="Augmentation")
    max_jitter: float = option(DEFAULT_MARGIN, "Jittered boxes stay within the person box grown by this fraction "
                               "of its size (at most a sparse cache's --sparse-margin).", ge=0, panel="Augmentation")
    samples_per_roi: int = option(2, "Jittered copies of each ROI per read.", ge=1, panel="Augmentation")
    overlap_boost: int = option(2, "ROIs with another person inside get this many times the copies (class 2).",
                                ge=1, cli=None)
    min_roi_px: float = option(8.0, "Skip training ROIs under this many input px.", ge=0, cli="--min-roi-size",
                               shown="8", panel="Augmentation")
    max_rois_per_image: int = option(64, "At most this many ROIs of one image per read.", ge=1, cli=None)
    analysis: str = option("data_analyze.json", "data_analyze.json for class weights (computed into the run "
                           "folder when missing).", panel="Inputs")
    class_weights: Literal["inverse_frequency", "log_scaled", "inverse_clipped", "none"] = option(
        "log_scaled", "CE class weights from --analysis.", panel="Loss")
    dice_weight: float = option(1.0, "Dice loss weight (on class 1; dice_classes [1, 2] in --config adds 2).", ge=0, shown="1.0", panel="Loss")
    dice_classes: list[int] = option([1], "Classes the Dice term covers.", cli=None)
    focal_gamma: float = option(0.0, "Focal CE gamma, 0 = plain CE.", ge=0, shown="0", cli=None)
    # an ablation switch (config file only): within noise of 0 on 61 and on 137 real images (docs/benchmarks.md)
    boundary_weight: float = option(0.0, "Ablation: extra CE on label boundaries.", ge=0, shown="0", cli=None)
    score_head: bool = option(False, "Also train a MaskIoU head that predicts each mask's IoU (the mask score; "
                              "roialign model only).", shown="off", panel="Model")
    score_weight: float = option(1.0, "Weight of the score head's squared error on the mask IoU.", ge=0,
                                 shown="1.0", cli=None)
    best_metric: Literal["instance_mIoU", "mIoU"] = option("instance_mIoU", "Validation metric that picks best.pth.", panel="Validation")
    coco_eval: bool = option(False, "Also COCO mask AP (pycocotools) every epoch.", shown="off", panel="Validation")
    zero_features: bool = option(False, "Ablation: train with features zeroed.", shown="off", cli=None)
    tensorboard: bool = option(True, "TensorBoard logs in <run>/tb.", shown="on", panel="Outputs")
    resume: str | None = option(None, "auto (latest in --out) or a checkpoint path; the run's args.yaml "
                                "gives the other settings.", panel="Inputs")
    allow_partial: bool = option(False, "Train on an incomplete store's complete images (interrupted or damaged "
                                 "cache); without it such a store is refused.", shown="off", panel="Inputs")
    train_images: list[str] | None = option(None, "Only these file names of the training store (k-fold).", cli=None)
    val_images: list[str] | None = option(None, "Only these file names of the validation store.", cli=None)
    vis_images: list[str] | None = option(None, "Comma-separated val file names for the validation PNG.",
                                          shown="the four fixed ones", panel="Validation")
    vis_ann: str | None = option(None, "Val annotations for the PNG.", shown="the val cache's", panel="Validation")
    vis_image_dir: str | None = option(None, "Val images for the PNG.", shown="the val cache's", panel="Validation")
    vis_onnx: str | None = option(None, "Extractor ONNX for the PNG.", shown="the cache's", panel="Validation")
    visualize: bool = option(True, "Draw the validation PNG every epoch.", cli="--vis", shown="on", panel="Validation")

    def __post_init__(self):
        if self.score_head and self.model != "roialign":
            raise ConfigError(f"score_head: needs --model roialign, not {self.model!r}")
        ratio = self.mask_size / self.roi_size
        if self.model == "roialign" and (ratio < 1 or 2 ** round(math.log2(ratio)) != ratio):
            sizes = ", ".join(str(self.roi_size * 2 ** k) for k in range(4))
            raise ConfigError(f"mask_size: {self.mask_size} must be --roi-size {self.roi_size} x a power of 2 "
                              f"({sizes} ...): the decoder doubles the ROI grid until it is the mask")

    def refuse_unused(self) -> None:
        """A setting that would do nothing with the others (a value other than its default whose
        switch is off) is an error that says why, never a silent no-op.  Checked for settings a user
        gives (``make_config`` with a file or options), not for a finished run's saved ones."""
        default = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                   for f in dataclasses.fields(self)}
        prior = self.model == "prior"
        rules = [("hidden", prior, "the prior has no layers to size"),
                 ("roi_size", self.model != "roialign", f"--model {self.model} reads no ROI grid"),
                 ("zero_features", prior, "the prior reads no features"),
                 ("workers", self.resident in ("cpu", "gpu") and self.workers > 0,
                  f"they stream the store, and --resident {self.resident} keeps it in memory"),
                 ("analysis", self.class_weights == "none", "it gives the class weights, and --class-weights is none"),
                 ("max_jitter", self.jitter == 0 and self.jitter_scale == 0, "it bounds the box jitter, which is off "
                  "(--jitter 0 --jitter-scale 0)"),
                 ("score_weight", not self.score_head, "it weighs the score head's loss: add --score-head"),
                 ("min_steps", self.epochs > 0, "it sizes auto epochs, and --epochs is given"),
                 ("hflip_source", self.hflip == 0, "it picks the mirrored features, and --hflip is 0"),
                 ("fine_width", self.fine == "off" or self.model != "roialign",
                  "it sizes the fine path, which is off (--fine off, or not --model roialign)"),
                 ("dice_classes", self.dice_weight == 0, "Dice is off (--dice-weight 0)")]
        rules += [(k, not self.visualize, "it sets the validation PNG, and --no-vis draws none")
                  for k in ("vis_images", "vis_ann", "vis_image_dir", "vis_onnx")]
        for name, off, why in rules:
            if off and getattr(self, name) != default[name]:
                raise ConfigError(f"{name}: {why}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Resolved:
    """What a run made of its config (auto values, folders): saved in ``resolved.yaml`` and every
    checkpoint beside the config as given."""
    out: str                  # the run folder (<out>/run2 next to another run)
    hidden: int
    epochs: int               # the LR schedule's length
    batch_size: int
    rois_per_step: int
    lr: float                 # scaled by sqrt(rois_per_step / 16)
    amp: bool                 # autocast on (CUDA, or a CPU with --amp-dtype bfloat16)
    amp_dtype: str
    device: str
    analysis: str             # the data_analyze.json used (computed into the run folder when missing)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    unknown = sorted(set(data) - set(specs(TrainConfig)))
    if unknown:
        raise ConfigError(f"unknown keys in {path}: {', '.join(unknown)}")
    return data


def make_config(file: str | Path | None = None, base: dict | None = None, **overrides) -> TrainConfig:
    """Defaults < ``base`` (a resumed run's saved settings) < ``file`` < ``overrides``; every value
    converted to its type and range-checked (one message per bad value)."""
    known = specs(TrainConfig)
    base = {k: v for k, v in (base or {}).items() if k in known}
    cfg = build(TrainConfig, base, load_config_file(file) if file else {}, overrides,
                where=f" (in {file} or the command line)" if file else "")
    if file or overrides:
        cfg.refuse_unused()
    return cfg
