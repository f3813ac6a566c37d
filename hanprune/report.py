"""The report: the reference implementation's four tables per model, a side-by-side with the
paper and the reference implementation, and figures. Pure functions of metrics and plot data."""
import csv
import io as _io
from pathlib import Path

import yaml
from tabulate import tabulate

PAPERS = yaml.safe_load((Path(__file__).parent / "papers.yaml").read_text())  # the published figures
PAPER = PAPERS["han2015"]
REFERENCE = {key: {"dense_error": 100 - r["dense_accuracy"], "pruned_error": 100 - r["pruned_accuracy"],
                   "compression": r["compression"], "flops_kept_percent": 100 * r["flops_pruned"] / r["flops_dense"],
                   "kept_percent": r["kept_percent"]} for key, r in PAPERS["reference_implementation"].items()}
DEEP_COMPRESSION = PAPERS["deep_compression"]

# Issue 7's floors: file_compression at least this with test error at most this (%).
COMPRESSION_TARGETS = {"lenet_300_100": (40.0, 1.64), "lenet5_caffe": (39.0, 0.80)}

# The project's floors (issue 3): test error at most this (%), compression at least this.
TARGETS = {"lenet_300_100": (1.64, 12.0), "lenet5_caffe": (0.80, 12.0), "lenet5": (1.10, 10.0)}


def target_line(key: str, m: dict) -> str:
    if key not in TARGETS:
        return ""
    max_error, min_ratio = TARGETS[key]
    err = 100 * (1 - m["test_pruned"])
    dense_err = 100 * (1 - m["test_dense"])
    ok = err <= max_error and dense_err <= max_error and m["compression"] >= min_ratio
    return (f"Target: dense and pruned test error ≤ {max_error:.2f}% at ≥ {min_ratio:.0f}x. Measured: dense "
            f"{dense_err:.2f}%, pruned {err:.2f}% at {m['compression']:.1f}x: **{'met' if ok else 'NOT met'}**.")


def _pct(before, after):
    return f"{100 * (1 - after / before):.1f}%" if before else "-"


def _change_table(rows, unit, scale):
    """rows: (name, before, after). The reference implementation's before/after/difference/reduction layout."""
    tb, ta = sum(r[1] for r in rows), sum(r[2] for r in rows)
    body = [[n, f"{b / scale:.2f}", f"{a / scale:.2f}", f"{(b - a) / scale:.2f}", _pct(b, a)] for n, b, a in rows]
    body.append(["**TOTAL**", f"**{tb / scale:.2f}**", f"**{ta / scale:.2f}**", f"**{(tb - ta) / scale:.2f}**",
                 f"**{_pct(tb, ta)}**"])
    return tabulate(body, headers=["Layer", f"{unit} Before Pruning", f"{unit} After Pruning", "Difference",
                                   "Reduction %"], tablefmt="github")


def model_tables(key: str, m: dict) -> str:
    layers = m["layers"]
    params, size = [], []
    for n, l in layers.items():
        bias = l["params"] - l["weights"]
        params += [(f"{n}.weight", l["weights"], l["weights_nonzero"]), (f"{n}.bias", bias, l["nonzero"] - l["weights_nonzero"])]
        size += [(n, l["bytes_dense"], l["bytes_nonzero"])]
    csr = [[n, f"{l['bytes_dense'] / 1000:.2f}", f"{l['bytes_nonzero'] / 1000:.2f}", f"{l['bytes_csr'] / 1000:.2f}"]
           for n, l in layers.items()]
    csr.append(["**TOTAL**", f"**{m['bytes_dense'] / 1000:.2f}**", f"**{m['bytes_nonzero'] / 1000:.2f}**",
                f"**{m['bytes_csr'] / 1000:.2f}**"])
    flops = [(n, l["flops_dense"], l["flops_pruned"]) for n, l in layers.items()]
    summary = [[key, f"{100 * m['test_dense']:.2f}%", f"{m['params_dense'] / 1000:.2f}", "1.00x"],
               [f"{key} (pruned)", f"{100 * m['test_pruned']:.2f}%", f"{m['params_nonzero'] / 1000:.2f}",
                f"{m['compression']:.2f}x"]]
    return "\n\n".join([
        "#### Parameter Count Comparison", _change_table(params, "Parameters (K)", 1000),
        "#### Model Size Comparison",
        "Values only (float32, as the reference implementation counts), per layer, weights and biases:",
        _change_table(size, "Size (KB)", 1000),
        "What a real sparse layout costs: CSR with float32 values, int32 column indices and row pointers "
        "(conv weights as out_channels x (in_channels*k*k)), biases dense:",
        tabulate(csr, headers=["Layer", "Dense (KB)", "Values only (KB)", "CSR (KB)"], tablefmt="github"),
        "#### FLOPs Comparison",
        "2 FLOPs per multiply-accumulate with a non-zero weight, per image; biases, ReLU and pooling not counted.",
        _change_table(flops, "FLOPs (K)", 1000),
        "#### Summary",
        tabulate(summary, headers=["Model", "Test Accuracy (%)", "Parameters (K)", "Compression Ratio"],
                 tablefmt="github"),
    ])


def not_counted_line(m: dict) -> list[str]:
    """Names the layers with parameters that are neither pruned nor counted (batch norm, say)."""
    if not m.get("not_counted"):
        return []
    names = ", ".join(f"{name} ({n} parameters)" for name, n in m["not_counted"].items())
    return [f"Not pruned, and not in the parameter, byte and FLOP counts: {names}. Only Linear and Conv2d "
            "weights are pruned; the compressed file stores these tensors as they are.", ""]


def side_by_side(key: str, m: dict) -> str:
    layers = m["layers"]
    ours = {"dense_error": 100 * (1 - m["test_dense"]), "pruned_error": 100 * (1 - m["test_pruned"]),
            "compression": m["compression"], "flops_kept_percent": 100 * m["flops_kept"],
            "kept_percent": {n: 100 * l["kept"] for n, l in layers.items()}}
    rows = []
    for label, ref in [("this run", ours), ("Han et al. 2015", PAPER.get(key)), ("reference implementation", REFERENCE.get(key))]:
        if ref is None:
            continue
        rows.append([label, f"{ref['dense_error']:.2f}%", f"{ref['pruned_error']:.2f}%", f"{ref['compression']:.1f}x",
                     f"{ref['flops_kept_percent']:.1f}%"] + [f"{ref['kept_percent'][n]:.1f}%" if n in ref["kept_percent"] else "-" for n in layers])
    return tabulate(rows, headers=["", "dense error", "pruned error", "compression", "FLOPs kept"]
                    + [f"{n} kept" for n in layers], tablefmt="github")


def compression_table(key: str, m: dict, quantize: dict) -> str:
    """Deep Compression's steps as the sizes of the files the encode stage wrote: dense float32,
    pruned non-zero values only (as the reference implementation counts), pruned CSR, + weight
    sharing (the compressed format with fixed-width codes), + Huffman and Rice coding (compressed.bin)."""
    paper = DEEP_COMPRESSION.get(key, {})
    files = m["file_bytes"]
    rows = [("dense float32", "storage/dense.f32", files["dense"], m["test_dense"], paper and f"{paper['dense_kb']} KB (1x)"),
            ("pruned, non-zero values only", "storage/values.f32", files["pruned_values"], m["test_pruned"],
             paper and f"{paper['pruned']}x"),
            ("pruned, CSR (values + int32 indices)", "storage/csr.bin", files["pruned_csr"], m["test_pruned"], ""),
            ("+ weight sharing, fixed-width codes", "storage/fixed.bin", files["quantized_fixed"], m["test_compressed"],
             paper and f"{paper['quantized']}x"),
            ("+ Huffman and Rice coding", "compressed.bin", files["compressed"], m["test_compressed"],
             paper and f"{paper['huffman_kb']} KB ({paper['huffman']}x), error {paper['error']:.2f}%")]
    body = [[name, f"`{path}`", f"{size:,}", f"{files['dense'] / size:.1f}x", f"{100 * (1 - acc):.2f}%", ref or "-"]
            for name, path, size, acc, ref in rows]
    table = tabulate(body, headers=["step", f"file in models/{key}/", "bytes", "compression", "test error",
                                    "Deep Compression"], tablefmt="github")
    table += ("\n\nEvery size is a file the pipeline wrote (format in hanprune/storage.py and hanprune/encoding.py); "
              "the encode stage loads back each loadable one and checks it before writing. The values-only file "
              "has no positions and cannot be loaded: it is the reference implementation's count.")
    table += (f"\n\nWeight sharing with {', '.join(f'{n} {b}' for n, b in quantize['bits'].items())} bits; validation "
              f"accuracy {quantize['val_before']:.4f} pruned, {quantize['val_shared']:.4f} right after "
              f"k-means, {quantize['val_finetuned']:.4f} after fine-tuning the shared values.")
    if key in COMPRESSION_TARGETS:
        ratio, error = COMPRESSION_TARGETS[key]
        err = 100 * (1 - m["test_compressed"])
        ok = m["file_compression"] >= ratio and err <= error
        table += (f"\n\nTarget: compressed file ≥ {ratio:.0f}x smaller than dense float32 at test error ≤ {error:.2f}%. "
                  f"Measured: {m['file_compression']:.1f}x at {err:.2f}%: **{'met' if ok else 'NOT met'}**.")
    return table


def iteration_table(iterations_csv: str) -> str:
    rows = list(csv.DictReader(_io.StringIO(iterations_csv)))
    body = [[r["iteration"], _fmt_pct(r["val_pruned"]), _fmt_pct(r["val_retrained"]),
             f"{float(r['compression']):.2f}x"] for r in rows]
    return tabulate(body, headers=["iteration", "val acc. after pruning", "val acc. after retraining",
                                   "compression"], tablefmt="github")


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(_io.StringIO(path.read_text())))


def _fmt_pct(v):
    return f"{100 * float(v):.2f}%" if v else "-"


def _legend_below(ax, handles_labels):
    """A legend under the axes, outside the data (the figure is saved with a tight bounding box)."""
    handles, labels = handles_labels
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(len(labels), 5), frameon=False)


def figures(key: str, plots_dir: Path, out_dir: Path, save) -> dict[str, str]:
    """Draw the model's PNGs from its plot data in plots_dir (the sensitivity scan, and final/ from
    evaluate); `save(fig, path)` writes one atomically. Returns {title: file name}."""
    import json
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    made = {}
    scan = _rows(plots_dir / "sensitivity.csv")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for layer in dict.fromkeys(r["layer"] for r in scan):
        pts = sorted((100 - float(r["kept_percent"]), 100 * float(r["val_accuracy"])) for r in scan if r["layer"] == layer)
        ax.plot(*zip(*pts), "o-", label=layer, markersize=3)
    ax.set_xlabel("weights pruned away in that layer (%)"), ax.set_ylabel("validation accuracy (%)")
    _legend_below(ax, ax.get_legend_handles_labels())
    ax.set_title(f"{key}: sensitivity, one layer pruned, no retraining")
    made["Sensitivity (paper's Figure 6)"] = save(fig, out_dir / f"{key}_sensitivity.png")

    plots_dir = plots_dir / "final"
    its = _rows(plots_dir / "iterations.csv")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [int(r["iteration"]) for r in its]
    ax.plot(xs[1:], [100 * float(r["val_retrained"]) for r in its[1:]], "o-", label="after retraining")
    pruned = [(int(r["iteration"]), 100 * float(r["val_pruned"])) for r in its[1:] if r["val_pruned"]]  # none: gradual
    ax.plot(*zip(*pruned) if pruned else ([], []), "x--", label="right after pruning")
    ax.set_xlabel("iteration"), ax.set_ylabel("validation accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax.twinx()
    ax2.plot(xs, [float(r["compression"]) for r in its], "s:", color="gray", label="compression (right axis)")
    ax2.set_ylabel("compression (x)", color="gray")
    handles, labels = ax.get_legend_handles_labels()
    handles2, labels2 = ax2.get_legend_handles_labels()
    _legend_below(ax, (handles + handles2, labels + labels2))
    ax.set_title(f"{key}: accuracy and compression per iteration")
    made["Accuracy and compression per iteration"] = save(fig, out_dir / f"{key}_iterations.png")

    kept = _rows(plots_dir / "kept.csv")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for layer in dict.fromkeys(r["layer"] for r in kept):
        pts = [(int(r["iteration"]), float(r["kept_percent"])) for r in kept if r["layer"] == layer]
        ax.plot(*zip(*pts), "o-", label=layer)
    ax.set_xlabel("iteration"), ax.set_ylabel("weights kept (%)"), ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_below(ax, ax.get_legend_handles_labels())
    ax.set_title(f"{key}: kept weights per layer")
    made["Kept weights per layer"] = save(fig, out_dir / f"{key}_kept.png")

    w = json.loads((plots_dir / "weights.json").read_text())
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharex=True)
    centers = [(a + b) / 2 for a, b in zip(w["edges"][:-1], w["edges"][1:])]
    width = w["edges"][1] - w["edges"][0]
    for ax, part, title in [(axes[0], "dense", "before pruning"), (axes[1], "pruned", "after pruning + retraining")]:
        ax.bar(centers, w[part], width=width)
        ax.set_title(f"{w['layer']} weights {title}"), ax.set_xlabel("weight value")
    axes[0].set_ylabel("count")
    made[f"Weight distribution of {w['layer']} (paper's Figure 5)"] = save(fig, out_dir / f"{key}_weights.png")
    plt.close("all")
    return made


def rule_groups(models: dict[str, tuple[str, dict]]) -> list[list[str]]:
    """Model keys that share an architecture and its kwargs (one model pruned by several rules),
    for the groups of two or more, in params order. models: key -> (arch, kwargs)."""
    groups = {}
    for key, (arch, kwargs) in models.items():
        groups.setdefault((arch, repr(sorted(kwargs.items()))), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def rules_figure(arch: str, lines: dict[str, dict], out_path: Path, save) -> str:
    """Test error against compression, one line per model of the group (labelled with its rule),
    a point per round, the selected round ringed; Han et al.'s point marked where the paper has one.
    lines: key -> {"rule", "rounds" (rounds.csv text), "selected"}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, line in lines.items():
        rows = list(csv.DictReader(_io.StringIO(line["rounds"])))
        xs = [float(r["compression"]) for r in rows]
        ys = [100 * (1 - float(r["test_accuracy"])) for r in rows]
        drawn = ax.plot(xs, ys, "o-", label=f"{line['rule']} ({key})", markersize=4)[0]
        k = line["selected"] - 1
        ax.plot(xs[k], ys[k], "o", markersize=11, markerfacecolor="none", color=drawn.get_color())
    if arch in PAPER:  # the classic LeNet-5 is not in the paper (the reference implementation's 3.6% is off this scale)
        ref = PAPER[arch]
        ax.plot(ref["compression"], ref["pruned_error"], "k*", markersize=12,
                label=f"Han et al. 2015 ({ref['pruned_error']:.2f}%)")
    ax.plot([], [], "o", markersize=11, markerfacecolor="none", color="gray", label="selected round (validation)")
    ax.set_xscale("log"), ax.set_xlabel("parameter compression (log scale)"), ax.set_ylabel("test error (%)")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x" if v in (2, 3, 5, 20, 30, 50) else ""))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    ax.set_title(f"{arch}: test error against compression, per round and rule")
    name = save(fig, out_path)
    plt.close(fig)
    return name


def rules_table(lines: dict[str, dict], selections: dict[str, dict], metrics: dict[str, dict]) -> str:
    """Per model of a group: its rule and selected round, compression, validation and test error."""
    body = []
    for key, line in lines.items():
        s, m = selections[key], metrics[key]
        body.append([line["rule"], f"`{key}`", f"{s['round']} of {s['rounds']}" + ("" if s["held"] else " (rule not held)"),
                     f"{m['compression']:.2f}x", f"{m['file_compression']:.1f}x", f"{100 * (1 - s['val_dense']):.2f}%",
                     f"{100 * (1 - s['val']):.2f}%", f"{100 * (1 - m['test_dense']):.2f}%", f"{100 * (1 - m['test_pruned']):.2f}%",
                     f"{100 * (1 - m['test_compressed']):.2f}%"])
    return tabulate(body, headers=["rule", "model", "selected round", "params x", "file x", "val error dense",
                                   "val error selected", "test error dense", "test error selected",
                                   "test error file"], tablefmt="github")


def schedule_table(final_s: dict[str, float], sensitivity_csv: str, m: dict, key: str = "s") -> str:
    """Why these values: each layer's value (s, or q) in the selected round beside what pruning that
    layer alone to about the same value did to validation accuracy in the sensitivity scan (no
    retraining)."""
    scan = list(csv.DictReader(_io.StringIO(sensitivity_csv)))
    rows = []
    for layer, s in final_s.items():
        points = [r for r in scan if r["layer"] == layer]
        near = min(points, key=lambda r: abs(float(r[key]) - s))
        worst = min(points, key=lambda r: float(r["val_accuracy"]))
        rows.append([layer, f"{s:g}", f"{100 * m['layers'][layer]['kept']:.1f}%", near[key],
                     f"{100 * float(near['val_accuracy']):.2f}%", f"{100 * float(worst['val_accuracy']):.1f}%"])
    return tabulate(rows, headers=["layer", f"final {key}", "kept after retraining", f"scan {key}",
                                   f"val acc., this layer alone at scan {key}", f"val acc. at the largest scan {key}"],
                    tablefmt="github")


def rounds_table(rounds: list[dict], selection: dict) -> str:
    """Per round: its rule, the values it used (* = chosen by the budget from the scan), and its
    validation accuracy and compression; the selected round marked."""
    body = []
    for r in rounds:
        values = r["values"]
        shown = (", ".join(f"{n} {v:g}" + ("*" if n in r["set_by_budget"] else "") for n, v in values.items())
                 if isinstance(values, dict) else f"{values:g}" + ("*" if r["set_by_budget"] else ""))
        budget = f"max_drop {r['budget']['max_drop']:g}, scale {r['budget']['scale']:g}" if r["budget"] else "-"
        body.append([r["iteration"] + (" (selected)" if int(r["iteration"]) == selection["round"] else ""), r["rule"],
                     f"{r['key']}: {shown}", budget, _fmt_pct(r["val_retrained"]), f"{r['compression']:.2f}x"])
    return tabulate(body, headers=["round", "rule", "values (* from the budget)", "budget", "val acc. after retraining",
                                   "compression"], tablefmt="github")


def selection_line(selection: dict) -> str:
    s = selection
    rule = (f"the most compressed round within {100 * s['max_drop']:.2f} points of the dense validation accuracy"
            + (f" ({s['noise']:g} standard errors of it on the validation split)" if s.get("noise") is not None else "")
            + (f", validation error at most {100 * s['max_error']:.2f}%" if s.get("max_error") else ""))
    if s["held"]:
        return (f"Selected (stage select, validation only): round {s['round']} of {s['rounds']}, {s['compression']:.1f}x, "
                f"val {100 * s['val']:.2f}% against dense {100 * s['val_dense']:.2f}%: {rule}. Rule held: **yes**.")
    return (f"Selected (stage select, validation only): **no round meets the rule** ({rule}); going on with the least "
            f"compressed, round {s['round']} of {s['rounds']} ({s['compression']:.1f}x, val {100 * s['val']:.2f}% against "
            f"dense {100 * s['val_dense']:.2f}%). Rule held: **no**.")


def render(dataset, models: dict[str, dict], iterations: dict[str, str], images: dict[str, dict[str, str]],
           schedules: dict[str, str], quantize: dict[str, dict], selections: dict[str, dict],
           rounds: dict[str, str], compared: list[tuple[str, str, str]] = ()) -> str:
    """The report of every model; `dataset` (hanprune.data.Dataset) names the data they saw;
    compared: (architecture, figure path, rules table) per architecture pruned by several rules."""
    parts = [f"# Pruning report: {dataset.title}", "",
             f"Han et al. 2015 magnitude pruning on {dataset.title} (data.name `{dataset.name}`, md5 of its four "
             f"files `{dataset.md5}`), reproduced by this project's DVC pipeline. Test "
             "figures are from the final models only; every schedule decision used the validation split. "
             "One departure from the paper: every training run (pretraining, retraining, fine-tuning) shifts "
             "each image by up to 2 pixels at random (params `shift`), which lowers the dense and the pruned "
             "error alike; set `shift: 0` for the paper's setting.", ""]
    if compared:
        parts += ["## Pruning rules compared", "",
                  "One architecture, the same dense training, the same rounds and retraining epochs; only the rule "
                  "that picks the weights differs (params.yaml `prune`). Each point is a round (after retraining), "
                  "its test error read only for this figure; the ringed point is the round the select stage chose on "
                  "validation. Errors in %.", ""]
        for arch, figure, table in compared:
            parts += [f"### {arch}", "", table, "", f"![{arch}: rules compared]({figure})", ""]
    for key, m in models.items():
        parts += [f"## {key}", "", "### Against the paper and the reference implementation", "",
                  "Errors are test errors; kept = non-zero weights / weights (biases excluded), as in the paper's Tables 2-3.",
                  "", side_by_side(key, m), "", target_line(key, m), "", *not_counted_line(m),
                  "### Rounds and the selected one", "", selection_line(selections[key]), "", rounds[key], "",
                  "### Iterations up to the selected round (validation accuracy)", "", iteration_table(iterations[key]), "",
                  "### The schedule and the sensitivity scan", "",
                  "The selected round's values per layer against the one-layer-at-a-time scan on the dense model. "
                  "Layers whose accuracy falls early in the scan (the most sensitive) get the smallest values; s is in "
                  "units of the dense layer's weight std, q a fraction of the layer's weights, and retraining between "
                  "rounds lets the final values go beyond what one-shot pruning of that layer tolerates.", "",
                  schedules[key], ""]
        for title, name in images[key].items():
            parts += [f"**{title}**", "", f"![{title}]({name})", ""]
        parts += ["### Deep Compression: the bytes on disk", "",
                  "The last row is the size of the file `models/<model>/compressed.bin` written by the encode stage; its "
                  "test error is measured on the model decoded from that file. The fixed-width row is that file's size "
                  "with its Huffman- and Rice-coded streams replaced by the same entries at fixed width (`storage/fixed.bin`); "
                  "both leave out the dead units, those whose every outgoing connection is pruned, with their weights "
                  "and biases (the output is the same bit for bit; hanprune/deadunits.py). The pruned rows count "
                  "values (and indices) as stated.", "",
                  compression_table(key, m, quantize[key]), ""]
        parts += ["### The reference implementation's tables", "", model_tables(key, m), ""]
    return "\n".join(parts)
