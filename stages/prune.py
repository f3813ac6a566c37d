"""Stage prune: one prune-and-retrain round (Han et al. 2015) of one model.

Reads the previous round's checkpoint, prunes by the round's rule with the values the schedule
stage wrote (e.g. |w| < s * std of the dense layer, per layer), retrains the survivors (pruned
weights stay exactly zero), and writes the new checkpoint, whose masks and history carry everything
the next round and the evaluation need."""
import json
from pathlib import Path

from common import epoch_logger, load_params, parser, run_stage, start, tracked
from hanprune import data, io, measure
from hanprune.config import ConfigError
from hanprune.pruning import PruningError, checkpoint, load_checkpoint
from hanprune.models import prunable_layers
from hanprune.rules import Gradual, check_round, prune_round
from hanprune.train import accuracy, fit, step_count


def main(argv=None):
    ap = parser(__doc__, "--data")
    ap.add_argument("iteration", help="key under prune: in params.yaml, e.g. lenet5-iter2")
    ap.add_argument("--start", required=True, help="checkpoint to start from")
    ap.add_argument("--schedule", required=True, help="the round's values, as the schedule stage wrote them")
    ap.add_argument("--out", required=True, help="checkpoint to write")
    ap.add_argument("--metrics", required=True, help="JSON metrics of this round to write")
    ap.add_argument("--plot", required=True, help="per-epoch CSV to write")
    args = ap.parse_args(argv)
    p = load_params(args.params)
    if args.iteration not in p.prune:
        raise ConfigError(f"prune.{args.iteration}: no such iteration in {args.params}; have: {', '.join(p.prune)}")
    it = p.prune[args.iteration]
    m = p.models[it.model]
    cfg = m.retrain.model_copy(update={"epochs": it.epochs, "lr": it.lr})
    model, ckpt = load_checkpoint(args.start, it.model, m.arch, m.kwargs)
    key = check_round(f"{p.source}: prune.{args.iteration}", it, list(prunable_layers(model)))[0].key
    schedule = json.loads(Path(args.schedule).read_text())
    if schedule.get("rule") != it.rule or key not in schedule:
        raise ConfigError(f"{args.schedule}: not the schedule of prune.{args.iteration} (rule {it.rule}); "
                          "run its schedule stage")
    values = schedule[key]
    device = start(p, cfg.seed)
    splits = data.open_splits(args.data, p.data, device)
    with tracked(p, f"prune@{args.iteration}", it.model, splits.dataset) as mlrun:
        mlrun.params({"prune": it.model_dump(), "retrain": cfg.model_dump(), "chosen": {key: values}})
        model.to(device)
        val_before = accuracy(model, *splits.val)
        gradual = None
        try:
            if it.gradual is None:  # prune at once, then retrain
                prune_round(model, it.rule, values, ckpt["dense_std"])
            else:  # prune while training (no accuracy right after pruning)
                gradual = Gradual(model, it.rule, values, ckpt["dense_std"], step_count(cfg, len(splits.train[0])), it.gradual)
        except PruningError as e:  # name the params key: prune.<iteration>.s.<layer>
            if it.budget is not None:
                raise PruningError(f"prune.{args.iteration}.{e} (from the budget: {args.schedule})") from None
            raise PruningError(f"prune.{args.iteration}.{e}") from None
        except ConfigError as e:
            raise ConfigError(f"{p.source}: prune.{args.iteration}.{e}") from None
        val_pruned = None if gradual else accuracy(model, *splits.val)
        epochs = fit(model, cfg, splits.train, splits.val, None, device,
                     log=epoch_logger(mlrun, f"prune {args.iteration}"), label=f"prune {args.iteration}",
                     lr_key=f"prune.{args.iteration}.lr", before_step=gradual)
        layers = measure.layer_stats(model, splits.input_shape)
        total = measure.totals(layers)
        # The checkpoint's history keeps the whole record; the DVC metrics the figures a person compares.
        record = {
            "iteration": it.iteration,
            "val_before": val_before,
            "val_pruned": val_pruned,
            "val_retrained": epochs[-1]["val_accuracy"],
            "params_nonzero": total["nonzero"],
            "compression": total["params"] / total["nonzero"],
            "kept": {name: l["kept"] for name, l in layers.items()},
        }
        headline = {**{k: record[k] for k in ("val_pruned", "val_retrained", "compression", "kept")}, key: values}
        io.save_torch(args.out, checkpoint(it.model, m.arch, m.kwargs, model, ckpt["dense_std"],
                                           ckpt["history"] + [record]))
        io.write_json(args.metrics, headline)
        io.write_csv(args.plot, ["epoch", "train_loss", "val_accuracy"],
                     [[e["epoch"], f"{e['train_loss']:.6f}", f"{e['val_accuracy']:.6f}"] for e in epochs])
        mlrun.metrics({k: v for k, v in record.items() if k != "iteration" and v is not None}, step=it.iteration, on_parent=True)
        mlrun.table([{"layer": n, **l} for n, l in layers.items()], "layers.json")
    pruned = "gradually" if gradual else f"{val_pruned:.4f}"
    print(f"prune {args.iteration}: val {val_before:.4f} -> pruned {pruned} -> retrained "
          f"{record['val_retrained']:.4f}, {record['compression']:.1f}x, kept "
          + " ".join(f"{n} {k:.1%}" for n, k in record["kept"].items()) + f" -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
