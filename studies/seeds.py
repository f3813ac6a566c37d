"""The seed band: the whole pipeline with 5 seeds per model, as DVC experiments, summarised in
reports/SEEDS.md from the experiments' results. Run it at the project root.

    python studies/seeds.py queue     # queues seed-1 .. seed-4 (seed 0 is the committed run);
                                      # --set run.portable=false: in the fast mode (about 4x faster)
    dvc queue start -j 1                 # runs them one after another (2 cores: never two at once)
    python studies/seeds.py report    # reports/SEEDS.md from the baseline and the seed-* experiments

Seed k sets every model's pretrain, retrain and fine-tune seeds to 10k, 10k+1 and 10k+2 (the
committed params hold 0, 1, 2). The validation split (data.val_seed) and every schedule stay.
`--models m1 m2` re-seeds, and reports, only those models: each experiment re-runs only their stages.

`--study studies/records` does the same for a study's pipeline (its params.yaml, its dvc.yaml only;
with --models, only those models' stages; --set names the study's params): experiments
<study>-seed-1 .. 4, reports/SEEDS-<study>.md. A study's model that starts from the paper's run's
dense checkpoint has no pretrain: its band is over the retrain and fine-tune seeds.
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
# Error budget (%) per architecture: the paper's pruned test error (hanprune/papers.yaml).
BUDGET = PAPERS["budget"]
# The records study's targets per architecture: parameter and file compression, test error (%).
TARGETS = PAPERS["targets"]


def within(budget: float, *errors: float) -> bool:
    """Whether every error (%) is within the budget (errors are counts over a split: one met exactly
    holds despite float rounding)."""
    return max(errors) <= budget + 1e-9


def meets(target: list[float], compression: float, file_compression: float, *errors: float) -> bool:
    """Whether a point meets a records target (parameter and file compression, test error %)."""
    x, file_x, error = target
    return compression >= x and file_compression >= file_x and within(error, *errors)
FIGURES = [("dense test error (%)", "dense"), ("pruned test error (%)", "pruned"),
           ("compressed test error (%)", "compressed"), ("compression (x)", "compression"),
           ("compressed file (x)", "file_compression"), ("selected round's validation error (%)", "val_error")]


def seed_params(k: int, models: dict, params_file: str = "") -> list[str]:
    """The -S settings of seed k for `models` (name: entry); params_file prefixes them for a study's params.yaml."""
    prefix = f"{params_file}:" if params_file else ""
    return [f"{prefix}models.{m}.{block}={10 * k + offset}" for m, entry in models.items()
            for offset, block in enumerate(["pretrain.seed", "retrain.seed", "quantize.finetune.seed"])
            if block != "pretrain.seed" or "pretrain" in entry]


def prefix_of(study: str) -> str:
    """The experiments' names: seed-k for the paper's run, <study>-seed-k for studies/<study>/."""
    return f"{Path(study).name}-seed-" if study else "seed-"


def queue(only: list[str] | None, settings: list[str], study: str = ""):
    params_file = f"{study}params.yaml"
    models = yaml.safe_load(Path(params_file).read_text())["models"]
    unknown = sorted(set(only or []) - set(models))
    if unknown:
        sys.exit(f"--models: {', '.join(unknown)} not in {params_file} models (there: {', '.join(models)})")
    models = {m: e for m, e in models.items() if only is None or m in only}
    name = prefix_of(study)
    # a study's pipeline alone; with --models, only their chains (--set run... would re-run the others too)
    targets = ([f"{study}dvc.yaml:evaluate@{m}" for m in models] if only else [f"{study}dvc.yaml"]) if study else []
    for k in SEEDS:
        cmd = ["dvc", "exp", "run", "--queue", "-n", f"{name}{k}"] + targets
        for setting in seed_params(k, models, params_file if study else "") + [
                f"{params_file}:{s}" if study and ":" not in s.split("=")[0] else s for s in settings]:
            cmd += ["-S", setting]
        subprocess.run(cmd, check=True)
    print(f"queued {name}{SEEDS[0]} .. {name}{SEEDS[-1]}; run them with `dvc queue start -j 1`")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()


def git_file(rev: str, path: str) -> str:
    return git("show", f"{rev}:{path}")


def outcome(rev: str, params: dict, model: str, study: str = "") -> dict:
    """One pipeline run's figures for one model, read from its commit (study: the study's folder)."""
    m = json.loads(git_file(rev, f"{study}metrics/{model}.json"))
    selected = json.loads(git_file(rev, f"{study}metrics/select/{model}.json"))  # the select stage's verdict
    entry = params["models"][model]
    return {"dense": 100 * (1 - m["test_dense"]), "pruned": 100 * (1 - m["test_pruned"]),
            "compressed": 100 * (1 - m["test_compressed"]), "compression": m["compression"],
            "file_compression": m["file_compression"], "val_error": 100 * (1 - selected["val"]),
            "rule": selected["held"], "noise": selected["noise"], "max_drop": selected["max_drop"],
            "mode": "portable" if params["run"]["portable"] else "fast",
            "seed": entry["pretrain" if "pretrain" in entry else "retrain"]["seed"], "arch": entry["arch"]}


def runs(prefix: str, rev: str = "HEAD", params_file: str = "params.yaml") -> list[tuple[str, str, dict]]:
    """(name, commit, params: params_file's) of the baseline commit rev and its finished experiments
    named <prefix>* (a queued or running experiment's commit holds the baseline's results)."""
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json", "--rev", rev], capture_output=True, text=True,
                                      check=True).stdout)
    base = next(row for row in shown if row["rev"] != "workspace")
    found = [("baseline", base["rev"], base["data"]["params"][params_file]["data"])]
    for exp in base.get("experiments") or []:
        rev, state = exp["revs"][0], (exp.get("executor") or {}).get("state", "success")
        if (rev.get("name") or "").startswith(prefix) and state == "success":
            found.append((rev["name"], rev["rev"], rev["data"]["params"][params_file]["data"]))
    return found


def band(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f} ({min(values):.2f}-{max(values):.2f})"


def render(results: dict[str, list[dict]], names: list[str], study: str = "", commits: list[str] = (),
           only: list[str] | None = None) -> str:
    """commits: those the experiments were queued on, as `report --rev` names them (none: HEAD);
    only: the models re-seeded (--models; none: all)."""
    option = (f" --study {study.rstrip('/')}" if study else "") + (f" --models {' '.join(only)}" if only else "")
    revs = "".join(f" --rev {c}" for c in commits)
    lines = [f"# The seed band{f' of {study.rstrip(chr(47))}' if study else ''}", "",
             f"Each model below run {len(names)} times: the committed run (baseline) and "
             + ", ".join(names[1:]) + ", which change its "
             + ("retrain and fine-tune seeds (a model that starts from the paper's run's dense checkpoint keeps it) "
                if study else "pretrain, retrain and fine-tune seeds ")
             + f"(`python studies/seeds.py queue{option}`, `dvc queue start -j 1`) and nothing else but the numeric mode "
             "where the table's row says so. Validation split and schedules "
             "are the committed ones. Mean ± sample std (min-max) over the runs; generated by "
             f"`python studies/seeds.py report{option}{revs}`, never typed.", ""]
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
        first = outs[0]  # select.noise, or a fixed select.max_drop in its place
        tolerance = (f"{first['noise']:g} standard errors" if first["noise"] is not None
                     else f"{100 * first['max_drop']:.2f} points")
        verdicts = [(f"selection rule held (val. accuracy at most {tolerance} below the dense model's)",
                     [o["rule"] for o in outs])]
        budget = BUDGET.get(first["arch"])
        if budget is not None:
            verdicts += [(f"pruned test error ≤ {budget:.2f}%, the error budget (reported, never selects)",
                          [within(budget, o["pruned"]) for o in outs]),
                         (f"within the old validation budget (selected round's val. error ≤ {budget:.2f}%)",
                          [within(budget, o["val_error"]) for o in outs])]
        target = TARGETS.get(first["arch"]) if Path(study).name == "records" else None
        if target is not None:
            verdicts.append((f"records target met (rule held, ≥ {target[0]}x parameters, ≥ {target[1]}x file, pruned "
                             f"and file test error ≤ {target[2]:.2f}%; reported, never selects)",
                             [o["rule"] and meets(target, o["compression"], o["file_compression"], o["pruned"],
                                                  o["compressed"]) for o in outs]))
        for label, held in verdicts:
            lines.append(f"| {label} | {sum(held)} of {len(held)} | " + " | ".join("yes" if h else "**no**" for h in held)
                         + " |" + (" - |" if paper else ""))
        lines.append("")
    return "\n".join(lines)


def report(prefix: str, out: Path, only: list[str] | None, revs: list[str], study: str = ""):
    found = runs(prefix, revs[0], f"{study}params.yaml")
    for rev in revs[1:]:  # experiments queued on other commits; the baseline is the first's
        found += runs(prefix, rev, f"{study}params.yaml")[1:]
    found[1:] = sorted(found[1:])
    # the models of every run (a model added since an experiment ran has no figures there)
    models = [m for m in found[0][2]["models"] if all(m in params["models"] for _, _, params in found)
              and (only is None or m in only)]
    results = {m: [outcome(rev, params, m, study) for _, rev, params in found] for m in models}
    commits = [git("rev-parse", "--short", rev) for rev in revs] if revs != ["HEAD"] else []
    io.write_text(out, render(results, [name for name, _, _ in found], study, commits, only))
    print(f"{out}: {len(found)} runs ({', '.join(n for n, _, _ in found)}) of {', '.join(models)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["queue", "report"])
    ap.add_argument("--study", default="", help="a study's folder, e.g. studies/records (default: the paper's run)")
    ap.add_argument("--prefix", help="experiments whose names start with this (report; default seed-, or <study>-seed-)")
    ap.add_argument("--models", nargs="+", help="re-seed (queue), and report, only these models (default: all); "
                                                "the others keep the committed run's results")
    ap.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE",
                    help="queue: one more -S setting for every seed, e.g. run.portable=false (the report shows "
                         "each run's numeric mode)")
    ap.add_argument("--out", help="default reports/SEEDS.md, or reports/SEEDS-<study>.md")
    ap.add_argument("--rev", action="append", help="report: the commit the experiments were queued on, if "
                                                    "commits came since (repeat it for several; default HEAD)")
    args = ap.parse_args()
    study = f"{args.study.rstrip('/')}/" if args.study else ""
    if study and not Path(f"{study}dvc.yaml").is_file():
        sys.exit(f"--study: {args.study} has no dvc.yaml; allowed: a study's folder, e.g. studies/records")
    if args.action == "queue":
        queue(args.models, args.set, study)
    else:
        out = Path(args.out or (f"reports/SEEDS-{Path(study).name}.md" if study else "reports/SEEDS.md"))
        report(args.prefix or prefix_of(study), out, args.models, args.rev or ["HEAD"], study)


if __name__ == "__main__":
    main()
