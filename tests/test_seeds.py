"""studies/seeds.py: which runs make the seed band (the report itself is run end to end on the
tiny pipeline's experiments in test_pipeline.py)."""
import json
import runpy
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_runs_are_the_baseline_and_the_finished_experiments_of_the_prefix(monkeypatch):
    seeds = runpy.run_path(str(ROOT / "studies" / "seeds.py"))
    params = {"models": {}}

    def exp(name, state):
        return {"revs": [{"name": name, "rev": f"{name}-sha", "data": {"params": {"params.yaml": {"data": params}}}}],
                "executor": state and {"state": state}}
    shown = [{"rev": "workspace"},
             {"rev": "base-sha", "data": {"params": {"params.yaml": {"data": params}}},
              "experiments": [exp("seed-2", "success"), exp("seed-3", "queued"), exp("seed-4", "running"),
                              exp("other", "success"), exp("seed-1", None)]}]
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, json.dumps(shown), ""))
    found = seeds["runs"]("seed-")
    assert found[0][:2] == ("baseline", "base-sha")
    assert sorted((name, rev) for name, rev, _ in found[1:]) == [("seed-1", "seed-1-sha"), ("seed-2", "seed-2-sha")]


def test_queue_re_seeds_only_the_models_named(monkeypatch, tmp_path, capsys):
    import pytest
    import yaml
    seeds = runpy.run_path(str(ROOT / "studies" / "seeds.py"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"models": {"a": {"pretrain": {}}, "b": {"pretrain": {}}}}))
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: calls.append(cmd))
    seeds["queue"](["b"], [])
    assert len(calls) == 4 and calls[0][:6] == ["dvc", "exp", "run", "--queue", "-n", "seed-1"]
    assert [c for c in calls[0][6:] if c != "-S"] == ["models.b.pretrain.seed=10", "models.b.retrain.seed=11",
                                                      "models.b.quantize.finetune.seed=12"]
    calls.clear()
    seeds["queue"](None, ["run.portable=false"])  # --set: the same setting for every seed
    assert all(c[-2:] == ["-S", "run.portable=false"] for c in calls) and len(calls) == 4
    assert "models.a.pretrain.seed=40" in calls[3]
    with pytest.raises(SystemExit, match="--models: c not in params.yaml models"):
        seeds["queue"](["c"], [])
    # a study: its params file named in each setting, its pipeline the target, no pretrain where the model has none
    (tmp_path / "studies" / "records").mkdir(parents=True)
    (tmp_path / "studies" / "records" / "params.yaml").write_text(yaml.safe_dump({"models": {"c": {"retrain": {}}}}))
    calls.clear()
    seeds["queue"](None, [], "studies/records/")
    assert calls[0][:7] == ["dvc", "exp", "run", "--queue", "-n", "records-seed-1", "studies/records/dvc.yaml"]
    assert [c for c in calls[0][7:] if c != "-S"] == ["studies/records/params.yaml:models.c.retrain.seed=11",
                                                      "studies/records/params.yaml:models.c.quantize.finetune.seed=12"]
    calls.clear()
    seeds["queue"](["c"], ["run.portable=false"], "studies/records/")  # --models: only their chains
    assert calls[0][6] == "studies/records/dvc.yaml:evaluate@c"
    assert calls[0][-2:] == ["-S", "studies/records/params.yaml:run.portable=false"]  # --set: in the study's params


def test_the_band_counts_the_runs_within_their_architecture_s_paper_error():
    """The paper's pruned error of the arch is absolute, not the select rule's noise below each run's
    own dense model: a run can hold its rule and miss it, on test (reported) or on validation."""
    render = runpy.run_path(str(ROOT / "studies" / "seeds.py"))["render"]

    def out(seed, val_error, test_error):
        return {"dense": 1.0, "pruned": test_error, "compressed": 1.4, "compression": 44.0, "file_compression": 120.0,
                "val_error": val_error, "rule": seed != 20, "noise": 2.0, "max_drop": 0.0025, "seed": seed,
                "arch": "lenet_300_100",
                "mode": "fast" if seed else "portable"}
    text = render({"lenet_300_100_global": [out(0, 1.52, 1.6), out(10, 1.66, 1.3), out(20, 1.59, 1.59)]},
                  ["baseline", "seed-1", "seed-2"])
    assert ("| selection rule held (val. accuracy at most 2 standard errors below the dense model's) | 2 of 3 "
            "| yes | yes | **no** |") in text
    assert "| numeric mode (run.portable) | - | portable | fast | fast |" in text
    assert "| pruned test error ≤ 1.59%, the error budget (reported, never selects) | 2 of 3 | **no** | yes | yes |" in text
    assert ("| within the old validation budget (selected round's val. error ≤ 1.59%) "
            "| 2 of 3 | yes | **no** | yes |") in text
    assert "`python studies/seeds.py report`, never typed" in text
    fixed = render({"lenet_300_100": [{**out(0, 1.5, 1.3), "noise": None}]}, ["baseline"])  # select.max_drop instead
    assert "| selection rule held (val. accuracy at most 0.25 points below the dense model's) | 1 of 1 |" in fixed
    some = render({"lenet_300_100": [out(0, 1.5, 1.3)]}, ["baseline"], "studies/records/", ["0d190cc", "f76729e"],
                  ["lenet_300_100"])  # runs of other commits, of one model
    assert "`python studies/seeds.py queue --study studies/records --models lenet_300_100`" in some
    assert "`python studies/seeds.py report --study studies/records --models lenet_300_100 --rev 0d190cc --rev f76729e`" in some
    assert "records target" not in text  # the paper's run has no targets
    records = render({"lenet_300_100": [{**out(0, 1.5, 1.5), "compression": 61.0, "file_compression": 201.0},
                                        {**out(10, 1.5, 1.5), "compression": 61.0},  # file 120x
                                        {**out(30, 1.5, 1.6), "compression": 61.0, "file_compression": 201.0}]},
                     ["baseline", "records-seed-1", "records-seed-3"], "studies/records/")
    assert ("| records target met (rule held, ≥ 60x parameters, ≥ 200x file, pruned and file test error ≤ 1.59%; "
            "reported, never selects) | 1 of 3 | yes | **no** | **no** |") in records
    other = {"lenet_custom": [{**out(0, 5.0, 5.0), "arch": "mynets:Net"}]}
    assert "error budget" not in render(other, ["baseline"])  # no budget for an arch the issue does not name
