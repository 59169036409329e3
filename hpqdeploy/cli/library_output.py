"""What the runtimes and other libraries print while a command works: held back, and shown with `--verbose` or
when the work fails (so an error is never hidden).

Some of it is written by C/C++ code straight to file descriptors 1 and 2, some by native extensions through Python's
`sys.stderr` (ExecuTorch's cpuinfo lines), some by Python packages (warnings, log records, prints), so all three are
held: the descriptors are pointed at a temporary file, and `sys.stdout` / `sys.stderr` write there too. Our own lines
go through rich consoles, which write behind these streams to the terminal: the step lines and progress bars on
stderr, a live progress bar on stdout when it is a terminal; our warnings are shown as before. While the work runs
nothing else reaches stdout: a command prints its result (its tables, or one JSON document) after `held_back`.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator, TextIO

from rich.file_proxy import FileProxy

from hpqdeploy.errors import UserError

_PACKAGE_DIR = str(Path(__file__).resolve().parents[1]) + os.sep
_active = False


class _HeldBack(FileProxy):
    """`sys.stdout` or `sys.stderr` while a command works: what is written to it goes to `held`; a rich console
    writes to `terminal` instead (rich looks behind a FileProxy, and does not wrap one again for a live display)."""

    def __init__(self, held: TextIO, terminal: TextIO, after: TextIO):  # not FileProxy's: no console to print to
        self._target, self._terminal, self._after = held, terminal, after

    def release(self) -> None:
        """The work is over; a handler that kept this stream writes where the process's stream writes again."""
        self._target = self._terminal = self._after

    @property
    def rich_proxied_file(self) -> TextIO:
        return self._terminal

    def __getattr__(self, name: str):
        return getattr(self._target, name)

    def write(self, text: str) -> int:
        return self._target.write(text)

    def close(self) -> None:
        """Leaves the stream open: it is not the proxy's to close (io's finalizer calls close() on collection)."""

    def flush(self) -> None:
        self._target.flush()

    def fileno(self) -> int:
        return self._target.fileno()

    def isatty(self) -> bool:
        return self._target.isatty()

    @property
    def encoding(self) -> str:
        return getattr(self._target, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str | None:
        return getattr(self._target, "errors", None)


def _ours(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(_PACKAGE_DIR)


def _flush_c_stdio() -> None:
    """Flush C's stdio buffers, so that what C code printed lands where its descriptor pointed when it printed."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to flush (Windows)
        pass


def _copy_standard_descriptors() -> dict[int, int] | None:
    """Copies of descriptors 1 and 2 (None where one is closed), with everything written so far flushed to them."""
    sys.stdout.flush()
    sys.stderr.flush()
    _flush_c_stdio()
    try:
        one = os.dup(1)
    except OSError:
        return None
    try:
        return {1: one, 2: os.dup(2)}
    except OSError:
        os.close(one)
        return None


def _terminal_stream(stream: TextIO, fd: int, saved: int) -> TextIO:
    """A stream writing where `stream` wrote before descriptor `fd` was moved (`saved` is its copy); a stream not on
    `fd` (a test's in-memory capture) is kept as it is."""
    try:
        on_fd = stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        on_fd = False
    if not on_fd:
        return stream
    return open(saved, "w", encoding=stream.encoding, errors=stream.errors, buffering=1, closefd=False)


def _explains(exc: BaseException) -> bool:
    """Whether a failure may be explained by what was held back: anything but an error we diagnosed ourselves (and
    an interrupt)."""
    if not isinstance(exc, Exception):
        return False
    return not isinstance(exc, UserError) or (exc.__cause__ is not None and not isinstance(exc.__cause__, UserError))


def _showing_ours(show, terminal: TextIO):
    """`warnings.showwarning` that shows our warnings on the terminal; other packages' go where warnings go."""
    def showwarning(message, category, filename, lineno, file=None, line=None):
        show(message, category, filename, lineno, terminal if file is None and _ours(filename) else file, line)

    return showwarning


@contextmanager
def held_back(verbose: bool = False, as_json: bool = False) -> Iterator[None]:
    """Run the body with what other libraries print held back, and replay it on stderr when the body fails with
    anything but an error of ours. With `verbose` it is shown as it comes instead. Either way nothing reaches stdout
    while the body runs when the command prints JSON (what would go there goes to stderr, or is held)."""
    global _active
    saved = None if _active or sys.stdout is None or sys.stderr is None else _copy_standard_descriptors()
    if saved is None:  # already held back (a command run by a command), or no standard streams
        yield
        return
    before = sys.stdout, sys.stderr
    out, err = _terminal_stream(sys.stdout, 1, saved[1]), _terminal_stream(sys.stderr, 2, saved[2])
    held = tempfile.TemporaryFile()
    held_text = open(held.fileno(), "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)
    proxies: list[_HeldBack] = []
    failed = False
    _active = True
    try:
        with warnings.catch_warnings():
            if verbose:
                if as_json:
                    os.dup2(saved[2], 1)
                    sys.stdout = err
            else:
                os.dup2(held.fileno(), 1)
                os.dup2(held.fileno(), 2)
                progress = err if as_json else out  # where a live progress bar on stdout may go: a terminal only
                proxies = [_HeldBack(held_text, progress if progress.isatty() else held_text, before[0]),
                           _HeldBack(held_text, err, before[1])]
                sys.stdout, sys.stderr = proxies
                warnings.showwarning = _showing_ours(warnings.showwarning, err)
            try:
                yield
            except BaseException as exc:
                failed = _explains(exc)
                raise
    finally:
        for stream in (sys.stdout, sys.stderr, out, err, held_text):
            with suppress(OSError, ValueError):  # a closed pipe must not keep the descriptors moved
                stream.flush()
        _flush_c_stdio()
        sys.stdout, sys.stderr = before
        for proxy in proxies:
            proxy.release()
        os.dup2(saved[1], 1)
        os.dup2(saved[2], 2)
        for stream in {out, err} - set(before):
            with suppress(OSError, ValueError):
                stream.close()
        os.close(saved[1])
        os.close(saved[2])
        _active = False
        held_text.close()
        held.seek(0)
        text = held.read().decode("utf-8", errors="replace")
        held.close()
        if failed and text.strip():
            sys.stderr.write(text.rstrip("\n") + "\n")
            sys.stderr.flush()
