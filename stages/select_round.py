"""Stage select: which prune round goes on to weight sharing, encoding and evaluation, by the rule
models.<model>.select, on validation accuracy only (no data is opened here: the figures are the
ones each round recorded in its checkpoint's history). Copies the chosen round's checkpoint to
--out, and names the round, its compression and validation accuracy and whether the rule held."""
from pathlib import Path

from common import load_params, parser, run_stage, tracked
from hanprune import io
from hanprune.config import iteration_path
from hanprune.pruning import CheckpointError, load_checkpoint
from hanprune.selection import classes_of, refuse_chance_level, select_round, tolerance


def main(argv=None):
    ap = parser(__doc__, "model")
    ap.add_argument("--rounds", required=True, help="directory of the model's round checkpoints (iter<k>.pt)")
    ap.add_argument("--out", required=True, help="checkpoint to write: a copy of the chosen round's")
    ap.add_argument("--metrics", required=True, help="JSON to write: the chosen round and the rule")
    args = ap.parse_args(argv)
    p = load_params(args.params, args.model)
    rule = p.models[args.model].select
    last = max(it.iteration for it in p.prune.values() if it.model == args.model)
    def path(k: int) -> Path:
        return Path(args.rounds, Path(iteration_path(args.model, k)).name)

    _, ckpt = load_checkpoint(path(last), args.model)
    history = ckpt["history"]
    val_dense = history[0]["val_before"]  # round 1 measured the dense model on the validation split
    max_drop = tolerance(val_dense, p.data.val_size, rule.noise) if rule.max_drop is None else rule.max_drop
    chosen, held = select_round(history, val_dense, max_drop, rule.max_error)
    source = path(chosen["iteration"])
    model, picked = load_checkpoint(source, args.model)  # checked before it is copied
    if len(picked["history"]) != chosen["iteration"]:
        raise CheckpointError(f"{source}: holds {len(picked['history'])} rounds, expected {chosen['iteration']}")
    refuse_chance_level(f"select {args.model}: round {chosen['iteration']} ({source})", chosen["val_retrained"],
                        classes_of(model), f"lower models.{args.model}.select.noise, prune less or retrain slower")
    record = {"round": chosen["iteration"], "compression": chosen["compression"], "val": chosen["val_retrained"],
              "val_dense": val_dense, "noise": rule.noise if rule.max_drop is None else None, "max_drop": max_drop, "max_error": rule.max_error,
              "held": held, "rounds": len(history)}
    with tracked(p, f"select@{args.model}", args.model) as mlrun:
        io.write_bytes(args.out, source.read_bytes())
        io.write_json(args.metrics, record)
        mlrun.params({"select": rule.model_dump()})
        mlrun.metrics({"selected_round": record["round"], "selected_compression": record["compression"],
                       "selected_val": record["val"], "select_rule_held": float(held)})
    verdict = "the most compressed within" if held else "NO round is within; the least compressed, beyond"
    print(f"select {args.model}: round {record['round']} of {len(history)} ({record['compression']:.1f}x, val "
          f"{record['val']:.4f}, dense {val_dense:.4f}): {verdict} "
          + (f"{rule.noise:g} standard errors " if rule.max_drop is None else "max_drop ") + f"({100 * max_drop:.2f} points)" + (f", error <= {rule.max_error:g}" if rule.max_error else "") + f" -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
