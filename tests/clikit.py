"""Running the CLI in-process, and what every user error must look like."""
from pathlib import Path

from click.testing import CliRunner

from roiseg.cli import main

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, **kw):
    """``cli.py ARGS`` in this process (stdout and stderr together in ``.output``)."""
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def user_error(r, *messages):
    """Exit code 1, one message naming the problem, no traceback: the error was handled (a
    ``SystemExit``), not an exception CliRunner caught for us."""
    assert r.exception is None or isinstance(r.exception, SystemExit), \
        f"unhandled {r.exception!r}\n{r.output}"
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output, r.output
    for m in messages:
        assert m in r.output, (m, r.output)
    return r


def succeeded(r):
    assert r.exception is None or isinstance(r.exception, SystemExit), \
        f"unhandled {r.exception!r}\n{r.output}"
    assert r.exit_code == 0, r.output
    return r


def torchrun(nproc: int, *args, timeout: float = 280, env: dict | None = None):
    """``torchrun --standalone`` (a free port: tests never collide) of ``cli.py ARGS``; the whole
    process group is killed at ``timeout`` so a hang fails the test instead of the CI run."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(root / "cli.py"), *[str(a) for a in args]]
    p = subprocess.Popen(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [p.pid] + descendants(p.pid):   # torchrun's workers lead sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, err = p.communicate()
        raise AssertionError(f"torchrun did not finish in {timeout} s (a hang?)\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: children, grandchildren ...)."""
    import os
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
