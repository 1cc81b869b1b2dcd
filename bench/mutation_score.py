"""Mutation score per module from a finished mutmut 3 run (``bench/mutation.sh``): killed
(including timeouts) over all mutants, mutants no selected test reaches counted as survivors."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path


def main(mutants: Path) -> None:
    out = subprocess.run([str(Path(sys.executable).parent / "mutmut"), "results", "--all", "true"], cwd=mutants.parent,
                         capture_output=True, text=True).stdout
    per = defaultdict(Counter)
    for line in out.splitlines():
        if ":" not in line:
            continue
        name, status = (x.strip() for x in line.rsplit(":", 1))
        module = name.split(".x_")[0].split(".xǁ")[0]
        per[module][status] += 1
    total = Counter()
    print(f"{'module':42s} {'mutants':>8s} {'killed':>7s} {'survived':>9s} {'no tests':>9s} {'score':>6s}")
    for module in sorted(per):
        c = per[module]
        killed = c["killed"] + c["timeout"]
        n = sum(c.values())
        total.update(c)
        print(f"{module:42s} {n:8d} {killed:7d} {c['survived']:9d} {c['no tests']:9d} {killed / max(n, 1):6.1%}")
    killed, n = total["killed"] + total["timeout"], sum(total.values())
    print(f"{'all core modules':42s} {n:8d} {killed:7d} {total['survived']:9d} {total['no tests']:9d} "
          f"{killed / max(n, 1):6.1%}")
    print(json.dumps({k: v for k, v in total.items()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("mutants"))
