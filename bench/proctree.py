"""Run a command with a timeout that ends its whole process tree (torchrun's workers included).

``subprocess.run(timeout=...)`` kills only the child it started; torchrun's workers start process
sessions of their own, so neither that nor ``killpg`` reaches them, and a hung rank would outlive
the check (and hold the GPU).  The tree is read from /proc before anything is killed (a child
whose parent died is re-parented and could no longer be found)."""
from __future__ import annotations

import os
import signal
import subprocess


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren ...), from /proc."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, todo = [], [pid]
    while todo:
        cur = todo.pop()
        kids = [c for c, pp in parent.items() if pp == cur]
        found += kids
        todo += kids
    return found


def kill_tree(pid: int) -> None:
    for p in [pid] + descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_tree(cmd: list, timeout: float, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """``cmd`` with captured text output; at ``timeout`` seconds the whole tree is killed and
    ``subprocess.TimeoutExpired`` raised (with what it printed so far)."""
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, cwd=cwd, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        out, err = p.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)
