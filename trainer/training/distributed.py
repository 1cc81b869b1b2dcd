"""torchrun support: NCCL on GPUs, gloo on CPU; rank 0 alone writes files."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device_pref: str) -> tuple[DistInfo, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda") or device_pref.startswith("cuda")
    if info.enabled and not dist.is_initialized():
        # FEATCACHE_DIST_BACKEND=gloo: several ranks on one GPU (NCCL refuses that), as gpu_bench.sh runs
        dist.init_process_group(os.environ.get("FEATCACHE_DIST_BACKEND") or ("nccl" if use_cuda else "gloo"))
    if use_cuda:
        device = torch.device(device_pref if device_pref.startswith("cuda:") else f"cuda:{info.local_rank}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return info, device


def all_reduce_(tensors: list[torch.Tensor], info: DistInfo) -> None:
    if info.enabled:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def sum_int(value: int, info: DistInfo, device) -> int:
    """``value`` summed over ranks (itself when alone)."""
    if not info.enabled:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t)


def all_gather_ints(values: list[int], info: DistInfo, device) -> list[list[int]]:
    """Every rank's ``values`` (one collective), in rank order."""
    t = torch.tensor(values, dtype=torch.long, device=device)
    if not info.enabled:
        return [t.tolist()]
    out = [torch.zeros_like(t) for _ in range(info.world)]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def all_gather_lists(items: list, info: DistInfo) -> list:
    """Every rank's list, concatenated in rank order (small picklable items: records, RLEs)."""
    if not info.enabled:
        return list(items)
    out = [None] * info.world
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def replica_digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """sha256 of a replica's parameters, buffers and optimizer state (bit for bit)."""
    from roiseg.trainer.checkpoint import tensor_digest
    return tensor_digest({"model": model.state_dict(), "optimizer": optimizer.state_dict()["state"]})


def check_replicas(model, optimizer, info: DistInfo) -> str:
    """All ranks hold bit-identical weights and optimizer state, or an error: a rank that stepped
    differently would be saved by rank 0 and scored with the others' as if all were one model."""
    digests = [None] * info.world
    dist.all_gather_object(digests, replica_digest(model, optimizer))
    if len(set(digests)) != 1:
        from roiseg.featcache.errors import FeatCacheError
        raise FeatCacheError("DDP replicas diverged: " + ", ".join(f"rank {r} {d[:12]}" for r, d in enumerate(digests)))
    return f"identical on {info.world} ranks ({digests[0][:16]})"


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
