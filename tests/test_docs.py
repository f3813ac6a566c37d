"""README.md's figures come from the committed results (docs/figures.py), and its first screen
holds what a newcomer needs."""
import json
import runpy
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _figures():
    return runpy.run_path(str(ROOT / "docs" / "figures.py"))


def test_the_readme_s_figures_are_the_committed_results():
    figures = _figures()
    blocks = dict(figures["BLOCKS"])
    branch = subprocess.run(["git", "symbolic-ref", "--short", "-q", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if branch.stdout.strip() != "main":  # `dvc exp show` names the commit's row by its branch: main's README shows main
        del blocks["exp"]
    assert figures["render"](README, ROOT, blocks) == README, "run python docs/figures.py and commit README.md"


def test_a_changed_metric_makes_the_readme_stale(tmp_path):
    """The check can fail: in a scratch copy of the results, one changed metric changes the README.
    (The `dvc metrics show` and `dvc exp show` blocks need a DVC repository: they are checked on the
    real one only.)"""
    figures = _figures()
    blocks = {name: make for name, make in figures["BLOCKS"].items() if name not in ("metrics", "exp")}
    shutil.copytree(ROOT / "metrics", tmp_path / "metrics")
    shutil.copytree(ROOT / "studies", tmp_path / "studies", ignore=shutil.ignore_patterns("models", "mlruns"))
    shutil.copytree(ROOT / "benchmarks", tmp_path / "benchmarks", ignore=shutil.ignore_patterns("*.py"))
    (tmp_path / "hanprune").mkdir()
    shutil.copy(ROOT / "hanprune" / "papers.yaml", tmp_path / "hanprune")
    metrics = tmp_path / "metrics" / "lenet5_caffe.json"
    m = json.loads(metrics.read_text())
    m["test_pruned"] -= 0.001
    metrics.write_text(json.dumps(m))
    assert figures["render"](README, tmp_path, blocks) != README
    shutil.copytree(ROOT / "metrics", tmp_path / "metrics", dirs_exist_ok=True)  # as committed again
    study = tmp_path / "studies" / "records" / "metrics" / "lenet5_caffe.json"
    m = json.loads(study.read_text())
    m["file_compression"] *= 2
    study.write_text(json.dumps(m))
    assert figures["render"](README, tmp_path, blocks) != README
    shutil.copytree(ROOT / "studies" / "records" / "metrics", tmp_path / "studies" / "records" / "metrics", dirs_exist_ok=True)
    rules = tmp_path / "studies" / "rules" / "metrics" / "lenet5_global.json"
    m = json.loads(rules.read_text())
    m["compression"] += 1
    rules.write_text(json.dumps(m))
    assert figures["render"](README, tmp_path, blocks) != README


def test_the_first_screen_has_the_two_commands_and_the_paper_table():
    lines = README.splitlines()
    first = "\n".join(lines[:50])
    assert len(lines) <= 200
    assert "./setup.sh && PATH=$PWD/.venv/bin:$PATH dvc repro" in first
    assert "./setup.sh && .venv/bin/python -m pytest" in first
    assert "| LeNet-5 (Caffe, the paper's) | 12x, 0.77% |" in first and " min of wall-clock time" in first


def test_a_study_s_time_over_several_calls_names_the_first_and_counts_the_rest(tmp_path):
    study_time = _figures()["_study_time"]
    (tmp_path / "benchmarks").mkdir()
    bench = tmp_path / "benchmarks" / "s-stages.json"
    bench.write_text(json.dumps({"command": "dvc repro s/dvc.yaml + dvc repro -f -s s/dvc.yaml:a + dvc repro -f -s s/dvc.yaml:b",
                                 "wall_seconds": 90, "stages": {"a": {}, "b": {}, "c": {}}}))
    assert study_time(tmp_path, "s") == ("`dvc repro s/dvc.yaml` and 2 more `dvc repro -f -s` calls for the stages it "
                                         "skipped: 3 stages in 1.5 min of wall-clock time (benchmarks/s-stages.json).")
    bench.write_text(json.dumps({"command": "dvc repro s/dvc.yaml + dvc repro s/dvc.yaml", "wall_seconds": 60, "stages": {}}))
    assert study_time(tmp_path, "s").startswith("`dvc repro s/dvc.yaml + dvc repro s/dvc.yaml`: 0 stages in 1.0 min")
