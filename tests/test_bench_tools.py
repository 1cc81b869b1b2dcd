"""The tools the benchmarks stand on: a timeout ends a whole process tree, a skipped GPU check is
never silent, the learning curve's fits recover a known curve, and choices nested in the folds
never look at their own fold."""
import os
import subprocess
import sys
import time

import pytest

from bench.proctree import run_tree


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:           # a zombie waiting for its reaper is dead too
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_timeout_kills_the_whole_tree_even_a_child_in_its_own_session(tmp_path):
    pids = tmp_path / "pids"
    script = ("import os, subprocess, sys, time\n"
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
              f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{c.pid}}')\n"
              "time.sleep(120)\n")
    t0 = time.perf_counter()
    with pytest.raises(subprocess.TimeoutExpired):
        run_tree([sys.executable, "-c", script], timeout=3)
    assert time.perf_counter() - t0 < 30
    parent, child = (int(v) for v in pids.read_text().split())
    time.sleep(0.5)
    assert not _alive(parent) and not _alive(child)     # a torchrun worker leads its own session too


def test_every_skip_is_in_the_summary_and_a_failure_fails(monkeypatch, capsys, tmp_path):
    from bench import gpu_checks as G

    def skipped(env):
        raise G.Skip("no CUDA provider in this onnxruntime")

    def failed(env):
        raise AssertionError("loss went up")
    monkeypatch.setattr(G, "CHECKS", {"a": lambda env: "fine", "b": skipped, "c": failed})
    monkeypatch.setattr(G, "RESULTS", [])
    rc = G.run_checks(G.Env("cpu", tmp_path, 10, None), ["a", "b", "c"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 1
    assert out[0].startswith("PASS a (") and out[1].startswith("SKIP b (") and out[2].startswith("FAIL c (")
    assert out[-1] == ("gpu_checks (--device cpu): 1 passed, 1 skipped (b: no CUDA provider in this onnxruntime), "
                       "1 failed: c")
    monkeypatch.setattr(G, "RESULTS", [])
    assert G.run_checks(G.Env("cpu", tmp_path, 10, None), ["a", "b"]) == 0     # skips alone: exit 0, listed


def test_learning_curve_fits_recover_a_known_curve():
    """bench/realdata_posthoc.py: both fits of error = c + a n^-b find a curve made that way, their
    projections and inverses agree, and a floor above the target is reported as never reaching it."""
    import numpy as np

    from bench.realdata_posthoc import fit_power, images_for, project
    n = np.array([12.0, 24, 48, 96, 110])
    pure = fit_power(n, 1 - 0.8 * n ** -0.4)["power"]
    assert pure["b"] == pytest.approx(-0.4, abs=1e-6) and pure["a"] == pytest.approx(0.8, rel=1e-6)
    assert project(pure, 5000) == pytest.approx(1 - 0.8 * 5000 ** -0.4, abs=1e-9)
    assert images_for(pure, project(pure, 777.0)) == pytest.approx(777.0, rel=1e-6)
    floored = fit_power(n, 1 - (0.2 + 0.8 * n ** -0.5))["power+floor"]
    assert floored["floor"] == pytest.approx(0.2, abs=0.01) and floored["b"] == pytest.approx(-0.5, abs=0.05)
    assert images_for(floored, 0.85) == float("inf")         # the floor (error 0.2) forbids 0.85


def test_nested_choices_never_look_at_their_own_fold():
    """The threshold for fold f is chosen on the other folds only: a fold whose own best threshold
    differs from the others' gets the others' choice."""
    from bench.realdata_posthoc import THRESHOLDS, nested_threshold
    k_low, k_high = THRESHOLDS.index(0.3), THRESHOLDS.index(0.7)
    peak = lambda k: [1.0 if j == k else 0.0 for j in range(len(THRESHOLDS))]  # noqa: E731
    rows = [{"fold": 0, "iou": peak(k_low)}] + [{"fold": f, "iou": peak(k_high)} for f in (1, 2, 3) for _ in range(2)]
    picks = nested_threshold(rows)
    assert picks[0] == k_high and picks[1:] == [k_high] * 6
