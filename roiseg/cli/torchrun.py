"""`cache` under torchrun: one shard per rank, rank 0 creates the store and reports for all."""
from __future__ import annotations

import dataclasses
import os

from roiseg.cli.common import UserError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def run_cache_launched(cfg, shard_given: bool):
    """`cache`, or under torchrun (WORLD_SIZE > 1) one shard per rank: shard RANK/WORLD_SIZE on the
    rank's local GPU (LOCAL_RANK); rank 0 opens or creates the store while the others wait at a
    barrier, and gathers the ranks' summaries (None on the other ranks).  A rank that dies leaves a
    store a re-run completes, as with --shard.  Several nodes talk over gloo: set
    ``GLOO_SOCKET_IFNAME`` to the interface they share."""
    from roiseg.data.cache import run_cache
    if world_size() == 1:
        return run_cache(cfg)
    if shard_given:
        raise UserError("--shard and torchrun both split the images: launch with torchrun without --shard, "
                        "or run one process per --shard I/N")
    from datetime import timedelta

    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), world_size()
    # gloo: only a few small messages; a shard may run for hours before the final gather
    dist.init_process_group("gloo", timeout=timedelta(days=7))
    try:
        cfg = dataclasses.replace(cfg, shard=(rank, world))
        if rank == 0:
            s = run_cache(cfg, progress=True, on_store_ready=dist.barrier)
        else:
            dist.barrier()                  # the store exists: fill this rank's shard
            s = run_cache(cfg, progress=False)
        every = [None] * world
        dist.all_gather_object(every, s)
        return _merged(cfg, every) if rank == 0 else None
    finally:
        dist.destroy_process_group()


def _merged(cfg, every: list[dict]) -> dict:
    """The ranks' summaries as one, counted on the store itself."""
    from roiseg.data.store import FeatureStore
    store = FeatureStore(cfg.out)
    done, skipped = store.done_mask(), store.skipped()
    return {**every[0], "cached": int(done.sum()) - len(skipped), "complete": bool(done.all()),
            "processed_now": sum(r["processed_now"] for r in every),
            "newly_skipped": sum(r["newly_skipped"] for r in every),
            "skipped": {k: v for r in every for k, v in r["skipped"].items()},
            "elapsed_s": max(r["elapsed_s"] for r in every), "created": every[0].get("created", False),
            "ranks": f" by {len(every)} ranks (" + ", ".join(str(r["processed_now"]) for r in every) + ")"}
