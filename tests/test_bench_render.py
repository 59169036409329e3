"""`bench/run_all.py` renders BENCHMARKS.md, the README's headline table and the picture from recorded results: the
committed ones must render to exactly the committed pages, every section with its goals, from one machine only."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import run_all  # noqa: E402

RESULTS = ROOT / "bench" / "results"


@pytest.fixture
def recorded(tmp_path):
    """A copy of the committed results of every section."""
    out = tmp_path / "results"
    out.mkdir()
    for name in [s.results for s in run_all.SECTIONS] + ["run_all.json"]:
        shutil.copy(RESULTS / name, out / name)
    return out


def test_committed_benchmarks_page_is_the_rendering_of_the_committed_results(recorded, tmp_path):
    text = run_all.render(recorded, tmp_path / "picture.png", f"docs/img/{run_all.PICTURE}")
    assert text == (ROOT / "BENCHMARKS.md").read_text()
    assert (tmp_path / "picture.png").stat().st_size > 10_000


def test_readme_headline_is_the_rendering_of_the_committed_results(recorded):
    readme = (ROOT / "README.md").read_text()
    assert run_all.replace_block(readme, "headline", run_all.headline(recorded)) == readme
    assert "bench/run_all.py" in run_all.headline(recorded)


def test_every_section_has_its_heading_goal_and_goal_table(recorded, tmp_path):
    text = run_all.render(recorded, None, "")
    blob = json.loads((recorded / run_all.SECTIONS[0].results).read_text())
    assert text.count("**Machine: ") == 1 and blob["machine"]["cpu"] in text
    for s in run_all.SECTIONS:
        part = text.split(f"\n## {s.heading}\n", 1)[1].split("\n## ", 1)[0]
        assert part.startswith(f"\nGoal: {s.goal}.")
        assert "| goal | measured | met |" in part
        assert f"](#{run_all.anchor(s.heading)})" in text  # linked from the goals at a glance


def test_results_from_another_machine_are_refused(recorded, tmp_path):
    other = recorded / run_all.BY_KEY["widths"].results
    blob = json.loads(other.read_text())
    blob["machine"] = {**blob["machine"], "cpu": "Another CPU", "isa": ["avx2"]}
    other.write_text(json.dumps(blob))
    with pytest.raises(run_all.MixedMachines, match="widths was measured on Machine: Another CPU"):
        run_all.render(recorded, None, "")
    assert recorded == tmp_path / "results"  # --out OUT renders what lies in OUT/results
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--render-only", "--out",
                          str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and run.stderr.startswith("error: widths was")
    assert not (tmp_path / "BENCHMARKS.md").exists()


def test_results_without_a_machine_block_are_refused(recorded):
    blob = json.loads((recorded / "profile.json").read_text())
    del blob["machine"]
    (recorded / "profile.json").write_text(json.dumps(blob))
    with pytest.raises(run_all.MixedMachines, match="profile: its results carry no machine block"):
        run_all.render(recorded, None, "")


@pytest.mark.parametrize("size", ["full", "quick"])
def test_every_section_runs_its_own_script_with_arguments_it_accepts(size, tmp_path):
    """Each section's arguments at each size parse with its script's own parser (the measurement is not run)."""
    for s in run_all.SECTIONS:
        args = s.args(size, tmp_path, RESULTS)
        assert (ROOT / "bench" / f"{s.script}.py").exists()
        run = subprocess.run([sys.executable, str(ROOT / "bench" / f"{s.script}.py"), *args, "--parse-only"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert run.returncode == 0, (s.key, run.stderr[-2000:])


def test_a_results_page_links_where_benchmarks_md_links():
    from common import relink

    text = "[log](docs/results-log.md), [row](#resnet20), [site](https://example.org), ![p](docs/img/a.png)"
    assert relink(text, ROOT) == text
    assert relink(text, ROOT / "bench" / "results") == (
        "[log](../../docs/results-log.md), [row](#resnet20), [site](https://example.org), ![p](../../docs/img/a.png)")
