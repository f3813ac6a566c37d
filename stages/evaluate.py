"""Stage evaluate: test accuracy of the dense model, the final pruned model and the model decoded
from the compressed file, and what each costs layer by layer (parameters, bytes, FLOPs).
Writes the model's DVC metrics and plot data."""
import os

import torch

from common import config, open_run, parser, run, setup
from hanprune import data, io, measure, storage
from hanprune.models import build, prunable_layers
from hanprune.pruning import load_checkpoint
from hanprune.quantize import read_compressed
from hanprune.train import accuracy

HIST_BINS = 100


def weight_histogram(model, layer: str, lo: float, hi: float) -> list[int]:
    w = prunable_layers(model)[layer].weight.detach().flatten()
    return torch.histc(w[w != 0], bins=HIST_BINS, min=lo, max=hi).long().tolist()


def main():
    ap = parser(__doc__)
    ap.add_argument("model", help="model key")
    ap.add_argument("--data", default="data", help="data root")
    ap.add_argument("--dense", required=True, help="dense checkpoint")
    ap.add_argument("--pruned", required=True, help="final pruned checkpoint")
    ap.add_argument("--compressed", required=True, help="compressed model file (encode stage)")
    ap.add_argument("--storage", required=True, help="directory of the other storage forms (encode stage)")
    ap.add_argument("--metrics", required=True, help="metrics JSON to write")
    ap.add_argument("--plots", required=True, help="directory for this model's plot data")
    args = ap.parse_args()
    p = config.load(args.params)
    with open_run(p, f"evaluate@{args.model}", args.model, data.dataset_md5(args.data)) as mlrun:
        device = setup(p, 0)
        x, y = data.load_split(args.data, train=False)
        dense, _ = load_checkpoint(args.dense, args.model)
        pruned, ckpt = load_checkpoint(args.pruned, args.model)
        dense_acc = accuracy(dense.to(device), x.to(device), y.to(device))
        pruned_acc = accuracy(pruned.to(device), x.to(device), y.to(device))
        _, decoded, _ = read_compressed(args.compressed, args.model)
        compressed_acc = accuracy(decoded.to(device), x.to(device), y.to(device))
        dense.cpu(), pruned.cpu()
        metrics = measure.summary(dense, pruned, dense_acc, pruned_acc)
        metrics.update(measure.compressed_sizes(args.compressed, metrics["bytes_dense"]),
                       compressed_accuracy=compressed_acc)
        metrics["file_bytes"] = {**{name: os.path.getsize(f"{args.storage}/{file}") for name, file in storage.FILES.items()},
                                 "compressed": metrics["compressed_bytes"]}
        metrics["iterations"] = len(ckpt["history"])
        layers = metrics["layers"]
        # Plot data: accuracy and compression per iteration, kept % per layer, weight distribution.
        history = [{"iteration": 0, "val_accuracy_pruned": None, "val_accuracy_retrained": None,
                    "compression_ratio": 1.0, "kept": {n: 1.0 for n in layers}}] + ckpt["history"]
        hist_layer = "conv2" if "conv2" in layers else "fc1"  # the layers of the paper's Figure 5
        w = prunable_layers(dense)[hist_layer].weight.detach()
        lo, hi = float(w.min()), float(w.max())
        edges = torch.linspace(lo, hi, HIST_BINS + 1).tolist()
        io.write_text(f"{args.plots}/iterations.csv", "iteration,val_accuracy_pruned,val_accuracy_retrained,compression_ratio\n"
                      + "".join(f"{h['iteration']},{h['val_accuracy_pruned'] or ''},{h['val_accuracy_retrained'] or ''},"
                                f"{h['compression_ratio']:.4f}\n" for h in history))
        io.write_text(f"{args.plots}/kept.csv", "iteration,layer,kept_percent\n" + "".join(
            f"{h['iteration']},{n},{100 * k:.3f}\n" for h in history for n, k in h["kept"].items()))
        io.write_json(f"{args.plots}/weights.json", {
            "layer": hist_layer, "edges": edges,
            "dense": weight_histogram(dense, hist_layer, lo, hi),
            "pruned": weight_histogram(pruned, hist_layer, lo, hi)})
        io.write_json(args.metrics, metrics)
        mlrun.metrics({k: v for k, v in metrics.items() if k != "layers"})
        for name, l in layers.items():
            mlrun.metrics({f"layer.{name}.{k}": v for k, v in l.items()})
        mlrun.table([{"layer": n, **l} for n, l in layers.items()], "layers.json")
        mlrun.artifact(args.metrics)
        mlrun.artifact(args.pruned, "checkpoint")
        plain = build(args.model)
        plain.load_state_dict(ckpt["state_dict"])
        mlrun.register_model(plain.eval(), f"{args.model}-pruned", x[:2].numpy(),
                             {k: metrics[k] for k in ("compression_ratio", "pruned_accuracy", "compressed_ratio")})
    print(f"evaluate {args.model}: test accuracy dense {dense_acc:.4f}, pruned {pruned_acc:.4f}; "
          f"{metrics['params_dense']} -> {metrics['params_nonzero']} params ({metrics['compression_ratio']:.1f}x), "
          f"FLOPs {metrics['flops_dense']} -> {metrics['flops_pruned']}; compressed file "
          f"{metrics['compressed_bytes']} bytes ({metrics['compressed_ratio']:.1f}x), test accuracy "
          f"{compressed_acc:.4f} -> {args.metrics}")


if __name__ == "__main__":
    run(main)
