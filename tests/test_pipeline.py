"""End to end: the real dvc.yaml and stage scripts, run by DVC in a temporary git repository that
holds a copy of the project and tiny generated MNIST-like data (data.name: tiny, data.source: local).

The module's first run (the `repo` fixture) is shared: a test that uses it as it is leaves it so
(what it forces to run again gives the same bytes), and a test that edits params, commits or runs
experiments does so in a copy of its own (tests.tiny.fork). No test depends on another's state."""
import csv
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from hanprune.deadunits import drop_dead_units
from hanprune.encoding import describe
from hanprune.models import prunable_layers
from hanprune.pruning import load_checkpoint
from hanprune.quantize import load_quantized
from hanprune.encoding import read_compressed
from hanprune.train import accuracy
from tests.tiny import HAS_AVX512, ROOT, TINY, env, fork, ran, sh, tiny_project

pytestmark = pytest.mark.slow

# lenet_300_100 with 3 rounds (so a middle round can be edited), and a conv model through every stage.
ITERATIONS = {"lenet_300_100": 3, "lenet5": 1}
CHANCE = 0.1  # ten classes
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    repo = tmp / "project"
    params = tiny_project(repo, ITERATIONS)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny project")
    # under benchmarks/monitor.py: each stage's time, and its training time from its epoch lines
    first = sh(repo, sys.executable, str(ROOT / "benchmarks" / "monitor.py"), "--out", str(tmp / "stages.json"),
               "--", "dvc", "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "first run")
    return repo, params, first.stdout


def test_every_stage_reports_its_fixed_cost(repo):
    """monitor.py measures each stage's time and adds up the seconds of the epoch lines it prints
    after DVC's "Running stage" line; the rest is the fixed cost."""
    repo, params, _ = repo
    stages = json.loads((repo.parent / "stages.json").read_text())["stages"]
    assert set(stages) == expected_stages(params)
    for name, s in stages.items():
        assert 0 < s["fixed_seconds"] <= s["seconds"], name
        trains = name.split("@")[0] in ("pretrain", "prune", "quantize")
        assert (s["training_seconds"] > 0) == trains, name


def expected_stages(params) -> set[str]:
    stages = {"download", "report"}
    for m in params["models"]:
        stages |= {f"{stage}@{m}" for stage in ("pretrain", "sensitivity", "select", "quantize", "encode", "evaluate")}
    stages |= {f"{stage}@{k}" for k in params["prune"] for stage in ("schedule", "prune")}
    return stages


def test_first_repro_runs_every_stage_and_writes_metrics(repo):
    """Every stage runs; the declared metrics hold the headline, the detail sits beside the plot data;
    and the models learned: the tiny data is made to be learnable, so chance-level accuracy is a bug."""
    repo, params, out = repo
    assert ran(out) == expected_stages(params)
    for model in ITERATIONS:
        m = json.loads((repo / "metrics" / f"{model}.json").read_text())
        assert set(m) == {"test_dense", "test_pruned", "test_compressed", "compression",
                          "file_compression", "flops_kept"}
        d = json.loads((repo / "plots" / model / "final" / "detail.json").read_text())
        assert {k: d[k] for k in m} == m
        # recounted from the checkpoints and the tiny test split, not from the figures evaluate wrote
        dense, _ = load_checkpoint(repo / "models" / model / "dense.pt", model)
        selected, ckpt = load_checkpoint(repo / "models" / model / "selected.pt", model)
        _, decoded = read_compressed(repo / "models" / model / "compressed.bin", model)
        x, y = tiny_test_split(repo)
        assert m["test_dense"] == accuracy(dense, x, y) and m["test_pruned"] == accuracy(selected, x, y)
        assert m["test_compressed"] == accuracy(decoded, x, y)
        assert m["test_dense"] > 5 * CHANCE and m["test_pruned"] > 5 * CHANCE, m
        assert abs(m["test_compressed"] - m["test_pruned"]) <= 0.05, m  # weight sharing + fine-tuning
        params_dense = sum(t.numel() for t in load_checkpoint(repo / "models" / model / "dense.pt")[1]["state_dict"].values())
        nonzero = sum(int(t.count_nonzero()) for t in ckpt["state_dict"].values())
        assert m["compression"] == pytest.approx(params_dense / nonzero) and m["compression"] > 1.5
        flops = flop_counts(selected)
        assert m["flops_kept"] == pytest.approx(sum(flops.values()) / sum(flop_counts(dense, dense=True).values()))
        for name, layer in d["layers"].items():
            mask = ckpt["masks"][name]
            assert layer["flops_pruned"] == flops[name] and layer["kept"] == int(mask.sum()) / mask.numel(), name
        compressed = repo / "models" / model / "compressed.bin"
        assert d["compressed_bytes"] == compressed.stat().st_size
        assert m["file_compression"] == pytest.approx(4 * params_dense / compressed.stat().st_size)
        files = d["file_bytes"]
        for name, file in [("dense", "storage/dense.f32"), ("pruned_values", "storage/values.f32"),
                           ("pruned_csr", "storage/csr.bin"), ("quantized_fixed", "storage/fixed.bin"),
                           ("compressed", "compressed.bin")]:
            assert files[name] == (repo / "models" / model / file).stat().st_size
        assert files["dense"] == d["bytes_dense"] and files["pruned_csr"] == d["bytes_csr"]
        assert files["compressed"] < files["quantized_fixed"] < files["pruned_values"] < files["pruned_csr"] < files["dense"]
        # the file holds the quantized model's weights but those of its dead units (hanprune/deadunits.py)
        quantized, layers = load_quantized(repo / "models" / model / "quantized.pt", model)
        kept, _ = drop_dead_units(quantized, layers)
        assert {n: l["nonzero"] for n, l in d["compressed_layers"].items()} == {
            n: int((l.codes >= 0).sum()) for n, l in kept.items()}
        assert sum(l["nonzero"] for l in d["compressed_layers"].values()) <= sum(
            l["weights_nonzero"] for l in d["layers"].values())
        rounds = [json.loads((repo / "metrics" / "prune" / f"{model}-iter{k}.json").read_text())
                  for k in range(1, ITERATIONS[model] + 1)]
        masks = [load_checkpoint(repo / "models" / model / "rounds" / f"iter{k}.pt")[1]["masks"]
                 for k in range(1, ITERATIONS[model] + 1)]
        for r, mask in zip(rounds, masks):
            key = "q" if params["prune"][f"{model}-iter1"]["rule"] in ("quantile", "global") else "s"  # lenet5: gradual q
            assert set(r) == {"val_pruned", "val_retrained", "compression", "kept", key}
            assert r["val_retrained"] > 5 * CHANCE
            assert r["kept"] == {n: int(mm.sum()) / mm.numel() for n, mm in mask.items()}
        for earlier, later in zip(masks, masks[1:]):  # each round prunes a subset of the survivors, and more
            assert all(not (later[n] & ~earlier[n]).any() for n in later)
            assert sum(int(mm.sum()) for mm in later.values()) < sum(int(mm.sum()) for mm in earlier.values())
        assert [r["compression"] for r in rounds] == sorted(r["compression"] for r in rounds)
        every_round = list(csv.DictReader((repo / "plots" / model / "final" / "rounds.csv").open()))
        assert [(int(r["iteration"]), float(r["test_accuracy"])) for r in every_round] == [
            (k, accuracy(load_checkpoint(repo / "models" / model / "rounds" / f"iter{k}.pt", model)[0], x, y))
            for k in range(1, ITERATIONS[model] + 1)]  # every round's test accuracy, recounted
        check_plot_data(repo, model, dense, masks)
        selected = json.loads((repo / "metrics" / "select" / f"{model}.json").read_text())
        assert selected["round"] == ITERATIONS[model] and selected["held"] is True  # tiny params: max_drop 1
        assert (repo / "models" / model / "selected.pt").read_bytes() == (
            repo / "models" / model / "rounds" / f"iter{ITERATIONS[model]}.pt").read_bytes()
        q = json.loads((repo / "metrics" / "quantize" / f"{model}.json").read_text())
        assert set(q) == {"val_before", "val_shared", "val_finetuned"}
        _, quantized = load_checkpoint(repo / "models" / model / "quantized.pt", model)
        for name, layer in quantized["quantized"].items():  # rounded to float16, as the file stores them
            bias = quantized["state_dict"][f"{name}.bias"]
            assert torch.equal(layer["codebook"], layer["codebook"].half().float()), name
            assert torch.equal(bias, bias.half().float()), name
        rows = describe((repo / "models" / model / "compressed.bin").read_bytes())
        assert all(r["bytes_codebook"] == 5 + 2 * r["codebook_size"] for r in rows), rows
        assert q["val_before"] == pytest.approx(rounds[-1]["val_retrained"], abs=0.011)
    report = (repo / "reports" / "REPORT.md").read_text()
    assert report.startswith(f"# Pruning report: {TINY}\n") and "## lenet_300_100" in report and "Han et al. 2015" in report
    assert "| + Huffman and Rice coding " in report and "`storage/csr.bin`" in report
    assert "Rule held: **yes**" in report and "| 3 (selected) | std " in report
    pngs = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert len(pngs) == 4 * len(ITERATIONS)
    for png in pngs:
        head = (repo / "reports" / png).read_bytes()[:24]
        assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", png  # a PNG, its header first
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        assert width >= 400 and height >= 200, (png, width, height)


def tiny_test_split(repo: Path):
    from hanprune import data
    return data.load_split(data.verified(data.raw_dir(repo / "data", TINY), TINY), train=False)


def flop_counts(model: nn.Module, dense: bool = False) -> dict[str, int]:
    """2 per non-zero weight (every weight if dense) per application: each output position of a conv."""
    positions = {}
    hooks = [m.register_forward_hook(lambda mod, i, out, n=n: positions.__setitem__(n, out[0, 0].numel() if isinstance(mod, nn.Conv2d) else 1))
             for n, m in prunable_layers(model).items()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, 28, 28))
    for h in hooks:
        h.remove()
    return {n: 2 * (m.weight.numel() if dense else int(m.weight.count_nonzero())) * positions[n]
            for n, m in prunable_layers(model).items()}


def check_plot_data(repo: Path, model: str, dense: nn.Module, masks: list[dict]):
    """evaluate's iterations.csv, kept.csv and weights.json and the sensitivity scan, against the checkpoints."""
    import csv
    final = repo / "plots" / model / "final"
    history = load_checkpoint(repo / "models" / model / "selected.pt")[1]["history"]
    rows = list(csv.DictReader((final / "iterations.csv").open()))
    assert [r["iteration"] for r in rows] == [str(k) for k in range(len(masks) + 1)]
    params = sum(p.numel() for p in dense.parameters())
    for row, record, k in zip(rows[1:], history, range(1, len(masks) + 1)):
        state = load_checkpoint(repo / "models" / model / "rounds" / f"iter{k}.pt")[1]["state_dict"]
        assert float(row["compression"]) == pytest.approx(params / sum(int(t.count_nonzero()) for t in state.values()), abs=1e-4)
        assert float(row["val_retrained"]) == record["val_retrained"]
    kept = {(r["iteration"], r["layer"]): float(r["kept_percent"]) for r in csv.DictReader((final / "kept.csv").open())}
    assert kept == {**{("0", n): 100.0 for n in masks[0]},
                    **{(str(k), n): round(100 * int(m.sum()) / m.numel(), 3)
                       for k, mask in enumerate(masks, start=1) for n, m in mask.items()}}
    w = json.loads((final / "weights.json").read_text())
    selected = prunable_layers(load_checkpoint(repo / "models" / model / "selected.pt")[0])[w["layer"]].weight.detach()
    weight = prunable_layers(dense)[w["layer"]].weight.detach()
    assert sum(w["dense"]) == int(weight.count_nonzero())
    assert sum(w["pruned"]) == int(selected.count_nonzero())  # the bins span both models' weights: every survivor
    assert (w["edges"][0], w["edges"][-1]) == (float(min(weight.min(), selected.min())),
                                               float(max(weight.max(), selected.max())))
    std = {n: m.weight.detach().std().item() for n, m in prunable_layers(dense).items()}
    scan = list(csv.DictReader((repo / "plots" / model / "sensitivity.csv").open()))
    assert {r["layer"] for r in scan} == set(std)
    for r in scan:  # one layer of the dense model pruned at s (or q, lenet5's rule): the fraction it keeps
        weight = prunable_layers(dense)[r["layer"]].weight.detach()
        if "s" in r:
            kept = (weight.abs() >= float(r["s"]) * std[r["layer"]]).double().mean().item()
        else:
            kept = 1 - math.floor(float(r["q"]) * weight.numel() + 0.5) / weight.numel()
        assert float(r["kept_percent"]) == round(100 * kept, 3), r


def test_second_repro_runs_nothing(repo):
    repo, _, _ = repo
    out = sh(repo, "dvc", "repro").stdout
    assert ran(out) == set()
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}


# What an edit to each library file makes stale (stage kinds; `dvc status` on the tiny project).
STALE_AFTER_EDIT = {
    "check.py": set(),
    "config.py": {"download", "pretrain", "sensitivity", "schedule", "prune", "select", "quantize", "encode",
                  "evaluate", "report"},
    "data.py": {"download", "pretrain", "sensitivity", "prune", "quantize", "evaluate", "report"},
    "encoding.py": {"encode", "evaluate"},
    "kernels.py": {"pretrain", "sensitivity", "prune", "quantize", "evaluate"},
    "quantize.py": {"quantize", "encode", "evaluate"},
    "report.py": {"report"},
    "rules.py": {"sensitivity", "schedule", "prune"},
    "selection.py": {"select", "quantize", "evaluate"},
    "sources.py": {"download"},
    "storage.py": {"encode", "evaluate"},
    "tracking.py": set(),
    "train.py": {"pretrain", "sensitivity", "prune", "quantize", "evaluate"},
}


def test_an_edit_to_a_library_file_makes_stale_only_the_stages_that_run_it(repo):
    """An edit to a file re-runs the stages whose script imports it, and (through their outputs)
    what follows them, nothing else: rules.py does not reach pretrain, report.py only the report.
    The table below is printed for every file of hanprune/ (pytest -s shows it)."""
    from dvc.repo import Repo
    repo, _, _ = repo
    stale = {}
    for module in sorted((repo / "hanprune").glob("*.py")):
        original = module.read_bytes()
        module.write_bytes(original + b"\n# an edit\n")
        try:
            with Repo(str(repo)) as dvc:
                stale[module.name] = {name.rsplit(":", 1)[-1].split("@")[0] for name in dvc.status()}
        finally:
            module.write_bytes(original)
    print("\n".join(f"{name}: {', '.join(sorted(kinds)) or '-'}" for name, kinds in stale.items()))
    assert {name: stale[name] for name in STALE_AFTER_EDIT} == STALE_AFTER_EDIT
    with Repo(str(repo)) as dvc:
        assert dvc.status() == {}


def lock_outs(repo: Path) -> dict:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {name: {o["path"]: o["md5"] for o in st.get("outs", [])} for name, st in lock["stages"].items()}


@pytest.mark.skipif(not HAS_AVX512, reason="needs a CPU with AVX-512: elsewhere the AVX2 caps change nothing, so the "
                                            "test could not fail")
def test_forced_rerun_under_avx2_caps_gives_identical_bytes(repo):
    """Every kind of stage, forced to run again at the pipeline's 2 threads with MKL, oneDNN and ATen
    capped at AVX2 (a CPU without AVX-512, as far as emulation can show), writes the bytes of the
    first, native run, for an MLP and a conv model: the portable mode (tests/test_portable.py shows
    that the fast mode does not)."""
    repo, _, _ = repo
    before = lock_outs(repo)
    stages = ["pretrain@lenet_300_100", "sensitivity@lenet_300_100", "prune@lenet_300_100-iter1",
              "quantize@lenet_300_100", "encode@lenet_300_100", "evaluate@lenet_300_100", "pretrain@lenet5",
              "sensitivity@lenet5", "prune@lenet5-iter1", "quantize@lenet5", "report"]
    caps = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    assert ran(sh(repo, "dvc", "repro", "-f", "-s", *stages, **caps).stdout) == set(stages)
    assert lock_outs(repo) == before


PAUSE_BEFORE_RENAME = """
import os, sys, time
_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == "dense.pt":
        print(f"paused before renaming onto {dst}", file=sys.stderr, flush=True)
        time.sleep(600)
    return _replace(src, dst, *args, **kwargs)
os.replace = replace
"""


def test_sigkill_inside_the_checkpoint_write_leaves_the_old_file_or_none(repo):
    """Kill the stage while it writes its checkpoint: the temporary file is complete and not yet
    renamed (a sitecustomize of the test's own holds os.replace there). The checkpoint is then the
    old one or absent (dvc repro -f removes outs first), never a partial file; the next repro
    recovers the same bytes."""
    repo, _, _ = repo
    before = lock_outs(repo)
    checkpoint = repo / "models" / "lenet_300_100" / "dense.pt"
    hook = repo.parent / "pause-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(PAUSE_BEFORE_RENAME)
    proc = subprocess.Popen(["dvc", "repro", "-f", "-s", "pretrain@lenet_300_100"], cwd=repo,
                            env=env(repo.parent, PYTHONPATH=str(hook)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "paused before renaming onto" in line:
            temporary = list(checkpoint.parent.glob(".dense.pt.*.tmp"))
            os.killpg(proc.pid, 9)
            break
    proc.wait()
    assert proc.returncode != 0 and "paused before renaming onto" in lines[-1], "".join(lines)[-3000:]
    assert len(temporary) == 1 and temporary[0].stat().st_size > 0  # killed inside the write itself
    if checkpoint.exists():
        assert hashlib.md5(checkpoint.read_bytes()).hexdigest() == before["pretrain@lenet_300_100"][str(checkpoint.relative_to(repo))]
    existed = checkpoint.exists()
    out = sh(repo, "dvc", "repro").stdout
    # a checkpoint that survived is the old one: nothing to do; a removed one is made again, by running
    # the stage or from DVC's run cache
    made = ran(out) | set(re.findall(r"Stage '([^']+)' is cached", out))
    assert ("pretrain@lenet_300_100" in made) == (not existed), out[-2000:]
    assert lock_outs(repo) == before
    assert hashlib.md5(checkpoint.read_bytes()).hexdigest() == before["pretrain@lenet_300_100"][str(checkpoint.relative_to(repo))]
    temporary[0].unlink()


def test_a_budget_edit_reruns_only_its_round_and_what_follows(repo, tmp_path):
    """Round 3 takes fc2 and fc3 from the scan (fc1 stays by hand) at its budget's scale. At scale 1
    (only the schedule stage run) it gives the scan's values; at scale 0.5 they halve, and `dvc repro`
    re-runs that round's schedule, and the round and what follows only if its values changed."""
    repo, params, _ = repo
    repo = fork(repo, tmp_path)
    p = yaml.safe_load((repo / "params.yaml").read_text())
    it = p["prune"]["lenet_300_100-iter3"]
    schedule_file = repo / "metrics" / "schedule" / "lenet_300_100-iter3.json"
    before = json.loads(schedule_file.read_text())
    it.update(s={"fc1": it["s"]["fc1"]}, budget={"max_drop": 0.05, "scale": 1.0})
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    assert ran(sh(repo, "dvc", "repro", "-s", "schedule@lenet_300_100-iter3").stdout) == {"schedule@lenet_300_100-iter3"}
    scanned = json.loads(schedule_file.read_text())
    assert set(scanned["s"]) == {"fc1", "fc2", "fc3"} and scanned["s"]["fc1"] == it["s"]["fc1"]
    it["budget"]["scale"] = 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    out = sh(repo, "dvc", "repro").stdout
    halved = json.loads(schedule_file.read_text())
    assert halved["s"] == {"fc1": it["s"]["fc1"], **{n: round(scanned["s"][n] * 0.5, 6) for n in ("fc2", "fc3")}}
    selects = {f"select@{m}" for m in params["models"]}  # each re-checks: it reads the prune section
    follows = {"schedule@lenet_300_100-iter3", "prune@lenet_300_100-iter3", "quantize@lenet_300_100",
               "encode@lenet_300_100", "evaluate@lenet_300_100", "report"} | selects
    assert ran(out) == (follows if halved["s"] != before["s"] else {"schedule@lenet_300_100-iter3"} | selects)
    assert json.loads((repo / "metrics" / "prune" / "lenet_300_100-iter3.json").read_text())["s"] == halved["s"]
    diff = json.loads(sh(repo, "dvc", "params", "diff", "--json").stdout)["params.yaml"]
    assert "prune.lenet_300_100-iter3.budget.scale" in diff and "prune.lenet_300_100-iter3.s.fc2" in diff
    assert "prune.lenet_300_100-iter3.s.fc1" not in diff  # what the user set: fc1 kept its value


def test_exp_run_changing_round_2_of_3_reruns_only_what_follows_it(repo, tmp_path):
    """`dvc exp run -S` on round 2's s: the experiment re-runs round 2 and what follows it, nothing
    else (round 3's schedule reads no output of round 2). It holds the new s in its params and its
    own metrics (a larger s prunes more in round 2); the workspace is left with the experiment, so
    `dvc params diff` and `dvc metrics show` show it; its stages' MLflow runs carry its name."""
    from mlflow.tracking import MlflowClient
    repo, params, _ = repo
    repo = fork(repo, tmp_path)
    baseline = json.loads((repo / "metrics" / "prune" / "lenet_300_100-iter2.json").read_text())
    p = yaml.safe_load((repo / "params.yaml").read_text())
    s = p["prune"]["lenet_300_100-iter2"]["s"]["fc1"] + 0.3
    out = sh(repo, "dvc", "exp", "run", "-n", "tiny-exp", "-S", f"prune.lenet_300_100-iter2.s.fc1={s}").stdout
    expected = {"schedule@lenet_300_100-iter2", "prune@lenet_300_100-iter2", "prune@lenet_300_100-iter3",
                "select@lenet_300_100", "select@lenet5", "quantize@lenet_300_100", "encode@lenet_300_100",
                "evaluate@lenet_300_100", "report"}
    assert ran(out) == expected
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    exp = next(e for row in shown for e in (row.get("experiments") or [])
               if e["revs"][0]["name"] == "tiny-exp")["revs"][0]["data"]
    assert exp["params"]["params.yaml"]["data"]["prune"]["lenet_300_100-iter2"]["s"]["fc1"] == s
    assert set(exp["metrics"]["metrics/lenet_300_100.json"]["data"]) >= {"compression", "test_pruned"}
    pruned = json.loads((repo / "metrics" / "prune" / "lenet_300_100-iter2.json").read_text())
    assert pruned["kept"]["fc1"] < baseline["kept"]["fc1"]
    diff = json.loads(sh(repo, "dvc", "params", "diff", "--json").stdout)
    assert "prune.lenet_300_100-iter2.s.fc1" in diff["params.yaml"]
    shown = json.loads(sh(repo, "dvc", "metrics", "show", "--json").stdout)
    metrics = next(iter(shown.values()))["data"]
    assert {"compression", "test_pruned"} <= set(metrics["metrics/lenet_300_100.json"]["data"])
    assert not any(path.startswith("metrics/prune/") for path in metrics)  # the headline only
    shown = json.loads(sh(repo, "dvc", "metrics", "show", "--json", "metrics/prune").stdout)
    assert "metrics/prune/lenet_300_100-iter2.json" in next(iter(shown.values()))["data"]
    # the copy's store holds this experiment's runs only, each under a parent of the same experiment
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(params["tracking"]["experiment"]).experiment_id])
    by_id = {r.info.run_id: r for r in runs}
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert {r.info.run_name for r in children} == expected - {"schedule@lenet_300_100-iter2"}  # a schedule logs nothing
    for r in children:
        assert r.data.tags["dvc_exp_name"] == by_id[r.data.tags["mlflow.parentRunId"]].data.tags["dvc_exp_name"] == "tiny-exp"


def test_mlflow_store_groups_stage_runs_under_a_parent_per_model(repo):
    from mlflow.tracking import MlflowClient
    repo, params, _ = repo
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_id = {r.info.run_id: r for r in runs}
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    unlogged = {"download"} | {f"schedule@{k}" for k in params["prune"]}  # a schedule logs nothing
    assert {r.info.run_name for r in children} >= expected_stages(params) - unlogged
    for r in children:  # every stage run hangs under the parent of its model and pipeline run
        parent = by_id[r.data.tags["mlflow.parentRunId"]]
        assert parent.data.tags["pipeline_parent"] == "true"
        for tag in ("model", "git_commit", "dvc_exp_name"):
            assert parent.data.tags[tag] == r.data.tags[tag]
        assert r.data.tags["dvc_stage"] == r.info.run_name
        if r.info.run_name.split("@")[0] in ("pretrain", "sensitivity", "prune", "quantize", "evaluate", "report"):
            assert r.data.tags["dataset"] == TINY and len(r.data.tags["dataset_md5"]) == 32, r.info.run_name
    assert {r.data.tags["dvc_exp_name"] for r in children} == {"workspace"}  # experiments run in copies
    # the module's first run (later tests force a few stages again, each under a parent of its own)
    evaluate = min((r for r in children if r.info.run_name == "evaluate@lenet_300_100"), key=lambda r: r.info.start_time)
    assert {"layer.fc1.kept", "layer.fc1.flops_pruned", "layer.fc2.nonzero", "compression"} <= set(evaluate.data.metrics)
    pretrains = [r for r in children if r.info.run_name == "pretrain@lenet_300_100" and r.info.status == "FINISHED"]
    assert pretrains  # (the run the SIGKILL test killed stays RUNNING: a killed process cannot close it)
    for pretrain in pretrains:
        assert [m.step for m in client.get_metric_history(pretrain.info.run_id, "train_loss")] == list(range(1, params["models"]["lenet_300_100"]["pretrain"]["epochs"] + 1))
    # a parent charts the prune iterations run under it: compression at step = iteration
    for parent_id in {r.data.tags["mlflow.parentRunId"] for r in children if r.data.tags.get("model") == "lenet_300_100"}:
        steps = {m.step for m in client.get_metric_history(parent_id, "compression")}
        assert steps == {int(r.info.run_name.rsplit("iter", 1)[1]) for r in children if r.info.run_name.startswith("prune@")
                         and r.data.tags["mlflow.parentRunId"] == parent_id}
    assert {m.step for m in client.get_metric_history(evaluate.data.tags["mlflow.parentRunId"], "compression")} == {1, 2, 3}
    assert evaluate.data.params["pruned"] == "models/lenet_300_100/selected.pt"  # every stage logs its params
    # The UI opens the experiment on its runs (not MLflow 3's GenAI overview), and a parent run's
    # time spans its children's.
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for parent_id in {r.data.tags["mlflow.parentRunId"] for r in children}:
        kids = [r for r in children if r.data.tags["mlflow.parentRunId"] == parent_id and r.info.end_time]
        p_info = by_id[parent_id].info
        assert p_info.start_time <= min(r.info.start_time for r in kids)
        assert p_info.end_time >= max(r.info.end_time for r in kids)
    assert {"checkpoint/selected.pt", "layers.json", "lenet_300_100.json", "detail.json"} <= {
        a.path for path in ("", "checkpoint") for a in client.list_artifacts(evaluate.info.run_id, path)}


def test_final_pruned_model_is_registered_and_loads_back_with_the_same_accuracy(repo):
    import mlflow
    from mlflow.tracking import MlflowClient
    from hanprune import data
    repo, _, _ = repo
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    versions = MlflowClient(uri).search_model_versions("name = 'lenet_300_100-pruned'")
    latest = max(versions, key=lambda v: int(v.version))  # from the last evaluate (each gives the same bytes)
    m = json.loads((repo / "metrics" / "lenet_300_100.json").read_text())
    assert float(latest.tags["compression"]) == pytest.approx(m["compression"])
    assert float(latest.tags["test_pruned"]) == pytest.approx(m["test_pruned"])
    dataset = data.verified(data.raw_dir(repo / "data", TINY), TINY)
    assert (latest.tags["dataset"], latest.tags["dataset_md5"]) == (TINY, dataset.md5)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"models:/lenet_300_100-pruned/{latest.version}")
    x, y = data.load_split(dataset, train=False)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).sum().item() / len(y) == m["test_pruned"]


def test_unreachable_tracking_warns_and_still_writes_outputs(repo, tmp_path):
    repo, _, _ = repo
    out = tmp_path / "m.json"
    proc = sh(repo, sys.executable, "stages/evaluate.py", "lenet_300_100", "--dense", "models/lenet_300_100/dense.pt",
              "--pruned", "models/lenet_300_100/rounds/iter1.pt", "--compressed", "models/lenet_300_100/compressed.bin",
              "--storage", "models/lenet_300_100/storage", "--rounds", "models/lenet_300_100/rounds",
              "--selection", "metrics/select/lenet_300_100.json", "--metrics", str(out), "--plots", str(tmp_path / "plots"),
              MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert "warning: MLflow tracking store http://127.0.0.1:9 unreachable" in proc.stderr
    assert json.loads(out.read_text())["compression"] > 1


def test_required_tracking_fails_before_training(repo, tmp_path):
    repo, _, _ = repo
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["tracking"]["required"] = True
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(p))
    ckpt = tmp_path / "dense.pt"
    proc = sh(repo, sys.executable, "stages/pretrain.py", "lenet_300_100", "--params", str(params), "--out", str(ckpt),
              "--plot", str(tmp_path / "p.csv"), check=False, MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert proc.returncode == 1
    assert "http://127.0.0.1:9" in proc.stderr and "tracking.required" in proc.stderr
    assert "epoch 1" not in proc.stdout and not ckpt.exists()


def test_decode_cli_rebuilds_the_model_with_the_evaluated_accuracy(repo, tmp_path):
    repo, _, _ = repo
    m = json.loads((repo / "plots" / "lenet_300_100" / "final" / "detail.json").read_text())
    out = tmp_path / "decoded.pt"
    proc = sh(repo, sys.executable, "-m", "hanprune", "decode", "models/lenet_300_100/compressed.bin", "--data", f"data/{TINY}/raw",
              "--out", str(out), PYTHONPATH=str(repo))
    assert f"{m['compressed_bytes']} bytes" in proc.stdout
    assert f"test accuracy: {m['test_compressed']:.4f}" in proc.stdout
    model, _ = load_checkpoint(out, "lenet_300_100")
    assert sum(int(l.weight.count_nonzero()) for l in prunable_layers(model).values()) == sum(
        l["nonzero"] for l in m["compressed_layers"].values())  # the file's weights: no dead unit's
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"HANPRUNX" + (repo / "models/lenet_300_100/compressed.bin").read_bytes()[8:])
    proc = sh(repo, sys.executable, "-m", "hanprune", "decode", str(bad), check=False, PYTHONPATH=str(repo))
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {bad}: ") and "magic" in proc.stderr


def test_benchmark_smoke(repo, tmp_path):
    """The benchmark script runs end to end (one repetition, tiny data) and writes its keys."""
    repo, params, _ = repo
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--no-pipeline",
                           "--data", str(repo / "data"), "--params", str(repo / "params.yaml"), "--threads", "1",
                           "--models", "lenet_300_100", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "results.json").read_text())
    for model in ["lenet_300_100"]:
        for key in ("seconds_per_epoch", "plain_loop_seconds_per_epoch", "baseline_seconds_per_epoch",
                    "speedup_vs_baseline", "fraction_of_bound"):
            assert r["train"][model][key] > 0
        for key in ("fast_seconds_per_epoch", "portable_seconds_per_epoch"):
            assert r["numerics"][model][key] > 0
        for key in ("batch1_speedup_sparse_vs_dense", "batch1000_speedup_sparse_vs_dense"):
            assert r["inference"][model][key] > 0
    assert "## Training" in (tmp_path / "RESULTS.md").read_text()


def test_monitor_measures_each_stage_process(tmp_path):
    """benchmarks/monitor.py attributes processes to stages by DVC_STAGE and records time and RSS."""
    out = tmp_path / "stages.json"
    cmd = "DVC_STAGE=first sleep 1; DVC_STAGE=second python -c 'b = bytearray(200 * 2**20); import time; time.sleep(1)'"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "monitor.py"), "--out", str(out), "--",
                           "sh", "-c", cmd], capture_output=True, text=True, env=env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    run = json.loads(out.read_text())
    stages, wall = run["stages"], run["wall_seconds"]
    assert set(stages) == {"first", "second"}
    assert 0.6 < stages["first"]["seconds"] < 2 and stages["second"]["peak_rss_mb"] > 200
    assert run["cpu"] not in ("", "unknown")  # the figures name their machine
    # --add: a later run of some stages adds to the file (a re-measured stage replaces its entry)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "monitor.py"), "--add", "--out", str(out), "--",
                           "sh", "-c", "DVC_STAGE=second sleep 1; DVC_STAGE=third sleep 1"],
                          capture_output=True, text=True, env=env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    added = json.loads(out.read_text())
    assert set(added["stages"]) == {"first", "second", "third"}
    assert added["stages"]["first"] == stages["first"] and added["stages"]["second"]["peak_rss_mb"] < 100
    assert added["wall_seconds"] > wall + 1.5


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_against_a_real_mlflow_server(repo, tmp_path):
    """Stages log to `mlflow server` over HTTP: grouped runs, per-layer metrics, artifacts and the
    registered model, checked through the REST API with MlflowClient."""
    import time
    import urllib.request
    from mlflow.tracking import MlflowClient
    repo, _, _ = repo
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
                              env=env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("mlflow server did not start within 60 s")
        before = lock_outs(repo)
        sh(repo, "dvc", "repro", "-f", "-s", "prune@lenet_300_100-iter2", MLFLOW_TRACKING_URI=uri)
        sh(repo, "dvc", "repro", "-f", "-s", "evaluate@lenet_300_100", MLFLOW_TRACKING_URI=uri)
        assert lock_outs(repo) == before
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("han-pruning")
        runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
        assert {"prune@lenet_300_100-iter2", "evaluate@lenet_300_100", "lenet_300_100"} <= set(runs)
        parent = runs["lenet_300_100"]
        for name in ("prune@lenet_300_100-iter2", "evaluate@lenet_300_100"):
            assert runs[name].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert [m.step for m in client.get_metric_history(parent.info.run_id, "compression")] == [2]
        evaluate = runs["evaluate@lenet_300_100"]
        assert {"layer.fc1.kept", "layer.fc3.flops_pruned"} <= set(evaluate.data.metrics)
        assert "checkpoint/selected.pt" in {a.path for a in client.list_artifacts(evaluate.info.run_id, "checkpoint")}
        (version,) = client.search_model_versions("name = 'lenet_300_100-pruned'")
        assert float(version.tags["compression"]) > 1
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_two_queued_experiments_run_in_parallel_into_one_new_store_and_make_a_seed_band(repo, tmp_path):
    """`dvc exp run --queue` twice, `dvc queue start -j 2`: both experiments finish, and every
    stage run of both is in the project's store (found from DVC_ROOT, as the stages run in
    temporary copies), complete, under its own parent. The store does not exist beforehand (the
    copy has none), so the two workers' first stages race to create it. Then studies/seeds.py
    summarises the baseline and the two experiments (which change bits rather than seeds) from
    their commits, one table per model."""
    import statistics
    import time
    repo, params, _ = repo
    repo = fork(repo, tmp_path)
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}
    assert not (repo / "mlflow.db").exists()
    head = sh(repo, "git", "rev-parse", "HEAD").stdout.strip()
    names = {"q-five-bits": 5, "q-four-bits": 4}
    for name, bits in names.items():
        sh(repo, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"models.lenet_300_100.quantize.bits.fc1={bits}")
    sh(repo, "dvc", "queue", "start", "-j", "2")
    deadline = time.monotonic() + 600
    while True:
        status = sh(repo, "dvc", "queue", "status").stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        assert time.monotonic() < deadline, f"queue not done after 600 s:\n{status}"
        time.sleep(3)
    logs = {name: sh(repo, "dvc", "queue", "logs", name, check=False).stdout[-3000:] for name in names}
    for name in names:
        assert re.search(rf"{name}\s.*Success", status), f"{name} did not succeed:\n{status}\n{logs[name]}"
    assert set(names) <= set(re.findall(r"q-\w+-bits", sh(repo, "dvc", "exp", "show", "--json").stdout))

    # Read the new store in a fresh process: this one holds MLflow's cached connection to the file
    # that was moved aside.
    read = ("import json, sys; from mlflow.tracking import MlflowClient; c = MlflowClient(sys.argv[1]); "
            "e = c.get_experiment_by_name(sys.argv[2]); print(json.dumps({'runs': [{'id': r.info.run_id, "
            "'name': r.info.run_name, 'status': r.info.status, 'tags': r.data.tags, 'params': r.data.params, "
            "'metrics': sorted(r.data.metrics)} for r in c.search_runs([e.experiment_id], max_results=1000)], "
            "'versions': len(c.search_model_versions(\"name = 'lenet_300_100-pruned'\"))}))")
    store = json.loads(sh(repo, sys.executable, "-c", read, f"sqlite:///{repo / 'mlflow.db'}",
                          params["tracking"]["experiment"]).stdout.strip().splitlines()[-1])
    by_id = {r["id"]: r for r in store["runs"]}
    expected = {"quantize@lenet_300_100", "encode@lenet_300_100", "evaluate@lenet_300_100", "report"}
    for name, bits in names.items():
        children = [r for r in store["runs"] if r["tags"].get("dvc_exp_name") == name and "mlflow.parentRunId" in r["tags"]]
        assert {r["name"] for r in children} == expected, logs[name]
        assert len(children) == len(expected)  # one run per stage: none lost, none doubled
        for r in children:
            assert r["status"] == "FINISHED", (name, r["name"], r["status"])
            parent = by_id[r["tags"]["mlflow.parentRunId"]]
            assert parent["tags"]["dvc_exp_name"] == name and parent["tags"]["git_commit"] == head
        quantize = next(r for r in children if r["name"] == "quantize@lenet_300_100")
        assert quantize["params"]["quantize.bits.fc1"] == str(bits)
        evaluate = next(r for r in children if r["name"] == "evaluate@lenet_300_100")
        assert {"file_compression", "compression", "layer.fc1.kept"} <= set(evaluate["metrics"])
    assert store["versions"] == len(names)

    out = tmp_path / "SEEDS.md"
    proc = sh(repo, sys.executable, str(ROOT / "studies" / "seeds.py"), "report", "--prefix", "q-", "--out", str(out))
    assert "3 runs (baseline, q-" in proc.stdout
    text = out.read_text()
    m = json.loads((repo / "metrics" / "lenet_300_100.json").read_text())
    for model in params["models"]:
        assert f"## {model}" in text
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    base = next(row for row in shown if row["rev"] != "workspace")
    revs = [base["rev"]] + [e["revs"][0]["rev"] for e in sorted(
        (e for e in base.get("experiments") or [] if (e["revs"][0].get("name") or "").startswith("q-")),
        key=lambda e: e["revs"][0]["name"])]
    values = [json.loads(sh(repo, "git", "show", f"{rev}:metrics/lenet_300_100.json").stdout)["file_compression"]
              for rev in revs]
    assert len(values) == 3 and values[0] == m["file_compression"] and len(set(values)) > 1  # bits differ
    section = text.split("## lenet_300_100", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in section.splitlines() if line.startswith("| compressed file (x) |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:5] == [f"{v:.2f}" for v in values]  # each run's figure, in the order of the runs
    assert cells[1].startswith(f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} "
                               f"({min(values):.2f}-{max(values):.2f})")
    assert "| selection rule held" in text
