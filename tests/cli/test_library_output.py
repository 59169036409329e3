"""What other libraries print while a command works is held back, shown with --verbose, and replayed when the work
fails; our own lines, warnings and results come through. Run in fresh processes: the holding is done on file
descriptors 1 and 2, as a user's terminal sees them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A stand-in for a command's work: noise from C (straight to the descriptors, and through C's buffered stdout), from
# a native extension through sys.stderr, a warning and log records of another package, a print; and our own lines:
# a step line through a rich console, a warning of ours, then the result on stdout after the work.
WORK = textwrap.dedent("""
    import ctypes, logging, os, sys, warnings
    from rich.console import Console
    from hpqdeploy.cli.library_output import held_back

    verbose, as_json, fail = (a == "1" for a in sys.argv[1:4])
    ours = compile("import warnings; warnings.warn('ours: budget not reached')", {ours_file!r}, "exec")
    try:
        with held_back(verbose, as_json):
            os.write(2, b"[cpuinfo_utils.cpp:71] from C on fd 2\\n")
            ctypes.CDLL(None).printf(b"printf from C on fd 1\\n")
            sys.stderr.write("[threadpool.cpp:66] through sys.stderr\\n")
            warnings.warn("theirs: a deprecation", FutureWarning)
            logging.getLogger("torch.utils._pytree").warning("theirs: a log record")
            print("theirs: a print")
            Console(stderr=True).print("our step line")
            exec(ours, {{}})
            if fail:
                raise RuntimeError("the runtime crashed")
    except RuntimeError as exc:
        print(f"error: {{exc}}", file=sys.stderr)
        sys.exit(1)
    print('{{"result": 1}}' if as_json else "our table")
""").format(ours_file=str(ROOT / "hpqdeploy" / "pipeline.py"))
THEIRS = ("from C on fd 2", "printf from C on fd 1", "through sys.stderr", "theirs: a deprecation",
          "theirs: a log record", "theirs: a print")


def _work(verbose: bool = False, as_json: bool = False, fail: bool = False) -> subprocess.CompletedProcess:
    flags = ["1" if f else "0" for f in (verbose, as_json, fail)]
    return subprocess.run([sys.executable, "-c", WORK, *flags], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "default"})


def test_other_libraries_are_held_back_and_ours_come_through():
    run = _work()
    assert run.returncode == 0, run.stderr
    assert run.stdout == "our table\n"
    assert "our step line" in run.stderr and "ours: budget not reached" in run.stderr
    for line in THEIRS:
        assert line not in run.stdout + run.stderr


def test_verbose_shows_them_and_json_keeps_stdout_to_the_document():
    run = _work(verbose=True, as_json=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"result": 1}  # C's printf to fd 1 too went to stderr
    for line in THEIRS:
        assert line in run.stderr
    assert "our step line" in run.stderr


def test_json_without_verbose_prints_the_document_alone():
    run = _work(as_json=True)
    assert run.returncode == 0 and json.loads(run.stdout) == {"result": 1}
    assert not any(line in run.stderr for line in THEIRS)


def test_a_failure_replays_what_was_held_back_before_the_error():
    run = _work(fail=True)
    assert run.returncode == 1
    for line in THEIRS:
        assert line in run.stderr
    assert run.stderr.strip().splitlines()[-1] == "error: the runtime crashed"  # the error stays the last line
    assert run.stdout == ""


# ------------------------------------------------------------------ a real runtime: ExecuTorch's export step


def test_export_prints_no_runtime_log_line_unless_verbose(digits_baseline, tmp_path):
    """ExecuTorch prints cpuinfo lines from C++ and torch a pytree log record while exporting; `hpqdeploy export`
    shows them with --verbose only."""
    pytest.importorskip("executorch")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}

    def export(*flags: str) -> subprocess.Popen:
        out = tmp_path / ("out" + "".join(flags).replace("-", "_"))
        return subprocess.Popen([sys.executable, "-m", "hpqdeploy", "export", str(digits_baseline), "--target",
                                 "executorch", "--eval-limit", "16", "--batch-size", "16", "-o", str(out), *flags],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    plain, verbose = export(), export("--verbose", "--json")  # side by side: each is mostly start-up and lowering
    out, err = plain.communicate(timeout=600)
    v_out, v_err = verbose.communicate(timeout=600)
    assert plain.returncode == 0 and verbose.returncode == 0, err + v_err
    assert err == ""  # no progress bar (not a terminal), no step lines, and nothing of ExecuTorch's or torch's
    lines = out.strip().splitlines()
    assert "baseline → executorch" in lines[0] and all(line[0] in "┏┃┡│└" for line in lines[1:]), out
    assert json.loads(v_out)["runtime"] == "executorch"  # with --verbose --json too, stdout holds the document only
    if not v_err.strip():
        pytest.skip("this ExecuTorch printed nothing while exporting")
    assert any("cpuinfo" in line or "pytree" in line for line in v_err.splitlines()), v_err
