"""Running the planned steps in order: keep what is up to date, resume what was interrupted, skip what this
machine cannot run, and record each step in the state file as it goes."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path

from hpqdeploy import atomic
from hpqdeploy.config import ComputeOptions
from hpqdeploy.errors import UserError
from hpqdeploy.experiment.config import ExperimentConfig, load_config
from hpqdeploy.experiment.state import STATE_FILE, UNFINISHED, load_state, locked, now, save_state
from hpqdeploy.experiment.steps import MARKERS, Step, environment_reason, plan_steps, step_hash


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


class _Run:
    def __init__(self, cfg: ExperimentConfig, steps: list[Step], quiet: bool, command: str):
        from rich.console import Console

        from hpqdeploy.artifact import environment

        self.cfg, self.steps, self.quiet, self.command = cfg, steps, quiet, command
        self.path = cfg.out / STATE_FILE
        self.state = load_state(self.path, cfg.name)
        self.records: dict = self.state["steps"]
        # how the latest run was made; each step's own provenance is in its output directory
        self.state.update(experiment=cfg.name, config=str(cfg.path), command=command, settings=cfg.settings(),
                          environment=environment())
        self.results: dict[str, dict] = {}
        self.console = Console(stderr=True, highlight=False)

    def say(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, soft_wrap=True)

    def save(self) -> None:
        save_state(self.path, self.state)

    def output_of(self, step: Step) -> str:
        """The step's output as the state file records it (relative to the experiment's directory)."""
        return _relative(step.output, self.cfg.out)

    def result(self, step: Step, status: str, record: dict) -> dict:
        res = {"status": status, "seconds": record.get("seconds"), "hash": step.hash, "output": str(step.output),
               "reason": record.get("reason")}
        self.results[step.name] = res
        return res

    def run(self) -> dict:
        start = time.time()
        for i, step in enumerate(self.steps, 1):
            position = f"[{i}/{len(self.steps)}]"
            res = self.execute(step, position)
            line = f"{position:>9} {step.name}: {res['status']}"
            if res["status"] == "skipped":
                line += f" ({res['reason']})"
            elif res["status"] == "ran":
                line += f" in {res['seconds']:.1f} s"
            self.say(line)
        counts = {s: sum(r["status"] == s for r in self.results.values()) for s in ("ran", "cached", "skipped")}
        return {"experiment": self.cfg.name, "config": str(self.cfg.path), "out": str(self.cfg.out),
                "state": str(self.path), "seconds": round(time.time() - start, 1), "counts": counts,
                "steps": self.results}

    def execute(self, step: Step, position: str) -> dict:
        record = self.records.get(step.name)
        done_deps = [d for d in step.deps if self.results[d]["status"] != "skipped"]
        if step.kind == "report":
            step.hash = step_hash("report", step.settings,
                                  [[d, self.results[d]["hash"], d in done_deps] for d in step.deps])
        else:
            missing = [d for d in step.deps if d not in done_deps]
            if missing:
                return self.skip(step, f"needs {missing[0]}, which was skipped")
        inputs = {d: self.records[d]["run"] for d in done_deps}
        if step.kind == "report" and not done_deps:
            return self.skip(step, "nothing finished to report on")
        if step.action is None:  # an existing baseline directory: its fingerprint is its identity
            if record is None or record.get("hash") != step.hash:
                self.records[step.name] = {"hash": step.hash, "output": str(step.output), "external": True,
                                           "status": "done", "run": step.hash[:16], "inputs": {}, "seconds": 0.0,
                                           "finished": now()}
            self.save()
            return self.result(step, "cached", self.records[step.name])
        rel = self.output_of(step)
        if (record and record.get("status") == "done" and record.get("hash") == step.hash
                and record.get("inputs") == inputs and record.get("output") == rel
                and (step.output / MARKERS[step.kind]).is_file()):
            return self.result(step, "cached", record)
        resume = bool(record and record.get("status") in UNFINISHED and record.get("hash") == step.hash
                      and record.get("inputs") == inputs)
        self.clear(step, record, resume)
        self.records[step.name] = {"hash": step.hash, "output": rel, "status": "running", "inputs": inputs,
                                   "started": now(), "resumed": resume}
        self.save()
        self.say(f"{position:>9} {step.name}: {'resuming' if resume else 'running'}")
        t0 = time.time()
        try:
            if step.kind == "report":
                step.action(step.output, resume, done_deps)
            else:
                step.action(step.output, resume)
        except KeyboardInterrupt:
            self.finish(step, "interrupted", t0, reason="interrupted (Ctrl-C)")
            raise
        except Exception as exc:  # noqa: BLE001 - classified, recorded, then re-raised as one line
            reason = environment_reason(step.kind, exc)
            if reason is not None:
                shutil.rmtree(atomic.partial_dir(step.output), ignore_errors=True)
                rec = self.finish(step, "skipped", t0, reason=reason)
                return self.result(step, "skipped", rec)
            message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            message = (message.splitlines() or [type(exc).__name__])[0]
            self.finish(step, "failed", t0, reason=message)
            raise UserError(f"{self.cfg.path.name}: step {step.name} failed: {message} (finished steps are kept in "
                            f"{self.path}; run again to continue)") from exc
        rec = self.finish(step, "done", t0)
        return self.result(step, "ran", rec)

    def clear(self, step: Step, record: dict | None, resume: bool) -> None:
        """Remove a stale output before a step re-runs; only ever one this experiment wrote."""
        if step.output.exists():
            if record is None or record.get("output") != self.output_of(step):
                raise UserError(f"{step.output} exists but {self.path} did not write it; remove it or choose "
                                "another [experiment] out")
            shutil.rmtree(step.output)
        if not resume:
            shutil.rmtree(atomic.partial_dir(step.output), ignore_errors=True)

    def finish(self, step: Step, status: str, t0: float, reason: str | None = None) -> dict:
        rec = self.records[step.name]
        rec.update(status=status, seconds=round(time.time() - t0, 1), finished=now(), reason=reason)
        if status == "done":
            rec["run"] = uuid.uuid4().hex[:16]  # what the steps downstream were made from
        self.save()
        return rec

    def skip(self, step: Step, reason: str) -> dict:
        old = self.records.get(step.name, {})
        self.records[step.name] = {**old, "hash": step.hash, "status": "skipped", "reason": reason,
                                   "output": old.get("output", self.output_of(step)),
                                   "seconds": 0.0, "finished": now()}
        self.save()
        return self.result(step, "skipped", self.records[step.name])


def run_experiment(config: Path, out: Path | None = None, quiet: bool = False, command: str = "",
                   compute: ComputeOptions | None = None) -> dict:
    """Run (or continue) the experiment described by `config`; `out` overrides its [experiment] out.

    Returns {"experiment", "config", "out", "state", "seconds", "counts": {ran, cached, skipped},
    "steps": {name: {"status": "ran" | "cached" | "skipped", "seconds", "hash", "output", "reason"}}}.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("experiment runs its steps in one process; launch `train` and `compress` under torchrun "
                        "(then name the baseline in [baseline] dir) for data-parallel fine-tuning")
    cfg = replace(load_config(config), compute=compute)
    if out is not None:
        cfg = replace(cfg, out=Path(out).expanduser().resolve())
    steps = plan_steps(cfg, quiet, command)
    with locked(cfg.out):
        return _Run(cfg, steps, quiet, command).run()


def summary_table(summary: dict):
    """The summary as a rich table: one row per step."""
    from rich.table import Table

    table = Table(title=f"experiment {summary['experiment']} → {summary['out']}")
    for c in ("step", "status", "seconds", "output / reason"):
        table.add_column(c, justify="right" if c == "seconds" else "left")
    for name, r in summary["steps"].items():
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        detail = r["reason"] if r["status"] == "skipped" else _relative(Path(r["output"]), Path(summary["out"]))
        table.add_row(name, r["status"], seconds, detail)
    c = summary["counts"]
    table.caption = f"{c['ran']} ran, {c['cached']} up to date, {c['skipped']} skipped; state: {summary['state']}"
    return table
