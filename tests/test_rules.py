"""The pruning rules (hanprune.rules), budgets from a scan, and the choice of the round (select)."""
import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from types import SimpleNamespace

from hanprune import io, pruning, rules
from hanprune.models import make, prunable_layers
from hanprune.rules import ALL, RULES, Rule, from_budget, prune_round, round_values, scan
from hanprune.selection import select_round, tolerance
from tests.tiny import stage

ROOT = Path(__file__).resolve().parents[1]


def _layer(values) -> nn.Linear:
    layer = nn.Linear(len(values[0]), len(values), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(values, dtype=torch.float32))
    return layer


def _two_layers(a, b) -> nn.Sequential:
    return nn.Sequential(_layer(a), _layer(b))


def test_quantile_prunes_the_smallest_fraction_of_the_layer_with_ties_by_position():
    model = nn.Sequential(_layer([[0.5, -0.1, 0.3, 0.1], [-0.2, 0.1, 0.9, -0.4]]))  # three |w| = 0.1 tie
    prune_round(model, "quantile", {"0": 0.25}, pruning.weight_std(model))  # 2 of 8: the first two 0.1s
    assert model[0].weight_mask.tolist() == [[1, 0, 1, 0], [1, 1, 1, 1]]


def test_quantile_rounds_compound():
    """q is the layer's pruned fraction after the round, counting the earlier rounds' prunes, so a
    second round with a larger q prunes only the difference; a smaller q prunes nothing."""
    model = nn.Sequential(_layer([[float(k) for k in range(1, 11)]]))
    std = pruning.weight_std(model)
    prune_round(model, "quantile", {"0": 0.3}, std)
    assert model[0].weight_mask.tolist() == [[0, 0, 0] + [1] * 7]
    with torch.no_grad():  # as if retraining had shrunk a survivor below the pruned ones' values
        model[0].weight_orig[0, 9] = 0.01
        model(torch.zeros(1, 10))  # a forward pass recomputes the weight from weight_orig
    prune_round(model, "quantile", {"0": 0.5}, std)
    assert model[0].weight_mask.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1, 0]]
    assert int((model[0].weight_mask == 0).sum()) == 5
    prune_round(model, "quantile", {"0": 0.2}, std)
    assert int((model[0].weight_mask == 0).sum()) == 5


def test_global_sets_one_threshold_across_layers():
    """Layer a holds small weights, b large ones: pruning half of all weights globally takes them
    from a, where per-layer quantile would take half of each."""
    b = [[1.0, -2.0, 3.0, 4.0]]
    model = _two_layers([[0.1, -0.2, 0.3, 0.4, 5.0]], b)
    prune_round(model, "global", 0.4, pruning.weight_std(model))  # 4 of 9 weights: a's four smallest
    assert model[0].weight_mask.tolist() == [[0, 0, 0, 0, 1]] and model[1].weight_mask.tolist() == [[1, 1, 1, 1]]
    per_layer = _two_layers([[0.1, -0.2, 0.3, 0.4, 5.0]], b)
    prune_round(per_layer, "quantile", {"0": 0.4, "1": 0.4}, pruning.weight_std(per_layer))
    assert per_layer[1].weight_mask.tolist() == [[0, 0, 1, 1]]  # 1.6 -> 2 of b's 4


def test_global_compounds_over_all_layers():
    model = _two_layers([[0.1, -0.2, 0.3, 0.4, 5.0]], [[1.0, -2.0, 3.0, 4.0]])
    std = pruning.weight_std(model)
    prune_round(model, "global", 0.2, std)  # 1.8 -> 2: 0.1, 0.2
    prune_round(model, "global", 0.6, std)  # 5.4 -> 5 in all: + 0.3, 0.4, 1.0
    assert model[0].weight_mask.tolist() == [[0, 0, 0, 0, 1]] and model[1].weight_mask.tolist() == [[0, 1, 1, 1]]


def test_a_rule_that_would_empty_a_layer_is_refused_and_leaves_the_model_untouched():
    model = _two_layers([[0.1, -0.2, 0.3, 0.4]], [[1.0, -2.0, 3.0, 4.0]])
    with pytest.raises(pruning.PruningError, match=r"^q = 0.5 removes every weight of 0 \(rule global\)"):
        prune_round(model, "global", 0.5, pruning.weight_std(model))
    with pytest.raises(pruning.PruningError, match=r"^q.1 = 0.9 removes every weight of 1 \(rule quantile\)"):
        prune_round(model, "quantile", {"0": 0.5, "1": 0.9}, pruning.weight_std(model))
    assert pruning.masks_of(model) == {}


def _old_sensitivity(model, s_grid, score):
    """hanprune.pruning.sensitivity before the rules: the reference for the std scan's rows."""
    std = pruning.weight_std(model)
    rows = []
    for layer in prunable_layers(model):
        for s in s_grid:
            pruned = copy.deepcopy(model)
            mask = (prunable_layers(pruned)[layer].weight.abs() >= s * std[layer]).float()
            torch.nn.utils.prune.custom_from_mask(prunable_layers(pruned)[layer], "weight", mask)
            kept = int(mask.sum()) / mask.numel()
            rows.append({"layer": layer, "s": s, "kept": kept, "score": score(pruned)})
    return rows


def test_the_std_rule_gives_the_paper_s_masks_and_scan_bit_for_bit():
    torch.manual_seed(0)
    model = make("lenet5")
    std = pruning.weight_std(model)
    s = {"conv1": 0.25, "conv2": 0.5, "fc1": 1.0, "fc2": 0.7, "fc3": 0.4}
    ours, today = copy.deepcopy(model), copy.deepcopy(model)
    prune_round(ours, "std", s, std)
    for name, value in s.items():  # the paper's rule written out: |w| >= s * std survives
        layer = prunable_layers(today)[name]
        torch.nn.utils.prune.custom_from_mask(layer, "weight", (layer.weight.abs() >= value * std[name]).float())
        assert torch.equal(prunable_layers(today)[name].weight_mask, prunable_layers(ours)[name].weight_mask)
    x = torch.randn(4, 1, 28, 28)
    score = lambda m: m.eval()(x).sum().item()  # noqa: E731
    assert scan(model, "std", [0.0, 1.0, 3.0], score) == _old_sensitivity(model, [0.0, 1.0, 3.0], score)


def test_the_quantile_and_global_scans():
    model = _two_layers([[0.1, -0.2, 0.3, 0.4, 5.0]], [[1.0, -2.0, 3.0, 4.0]])
    rows = scan(model, "quantile", [0.0, 0.5], lambda m: 1.0)
    assert [(r["layer"], r["q"], r["kept"]) for r in rows] == [("0", 0.0, 1.0), ("0", 0.5, pytest.approx(0.4)),
                                                                ("1", 0.0, 1.0), ("1", 0.5, 0.5)]  # 2.5 -> 3 pruned
    rows = scan(model, "global", [0.0, 0.4], lambda m: 1.0)
    assert [(r["layer"], r["q"], r["kept"]) for r in rows] == [(ALL, 0.0, 1.0), (ALL, 0.4, pytest.approx(5 / 9))]


FAKE_SCAN = [  # layer, s, val_accuracy: dense 0.99
    *[{"layer": "fc1", "s": s, "val_accuracy": a} for s, a in [(0.0, 0.99), (0.5, 0.985), (1.0, 0.981), (1.5, 0.95),
                                                                  (2.0, 0.985)]],  # recovers at 2.0: noise, not taken
    *[{"layer": "fc2", "s": s, "val_accuracy": a} for s, a in [(0.0, 0.99), (0.5, 0.97), (1.0, 0.9)]],
    *[{"layer": "fc3", "s": s, "val_accuracy": a} for s, a in [(1.0, 0.99), (0.0, 0.99), (2.0, 0.99)]],  # any order
]


def test_a_budget_takes_the_largest_grid_value_within_max_drop_times_scale():
    assert from_budget(FAKE_SCAN, "std", 0.01, 1.0) == {"fc1": 1.0, "fc2": 0.0, "fc3": 2.0}
    assert from_budget(FAKE_SCAN, "std", 0.02, 0.5) == {"fc1": 0.5, "fc2": 0.25, "fc3": 1.0}
    assert from_budget(FAKE_SCAN, "std", 0.005, 0.25) == {"fc1": 0.125, "fc2": 0.0, "fc3": 0.5}


def test_a_fraction_budget_compounds_its_scale_and_stays_below_one():
    """q is a pruned fraction: scale 2 prunes the one-shot fraction of the survivors once more
    (kept 0.4 -> 0.16), scale 0.5 keeps sqrt(kept); never q >= 1, which no layer could survive."""
    scan = [{"layer": "fc1", "q": q, "val_accuracy": a} for q, a in [(0.0, 0.99), (0.6, 0.985), (0.9, 0.9)]]
    assert from_budget(scan, "quantile", 0.01, 1.0) == {"fc1": 0.6}
    assert from_budget(scan, "quantile", 0.01, 2.0) == {"fc1": 0.84}
    assert from_budget(scan, "quantile", 0.01, 0.5) == {"fc1": round(1 - 0.4 ** 0.5, 6)}
    assert from_budget(scan, "quantile", 0.1, 10.0)["fc1"] < 1


def test_values_given_beside_a_budget_override_single_layers():
    budget = SimpleNamespace(max_drop=0.01, scale=0.5)
    assert round_values("std", {"fc2": 0.3}, budget, FAKE_SCAN) == ({"fc1": 0.5, "fc2": 0.3, "fc3": 1.0}, ["fc1", "fc3"])
    assert round_values("std", {"fc2": 0.3}, None, FAKE_SCAN) == ({"fc2": 0.3}, [])
    scan_all = [{"layer": ALL, "q": q, "val_accuracy": a} for q, a in [(0.0, 0.99), (0.5, 0.985), (0.8, 0.9)]]
    assert round_values("global", None, budget, scan_all) == (round(1 - 0.5 ** 0.5, 6), [ALL])
    assert round_values("global", 0.6, budget, scan_all) == (0.6, [])


class Sign(Rule):
    """A rule of the test's own: prune the negative weights of the layers named (value 1), or none (0)."""
    key, per_layer, grid = "neg", True, [0.0, 1.0]
    value = bool

    def masks(self, weights, alive, values, dense_std):
        return {n: alive[n] * (weights[n] >= 0).float() if on else alive[n] for n, on in values.items()}

    def scale(self, value, factor):
        return value


def test_a_new_rule_is_one_class_and_one_registry_line_and_runs_a_round_through_the_shared_mechanism(monkeypatch):
    """Adding a rule: the class above and its line in RULES. The shared mechanism applies its masks
    (torch's re-parametrisation), refuses a round that would empty a layer, and scans it."""
    monkeypatch.setitem(RULES, "sign", Sign())
    model = _two_layers([[0.1, -0.2, 0.3, -0.4]], [[-1.0, -2.0]])
    prune_round(model, "sign", {"0": True}, pruning.weight_std(model))
    assert model[0].weight_mask.tolist() == [[1, 0, 1, 0]] and pruning.masks_of(model).keys() == {"0"}
    assert model[0].weight.tolist() == [[pytest.approx(0.1), 0.0, pytest.approx(0.3), 0.0]]
    with pytest.raises(pruning.PruningError, match=r"^neg.1 = 1 removes every weight of 1 \(rule sign\); allowed: a smaller neg$"):
        prune_round(model, "sign", {"1": True}, pruning.weight_std(model))
    assert pruning.masks_of(model).keys() == {"0"}  # refused whole
    rows = scan(_two_layers([[0.1, -0.2, 0.3, -0.4]], [[-1.0, 2.0]]), "sign", Sign.grid, lambda m: 0.5)
    assert [(r["layer"], r["neg"], r["kept"]) for r in rows] == [("0", 0.0, 1.0), ("0", 1.0, 0.5), ("1", 0.0, 1.0),
                                                                 ("1", 1.0, 0.5)]


def _rounds(*figures):
    return [{"iteration": k, "val_retrained": v, "compression": c} for k, (v, c) in enumerate(figures, start=1)]


def test_select_picks_the_most_compressed_round_within_max_drop():
    rounds = _rounds((0.990, 3.0), (0.989, 6.0), (0.986, 12.0), (0.988, 9.0))
    assert select_round(rounds, 0.990, 0.002) == (rounds[3], True)   # 9x: 12x is 0.4 points off
    assert select_round(rounds, 0.990, 0.004) == (rounds[2], True)   # exactly at the limit counts
    assert select_round(rounds, 0.995, 0.001) == (rounds[0], False)  # none: the least compressed
    assert select_round(rounds, 0.990, 0.004, max_error=0.0125) == (rounds[3], True)  # not 12x: its error is 1.4%


def test_the_tolerance_is_the_validation_split_s_standard_error():
    """noise * sqrt(a (1 - a) / n): at the paper's Caffe LeNet-5 (dense 0.74% error, 5,000 images)
    two standard errors are 0.24 points; four times the images halve it."""
    assert tolerance(0.9926, 5000, 2.0) == pytest.approx(0.002424, abs=1e-6)
    assert tolerance(0.9926, 20000, 2.0) == pytest.approx(tolerance(0.9926, 5000, 2.0) / 2)
    assert tolerance(0.9926, 5000, 0.0) == 0 and tolerance(1.0, 5000, 2.0) == 0


def test_select_stage_reads_no_data_and_copies_the_chosen_round(tmp_path, monkeypatch, capsys):
    """The stage gets no data root at all (the test split cannot be read), and the data directory
    of params.yaml does not exist: it chooses from the rounds' own validation figures."""
    model = make("lenet_300_100")
    std = pruning.weight_std(model)
    history = []
    for k, (val, ratio) in enumerate([(0.985, 3.0), (0.979, 8.0), (0.95, 15.0)], start=1):
        history.append({"iteration": k, "val_before": 0.98 if k == 1 else history[-1]["val_retrained"],
                        "val_pruned": 0.5, "val_retrained": val, "params_nonzero": 1, "compression": ratio, "kept": {}})
        io.save_torch(tmp_path / "rounds" / f"iter{k}.pt", pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, model, std, list(history)))
    p = yaml_params(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    stage("select_round").main(["lenet_300_100", "--params", str(p), "--rounds", "rounds", "--out", "selected.pt",
                                "--metrics", "select.json"])
    assert "select lenet_300_100: round 2 of 3" in capsys.readouterr().out
    assert json.loads((tmp_path / "select.json").read_text()) == {  # one standard error of 0.98 on 5,000: 0.00198
        "round": 2, "compression": 8.0, "val": 0.979, "val_dense": 0.98, "noise": 1.0,
        "max_drop": pytest.approx(0.0019799), "max_error": None, "held": True, "rounds": 3}
    assert (tmp_path / "selected.pt").read_bytes() == (tmp_path / "rounds" / "iter2.pt").read_bytes()


def yaml_params(tmp_path) -> Path:
    import yaml
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"]["root"] = str(tmp_path / "no-data-here")
    p["models"] = {"lenet_300_100": {**p["models"]["lenet_300_100"], "select": {"noise": 1}}}
    p["prune"] = {k: v for k, v in p["prune"].items() if v["model"] == "lenet_300_100" and v["iteration"] <= 3}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path
