"""The one place bench scripts write BENCHMARKS.md: each owns the text between its `<!-- NAME:begin/end -->` markers."""

from __future__ import annotations

from pathlib import Path

PATH = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def replace_section(name: str, heading: str, section: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = PATH.read_text() if PATH.exists() else "# Benchmarks\n"
    if begin not in text:
        text += f"\n## {heading}\n\n{begin}\n{end}\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    PATH.write_text(f"{head}{begin}\n{section}\n{end}{tail}")
