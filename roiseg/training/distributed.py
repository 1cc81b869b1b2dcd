"""torchrun support: NCCL on GPUs, gloo on CPU; rank 0 alone writes files."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta

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


def deterministic() -> None:
    """Deterministic algorithms only (``train --deterministic``): cuBLAS needs a fixed workspace, set
    before its first call; torchvision's ``roi_align`` then takes its deterministic path on CUDA."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def setup(device_pref: str, timeout_minutes: float = 120.0) -> tuple[DistInfo, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    from roiseg.modeling.devices import resolve_device
    use_cuda = resolve_device(device_pref).type == "cuda"    # an unknown or absent device: an error
    if info.enabled and not dist.is_initialized():
        # FEATCACHE_DIST_BACKEND=gloo: several ranks on one GPU (NCCL refuses that), as gpu_bench.sh runs
        # a long timeout: ranks loading a resident cache at different speeds wait for each other at
        # the first collective (NCCL's default, 10 minutes, aborted such runs)
        dist.init_process_group(os.environ.get("FEATCACHE_DIST_BACKEND") or ("nccl" if use_cuda else "gloo"),
                                timeout=timedelta(minutes=timeout_minutes))
    if use_cuda:
        device = torch.device(str(device_pref) if str(device_pref).startswith("cuda:") else f"cuda:{info.local_rank}")
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
    from roiseg.modeling.checkpoint import tensor_digest
    return tensor_digest({"model": model.state_dict(), "optimizer": optimizer.state_dict()["state"]})


def check_replicas(model, optimizer, info: DistInfo) -> str:
    """All ranks hold bit-identical weights and optimizer state, or an error: a rank that stepped
    differently would be saved by rank 0 and scored with the others' as if all were one model."""
    digests = [None] * info.world
    dist.all_gather_object(digests, replica_digest(model, optimizer))
    if len(set(digests)) != 1:
        from roiseg.common.errors import RoisegError
        raise RoisegError("DDP replicas diverged: " + ", ".join(f"rank {r} {d[:12]}" for r, d in enumerate(digests)))
    return f"identical on {info.world} ranks ({digests[0][:16]})"


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (itself when alone)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_shared_folder(folder, token: str, info: DistInfo) -> None:
    """Every rank sees the run folder rank 0 claimed (its lock file holds rank 0's ``token``): ranks
    on several nodes need one file system for ``--out``, or each would write (and resume) its own."""
    if not info.enabled:
        return
    from roiseg.common.files import LOCK_NAME
    try:
        seen = json.loads((folder / LOCK_NAME).read_text()).get("token")
    except (OSError, ValueError, AttributeError):
        seen = None
    ok = [None] * info.world
    dist.all_gather_object(ok, seen == token)
    if not all(ok):
        from roiseg.common.errors import RoisegError
        blind = [r for r, v in enumerate(ok) if not v]
        raise RoisegError(f"rank(s) {blind} do not see the run folder {folder} that rank 0 claimed: --out (and "
                             f"--resume) must be on a file system every node shares")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
