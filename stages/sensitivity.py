"""Stage sensitivity: prune one layer at a time at a grid of values of the model's rule (s for std,
q for quantile; for global all layers at once, layer `all`), without retraining, and measure
validation accuracy (the paper's Figure 6). Explains the per-layer values in params.yaml, and is
what a round's budget chooses them from."""
from common import load_params, parser, run_stage, start, tracked
from hanprune import data, io
from hanprune.pruning import load_checkpoint
from hanprune.models import prunable_layers
from hanprune.rules import check_round, grid_of, scan
from hanprune.train import accuracy


def main(argv=None):
    ap = parser(__doc__, "model", "--data", "--dense")
    ap.add_argument("--out", required=True, help="CSV to write: layer, s (or q), kept_percent, val_accuracy")
    args = ap.parse_args(argv)
    p = load_params(args.params, args.model)
    m = p.models[args.model]
    model, _ = load_checkpoint(args.dense, args.model, m.arch, m.kwargs)
    first = p.prune[f"{args.model}-iter1"]  # every round of a model has the same rule
    rule, _ = check_round(f"{p.source}: prune.{args.model}-iter1", first, list(prunable_layers(model)))
    key, grid = rule.key, grid_of(rule, p.sensitivity, p.source)
    device = start(p)
    splits = data.open_splits(args.data, p.data, device)
    with tracked(p, f"sensitivity@{args.model}", args.model, splits.dataset) as mlrun:
        mlrun.params({"rule": first.rule, f"{key}_grid": grid})
        rows = scan(model.to(device), rule, grid, lambda m: accuracy(m, *splits.val))
        io.write_csv(args.out, ["layer", key, "kept_percent", "val_accuracy"],
                     [[r["layer"], r[key], f"{100 * r['kept']:.3f}", f"{r['score']:.4f}"] for r in rows])
        mlrun.table(rows, "sensitivity.json")
    worst = {}
    for r in rows:
        worst[r["layer"]] = min(worst.get(r["layer"], 1.0), r["score"])
    print(f"sensitivity {args.model}: rule {first.rule}, {len(rows)} points; lowest val accuracy per layer: "
          + ", ".join(f"{k} {v:.3f}" for k, v in worst.items()) + f" -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
