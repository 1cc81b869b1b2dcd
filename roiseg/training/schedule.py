"""The learning-rate schedule and how long a run is: rate scaled with the step size, linear warm-up
then cosine, progress measured in training ROIs (of all ranks under DDP), auto epochs."""
from __future__ import annotations

import math

REFERENCE_ROIS_PER_STEP = 16
# The global model runs a U-Net over the whole 80x80 map per ROI: 128 channels there train at
# 0.5 ROIs/s on a CPU core (roialign: 28), 32 at 8.
DEFAULT_HIDDEN = {"roialign": 128, "global": 32, "prior": 0}
DEFAULT_EPOCHS = 12


def auto_epochs(epoch_rois: int, rois_per_step: int, min_steps: int) -> int:
    """12 epochs, or as many as it takes to make ``min_steps`` optimizer steps on a small set."""
    return max(DEFAULT_EPOCHS, math.ceil(min_steps * rois_per_step / max(epoch_rois, 1)))


def scaled_lr(lr: float, rois_per_step: int) -> float:
    """Square-root scaling for adaptive optimizers: ``lr`` is the rate at 16 ROIs per step."""
    return lr * math.sqrt(rois_per_step / REFERENCE_ROIS_PER_STEP)


def warmup_cosine(progress: float, epochs: int, warmup_epochs: float) -> float:
    """LR factor at ``progress`` epochs done (fractional): linear warm-up, then cosine to 0."""
    if progress < warmup_epochs:
        return max(progress / warmup_epochs, 1e-3)
    span = max(epochs - warmup_epochs, 1e-9)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup_epochs) / span)))




def rois_before_step(counts: list[int], k: int, j: int) -> int:
    """Training ROIs of all ranks in the steps before step ``j`` of a read that every rank splits
    into ``k`` steps (``torch.tensor_split``: the first ``n % k`` steps get one ROI more)."""
    return sum(j * (n // k) + min(j, n % k) for n in counts)
