"""Magnitude pruning, retraining with masks, and the checkpoint format (hanprune.pruning)."""
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from hanprune import pruning, rules
from hanprune.config import Training
from hanprune.models import make, prunable_layers
from hanprune.pruning import CheckpointError
from hanprune.train import fit, random_shift

ROOT = Path(__file__).resolve().parents[1]


# --- the rule -----------------------------------------------------------------------------------

def _known_model() -> nn.Module:
    """lenet_300_100 with fc3 (10 x 100) holding -0.999 .. 1.0 in steps of 1/500 (all exact in
    float32), so thresholds land on known values."""
    model = make("lenet_300_100")
    with torch.no_grad():
        model.fc3.weight.copy_((torch.arange(-499, 501, dtype=torch.float64) / 500).float().view(10, 100))
    return model


def _expected_mask(w: torch.Tensor, threshold: float) -> torch.Tensor:
    return w.abs() >= threshold


def test_prune_by_std_masks_exactly_below_threshold():
    model = _known_model()
    w = model.fc3.weight.detach().clone()
    std = {"fc3": 0.5}  # passed in: deliberately not the layer's own std
    rules.prune_round(model, "std", {"fc3": 0.5}, std)  # threshold 0.25
    mask = pruning.masks_of(model)["fc3"]
    assert torch.equal(mask, _expected_mask(w, 0.25))
    # |w| < 0.25 means w = k/500 with |k| <= 124: 124 negatives, zero, 124 positives
    assert int((~mask).sum()) == 249
    # the boundary is kept: |w| == threshold is not "< threshold"
    assert mask[w == 0.25].all() and mask[w == -0.25].all()
    assert not mask[w == 0.248].any()
    # effective weights: pruned exactly zero, survivors unchanged
    assert torch.equal(model.fc3.weight.detach(), w * mask)
    # only the named layer got a mask
    assert set(pruning.masks_of(model)) == {"fc3"}


def test_std_threshold_apply_on_plain_linear():
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -0.2, 0.3, -0.4], [0.5, -0.6, 0.05, 1.0]]))
    rules.prune_round(nn.Sequential(layer), "std", {"0": 1.5}, {"0": 0.2})  # threshold 0.3 (float64: 0.30000000000000004)
    # 0.3 in float32 is 0.30000001192..., not below the threshold -> kept
    expected = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 1]], dtype=torch.float32)
    assert torch.equal(layer.weight_mask, expected)


def test_s_zero_prunes_nothing():
    model = _known_model()
    rules.prune_round(model, "std", {"fc1": 0.0, "fc3": 0.0}, pruning.weight_std(model))
    masks = pruning.masks_of(model)
    assert masks["fc1"].all() and masks["fc3"].all()
    # s=0 keeps even an exact zero weight (|0| >= 0)
    assert masks["fc3"].view(-1)[499]  # w == 0.0 there
    assert model.fc3.weight.view(-1)[499] == 0.0


@pytest.mark.parametrize("s", [-0.1, -1.0, float("nan")])
def test_negative_s_raises(s):
    model = _known_model()
    with pytest.raises(ValueError, match="s must be >= 0"):
        rules.prune_round(model, "std", {"fc3": s}, {"fc3": 1.0})
    assert "fc3" not in pruning.masks_of(model)  # nothing half-applied


def test_second_round_larger_s_prunes_superset_and_never_revives():
    model = _known_model()
    std = {"fc3": 1.0}
    rules.prune_round(model, "std", {"fc3": 0.2}, std)
    first = pruning.masks_of(model)["fc3"].clone()
    assert int((~first).sum()) == 199  # |w| < 0.2
    # as if retraining had grown the pruned entries' hidden values: they must stay pruned
    with torch.no_grad():
        model.fc3.weight_orig[~first] = 5.0
    rules.prune_round(model, "std", {"fc3": 0.6}, std)
    second = pruning.masks_of(model)["fc3"]
    assert not (second & ~first).any(), "a pruned weight was revived"
    w = (torch.arange(-499, 501, dtype=torch.float64) / 500).float().view(10, 100)
    assert torch.equal(second, first & (w.abs() >= 0.6))
    assert int((~second).sum()) == 599
    assert (model.fc3.weight[~second] == 0).all()


def test_second_round_smaller_s_prunes_nothing_new():
    model = _known_model()
    std = {"fc3": 1.0}
    rules.prune_round(model, "std", {"fc3": 0.6}, std)
    first = pruning.masks_of(model)["fc3"].clone()
    rules.prune_round(model, "std", {"fc3": 0.3}, std)
    assert torch.equal(pruning.masks_of(model)["fc3"], first)
    assert int((~first).sum()) == 599



def test_s_that_empties_a_layer_is_refused_before_any_layer_is_touched():
    model = _known_model()  # fc3: largest |w| is 1.0
    with pytest.raises(pruning.PruningError) as e:
        rules.prune_round(model, "std", {"fc1": 0.5, "fc3": 2.5}, {"fc1": 0.05, "fc3": 0.5})
    assert str(e.value) == "s.fc3 = 2.5 removes every weight of fc3 (rule std); allowed: s <= 2 (largest |w| 1)"
    assert pruning.masks_of(model) == {}  # fc1, named first, was not pruned either
    rules.prune_round(model, "std", {"fc3": 2.0}, {"fc3": 0.5})  # the bound itself keeps the largest weight
    assert int(pruning.masks_of(model)["fc3"].sum()) == 1


def test_emptying_check_looks_only_at_surviving_weights():
    model = _known_model()
    rules.prune_round(model, "std", {"fc3": 0.6}, {"fc3": 1.0})
    first = pruning.masks_of(model)["fc3"].clone()
    with torch.no_grad():
        model.fc3.weight_orig[~first] = 5.0  # pruned entries' hidden values do not count
    with pytest.raises(pruning.PruningError, match=r"allowed: s <= 1 \(largest \|w\| 1\)$"):
        rules.prune_round(model, "std", {"fc3": 1.5}, {"fc3": 1.0})
    assert torch.equal(pruning.masks_of(model)["fc3"], first)


def test_sensitivity_may_empty_a_layer():
    """The scan (the paper's Figure 6) goes on to s where a layer has no weights left: a data point, not an error."""
    from hanprune.rules import scan
    rows = scan(_known_model(), "std", [3.0], lambda m: 0.0)
    assert [r["kept"] for r in rows if r["layer"] == "fc3"] == [0.0]

# --- retraining keeps pruned weights at zero ------------------------------------------------------

def _tiny_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_pruned_weights_stay_zero_through_retraining(kind):
    torch.manual_seed(0)
    model = make("lenet_300_100")
    rules.prune_round(model, "std", {"fc1": 1.0, "fc2": 0.5}, pruning.weight_std(model))
    masks = {k: v.clone() for k, v in pruning.masks_of(model).items()}
    assert 0.2 < masks["fc1"].float().mean() < 0.8  # a real mix of pruned and kept weights
    before = {k: v.clone() for k, v in pruning.plain_state_dict(model).items()}
    cfg = Training(seed=0, epochs=2, batch_size=16, lr=0.1, momentum=0.9, schedule="cosine",
                   regularization={"kind": kind, "strength": 0.01})
    train, val = _tiny_data(64, 1), _tiny_data(32, 2)
    plain = make("lenet_300_100")
    checked = []

    def log(record):
        mask = masks["fc1"]
        # the weight torch uses in forward
        assert (model.fc1.weight[mask == 0] == 0).all()
        assert (model.fc2.weight[~masks["fc2"]] == 0).all()
        # the effective weights that would be saved
        state = pruning.plain_state_dict(model)
        assert (state["fc1.weight"][~mask] == 0).all()
        assert (state["fc2.weight"][~masks["fc2"]] == 0).all()
        # masks unchanged by the optimizer (buffers, not parameters)
        assert torch.equal(model.fc1.weight_mask.bool(), mask)
        # the model computes exactly what a plain model with those zeroed weights computes
        plain.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(val[0]), plain.eval()(val[0]))
        checked.append(record["epoch"])

    history = fit(model, cfg, train, val, log=log)
    assert checked == [1, 2]
    assert [r["epoch"] for r in history] == [1, 2]
    after = pruning.plain_state_dict(model)
    for name in ("fc1", "fc2"):
        keep = masks[name]
        assert (after[f"{name}.weight"][~keep] == 0).all()
        assert not torch.equal(after[f"{name}.weight"][keep], before[f"{name}.weight"][keep]), \
            f"surviving {name} weights did not train"
    assert not torch.equal(after["fc3.weight"], before["fc3.weight"])


def test_conv_training_keeps_masks_and_returns_standard_layout():
    """fit trains convolutions in channels-last layout; the masks hold there too (in the weight the
    forward pass uses, not only in the saved state, which plain_state_dict multiplies by the mask
    itself), and the model comes back in the standard layout, so checkpoints do not depend on how
    it was trained."""
    torch.manual_seed(0)
    model = make("lenet5_caffe")
    rules.prune_round(model, "std", {"conv2": 1.0}, pruning.weight_std(model))
    with torch.no_grad():
        model.conv2.weight_mask[:, 3] = 0  # conv2 ignores its input channel 3 altogether
    keep = model.conv2.weight_mask.bool().clone()
    before = model.conv2.weight_orig.detach().clone()
    cfg = Training(seed=0, epochs=1, batch_size=16, lr=0.1, momentum=0.9, schedule="cosine",
                   regularization={"kind": "l2", "strength": 0.01})
    fit(model, cfg, _tiny_data(64, 1), _tiny_data(32, 2))
    for t in (model.conv2.weight_orig, model.conv2.weight_mask, model.conv1.weight):
        assert t.is_contiguous()
    model.eval()
    x = _tiny_data(8, 3)[0]
    with torch.no_grad():
        out = model(x)
    assert (model.conv2.weight[~keep] == 0).all()  # the weight that forward just used
    assert not torch.equal(model.conv2.weight[keep], before[keep])

    def perturbed(channel):
        def hook(module, args):
            (inputs,) = args
            inputs = inputs.clone()
            inputs[:, channel] += 100 * torch.randn_like(inputs[:, channel])
            return (inputs,)
        handle = model.conv2.register_forward_pre_hook(hook)  # after pruning's hook, which sets weight
        try:
            with torch.no_grad():
                return model(x)
        finally:
            handle.remove()
    assert torch.equal(perturbed(3), out)  # the pruned channel has no effect on the output
    assert not torch.equal(perturbed(4), out)  # a channel with survivors has
    state = pruning.plain_state_dict(model)
    assert torch.equal(state["conv2.weight"], model.conv2.weight)


def test_random_shift_translates_each_image_by_its_own_offset():
    """Each output image is its input translated by (dy, dx) in [-2, 2], with the edge pixels
    filling the uncovered border: the same as slicing that image's replicate-padded copy."""
    x = torch.randn(50, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    dy, dx = torch.randint(0, 5, (2, 50), generator=torch.Generator().manual_seed(3))
    out = random_shift(x, 2, dy, dx)
    padded = torch.nn.functional.pad(x, (2,) * 4, mode="replicate")
    for i in range(50):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 28, dx[i]:dx[i] + 28])
    assert len({(a, b) for a, b in zip(dy.tolist(), dx.tolist())}) > 10  # offsets really vary


def test_one_draw_per_epoch_gives_the_numbers_of_one_draw_per_batch():
    """The loop draws an epoch's shifts at once and gives batch i the next 2 * len(batch) of them:
    the numbers that drawing (2, len(batch)) per batch gave, on which the committed results rest."""
    n, size = 1000, 64
    per_batch = torch.Generator().manual_seed(7)
    expected = torch.cat([torch.randint(0, 5, (2, min(size, n - i)), generator=per_batch).flatten()
                          for i in range(0, n, size)])
    assert torch.equal(torch.randint(0, 5, (2 * n,), generator=torch.Generator().manual_seed(7)), expected)


@pytest.mark.parametrize("schedule", ["cosine", "inv", "constant"])
@pytest.mark.parametrize("momentum,nesterov,reg", [(0.9, False, "l2"), (0.9, True, "l2"), (0.0, False, "l2"),
                                                     (0.9, False, "l1")])
def test_sgd_and_rates_give_the_bits_of_torch_optim(schedule, momentum, nesterov, reg):
    """hanprune.train.SGD and learning_rates stand in for torch.optim.SGD(fused=True) and its LR
    schedulers (which import torch._dynamo): 200 steps of both give the same bits."""
    import torch.optim.lr_scheduler as sched
    from hanprune.train import SGD, learning_rates
    cfg = Training(seed=0, epochs=1, batch_size=8, lr=0.05, momentum=momentum, nesterov=nesterov,
                   schedule=schedule, regularization={"kind": reg, "strength": 0.001}, shift=0)
    steps = 200
    ours, theirs = make("lenet_300_100"), make("lenet_300_100")
    theirs.load_state_dict(ours.state_dict())
    opt = torch.optim.SGD(theirs.parameters(), lr=cfg.lr, momentum=momentum, nesterov=nesterov,
                          weight_decay=0.001 if reg == "l2" else 0.0, fused=True)
    schedule_of = {"cosine": lambda: sched.CosineAnnealingLR(opt, T_max=steps),
                   "inv": lambda: sched.LambdaLR(opt, lambda i: (1 + 1e-4 * i) ** -0.75),
                   "constant": lambda: sched.LambdaLR(opt, lambda i: 1.0)}[schedule]()
    sgd = SGD(ours.parameters(), cfg)
    x = torch.randn(8, 784, generator=torch.Generator().manual_seed(1))
    for step, lr in enumerate(learning_rates(cfg, steps)):
        assert lr == opt.param_groups[0]["lr"], f"step {step}"
        for model in (ours, theirs):
            model.zero_grad(set_to_none=True)
            model(x * (step % 7)).square().mean().backward()
        sgd.step(lr)
        opt.step()
        schedule_of.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("key", ["lenet_300_100", "lenet5"])
def test_training_on_the_cpu_is_repeatable_to_the_bit(key):
    """Same seed, same thread count: the same bytes, without torch.use_deterministic_algorithms
    (which runtime.start only sets on CUDA)."""
    cfg = Training(seed=0, epochs=1, batch_size=16, lr=0.05, momentum=0.9, schedule="cosine",
                   regularization={"kind": "l2", "strength": 0.001}, shift=2)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = make(key)
        rules.prune_round(model, "std", {"fc1": 1.0}, pruning.weight_std(model))
        fit(model, cfg, _tiny_data(96, 1), _tiny_data(32, 2))
        states.append(pruning.plain_state_dict(model))
    assert not torch.are_deterministic_algorithms_enabled()
    for name, tensor in states[0].items():
        assert tensor.numpy().tobytes() == states[1][name].numpy().tobytes(), name


# --- checkpoints --------------------------------------------------------------------------------

def _pruned_model():
    torch.manual_seed(0)
    model = make("lenet_300_100")
    std = pruning.weight_std(model)
    rules.prune_round(model, "std", {"fc1": 1.0, "fc3": 0.5}, std)
    history = [{"iteration": 1, "s": {"fc1": 1.0, "fc3": 0.5}, "kept": 0.31, "val_accuracy": 0.97}]
    return model, std, history


def _save(tmp_path, obj, name="ckpt.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_checkpoint_round_trip(tmp_path):
    model, std, history = _pruned_model()
    ckpt = pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, model, std, history)
    path = _save(tmp_path, ckpt)

    loaded, ck = pruning.load_checkpoint(path, "lenet_300_100")
    assert ck["model"] == "lenet_300_100" and (ck["arch"], ck["kwargs"]) == ("lenet_300_100", {})
    assert ck["format"] == pruning.CHECKPOINT_FORMAT
    assert ck["dense_std"] == std
    assert ck["history"] == history
    original = pruning.plain_state_dict(model)
    restored = pruning.plain_state_dict(loaded)
    assert original.keys() == restored.keys()
    for k in original:
        assert torch.equal(original[k], restored[k]), k
    m0, m1 = pruning.masks_of(model), pruning.masks_of(loaded)
    assert set(m0) == set(m1) == {"fc1", "fc3"}
    for k in m0:
        assert torch.equal(m0[k], m1[k])
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.eval()(x))
    # the saved state dict is the plain architecture's (no _orig/_mask keys)
    assert set(ck["state_dict"]) == set(make("lenet_300_100").state_dict())
    # model_key is optional
    _, ck2 = pruning.load_checkpoint(path)
    assert ck2["model"] == "lenet_300_100"


def test_checkpoint_loads_with_weights_only(tmp_path):
    model, std, history = _pruned_model()
    path = _save(tmp_path, pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, model, std, history))
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["model"] == "lenet_300_100"
    assert raw["masks"]["fc1"].dtype == torch.bool
    assert torch.equal(raw["state_dict"]["fc1.weight"][~raw["masks"]["fc1"]],
                       torch.zeros(int((~raw["masks"]["fc1"]).sum())))


def test_loaded_checkpoint_can_be_pruned_further(tmp_path):
    """A later round starts from a checkpoint: masks carry over, nothing is revived."""
    model, std, history = _pruned_model()
    path = _save(tmp_path, pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, model, std, history))
    loaded, ck = pruning.load_checkpoint(path, "lenet_300_100")
    old = pruning.masks_of(loaded)["fc1"].clone()
    rules.prune_round(loaded, "std", {"fc1": 1.5}, ck["dense_std"])
    new = pruning.masks_of(loaded)["fc1"]
    assert not (new & ~old).any()
    assert new.sum() < old.sum()


def test_truncated_checkpoint(tmp_path):
    model, std, history = _pruned_model()
    good = _save(tmp_path, pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, model, std, history))
    bad = tmp_path / "truncated.pt"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        pruning.load_checkpoint(bad, "lenet_300_100")
    assert str(bad) in str(e.value)
    assert "not a readable checkpoint" in str(e.value)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        pruning.load_checkpoint(tmp_path / "nope.pt")


def test_checkpoint_of_another_model(tmp_path):
    model, std, history = _pruned_model()
    path = _save(tmp_path, pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, model, std, history))
    with pytest.raises(CheckpointError) as e:
        pruning.load_checkpoint(path, "lenet5")
    msg = str(e.value)
    assert str(path) in msg
    assert "holds model 'lenet_300_100', expected 'lenet5'" in msg


def test_checkpoint_of_another_key_with_the_same_architecture(tmp_path):
    """A study's model (lenet_300_100_quantile) starts from the paper's run's dense checkpoint: the
    arch and kwargs decide, not the key; another arch is still refused."""
    model, std, history = _pruned_model()
    path = _save(tmp_path, pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, model, std, history))
    loaded, ckpt = pruning.load_checkpoint(path, "lenet_300_100_quantile", "lenet_300_100", {})
    assert ckpt["model"] == "lenet_300_100"
    assert all(torch.equal(w, pruning.plain_state_dict(model)[k]) for k, w in pruning.plain_state_dict(loaded).items())
    with pytest.raises(CheckpointError, match="holds model lenet_300_100 of arch 'lenet_300_100' with kwargs {}, "
                                              "expected arch 'lenet5'"):
        pruning.load_checkpoint(path, "lenet5_quantile", "lenet5", {})


def test_mask_shape_mismatch(tmp_path):
    model, std, history = _pruned_model()
    ckpt = pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, model, std, history)
    ckpt["masks"]["fc1"] = torch.ones(10, 10, dtype=torch.bool)
    path = _save(tmp_path, ckpt)
    with pytest.raises(CheckpointError) as e:
        pruning.load_checkpoint(path, "lenet_300_100")
    msg = str(e.value)
    assert str(path) in msg
    assert "mask of fc1 has shape (10, 10), weight has (300, 784)" in msg


def test_mask_for_unknown_layer(tmp_path):
    model, std, history = _pruned_model()
    ckpt = pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, model, std, history)
    ckpt["masks"]["fc9"] = torch.ones(10, 100, dtype=torch.bool)
    path = _save(tmp_path, ckpt)
    with pytest.raises(CheckpointError, match=r"mask for unknown layer 'fc9'; layers: fc1, fc2, fc3"):
        pruning.load_checkpoint(path, "lenet_300_100")


def test_weights_that_do_not_fit(tmp_path):
    model, std, history = _pruned_model()
    ckpt = pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, model, std, history)
    ckpt["state_dict"]["fc2.weight"] = torch.zeros(7, 300)
    path = _save(tmp_path, ckpt)
    with pytest.raises(CheckpointError) as e:
        pruning.load_checkpoint(path, "lenet_300_100")
    assert "weights do not fit lenet_300_100" in str(e.value)
    assert "fc2.weight" in str(e.value)


@pytest.mark.parametrize("obj", [{"weights": torch.zeros(3)}, [1, 2, 3], {"format": 99, "model": "lenet5"}])
def test_not_a_checkpoint(tmp_path, obj):
    path = _save(tmp_path, obj)
    with pytest.raises(CheckpointError) as e:
        pruning.load_checkpoint(path)
    assert f"not a checkpoint of this project (format 1 or {pruning.CHECKPOINT_FORMAT})" in str(e.value)


@pytest.mark.parametrize("obj, key", [
    pytest.param({"format": 1}, "lenet5", id="no-model-key"),
    pytest.param({"format": 1, "model": "lenet5"}, None, id="no-state_dict"),
    pytest.param({"format": 1, "model": "resnet", "state_dict": {}, "masks": {}}, None,
                 id="unknown-model"),
    pytest.param({"format": 1, "model": "lenet5", "state_dict": torch.zeros(2), "masks": {}}, None,
                 id="state_dict-not-a-dict"),
    pytest.param({"format": 2, "model": "lenet5", "state_dict": {}, "masks": {}, "dense_std": {}, "history": []}, None,
                 id="format2-without-arch"),
])
def test_incomplete_format1_checkpoint(tmp_path, obj, key):
    path = _save(tmp_path, obj)
    with pytest.raises(CheckpointError) as e:
        pruning.load_checkpoint(path, key)
    assert str(path) in str(e.value)


def test_random_bytes_not_a_checkpoint(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(b"this is not a zip file nor a pickle\n" * 10)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        pruning.load_checkpoint(path)


def _old_checkpoint(ckpt: dict) -> dict:
    """What the writer of checkpoint format 1 wrote: the same without arch and kwargs."""
    return {**{k: v for k, v in ckpt.items() if k not in ("arch", "kwargs")}, "format": 1}


def test_a_checkpoint_of_format_1_of_a_built_in_loads(tmp_path):
    model, std, history = _pruned_model()
    old = _old_checkpoint(pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, model, std, history))
    path = _save(tmp_path, old)
    loaded, ck = pruning.load_checkpoint(path, "lenet_300_100")
    assert ck["format"] == 1 and "arch" not in ck
    original, restored = pruning.plain_state_dict(model), pruning.plain_state_dict(loaded)
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)
    assert pruning.masks_of(loaded).keys() == {"fc1", "fc3"}


GOLDEN = ROOT / "tests" / "data"  # made by the code before checkpoints named their arch (commit 2eb6934)
SMALL_RESNET = ("examples.small_resnet:SmallResNet", {"channels": 4})


def test_a_checkpoint_of_format_1_of_a_model_not_built_in_loads_given_its_arch():
    """small_resnet-format1.pt: SmallResNet(channels=4), pruned at s = 1, batch norm statistics set."""
    path = GOLDEN / "small_resnet-format1.pt"
    with pytest.raises(CheckpointError) as e:
        pruning.load_checkpoint(path, "small_resnet")
    assert str(e.value) == (f"{path}: of an older format, which does not name the architecture: model 'small_resnet' "
                            "is not built in (lenet_300_100, lenet5, lenet5_caffe); give the arch and kwargs it was "
                            "made with (models.small_resnet of its params file)")
    model, ck = pruning.load_checkpoint(path, "small_resnet", *SMALL_RESNET)
    assert ck["format"] == 1 and type(model).__name__ == "SmallResNet"
    assert _digest(model) == "5e537f0d56a54ef418070df009fa46bf"  # what the code of commit 2eb6934 loaded


def test_a_checkpoint_names_its_arch_and_kwargs_and_is_made_from_them(tmp_path):
    """No registry: the file alone says what to make; an arch and kwargs given must be the file's."""
    model, ck = pruning.load_checkpoint(GOLDEN / "small_resnet-format1.pt", "small_resnet", *SMALL_RESNET)
    path = _save(tmp_path, pruning.checkpoint("small_resnet", *SMALL_RESNET, model, ck["dense_std"], []))
    loaded, ck2 = pruning.load_checkpoint(path)
    assert (ck2["arch"], ck2["kwargs"]) == SMALL_RESNET and _digest(loaded) == _digest(model)
    with pytest.raises(CheckpointError, match=r"holds model small_resnet of arch 'examples.small_resnet:SmallResNet' "
                                              r"with kwargs \{'channels': 4\}, expected arch "
                                              r"'examples.small_resnet:SmallResNet' with kwargs \{'channels': 8\}"):
        pruning.load_checkpoint(path, "small_resnet", SMALL_RESNET[0], {"channels": 8})


def _digest(model) -> str:
    import hashlib
    return hashlib.md5(b"".join(t.numpy().tobytes() for t in pruning.plain_state_dict(model).values())).hexdigest()


class _Exploit:
    """Unpickling this would call a non-allowed global that creates `marker`."""

    def __init__(self, how, marker):
        self.how, self.marker = how, str(marker)

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch '{self.marker}'",)
        return open, (self.marker, "w")


@pytest.mark.parametrize("how", ["os.system", "open"])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump", "pickle.dump protocol 4"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, how, writer):
    marker = tmp_path / "pwned"
    payload = {"format": pruning.CHECKPOINT_FORMAT, "model": "lenet_300_100", "x": _Exploit(how, marker)}
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4 if writer.endswith("4") else 2))
    assert not marker.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "Detected pickle protocol 4" warning is not shown
        with pytest.raises(CheckpointError) as e:
            pruning.load_checkpoint(path, "lenet_300_100")
    assert not marker.exists(), "the pickled call was executed"
    msg = str(e.value)
    assert msg.startswith(f"{path}: refused unread: it holds objects that a checkpoint of this project never holds")
    assert msg.endswith("; checkpoints come from the pretrain, prune and quantize stages")
    if writer != "pickle.dump protocol 4":  # refused at the frame opcode, before the call
        assert f"(it calls {'posix.system' if how == 'os.system' else 'io.open'})" in msg
    assert "weights_only" not in msg and "issue" not in msg and "\n" not in msg


# --- sensitivity --------------------------------------------------------------------------------

def test_sensitivity_rows():
    from hanprune.rules import scan
    torch.manual_seed(0)
    model = make("lenet_300_100")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grid = [0.0, 0.5, 1.0, 2.0]
    calls = []

    def score(pruned):
        masks = pruning.masks_of(pruned)
        assert len(masks) == 1  # one layer at a time
        calls.append(next(iter(masks)))
        return float(sum(int(m.sum()) for m in masks.values()))

    rows = scan(model, "std", grid, score)
    assert [(r["layer"], r["s"]) for r in rows] == [(l, s) for l in ("fc1", "fc2", "fc3") for s in grid]
    assert calls == [r["layer"] for r in rows]
    for layer in ("fc1", "fc2", "fc3"):
        kept = [r["kept"] for r in rows if r["layer"] == layer]
        assert kept[0] == 1.0
        assert all(a > b for a, b in zip(kept, kept[1:])), kept
        assert kept[-1] < 0.2  # s=2 std leaves few weights of a uniform init
        n = prunable_layers(model)[layer].weight.numel()
        assert [r["score"] for r in rows if r["layer"] == layer] == [round(k * n) for k in kept]
    # the model itself is left untouched
    assert pruning.masks_of(model) == {}
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
