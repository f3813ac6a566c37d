"""The seed band: the whole pipeline with 5 seeds per model, as DVC experiments, summarised in
reports/SEEDS.md from the experiments' results. Run it at the project root.

    python studies/seeds.py queue     # queues seed-1 .. seed-4 (seed 0 is the committed run);
                                      # --set run.portable=false: in the fast mode (about 4x faster)
    dvc queue start -j 1                 # runs them one after another (2 cores: never two at once)
    python studies/seeds.py report    # reports/SEEDS.md from the baseline and the seed-* experiments

Seed k sets every model's pretrain, retrain and fine-tune seeds to 10k, 10k+1 and 10k+2 (the
committed params hold 0, 1, 2). The validation split (data.val_seed) and every schedule stay.
`--models m1 m2` re-seeds, and reports, only those models: each experiment re-runs only their stages.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hanprune import io  # noqa: E402
from hanprune.report import PAPER, PAPERS  # noqa: E402

SEEDS = range(1, 5)
# Validation error budget (%) per architecture: the paper's pruned test error (issue 25).
BUDGET = PAPERS["budget"]


def within(budget: float, *errors: float) -> bool:
    """Whether every validation error (%) is within the budget (errors are counts over the split:
    one met exactly holds despite float rounding)."""
    return max(errors) <= budget + 1e-9
FIGURES = [("dense test error (%)", "dense"), ("pruned test error (%)", "pruned"),
           ("compressed test error (%)", "compressed"), ("compression (x)", "compression"),
           ("compressed file (x)", "file_compression"), ("selected round's validation error (%)", "val_error")]


def seed_params(k: int, models) -> list[str]:
    return [f"models.{m}.{block}={10 * k + offset}" for m in models
            for offset, block in enumerate(["pretrain.seed", "retrain.seed", "quantize.finetune.seed"])]


def queue(only: list[str] | None, settings: list[str]):
    models = yaml.safe_load(Path("params.yaml").read_text())["models"]
    unknown = sorted(set(only or []) - set(models))
    if unknown:
        sys.exit(f"--models: {', '.join(unknown)} not in params.yaml models (there: {', '.join(models)})")
    models = only or list(models)
    for k in SEEDS:
        cmd = ["dvc", "exp", "run", "--queue", "-n", f"seed-{k}"]
        for setting in seed_params(k, models) + settings:
            cmd += ["-S", setting]
        subprocess.run(cmd, check=True)
    print(f"queued seed-{SEEDS[0]} .. seed-{SEEDS[-1]}; run them with `dvc queue start -j 1`")


def git_file(rev: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True).stdout


def outcome(rev: str, params: dict, model: str) -> dict:
    """One pipeline run's figures for one model, read from its commit."""
    m = json.loads(git_file(rev, f"metrics/{model}.json"))
    selected = json.loads(git_file(rev, f"metrics/select/{model}.json"))  # the select stage's verdict
    return {"dense": 100 * (1 - m["test_dense"]), "pruned": 100 * (1 - m["test_pruned"]),
            "compressed": 100 * (1 - m["test_compressed"]), "compression": m["compression"],
            "file_compression": m["file_compression"], "val_error": 100 * (1 - selected["val"]),
            "rule": selected["held"], "max_drop": selected["max_drop"],
            "mode": "portable" if params["run"]["portable"] else "fast",
            "seed": params["models"][model]["pretrain"]["seed"], "arch": params["models"][model]["arch"]}


def runs(prefix: str, rev: str = "HEAD") -> list[tuple[str, str, dict]]:
    """(name, commit, params) of the baseline commit rev and its finished experiments named <prefix>*,
    in name order (a queued or running experiment's commit holds the baseline's results)."""
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json", "--rev", rev], capture_output=True, text=True,
                                      check=True).stdout)
    base = next(row for row in shown if row["rev"] != "workspace")
    found = [("baseline", base["rev"], base["data"]["params"]["params.yaml"]["data"])]
    for exp in base.get("experiments") or []:
        rev, state = exp["revs"][0], (exp.get("executor") or {}).get("state", "success")
        if (rev.get("name") or "").startswith(prefix) and state == "success":
            found.append((rev["name"], rev["rev"], rev["data"]["params"]["params.yaml"]["data"]))
    return found[:1] + sorted(found[1:])


def band(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f} ({min(values):.2f}-{max(values):.2f})"


def render(results: dict[str, list[dict]], names: list[str]) -> str:
    lines = ["# The seed band", "",
             f"Each model below run {len(names)} times: the committed run (baseline) and "
             + ", ".join(names[1:]) + ", which change its pretrain, retrain and fine-tune seeds "
             "(`python studies/seeds.py queue`, `dvc queue start -j 1`) and nothing else but the numeric mode "
             "where the table's row says so. Validation split and schedules "
             "are the committed ones. Mean ± sample std (min-max) over the runs; generated by "
             "`python studies/seeds.py report`, never typed.", ""]
    for model, outs in results.items():
        paper = PAPER.get(model)
        lines += [f"## {model}", "", "| figure | band | " + " | ".join(f"{n} (seed {o['seed']})" for n, o in zip(names, outs))
                  + " |" + (" Han et al. 2015 |" if paper else ""),
                  "|---|---|" + "---|" * len(outs) + ("---|" if paper else ""),
                  "| numeric mode (run.portable) | - | " + " | ".join(o["mode"] for o in outs) + " |" + (" - |" if paper else "")]
        ref = paper and {"pruned": paper["pruned_error"], "dense": paper["dense_error"], "compression": paper["compression"]}
        for label, key in FIGURES:
            values = [o[key] for o in outs]
            row = f"| {label} | {band(values)} | " + " | ".join(f"{v:.2f}" for v in values) + " |"
            if paper:
                row += f" {ref[key]:.2f} |" if key in ref else " - |"
            lines.append(row)
        verdicts = [(f"selection rule held (val. error within {100 * outs[0]['max_drop']:g} points of dense)",
                     [o["rule"] for o in outs])]
        budget = BUDGET.get(outs[0]["arch"])
        if budget is not None:
            verdicts.append((f"within the validation budget (selected round's val. error ≤ {budget:.2f}%, the paper's "
                             "pruned test error)", [within(budget, o["val_error"]) for o in outs]))
        for label, held in verdicts:
            lines.append(f"| {label} | {sum(held)} of {len(held)} | " + " | ".join("yes" if h else "**no**" for h in held)
                         + " |" + (" - |" if paper else ""))
        lines.append("")
    return "\n".join(lines)


def report(prefix: str, out: Path, only: list[str] | None, revs: list[str]):
    found = runs(prefix, revs[0])
    for rev in revs[1:]:  # experiments queued on other commits; the baseline is the first's
        found += runs(prefix, rev)[1:]
    # the models of every run (a model added since an experiment ran has no figures there)
    models = [m for m in found[0][2]["models"] if all(m in params["models"] for _, _, params in found)
              and (only is None or m in only)]
    results = {m: [outcome(rev, params, m) for _, rev, params in found] for m in models}
    io.write_text(out, render(results, [name for name, _, _ in found]))
    print(f"{out}: {len(found)} runs ({', '.join(n for n, _, _ in found)}) of {', '.join(models)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["queue", "report"])
    ap.add_argument("--prefix", default="seed-", help="experiments whose names start with this (report)")
    ap.add_argument("--models", nargs="+", help="re-seed (queue), and report, only these models (default: all); "
                                                "the others keep the committed run's results")
    ap.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE",
                    help="queue: one more -S setting for every seed, e.g. run.portable=false (the report shows "
                         "each run's numeric mode)")
    ap.add_argument("--out", default="reports/SEEDS.md")
    ap.add_argument("--rev", action="append", help="report: the commit the experiments were queued on, if "
                                                    "commits came since (repeat it for several; default HEAD)")
    args = ap.parse_args()
    queue(args.models, args.set) if args.action == "queue" else report(args.prefix, Path(args.out), args.models, args.rev or ["HEAD"])


if __name__ == "__main__":
    main()
