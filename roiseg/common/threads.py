"""Thread settings that hold when the CPU is shared (another training, a test run, `cache`).

OpenMP (torch's CPU thread pool) spins at every parallel region's barrier by default; with two
processes each spinning on all cores, every small op of the decoder waits for spinning threads
of the other process: bench/bench_contention.py measures the effect.  ``OMP_WAIT_POLICY=PASSIVE``
makes waiting threads sleep instead.  It is read once, when OpenMP loads (at ``import torch``), so
this runs from the packages' ``__init__`` and from cli.py, before torch is imported; an environment
that sets it already wins.  ``FEATCACHE_THREADS=stock`` turns it off (for measuring)."""
from __future__ import annotations

import os


def configure_threads() -> None:
    if os.environ.get("FEATCACHE_THREADS") == "stock":
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
