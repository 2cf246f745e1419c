"""The README stays a newcomer's two screens and the documentation site stays whole: it builds
with ``mkdocs build --strict`` (as CI does), a broken link, anchor or page left out of the nav
fails that build, and the README's links into ``docs/`` and its headline agree with the site."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS_YML = ROOT / "mkdocs.yml"
#: what a newcomer reads before the docs site takes over (issue #24: "one screen or two")
README_MAX_LINES = 200
#: a build of this site takes about a second; far more means something else is wrong
BUILD_TIMEOUT_S = 60
LINK = re.compile(r"\]\(([^)\s]+)\)")

needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed: pip install -e '.[docs]' (part of '.[dev]')")


def build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """The CI's build: strict, so every warning (broken link or anchor, page not in nav) fails."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
         "--site-dir", str(site)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)


def headings(page: Path) -> set[str]:
    """The anchors MkDocs (and GitHub) give the page's headings."""
    from markdown.extensions.toc import slugify

    anchors, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            text = re.sub(r"[`*]", "", line.lstrip("#").strip())
            anchors.add(slugify(text, "-"))
    return anchors


def paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, whitespace collapsed, ``docs/`` dropped from link targets."""
    return [" ".join(block.replace("](docs/", "](").split())
            for block in re.split(r"\n\s*\n", text) if block.strip()]


def test_the_readme_fits_in_two_hundred_lines():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


@needs_mkdocs
def test_the_site_builds_strictly_with_every_page_and_raw_output(tmp_path):
    proc = build(MKDOCS_YML, tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("*")}
    assert {"index.html", "methods.html", "edge.html", "bad-inputs.html",
            "cheap/report.html"} <= built
    assert {f"speed/{p.name}" for p in (DOCS / "speed").glob("*.txt")} <= built


@needs_mkdocs
@pytest.mark.parametrize(("page", "text", "named"), [
    ("index.md", "\n[gone](no-such-page.md)\n", "no-such-page.md"),
    ("index.md", "\n[gone](methods.md#no-such-heading)\n", "no-such-heading"),
    ("orphan.md", "# A page nobody listed\n", "orphan.md"),
], ids=["missing page", "missing anchor", "page not in nav"])
def test_a_broken_link_or_an_unlisted_page_fails_the_build(tmp_path, page, text, named):
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(MKDOCS_YML, tmp_path / "mkdocs.yml")
    with (tmp_path / "docs" / page).open("a", encoding="utf-8") as f:
        f.write(text)
    proc = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0
    assert named in proc.stderr and "strict mode" in proc.stdout + proc.stderr, proc.stderr[-3000:]


@needs_mkdocs
def test_every_page_under_docs_is_in_the_nav():
    import yaml

    def pages(nav: list) -> set[str]:
        out: set[str] = set()
        for item in nav:
            for value in item.values() if isinstance(item, dict) else [item]:
                out |= pages(value) if isinstance(value, list) else {value}
        return out

    listed = pages(yaml.safe_load(MKDOCS_YML.read_text(encoding="utf-8"))["nav"])
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert on_disk == listed


@needs_mkdocs
def test_the_readme_links_into_docs_resolve_to_pages_and_headings():
    targets = [t for t in LINK.findall(README.read_text(encoding="utf-8")) if "://" not in t]
    assert any(t.startswith("docs/") for t in targets)
    for target in targets:
        path, _, anchor = target.partition("#")
        page = ROOT / path
        assert page.is_file(), f"README links to {target}: no such file"
        assert not anchor or anchor in headings(page), f"README links to {target}: no such heading"


def test_the_readme_headline_is_the_sites():
    """What the README says before its first section (the main job, its numbers with their date
    and machine, the install notes) is said in the same words on the site's first pages."""
    readme = README.read_text(encoding="utf-8").split("\n## ", 1)[0]
    site = " ".join(paragraphs((DOCS / "index.md").read_text(encoding="utf-8"))
                    + paragraphs((DOCS / "getting-started.md").read_text(encoding="utf-8")))
    missing = [p for p in paragraphs(readme)[1:] if p not in site]
    assert not missing, missing


def test_ci_runs_the_readmes_install_and_builds_the_site_strictly():
    install = next(line.split("#")[0].strip() for line in README.read_text(encoding="utf-8").splitlines()
                   if line.startswith("pip install"))
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert install in ci
    assert any(line.startswith("mkdocs build --strict") for line in ci)
