"""The code's shape: import contracts (pyproject.toml [tool.importlinter]) hold, nothing imports the
folders under their bare top-level names, and the wheel installs one import root with a command."""
import subprocess
import sys
import zipfile

import pytest
from clikit import ROOT


def test_import_contracts_hold():
    """Layers run one way (featcache -> core -> training | runtime -> inference -> cli) and the
    ONNX Runtime path and the data layer cannot import torch, not even through another module."""
    lint = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    p = subprocess.run([sys.executable, "-c", lint], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert p.stdout.count(" KEPT") == 3 and "BROKEN" not in p.stdout


def test_only_the_import_root_is_imported():
    """Every module imports ``roiseg.*``: a bare ``featcache`` or ``trainer`` import would load a
    second copy of the same files (two classes that are not equal)."""
    code = ("import importlib, pkgutil, sys, roiseg\n"
            "for m in pkgutil.walk_packages(roiseg.__path__, 'roiseg.'):\n"
            "    importlib.import_module(m.name)\n"
            "bare = sorted(k for k in sys.modules if k.split('.')[0] in ('featcache', 'trainer', 'cli', 'demo'))\n"
            "print(bare)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "[]", p.stdout


@pytest.mark.slow
def test_wheel_holds_one_import_root_and_a_working_command(tmp_path):
    """``pip install .``: one top-level package ``roiseg`` (no generic ``trainer``), a ``roiseg``
    console command equal to ``uv run cli.py``, and code that runs outside the checkout."""
    p = subprocess.run([sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    wheel = next(tmp_path.glob("*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        assert "roiseg = roiseg.cli:main" in z.read(entry).decode()
        z.extractall(tmp_path / "site")
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"roiseg"}, tops
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    for part in ("roiseg/featcache/store.py", "roiseg/trainer/runtime/pipeline.py", "roiseg/cli.py"):
        assert part in names
    run = subprocess.run([sys.executable, "-c", "import sys; from roiseg.cli import main; sys.exit(main(['--help']))"],
                         cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "predict" in run.stdout, run.stderr[-2000:]
    # python -m roiseg (what `torchrun -m roiseg` runs) is the same command line
    run = subprocess.run([sys.executable, "-m", "roiseg", "--help"], cwd=tmp_path,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "predict" in run.stdout, run.stderr[-2000:]
    import roiseg
    assert str(tmp_path) not in roiseg.__file__
