"""Stage report: reports/REPORT.md and its PNG figures (reports/figures/) from every model's metrics
and plot data."""
import json
from pathlib import Path

from common import load_params, parser, run_stage, tracked
from hanprune import data, io, report


def save_png(fig, path: Path) -> str:
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return path.name


def main(argv=None):
    ap = parser(__doc__, "--data")
    ap.add_argument("--metrics", default="metrics", help="directory of <model>.json metrics")
    ap.add_argument("--plots", default="plots", help="directory of <model>/ plot data")
    ap.add_argument("--out", default="reports", help="output directory")
    args = ap.parse_args(argv)
    p = load_params(args.params)
    out = Path(args.out)
    dataset = data.verified(data.raw_dir(args.data, p.data.name), p.data.name)
    with tracked(p, "report", dataset=dataset) as mlrun:
        models, iterations, images, schedules, quantize, selections, rounds = {}, {}, {}, {}, {}, {}, {}
        for key in p.models:
            models[key] = json.loads(Path(args.plots, key, "final", "detail.json").read_text())
            quantize[key] = {**json.loads(Path(args.metrics, "quantize", f"{key}.json").read_text()),
                             "bits": p.models[key].quantize.bits}
            iterations[key] = Path(args.plots, key, "final", "iterations.csv").read_text()
            made = report.figures(key, Path(args.plots, key), out / "figures", save_png)
            images[key] = {title: f"figures/{name}" for title, name in made.items()}
            selections[key] = json.loads(Path(args.metrics, "select", f"{key}.json").read_text())
            mine = []
            for name, it in sorted(((n, it) for n, it in p.prune.items() if it.model == key), key=lambda x: x[1].iteration):
                schedule = json.loads(Path(args.metrics, "schedule", f"{name}.json").read_text())
                figures = json.loads(Path(args.metrics, "prune", f"{name}.json").read_text())
                rule_key = next(k for k in schedule if k != "rule")  # the schedule stage's: rule and values
                values, given = schedule[rule_key], it.model_extra.get(rule_key)
                by_budget = ([] if it.budget is None else [n for n in values if n not in (given or {})]
                             if isinstance(values, dict) else [] if given is not None else ["all"])
                mine.append({"iteration": str(it.iteration), "rule": it.rule, "key": rule_key, "values": values,
                             "set_by_budget": by_budget, "budget": it.budget and it.budget.model_dump(), **figures})
            rounds[key] = report.rounds_table(mine, selections[key])
            chosen = mine[selections[key]["round"] - 1]
            scan = Path(args.plots, key, "sensitivity.csv").read_text()
            schedules[key] = (report.schedule_table(chosen["values"], scan, models[key], chosen["key"])
                              if isinstance(chosen["values"], dict) else
                              f"Rule global: one q = {chosen['values']:g} for all layers (the scan prunes them all at once).")
        compared = []
        for keys in report.rule_groups({k: (m.arch, m.kwargs) for k, m in p.models.items()}):
            lines = {k: {"rule": next(it.rule for it in p.prune.values() if it.model == k), "selected": selections[k]["round"],
                         "rounds": Path(args.plots, k, "final", "rounds.csv").read_text()} for k in keys}
            arch = p.models[keys[0]].arch
            name = report.rules_figure(arch, lines, out / "figures" / f"{keys[0]}_rules.png", save_png)
            mlrun.artifact(out / "figures" / name, "figures")
            compared.append((arch, f"figures/{name}", report.rules_table(lines, selections, models)))
        io.write_text(out / "REPORT.md", report.render(dataset, models, iterations, images, schedules, quantize,
                                                       selections, rounds, compared))
        mlrun.artifact(out / "REPORT.md")
        for names in images.values():
            for name in names.values():
                mlrun.artifact(out / name, "figures")
    print(f"report: {out / 'REPORT.md'} with {sum(len(v) for v in images.values())} figures for {', '.join(models)}")


if __name__ == "__main__":
    run_stage(main)
