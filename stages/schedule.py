"""Stage schedule: the values one prune round uses (s or q per layer, or one q), written as a plain
file that the round depends on: those given in params.yaml, and for a budget the sensitivity
scan's choice for the layers they leave out. A scan that changes without changing a round's values
re-runs no round."""
import csv

from common import load_params, parser, run_stage
from hanprune import io
from hanprune.config import ConfigError
from hanprune.rules import RULES, round_values


def main():
    ap = parser(__doc__)
    ap.add_argument("iteration", help="key under prune: in params.yaml, e.g. small_resnet-iter1")
    ap.add_argument("--scan", required=True, help="the model's sensitivity CSV")
    ap.add_argument("--out", required=True, help="JSON to write: the rule and its values (s or q)")
    args = ap.parse_args()
    p = load_params(args.params)
    if args.iteration not in p.prune:
        raise ConfigError(f"prune.{args.iteration}: no such iteration in {args.params}; have: {', '.join(p.prune)}")
    it = p.prune[args.iteration]
    with open(args.scan, newline="") as f:
        rows = list(csv.DictReader(f))
    values, from_budget = round_values(it.rule, it.values, it.budget, rows)
    io.write_json(args.out, {"rule": it.rule, RULES[it.rule].key: values})  # only what the round reads
    shown = " ".join(f"{n} {v:g}" for n, v in values.items()) if isinstance(values, dict) else f"{values:g}"
    print(f"schedule {args.iteration}: rule {it.rule}, {shown}"
          + (f" ({len(from_budget)} from the budget)" if from_budget else "") + f" -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
