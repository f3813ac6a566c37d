"""Stages run in this process on the tiny data with models made here, so that what they write can be
checked against what they were given: the prune stage's thresholds from the dense std in the
checkpoint and the history it appends, evaluate's test figures (on the test split, not the
validation split) and counts recounted from the checkpoints, and encode's self-check refusing a file
that does not decode back."""
import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from hanprune import data, encoding, io, pruning, rules, storage
from hanprune.models import make, prunable_layers
from hanprune.quantize import load_into, quantized_layers, share_weights
from hanprune.train import accuracy
from tests import tiny
from tests.tiny import PRUNE, TINY

ROOT = Path(__file__).resolve().parents[1]
LENET_300_100_PARAMS = 266_610  # weights and biases (test_models)


def run(monkeypatch, script: str, *args):
    """The stage's main() as `python stages/<script>.py args` runs it, in this process; it must succeed."""
    tiny.stage(script).main(list(args))


def splits(project) -> data.Splits:
    p = yaml.safe_load((project / "params.yaml").read_text())
    dataset = data.verified(data.raw_dir(project / "data", TINY), TINY)
    return data.Splits(dataset, p["data"]["val_size"], p["data"]["val_seed"])


def _record(kept: dict) -> dict:
    return {"iteration": 1, "val_before": 0.99, "val_pruned": 0.4, "val_retrained": 0.3, "params_nonzero": 1,
            "compression": 3.0, "kept": kept}


def test_prune_thresholds_come_from_the_checkpoint_s_dense_std_per_layer_and_the_history_grows(project, monkeypatch):
    """The start checkpoint's dense std (deliberately not the layers' own, and different per layer)
    sets each layer's threshold s * std; the written checkpoint keeps it, appends this round's record
    to the history it started with, and its record's figures are its masks' counts."""
    torch.manual_seed(5)
    dense = make("lenet_300_100")
    dense_std = {"fc1": 0.03, "fc2": 0.02, "fc3": 0.1}  # their own: 0.021, 0.033, 0.058
    earlier = [_record({"fc1": 1.0, "fc2": 1.0, "fc3": 1.0})]
    io.save_torch(project / "start.pt", pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, dense, dense_std, earlier))
    s = {"fc1": 1.0, "fc2": 1.0, "fc3": 0.5}
    io.write_json(project / "schedule.json", {"rule": "std", "s": s})
    args = PRUNE[1:]
    args[args.index("--start") + 1] = "start.pt"
    run(monkeypatch, "prune", *args)
    model, ckpt = pruning.load_checkpoint(project / "out.pt", "lenet_300_100")
    for name, layer in prunable_layers(dense).items():
        expected = layer.weight.detach().abs() >= s[name] * dense_std[name]
        assert torch.equal(ckpt["masks"][name], expected), name
    assert all(0.1 < m.float().mean() < 0.9 for m in ckpt["masks"].values())  # thresholds inside each layer
    assert ckpt["dense_std"] == dense_std
    assert ckpt["history"][:1] == earlier and len(ckpt["history"]) == 2
    record = ckpt["history"][1]
    assert record["iteration"] == 1
    assert record["kept"] == {n: int(m.sum()) / m.numel() for n, m in ckpt["masks"].items()}
    nonzero = sum(int(t.count_nonzero()) for t in ckpt["state_dict"].values())
    assert record["params_nonzero"] == nonzero and record["compression"] == LENET_300_100_PARAMS / nonzero
    val = splits(project).val
    assert record["val_before"] == accuracy(dense, *val)
    assert record["val_retrained"] == accuracy(model, *val)
    metrics = json.loads((project / "metrics.json").read_text())
    assert metrics == {**{k: record[k] for k in ("val_pruned", "val_retrained", "compression", "kept")}, "s": s}


def _classes(project) -> tuple[int, int]:
    """Two classes whose frequencies differ between the test and the validation split (the tiny
    data's labels are random), so a constant classifier's accuracy tells the splits apart."""
    sp = splits(project)
    freq = {name: torch.bincount(y, minlength=10).double() / len(y) for name, (_, y) in (("val", sp.val), ("test", sp.test))}
    order = (freq["test"] - freq["val"]).abs().argsort(descending=True).tolist()
    return order[0], order[1]


def _constant(model, c: int):
    """The model with fc3's bias pushing it to class c on every image."""
    with torch.no_grad():
        model.fc3.bias[c] += 1000.0
    return model


def _evaluate_inputs(project) -> tuple[int, int]:
    """dense.pt predicts class d, pruned.pt (s = 1 in every layer) class c; compressed.bin and the
    storage forms are made from them as encode makes them."""
    c, d = _classes(project)
    torch.manual_seed(6)
    dense = _constant(make("lenet_300_100"), d)
    pruned = make("lenet_300_100")
    pruned.load_state_dict(dense.state_dict())
    std = pruning.weight_std(dense)
    rules.prune_round(pruned, "std", {"fc1": 1.0, "fc2": 1.0, "fc3": 1.0}, std)
    with torch.no_grad():
        pruned.fc3.bias[d] -= 1000.0
    _constant(pruned, c)
    kept = {n: int(m.sum()) / m.numel() for n, m in pruning.masks_of(pruned).items()}
    io.save_torch(project / "dense.pt", pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, dense, std, []))
    io.write_json(project / "selection.json", {"round": 1, "rounds": 1})  # as the select stage writes it
    for path in ("pruned.pt", "rounds/iter1.pt"):  # the selected round, and the only one
        io.save_torch(project / path, pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, pruned, std,
                                                         [_record(kept)]))  # 69 points below dense: not registered
    plain = make("lenet_300_100")
    plain.load_state_dict(pruning.plain_state_dict(pruned))
    share_weights(plain, {"fc1": 4, "fc2": 4, "fc3": 4}, pruning.masks_of(pruned))
    layers = quantized_layers(plain)
    (project / "compressed.bin").write_bytes(encoding.encode("lenet_300_100", "lenet_300_100", {}, layers))
    forms = {"dense": storage.dense_bytes(dense), "pruned_values": storage.values_bytes(pruned),
             "pruned_csr": storage.csr_bytes(pruned),
             "quantized_fixed": encoding.encode("lenet_300_100", "lenet_300_100", {}, layers, huffman=False)}
    for name, blob in forms.items():
        io.write_bytes(project / "storage" / storage.FILES[name], blob)
    return c, d


EVALUATE = ["lenet_300_100", "--data", "data", "--dense", "dense.pt", "--pruned", "pruned.pt", "--compressed",
            "compressed.bin", "--storage", "storage", "--rounds", "rounds", "--selection", "selection.json", "--metrics", "metrics.json",
            "--plots", "plots"]


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_evaluate_scores_the_test_split_and_counts_from_the_checkpoints(project, monkeypatch):
    c, d = _evaluate_inputs(project)
    sp = splits(project)
    (_, y_test), (_, y_val) = sp.test, sp.val
    on_test = {k: (y_test == k).double().mean().item() for k in (c, d)}
    on_val = {k: (y_val == k).double().mean().item() for k in (c, d)}
    assert on_test[c] != on_val[c] and on_test[d] != on_val[d]  # what lets the test tell the splits apart
    run(monkeypatch, "evaluate", *EVALUATE)
    m = json.loads((project / "metrics.json").read_text())
    assert (m["test_dense"], m["test_pruned"], m["test_compressed"]) == (on_test[d], on_test[c], on_test[c])
    # the counts, recounted from the checkpoint's weights
    _, ckpt = pruning.load_checkpoint(project / "pruned.pt")
    state = ckpt["state_dict"]
    nonzero = sum(int(t.count_nonzero()) for t in state.values())
    weights_nonzero = sum(int(state[f"{n}.weight"].count_nonzero()) for n in ("fc1", "fc2", "fc3"))
    assert m["compression"] == LENET_300_100_PARAMS / nonzero
    assert m["flops_kept"] == 2 * weights_nonzero / (2 * (784 * 300 + 300 * 100 + 100 * 10))  # an MLP: once per image
    assert m["file_compression"] == 4 * LENET_300_100_PARAMS / (project / "compressed.bin").stat().st_size
    detail = json.loads((project / "plots" / "detail.json").read_text())
    assert detail["iterations"] == 1 and detail["file_bytes"]["pruned_csr"] == (project / "storage/csr.bin").stat().st_size
    for name, layer in detail["layers"].items():
        mask = ckpt["masks"][name]
        assert layer["weights_nonzero"] == int(mask.sum()) and layer["kept"] == int(mask.sum()) / mask.numel(), name
    # the plot data: iteration 0 is the dense model, then the checkpoint's history
    record = ckpt["history"][0]
    assert _csv(project / "plots" / "iterations.csv") == [
        {"iteration": "0", "val_pruned": "", "val_retrained": "", "compression": "1.0000"},
        {"iteration": "1", "val_pruned": str(record["val_pruned"]), "val_retrained": str(record["val_retrained"]),
         "compression": f"{record['compression']:.4f}"}]
    # every round's test accuracy (reported only), from the rounds' checkpoints: here round 1 is the pruned model
    assert _csv(project / "plots" / "rounds.csv") == [
        {"iteration": "1", "compression": f"{record['compression']:.4f}", "val_retrained": str(record["val_retrained"]),
         "test_accuracy": str(on_test[c])}]
    kept = _csv(project / "plots" / "kept.csv")
    assert [(r["iteration"], r["layer"], float(r["kept_percent"])) for r in kept] == \
        [("0", n, 100.0) for n in ckpt["masks"]] + [("1", n, round(100 * k, 3)) for n, k in record["kept"].items()]
    w = json.loads((project / "plots" / "weights.json").read_text())
    dense_fc1 = pruning.load_checkpoint(project / "dense.pt")[1]["state_dict"]["fc1.weight"]
    assert w["layer"] == "fc1" and len(w["edges"]) == 101
    assert (w["edges"][0], w["edges"][-1]) == (dense_fc1.min().item(), dense_fc1.max().item())
    assert sum(w["dense"]) == int(dense_fc1.count_nonzero()) and sum(w["pruned"]) == int(ckpt["masks"]["fc1"].sum())


def _encode_inputs(project):
    torch.manual_seed(7)
    model = make("lenet_300_100")
    std = pruning.weight_std(model)
    rules.prune_round(model, "std", {"fc1": 1.0, "fc2": 1.0, "fc3": 0.5}, std)
    io.save_torch(project / "pruned.pt", pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, model, std, []))
    masks = pruning.masks_of(model)
    plain = make("lenet_300_100")
    plain.load_state_dict(pruning.plain_state_dict(model))
    share_weights(plain, {"fc1": 3, "fc2": 3, "fc3": 3}, masks)
    layers = quantized_layers(plain)
    quantized = load_into(make("lenet_300_100"), layers)
    pruning.attach_masks(quantized, {n: m.float() for n, m in masks.items()})
    ckpt = pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, quantized, std, [])
    ckpt["quantized"] = {n: {"codes": l.codes.int(), "codebook": l.codebook} for n, l in layers.items()}
    io.save_torch(project / "quantized.pt", ckpt)


ENCODE = ["lenet_300_100", "--dense", "models/lenet_300_100/dense.pt", "--pruned", "pruned.pt", "--quantized",
          "quantized.pt", "--out", "compressed.bin", "--storage", "storage"]


@pytest.mark.parametrize("broken", [False, True])
def test_encode_checks_its_file_decodes_back_and_else_writes_nothing(project, monkeypatch, capsys, broken):
    """The encode stage decodes what it is about to write; a decoder that gives back other weights
    (here: one codebook entry off) stops it with one error line, and no file is written."""
    _encode_inputs(project)
    if broken:
        real = encoding.decode_all

        def off_by_one(blob):
            found = real(blob)
            found.layers["fc2"].codebook[0] += 1.0
            return found
        monkeypatch.setattr(encoding, "decode_all", off_by_one)
        code = tiny.run_stage("encode", *ENCODE)
        err = capsys.readouterr().err
        assert code == 1
        assert err == ("error: quantized_fixed, compressed: does not load back to the model it stores; "
                       "nothing written\n")
        assert not (project / "compressed.bin").exists() and not (project / "storage").exists()
    else:
        run(monkeypatch, "encode", *ENCODE)
        assert sorted(p.name for p in (project / "storage").iterdir()) == sorted(storage.FILES.values())
        found = encoding.decode_all((project / "compressed.bin").read_bytes())
        _, ckpt = pruning.load_checkpoint(project / "quantized.pt")
        for name, layer in found.layers.items():
            assert torch.equal(layer.weight(), ckpt["state_dict"][f"{name}.weight"]), name


def test_the_pruned_weight_histogram_counts_every_surviving_weight(project, monkeypatch):
    _evaluate_inputs(project)
    model, ckpt = pruning.load_checkpoint(project / "pruned.pt")
    with torch.no_grad():  # as retraining may: one survivor grows past the dense layer's largest weight
        survivor = ckpt["masks"]["fc1"].flatten().nonzero()[0, 0]
        model.fc1.weight_orig.view(-1)[survivor] = 2 * pruning.load_checkpoint(project / "dense.pt")[0].fc1.weight.max()
    io.save_torch(project / "pruned.pt", pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, model,
                                                            ckpt["dense_std"], ckpt["history"]))
    run(monkeypatch, "evaluate", *EVALUATE)
    w = json.loads((project / "plots" / "weights.json").read_text())
    assert sum(w["pruned"]) == int(ckpt["masks"]["fc1"].sum())
