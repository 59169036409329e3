"""Outputs appear whole or not at all: a directory is written as `<name>.partial` and renamed into place when
complete; a file is written beside itself and renamed over the old one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from hpqdeploy.errors import UserError


def partial_dir(out: Path) -> Path:
    """Where `out` is written until it is complete."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def check_output(out: Path) -> None:
    """Before any work: the output directory must not exist, and its parents must be directories (or not yet)."""
    out = Path(out)
    if out.exists():
        raise UserError(f"output directory {out} exists; choose another output, or remove it first")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write {out}: {parent} is a file, not a directory")
            break


def publish(work: Path, out: Path) -> Path:
    """Rename a finished work directory into place (replacing `out` if a re-run wrote it before)."""
    if out.exists():
        shutil.rmtree(out)
    Path(work).replace(out)
    return out


@contextlib.contextmanager
def directory(out: Path, keep: bool = False) -> Iterator[Path]:
    """Yield a fresh `<out>.partial` to write into, renamed to `out` when the block ends normally. On a user error
    it is removed; any other failure (an interrupt) leaves it for a resumable stage when `keep` is set."""
    out = Path(out)
    work = partial_dir(out)
    if work.exists() and not keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    except UserError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    except BaseException:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        raise
    publish(work, out)


def write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    write_file(path, lambda tmp: tmp.write_text(text))
