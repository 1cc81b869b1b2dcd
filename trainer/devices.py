"""Which torch device a command runs on, and the batch that keeps it busy (one rule for train,
evaluate and predict)."""
from __future__ import annotations

import torch


def resolve_device(pref: str | torch.device = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when there is one, else the CPU; anything else as given."""
    if str(pref) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


def default_batch_size(device: torch.device) -> int:
    """Images per batch: 64 on a GPU (16 reach only 40% of the in-memory rate: kernel-launch bound,
    bench/gpu_bench.sh), 8 on a CPU (small steps train faster there)."""
    return 64 if torch.device(device).type == "cuda" else 8
