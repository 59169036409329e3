"""The format version of each JSON file hpqdeploy writes, and the check each reader makes.

A file carries `format_version`; a reader refuses a version newer than it knows with one line, instead of failing
later on a key it does not find. Files written before versioning are version 1.
"""

from __future__ import annotations

from pathlib import Path

from hpqdeploy.errors import UserError

KEY = "format_version"
VERSIONS = {"plan.json": 1, "metrics.json": 1, "export.json": 1, "profile.json": 1,
            "plan": 1}  # `hpqdeploy.plan`'s result, the in-memory plan as data


def stamp(name: str, blob: dict) -> dict:
    """`blob` as file `name` is written: its format version first."""
    return {KEY: VERSIONS[name], **{k: v for k, v in blob.items() if k != KEY}}


def check(path: Path, blob: dict) -> dict:
    """`blob`, read from `path`, if this hpqdeploy reads its format version."""
    known = VERSIONS.get(Path(path).name)
    if known is None:
        return blob
    version = blob.get(KEY, 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= known:
        raise UserError(f"{path}: format version {version!r}; this hpqdeploy reads {Path(path).name} versions 1 to "
                        f"{known} (a newer hpqdeploy wrote it, or it was edited)")
    return blob
