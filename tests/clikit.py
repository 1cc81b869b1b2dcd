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
    process tree is killed at ``timeout`` (``bench/proctree.py``) so a hang fails the test instead of
    the CI run."""
    import os
    import subprocess
    import sys

    from bench.proctree import run_tree
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(root / "cli.py"), *[str(a) for a in args]]
    try:
        return run_tree(cmd, timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, cwd=root)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"torchrun did not finish in {timeout} s (a hang?)\n{(exc.stderr or '')[-3000:]}") from None


def feature_source(mode: str = "stretch", onnx=None, channels: int = 16, roi_padding: float = 0.1):
    """A ``FeatureSource`` for tests that build a predictor or an export without a store: the
    stand-in's tensor (``onnx``: its file, for the sha256), RGB 0-1 input, ``mode`` resize."""
    from roiseg.common.files import file_sha256
    from roiseg.common.geometry import ResizePolicy
    from roiseg.data.images import Preprocess
    from roiseg.data.standin import FEATURE_NAME
    from roiseg.data.store_meta import FeatureSource
    return FeatureSource(str(onnx or ""), file_sha256(onnx) if onnx else "0" * 64, FEATURE_NAME, (channels, 80, 80),
                         (640, 640), Preprocess(policy=ResizePolicy(640, 640, mode)), roi_padding)
