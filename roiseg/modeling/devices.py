"""Which torch device a command runs on, and the batch that keeps it busy (one rule for train,
evaluate and predict)."""
from __future__ import annotations

import re

import torch

from roiseg.common.errors import RoisegError


class DeviceError(RoisegError):
    """A --device that does not exist, or that this machine does not have."""


def resolve_device(pref: str | torch.device = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when there is one, else the CPU; ``cpu``, ``cuda``, ``cuda:N``
    when this machine has it; anything else is an error (never a silent fallback to the CPU)."""
    text = str(pref).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m is None:
        raise DeviceError(f"--device {pref}: not a device this program runs on; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {pref}: PyTorch sees no CUDA GPU on this machine (torch {torch.__version__}, "
                          f"built for CUDA {torch.version.cuda or 'none'}); use --device cpu (or auto)")
    n = torch.cuda.device_count()
    if int(m.group(1) or 0) >= n:
        raise DeviceError(f"--device {pref}: this machine has {n} CUDA GPU(s): cuda:0 to cuda:{n - 1}")
    return torch.device(text)


def default_batch_size(device: torch.device) -> int:
    """Images per batch: 64 on a GPU (16 reach only 40% of the in-memory rate: kernel-launch bound,
    bench/gpu_bench.sh), 8 on a CPU (small steps train faster there)."""
    return 64 if torch.device(device).type == "cuda" else 8
