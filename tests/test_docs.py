"""The docs build as a site without a warning, every relative link and anchor resolves (as the site
and GitHub make anchors), every `cli.py` flag a code block shows exists in that command's --help (a
renamed option cannot leave a stale example behind), and every module path a docstring or page
names exists."""
import re
import subprocess
import sys

import pytest

from clikit import ROOT, cli

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def test_pages_exist():
    names = {p.name for p in PAGES}
    assert {"README.md", "cache.md", "training.md", "inference.md", "export.md", "geometry.md",
            "troubleshooting.md", "benchmarks.md", "development.md"} <= names
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def _anchors(text: str) -> set[str]:
    """The anchors of a page's headings as the site makes them (mkdocs: Python-Markdown's toc
    ``slugify``) that GitHub makes the same way too, so a link works on both."""
    from markdown.extensions.toc import slugify
    out = set()
    for h in re.findall(r"^#+ (.+)$", text, re.M):
        site = slugify(h.strip(), "-")
        github = re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        if site == github:
            out.add(site)
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for m in LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"^[a-z]+:", target):
            continue                      # http(s), mailto
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: {target} does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest.read_text()), f"{page.name}: no heading #{anchor} in {dest.name}"


def _shown_commands():
    """(command, flags) of every `cli.py CMD ...` line in the pages' shell code blocks."""
    found = []
    for page in PAGES:
        for lang, block in re.findall(r"```([^\n]*)\n(.*?)```", page.read_text(), flags=re.S):
            if lang.strip() == "python":          # `from roiseg import ...` is not a command
                continue
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                m = re.search(r"(?:cli\.py|roiseg) ([a-z]+)(.*)", line)
                if m:
                    flags = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(2).split("#")[0])
                    found.append((page.name, m.group(1), sorted(set(flags))))
    return found


def test_every_flag_shown_in_the_docs_exists():
    shown = _shown_commands()
    assert len(shown) > 15
    helps = {}
    for page, command, flags in shown:
        if command not in helps:
            r = cli(command, "--help")
            assert r.exit_code == 0, (page, command, r.output)
            helps[command] = r.output
        for flag in flags:
            assert flag in helps[command], f"{page}: `cli.py {command} {flag}` is not an option of {command}"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    warnings = [line for line in (p.stdout + p.stderr).splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert warnings == [], warnings       # every warning counts: a broken anchor is one
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "cache" / "index.html").is_file()


# a module named in a docstring or page: roiseg.x.y[.z] or a file path roiseg/..., bench/..., tests/..., docs/...
DOTTED = re.compile(r"(?<![\w./])roiseg(?:\.[a-z_]+)+")
FILE = re.compile(r"(?<![\w./-])((?:roiseg|bench|tests|docs|featcache|trainer)/[\w/.-]*\.(?:py|md|sh))")


def _exists_dotted(name: str) -> bool:
    """``roiseg.a.b.c``: a module, or an attribute of the longest module prefix."""
    import importlib
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        try:
            mod = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        obj = mod
        for attr in parts[k:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _named_paths():
    sources = [*(ROOT / "roiseg").rglob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "bench").glob("*.sh"),
               *(ROOT / "tests").glob("*.py"), ROOT / "bench" / "README.md", *PAGES]
    for src in sources:
        if src.name == "test_docs.py":        # its own patterns and examples
            continue
        text = src.read_text()
        for m in DOTTED.finditer(text):
            yield src, "dotted", m.group(0).rstrip(".")
        for m in FILE.finditer(text):
            if not m.group(1).startswith("bench/out/") and "NAME" not in m.group(1):   # outputs a run writes
                yield src, "file", m.group(1)


def test_every_module_path_named_in_a_docstring_or_page_exists():
    missing = []
    for src, kind, name in _named_paths():
        ok = _exists_dotted(name) if kind == "dotted" else (ROOT / name).exists()
        if not ok:
            missing.append(f"{src.relative_to(ROOT)}: {name}")
    assert missing == [], missing
