"""Stage schedule: the values one prune round uses (s or q per layer, or one q), written as a plain
file that the round depends on: those given in params.yaml, and for a budget the sensitivity
scan's choice for the layers they leave out. A scan that changes without changing a round's values
re-runs no round."""
import csv

from common import load_params, parser, run_stage
from hanprune import io
from hanprune.config import ConfigError
from hanprune.rules import check_round, round_values


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("iteration", help="key under prune: in params.yaml, e.g. small_resnet-iter1")
    ap.add_argument("--scan", help="the model's sensitivity CSV (needed for a budget)")
    ap.add_argument("--out", required=True, help="JSON to write: the rule and its values (s or q)")
    args = ap.parse_args(argv)
    p = load_params(args.params)
    if args.iteration not in p.prune:
        raise ConfigError(f"prune.{args.iteration}: no such iteration in {args.params}; have: {', '.join(p.prune)}")
    it = p.prune[args.iteration]
    rows = []
    if args.scan:
        with open(args.scan, newline="") as f:
            rows = list(csv.DictReader(f))
    elif it.budget is not None:
        raise ConfigError(f"{p.source}: prune.{args.iteration}.budget: a budget needs the model's sensitivity scan "
                          "(--scan); give the rule's values instead")
    rule, given = check_round(f"{p.source}: prune.{args.iteration}", it, [r["layer"] for r in rows] if rows else None)
    if rows and rule.key not in rows[0]:
        raise ConfigError(f"prune.{args.iteration}.rule: {it.rule} takes {rule.key}, but {args.scan} scans another "
                          "rule's values: a model's rounds use one rule (the scan is made with its first round's)")
    values, from_budget = round_values(rule, given, it.budget, rows)
    io.write_json(args.out, {"rule": it.rule, rule.key: values})  # only what the round reads
    shown = " ".join(f"{n} {v:g}" for n, v in values.items()) if isinstance(values, dict) else f"{values:g}"
    print(f"schedule {args.iteration}: rule {it.rule}, {shown}"
          + (f" ({len(from_budget)} from the budget)" if from_budget else "") + f" -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
