"""Gradual magnitude pruning (Zhu & Gupta 2017) inside a round's training run: rules.Gradual,
called by train.fit before every step, and a round that names it (prune.<key>.gradual)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.ao.pruning import CubicSL

from hanprune import pruning
from hanprune.config import ConfigError, Gradual as GradualCfg, Iteration
from hanprune.models import prunable_layers
from hanprune.rules import Gradual, check_round
from hanprune.train import fit
from tests.tiny import PRUNE, edit_params, run_stage


def _model(seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 40), nn.ReLU(), nn.Linear(40, 4))


def _pruned(model) -> dict[str, float]:
    return {n: 1 - m.weight_mask.mean().item() for n, m in prunable_layers(model).items()}


def test_the_pruned_fraction_follows_torch_s_cubic_curve_and_nothing_regrows():
    model = _model()
    layers = prunable_layers(model)
    g = Gradual(model, "quantile", {"1": 0.9, "3": 0.5}, pruning.weight_std(model), steps=100,
                cfg=GradualCfg(ramp=0.8, every=10))
    assert g.updates == 8 and _pruned(model) == {"1": 0.0, "3": 0.0}  # ones attached; nothing pruned yet
    previous = {n: m.weight_mask.clone() for n, m in layers.items()}
    for step in range(100):
        g(step)
        update = step // 10
        expected = CubicSL.sparsity_compute_fn(0.0, 0.9, min(update, 8), 0, 1, 8)
        assert abs(_pruned(model)["1"] - expected) <= 1 / layers["1"].weight.numel(), step
        for n, m in layers.items():
            assert not (m.weight_mask > previous[n]).any(), f"a pruned weight of {n} came back at step {step}"
            previous[n] = m.weight_mask.clone()
        with torch.no_grad():  # training moves the weights between updates: the masks follow them
            for m in layers.values():
                m.weight_orig.add_(torch.randn_like(m.weight_orig) * 0.05)
    assert _pruned(model) == pytest.approx({"1": 0.9, "3": 0.5}, abs=1e-3)


def test_global_ramps_one_fraction_over_all_layers_from_where_the_round_starts():
    model = _model()
    std = pruning.weight_std(model)
    pruning.attach_masks(model, {"1": (torch.arange(640).view(40, 16) % 2).float()})  # half of layer 1 pruned
    g = Gradual(model, "global", 0.8, std, steps=20, cfg=GradualCfg(ramp=1.0, every=5))
    assert g.start == pytest.approx(320 / 800) and g.at(0) == pytest.approx(0.4) and g.at(4) == pytest.approx(0.8)
    for step in range(20):
        g(step)
    masks = [m.weight_mask for m in prunable_layers(model).values()]
    assert sum(int(m.sum()) for m in masks) == 800 - math.floor(0.8 * 800 + 0.5)


def test_fit_calls_before_step_with_the_step_count_over_all_epochs():
    model = _model()
    x, y = torch.rand(50, 1, 4, 4), torch.randint(0, 4, (50,))
    cfg = SimpleNamespace(epochs=2, batch_size=16, lr=0.05, momentum=0.9, nesterov=False, schedule="cosine",
                          regularization=SimpleNamespace(kind="l2", strength=1e-4), shift=0, seed=0)
    steps = []
    fit(model, cfg, (x, y), (x, y), before_step=steps.append)
    assert steps == list(range(8))  # 4 batches (16, 16, 16, 2) per epoch


def test_a_gradual_round_trains_to_the_round_s_fractions(project, capsys):
    """The prune stage with prune.<key>.gradual: no accuracy right after pruning (there is no such
    point), the masks of the round's values at the end, and pruned weights exactly zero."""
    def gradual(p):
        it = p["prune"]["lenet_300_100-iter1"]
        it.pop("s"), it.pop("budget", None)
        it.update(rule="quantile", q={"fc1": 0.9, "fc2": 0.8, "fc3": 0.5}, gradual={"ramp": 0.5, "every": 2}, epochs=2)
    edit_params(project, gradual)
    json.dump({"rule": "quantile", "q": {"fc1": 0.9, "fc2": 0.8, "fc3": 0.5}}, open("schedule.json", "w"))
    assert run_stage(*PRUNE) == 0
    assert "pruned gradually" in capsys.readouterr().out
    metrics = json.load(open("metrics.json"))
    assert metrics["val_pruned"] is None
    assert metrics["kept"] == pytest.approx({"fc1": 0.1, "fc2": 0.2, "fc3": 0.5}, abs=1e-3)
    ckpt = torch.load("out.pt", weights_only=True)
    for name, mask in ckpt["masks"].items():
        assert (ckpt["state_dict"][f"{name}.weight"][~mask] == 0).all()


def test_a_rule_without_a_fraction_cannot_be_gradual():
    it = Iteration(model="m", iteration=1, start="s", rule="std", s={"fc1": 1.0}, epochs=1, lr=0.1,
                   gradual={"ramp": 0.5, "every": 10})
    with pytest.raises(ConfigError, match=r"prune\.m-iter1\.gradual: rule std has no pruned fraction to ramp; "
                                          r"allowed with gradual: quantile, global"):
        check_round("prune.m-iter1", it, ["fc1"])


def test_mask_updates_further_apart_than_the_ramp_are_refused():
    model = _model()
    with pytest.raises(ConfigError, match=r"gradual\.every: 50 steps is more than the ramp's 10 .*allowed: every <= 10"):
        Gradual(model, "quantile", {"1": 0.5}, pruning.weight_std(model), steps=20, cfg=GradualCfg(ramp=0.5, every=50))
    assert not hasattr(prunable_layers(model)["1"], "weight_mask")  # untouched
