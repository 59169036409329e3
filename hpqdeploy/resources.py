"""Where the top-level `targets/` and `profiles/` directories are: beside the package in a checkout (editable
install), or under `<prefix>/share/hpqdeploy/` where a wheel install puts them (pyproject's data-files)."""

from __future__ import annotations

import sys
from pathlib import Path


def resource_dir(name: str) -> Path:
    checkout = Path(__file__).resolve().parent.parent / name
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "hpqdeploy" / name
