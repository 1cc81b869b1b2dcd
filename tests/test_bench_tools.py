"""The tools the GPU check stands on: a timeout ends a whole process tree, and a skipped check is
never silent."""
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
