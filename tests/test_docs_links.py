"""Every relative link in the README, BENCHMARKS.md, docs/ and the benchmark results pages points at a file that
exists and, with a #fragment, at a heading or `<a id>` in it; product documents speak of the product, not of the
project's work history."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md")),
         *sorted((ROOT / "bench" / "results").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HISTORY = re.compile(r"\b(\w+(st|nd|rd|th)[ -]sessions?|this session|previous session|between sessions|issue #?\d+)\b",
                     re.IGNORECASE)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page: its headings' slugs (numbered when repeated) and explicit `<a id>`s."""
    text, seen, out = page.read_text(), {}, set()
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE):
        plain = re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
        slug = re.sub(r"[^\w\- ]", "", plain).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out | set(re.findall(r'<a id="([^"]+)"', text))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no such heading")
    assert not broken, broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_work_history_talk(page):
    assert not HISTORY.findall(page.read_text())


def test_readme_fits_five_minutes():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_anchor_slugs_follow_github():
    page = ROOT / "README.md"
    assert "set-up-on-a-fresh-machine" in anchors(page)
