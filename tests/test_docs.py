"""The docs build as a site, every relative link resolves, and every `cli.py` flag a code block
shows exists in that command's --help (a renamed option cannot leave a stale example behind)."""
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
    """GitHub/mkdocs-style slugs of a page's headings."""
    out = set()
    for h in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        out.add(slug)
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
    """(command, flags) of every `cli.py CMD ...` line in the pages' code blocks."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```[^\n]*\n(.*?)```", page.read_text(), flags=re.S):
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
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "cache" / "index.html").is_file()
