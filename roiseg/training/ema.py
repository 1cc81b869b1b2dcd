"""Exponential moving average of the decoder's weights, kept on the weights' device.

The same arithmetic as ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` (first
update copies, then ``ema += (1 - decay) * (w - ema)`` by ``torch._foreach_lerp_``; buffers copied)
and the same state dict (``n_averaged``, ``module.*``), so earlier checkpoints load.  The update
count is a Python int: AveragedModel tests a tensor counter (``bool(n_averaged == 0)``) and copies
it to the device every step, a host synchronization per step on a GPU.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class Ema(nn.Module):
    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        mine = [p.detach() for p in self.module.parameters()]
        theirs = [p.detach() for p in model.parameters()]
        if self.updates == 0:
            torch._foreach_copy_(mine, theirs)
        else:
            torch._foreach_lerp_(mine, theirs, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.updates += 1

    def state_dict(self, *args, **kwargs) -> dict:
        out = {"n_averaged": torch.tensor(self.updates, dtype=torch.long)}
        out.update({f"module.{k}": v for k, v in self.module.state_dict().items()})
        return out

    def load_state_dict(self, state: dict, strict: bool = True):
        self.updates = int(state.get("n_averaged", torch.tensor(0)))
        inner = {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}
        return self.module.load_state_dict(inner, strict=strict)
