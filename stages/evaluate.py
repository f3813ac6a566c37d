"""Stage evaluate: test accuracy of the dense model, the selected pruned model and the model decoded
from the compressed file, and what each costs layer by layer (parameters, bytes, FLOPs); and, to
report only (the select stage chose on validation), the test accuracy of every round.
Writes the model's DVC metrics (the headline figures), and beside its plot data every figure layer by
layer (detail.json), which the report reads."""
import json
import os
from pathlib import Path

import torch

from common import dataset_tags, load_params, parser, run_stage, start, tracked
from hanprune import data, io, measure, storage
from hanprune.config import iteration_path
from hanprune.encoding import describe
from hanprune.models import make, prunable_layers
from hanprune.pruning import load_checkpoint
from hanprune.encoding import read_compressed
from hanprune.selection import classes_of, refuse_chance_level
from hanprune.train import accuracy

HIST_BINS = 100
HEADLINE = ("test_dense", "test_pruned", "test_compressed", "compression", "file_compression",
            "flops_kept")


def weight_histogram(model, layer: str, lo: float, hi: float) -> list[int]:
    w = prunable_layers(model)[layer].weight.detach().flatten()
    return torch.histc(w[w != 0], bins=HIST_BINS, min=lo, max=hi).long().tolist()


def compressed_sizes(path, bytes_dense: int) -> dict:
    """The compressed file's real size and ratio to dense float32, and where its bytes go per layer."""
    blob = Path(path).read_bytes()
    return {
        "compressed_bytes": len(blob),
        "file_compression": bytes_dense / len(blob),
        "compressed_layers": {l["layer"]: {k: l[k] for k in ("nonzero", "entries", "index_bits", "gap_code",
                                                            "codebook_size", "bytes_codes", "bytes_index",
                                                            "bytes_codebook", "bytes_total")}
                              for l in describe(blob)},
    }


def not_registered_reason(history: list[dict], max_drop: float) -> str | None:
    """Why the pruned model must not go to the Model Registry, or None: its validation accuracy
    after the last round is more than max_drop below the dense model's (before round 1)."""
    if not history:
        return None
    dense, pruned = history[0]["val_before"], history[-1]["val_retrained"]
    if dense - pruned <= max_drop:
        return None
    return (f"validation accuracy {pruned:.4f} is {100 * (dense - pruned):.2f} points below the dense model's "
            f"{dense:.4f} (tracking.register_max_drop = {max_drop:g})")


def main(argv=None):
    ap = parser(__doc__, "model", "--data", "--dense", "--pruned")
    ap.add_argument("--compressed", required=True, help="compressed model file (encode stage)")
    ap.add_argument("--storage", required=True, help="directory of the other storage forms (encode stage)")
    ap.add_argument("--rounds", required=True, help="directory of the model's round checkpoints (iter<k>.pt)")
    ap.add_argument("--selection", required=True, help="the select stage's JSON: how many rounds the model has")
    ap.add_argument("--metrics", required=True, help="metrics JSON to write")
    ap.add_argument("--plots", required=True, help="directory for this model's plot data")
    args = ap.parse_args(argv)
    p = load_params(args.params, args.model)
    m = p.models[args.model]
    dense, _ = load_checkpoint(args.dense, args.model, m.arch, m.kwargs)
    pruned, ckpt = load_checkpoint(args.pruned, args.model, m.arch, m.kwargs)
    _, decoded = read_compressed(args.compressed, args.model, m.arch, m.kwargs)
    if ckpt["history"]:  # on the validation figure it was selected on (the test split only reports), before any output
        refuse_chance_level(f"evaluate {args.model}: {args.pruned}", ckpt["history"][-1]["val_retrained"],
                            classes_of(pruned), "it is not a result; see its select and prune stages")
    device = start(p)
    splits = data.open_splits(args.data, p.data, device)
    with tracked(p, f"evaluate@{args.model}", args.model, splits.dataset) as mlrun:
        mlrun.params({"pruned": args.pruned, "run": p.run.model_dump(),
                      "tracking.register_max_drop": p.tracking.register_max_drop})
        dense_acc = accuracy(dense.to(device), *splits.test)
        pruned_acc = accuracy(pruned.to(device), *splits.test)
        compressed_acc = accuracy(decoded.to(device), *splits.test)
        dense.cpu(), pruned.cpu()
        every_round = []
        for k in range(1, json.loads(Path(args.selection).read_text())["rounds"] + 1):
            model, c = load_checkpoint(Path(args.rounds, Path(iteration_path(args.model, k)).name), args.model, m.arch, m.kwargs)
            every_round.append((c["history"][-1], accuracy(model.to(device), *splits.test)))
        metrics = measure.summary(dense, pruned, dense_acc, pruned_acc, splits.input_shape)
        metrics.update(compressed_sizes(args.compressed, metrics["bytes_dense"]),
                       test_compressed=compressed_acc)
        metrics["file_bytes"] = {**{name: os.path.getsize(f"{args.storage}/{file}") for name, file in storage.FILES.items()},
                                 "compressed": metrics["compressed_bytes"]}
        metrics["iterations"] = len(ckpt["history"])
        layers = metrics["layers"]
        # Plot data: accuracy and compression per iteration, kept % per layer, weight distribution.
        history = [{"iteration": 0, "val_pruned": None, "val_retrained": None,
                    "compression": 1.0, "kept": {n: 1.0 for n in layers}}] + ckpt["history"]
        # the layers of the paper's Figure 5, else the model's largest; bins over both models' weights
        hist_layer = next((n for n in ("conv2", "fc1") if n in layers), max(layers, key=lambda n: layers[n]["weights"]))
        w = torch.cat([prunable_layers(x)[hist_layer].weight.detach().flatten() for x in (dense, pruned)])
        lo, hi = float(w.min()), float(w.max())
        edges = torch.linspace(lo, hi, HIST_BINS + 1).tolist()
        io.write_csv(f"{args.plots}/iterations.csv", ["iteration", "val_pruned", "val_retrained", "compression"],
                     [[h["iteration"], h["val_pruned"] or "", h["val_retrained"] or "", f"{h['compression']:.4f}"]
                      for h in history])
        io.write_csv(f"{args.plots}/rounds.csv", ["iteration", "compression", "val_retrained", "test_accuracy"],
                     [[h["iteration"], f"{h['compression']:.4f}", h["val_retrained"], test] for h, test in every_round])
        io.write_csv(f"{args.plots}/kept.csv", ["iteration", "layer", "kept_percent"],
                     [[h["iteration"], n, f"{100 * k:.3f}"] for h in history for n, k in h["kept"].items()])
        io.write_json(f"{args.plots}/weights.json", {
            "layer": hist_layer, "edges": edges,
            "dense": weight_histogram(dense, hist_layer, lo, hi),
            "pruned": weight_histogram(pruned, hist_layer, lo, hi)})
        io.write_json(f"{args.plots}/detail.json", metrics)
        io.write_json(args.metrics, {k: metrics[k] for k in HEADLINE})
        mlrun.metrics({k: v for k, v in metrics.items() if k != "layers"})
        for name, l in layers.items():
            mlrun.metrics({f"layer.{name}.{k}": v for k, v in l.items()})
        mlrun.table([{"layer": n, **l} for n, l in layers.items()], "layers.json")
        mlrun.artifact(args.metrics)
        mlrun.artifact(f"{args.plots}/detail.json")
        mlrun.artifact(args.pruned, "checkpoint")
        reason = not_registered_reason(ckpt["history"], p.tracking.register_max_drop)
        if reason:
            mlrun.run_tags({"registered": "false", "not_registered_reason": reason})
            print(f"evaluate {args.model}: not registered: {reason}")
        else:
            plain = make(m.arch, m.kwargs)
            plain.load_state_dict(ckpt["state_dict"])
            mlrun.register_model(plain.eval(), f"{args.model}-pruned", splits.test[0][:2].cpu().numpy(),
                                 {**{k: metrics[k] for k in ("compression", "test_pruned", "file_compression")},
                                  **dataset_tags(splits.dataset)})
            mlrun.run_tags({"registered": "true"})
    print(f"evaluate {args.model}: test accuracy dense {dense_acc:.4f}, pruned {pruned_acc:.4f}; "
          f"{metrics['params_dense']} -> {metrics['params_nonzero']} params ({metrics['compression']:.1f}x), "
          f"FLOPs {metrics['flops_dense']} -> {metrics['flops_pruned']}; compressed file "
          f"{metrics['compressed_bytes']} bytes ({metrics['file_compression']:.1f}x), test accuracy "
          f"{compressed_acc:.4f} -> {args.metrics}")


if __name__ == "__main__":
    run_stage(main)
