"""The code's shape: import contracts (pyproject.toml [tool.importlinter]) hold, the code lives in one
package without links, and the wheel installs one import root with a command."""
import re
import subprocess
import sys
import zipfile

import pytest

from clikit import ROOT


def test_import_contracts_hold():
    """Layers run one way (common -> data -> modeling -> loader -> evaluation -> training | runtime
    -> export | inference -> cli) and the ONNX Runtime path, the data layer and the shared layer
    cannot import torch, not even through another module."""
    lint = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    p = subprocess.run([sys.executable, "-c", lint], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert p.stdout.count(" KEPT") == 3 and "BROKEN" not in p.stdout


def test_the_code_is_where_tools_look():
    """Real files in one package, no links (tools that do not follow links see every import), one
    import style (absolute ``roiseg.``), and the design's root names hold re-exports only."""
    tracked = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True).stdout
    links = [line.split("\t")[1] for line in tracked.splitlines() if line.startswith("120000")]
    assert links == [], links
    relative = [f"{p.relative_to(ROOT)}:{k}" for p in (ROOT / "roiseg").rglob("*.py")
                for k, line in enumerate(p.read_text().splitlines(), 1) if re.match(r"\s*from \.", line)]
    assert relative == [], relative
    for entry in ("featcache/__init__.py", "trainer/__init__.py", "cli.py"):
        code = [line for line in (ROOT / entry).read_text().split('"""')[2].splitlines()
                if line.strip() and not line.startswith(("from roiseg", "__all__", "    ", "if __name__"))]
        assert code == [], (entry, code)


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
    for part in ("roiseg/data/store.py", "roiseg/runtime/pipeline.py", "roiseg/cli/__init__.py", "roiseg/__main__.py"):
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


def test_no_function_of_the_package_is_over_50_lines():
    """Long functions hide their steps: each is split into named ones (docstring included)."""
    import ast
    long = []
    for path in sorted((ROOT / "roiseg").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines)")
    assert long == [], long


def test_no_string_reads_of_store_or_checkpoint_records_outside_their_classes():
    """Store metadata and checkpoints are read through their typed records (``StoreMeta``,
    ``FeatureSource``, ``CheckpointRecord``), never ``meta["..."]`` / ``ck["..."]``."""
    pattern = re.compile(r"\b(?:meta|ck|store_meta|train_meta|val_meta)(?:\[\"|\.get\(\")")
    own = {"roiseg/data/store_meta.py", "roiseg/modeling/checkpoint.py"}
    found = [f"{p.relative_to(ROOT)}:{k}" for p in sorted((ROOT / "roiseg").rglob("*.py"))
             if str(p.relative_to(ROOT)) not in own
             for k, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == [], found


def test_one_version():
    """``roiseg.__version__`` is pyproject.toml's."""
    import roiseg
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == roiseg.__version__