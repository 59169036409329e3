"""`experiment.json` in the output directory (per step its hash, output, status and seconds) and its lock.

A step's record is `done` when it finished, `skipped` with the reason when this machine cannot run it, and otherwise
one of UNFINISHED: its next run may continue from its checkpoint.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from hpqdeploy import atomic
from hpqdeploy.errors import UserError

STATE_FILE = "experiment.json"
STATE_FORMAT = 1
UNFINISHED = ("running", "failed", "interrupted")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def load_state(path: Path, experiment: str) -> dict:
    """The state file at `path`, or a new one for `experiment` when there is none."""
    if not path.exists():
        return {"format": STATE_FORMAT, "experiment": experiment, "steps": {}}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); remove it to start the experiment over") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("steps"), dict):
        raise UserError(f"{path} is not an experiment state file of format {STATE_FORMAT}; remove it to start over")
    return state


def save_state(path: Path, state: dict) -> None:
    """Write `state` whole (through a temporary file), stamped with the time."""
    state["updated"] = now()
    atomic.write_text(path, json.dumps(state, indent=2) + "\n")


@contextmanager
def locked(root: Path):
    """One run per output directory at a time."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with (root / ".lock").open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{root} is in use by another experiment run; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
