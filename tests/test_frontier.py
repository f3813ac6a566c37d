"""studies/frontier.py: one point per configuration of a model from the runs' commits, the point chosen on
validation only, and the targets judged on that point."""
import json
import runpy
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _frontier():
    return runpy.run_path(str(ROOT / "studies" / "frontier.py"))


def _point(model, compression, val_error, test_error, rule="std", file_x=50.0, file_val_error=None):
    """A point of lenet_300_100 whose dense validation error is 1.20% and tolerance 0.30 points."""
    return {"run": "r", "model": model, "arch": "lenet_300_100", "rule": rule, "round": 3, "compression": compression,
            "file_compression": file_x, "val_error": val_error, "test_error": test_error, "file_test_error": test_error,
            "file_val_error": val_error if file_val_error is None else file_val_error,
            "dense_val_error": 1.20, "tolerance": 0.30}


def test_the_chosen_point_is_the_most_compressed_the_selection_rule_holds_whatever_its_test_error():
    chosen = _frontier()["chosen"]
    a = _point("a", 20.0, 1.40, 1.40)
    b = _point("b", 45.0, 1.51, 1.20)  # more compressed and better on test, but past the tolerance on validation
    c = _point("c", 30.0, 1.50, 1.70)  # at the tolerance: taken, though its test error is over the target
    assert chosen([a, b, c]) is c
    assert chosen([b]) is None
    # at the same parameter compression the larger file wins, if the file's model is held too
    d = _point("d", 30.0, 1.40, 1.30, file_x=120.0, file_val_error=1.60)  # its weight sharing costs too much
    e = _point("e", 30.0, 1.40, 1.40, file_x=110.0, file_val_error=1.45)
    assert chosen([a, c, d, e]) is e


def test_the_tolerance_is_the_selection_rule_s_from_the_dense_validation_accuracy():
    f = _frontier()
    files = {("r", "metrics/lenet_300_100.json"): json.dumps({"compression": 40.0, "file_compression": 100.0,
                                                              "test_pruned": 0.985, "test_compressed": 0.985}),
             ("r", "metrics/select/lenet_300_100.json"): json.dumps({"round": 2, "val": 0.985, "val_dense": 0.9888,
                                                                     "noise": 3.0}),
             ("r", "metrics/quantize/lenet_300_100.json"): json.dumps({"val_finetuned": 0.985}),
             ("r", "plots/lenet_300_100/final/rounds.csv"): "iteration,compression,test_accuracy\n2,40.0,0.985\n"}
    f["_point"].__globals__["git_file"] = lambda rev, path: files[(rev, path)]
    params = {"models": {"lenet_300_100": {"arch": "lenet_300_100"}}, "data": {"val_size": 5000},
              "prune": {"lenet_300_100-iter1": {"model": "lenet_300_100", "rule": "std"}}}
    p = f["_point"]("r", "r", "", params, "lenet_300_100", params["models"]["lenet_300_100"], params)
    assert round(p["tolerance"], 4) == round(100 * 3.0 * (0.9888 * 0.0112 / 5000) ** 0.5, 4)  # 0.4470 points
    assert round(p["dense_val_error"], 6) == 1.12 and f["held"](p)  # 1.50% is within 1.12 + 0.447
    params["data"]["val_size"] = 20000  # a larger split: a smaller tolerance (0.2235 points), no longer held
    assert not f["held"](f["_point"]("r", "r", "", params, "lenet_300_100", params["models"]["lenet_300_100"], params))


def test_changed_names_a_missing_round_once_and_a_reshaped_value_by_the_run_s_keys():
    changed = _frontier()["changed"]
    base = {"models": {"m": {"arch": "lenet5", "retrain": {"epochs": 20}}},
            "prune": {"m-iter1": {"model": "m", "q": 0.9, "epochs": 30}, "m-iter2": {"model": "m", "q": 0.95},
                      "other-iter1": {"model": "other", "q": 0.5}}}
    run = {"models": {"m": {"arch": "lenet5", "retrain": {"epochs": 10}}},
           "prune": {"m-iter1": {"model": "m", "q": {"fc1": 0.97, "fc2": 0.9}, "epochs": 30}}}
    assert changed(run, base, "m") == "iter1.q.fc1=0.97, iter1.q.fc2=0.9, retrain.epochs=10, no iter2"
    assert changed(base, run, "m") == "iter1.q=0.9, iter2.model=m, iter2.q=0.95, retrain.epochs=20"
    assert changed(base, base, "m") == "-"


def test_points_come_from_each_run_s_commit_and_render_marks_the_choice():
    f = _frontier()
    rounds = "iteration,compression,val_retrained,test_accuracy\n1,3.0,0.99,0.991\n4,41.0,0.9845,0.985\n"
    files = {}
    for rev, x in [("base", 41.0), ("exp1", 41.0), ("exp2", 50.0)]:
        files[(rev, "metrics/lenet_300_100.json")] = json.dumps(
            {"compression": x, "file_compression": 130.0, "test_pruned": 0.985, "test_compressed": 0.9849})
        files[(rev, "metrics/select/lenet_300_100.json")] = json.dumps({"round": 4, "val": 0.9845, "val_dense": 0.986})
        files[(rev, "plots/lenet_300_100/final/rounds.csv")] = rounds
        files[(rev, "metrics/quantize/lenet_300_100.json")] = json.dumps({"val_finetuned": 0.985})
    study = {"models": {"lenet_300_100": {"arch": "lenet_300_100", "dense": "../../models/lenet_300_100/dense.pt"}},
             "prune": {"lenet_300_100-iter1": {"model": "lenet_300_100", "rule": "quantile", "q": {"fc1": 0.98},
                                               "gradual": {"ramp": 0.6, "every": 100}}}, "data": {}, "run": {}}
    files[("base", "studies/records/params.yaml")] = json.dumps(study)  # a study, run at the baseline only
    for name, text in [("lenet_300_100.json", json.dumps({"compression": 60.0, "file_compression": 200.0,
                                                          "test_pruned": 0.986, "test_compressed": 0.986})),
                       ("select/lenet_300_100.json", json.dumps({"round": 1, "val": 0.984, "val_dense": 0.986})),
                       ("quantize/lenet_300_100.json", json.dumps({"val_finetuned": 0.984}))]:
        files[("base", f"studies/records/metrics/{name}")] = text
    files[("base", "studies/records/plots/lenet_300_100/final/rounds.csv")] = rounds
    files[("exp2", "studies/records/params.yaml")] = json.dumps({**study, "run": {"portable": False}})
    for name in ["lenet_300_100.json", "select/lenet_300_100.json", "quantize/lenet_300_100.json"]:
        files[("exp2", f"studies/records/metrics/{name}")] = files[("base", f"studies/records/metrics/{name}")]
    files[("exp2", "studies/records/plots/lenet_300_100/final/rounds.csv")] = rounds
    # exp2 set the study's run otherwise but ran other stages only: the baseline's results, not a new point

    def git_file(rev, path):
        if (rev, path) not in files:
            raise subprocess.CalledProcessError(128, ["git", "show", f"{rev}:{path}"])
        return files[(rev, path)]
    f["points"].__globals__["git_file"] = git_file
    params = {"models": {"lenet_300_100": {"arch": "lenet_300_100"}, "small": {"arch": "examples.x:Net"}},
              "prune": {"lenet_300_100-iter1": {"model": "lenet_300_100", "rule": "global", "q": 0.9},
                        "small-iter1": {"model": "small", "rule": "std"}},
              "data": {}, "run": {}, "sensitivity": {}}
    other = {**params, "prune": {**params["prune"], "small-iter1": {"model": "small", "rule": "std", "s": 2}}}
    swept = {**params, "prune": {**params["prune"], "lenet_300_100-iter1": {"model": "lenet_300_100", "rule": "global",
                                                                           "q": 0.95}}}
    # only the architectures with a budget; exp1 changed another model only: not a configuration of this one
    found = f["points"]([("baseline", "base", params), ("exp1", "exp1", other), ("exp2", "exp2", swept)])
    assert [(q["run"], q["model"], q["compression"], q["changed"]) for q in found] == [
        ("baseline", "lenet_300_100", 41.0, "-"), ("baseline", "studies/records/lenet_300_100", 60.0, "-"),
        ("exp2", "lenet_300_100", 50.0, "iter1.q=0.95")]
    assert found[1]["rule"] == "quantile gradual"
    p = found[0]
    assert (p["rule"], p["round"], p["compression"], p["file_compression"]) == ("global", 4, 41.0, 130.0)
    assert [(x, round(e, 6)) for x, e in p["rounds"]] == [(3.0, 0.9), (41.0, 1.5)]
    assert round(p["val_error"], 6) == 1.55 and round(p["test_error"], 6) == 1.5 and round(p["file_test_error"], 6) == 1.51
    text = f["render"]([p], ["baseline"], {"lenet_300_100": "lenet_300_100.png"})
    assert "Chosen (validation): `lenet_300_100` of baseline, 41.0x parameters, 130.0x file, test error 1.50% " \
           "(file 1.51%). Target **not met**." in text  # papers.yaml targets: 60x, 200x file
    assert "| **chosen** |" in text and "](frontier/lenet_300_100.png)" in text
    p.update(compression=60.0, file_compression=200.0)
    assert "Target **met**" in f["render"]([p], ["baseline"], {"lenet_300_100": "x.png"})


def test_every_run_adds_older_commits_with_experiments_or_results_named_by_commit(monkeypatch):
    """Older commits come with their experiments (here only) and, since frontier.py came, every commit
    that changed a committed result (in every clone), newest first."""
    import subprocess
    f = _frontier()
    g = f["every_run"].__globals__
    listed = "main:\n\tabc1234 [exp-a]\nfeedbee:\n\t1111111 [exp-b]\n\t2222222 [exp-c]\n"
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 0, listed, ""))
    shas = {"HEAD": "h" * 40, "main": "h" * 40, "feedbee": "f" * 40}
    came, logs = "c" * 40, []

    def git(*args):
        if args[0] == "rev-parse":
            return shas[args[-1]]
        logs.append(args)
        if "--diff-filter=A" in args:  # the commits that added frontier.py, newest first
            return f"{'d' * 40}\n{came}\n"
        if "--no-walk" in args:  # newest first
            return "\n".join(sorted(args[3:], reverse=True))
        return "\n".join(["h" * 40, "e" * 40, "f" * 40])  # commits that changed results, HEAD's too

    monkeypatch.setitem(g, "git", git)
    monkeypatch.setitem(g, "git_file", lambda rev, path: "models: {}\n" if (rev, path) == ("e" * 40, "params.yaml") else 1 / 0)
    by_rev = {"HEAD": [("baseline", "h", {}), ("exp-a", "a", {})],
              "f" * 40: [("baseline", "f" * 40, {}), ("exp-b", "b", {}), ("exp-c", "c", {})]}
    monkeypatch.setitem(g, "runs", lambda prefix, rev="HEAD": by_rev[rev])
    found = f["every_run"]()
    assert [name for name, _, _ in found] == ["baseline", "exp-a", "commit fffffff", "exp-b", "exp-c", "commit eeeeeee"]
    assert found[-1][1:] == ("e" * 40, {"models": {}})
    results_log = next(args for args in logs if "metrics" in args)
    assert f"{came}^..HEAD" in results_log and {"metrics", "studies/records/metrics"} <= set(results_log)
