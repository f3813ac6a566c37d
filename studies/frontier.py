"""The compression frontier: test error against parameter and file compression for every
configuration tried, one point per configuration of a model, from the committed run, every older commit
that changed a committed result, and the finished DVC experiments of these commits and of any other that
has some here (a sweep made before its best point was committed); reports/FRONTIER.md and
reports/frontier/<arch>.png. Run it at the project root.

    dvc exp run --queue -S 'prune.lenet_300_100_global-iter9.q=0.977,0.979'   # a sweep: any -S grid
    dvc queue start -j 1                                                  # 2 cores: one at a time
    python studies/frontier.py                                         # the frontier of all of them

A point is a model's selected round (stage select, validation only). Per architecture, the point
chosen is the most compressed that the selection rule holds (hanprune/selection.py): both its selected
round's and its weight-shared model's (the file's) validation accuracy within `noise` standard errors of
the dense model's (the run's models.<model>.select.noise; 2 for a run from before the rule). The test
set is only reported, against the targets (hanprune/papers.yaml).
"""
import argparse
import csv
import io as _io
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hanprune import io  # noqa: E402
from hanprune.report import PAPERS  # noqa: E402
from hanprune.selection import tolerance  # noqa: E402
from studies.seeds import git, git_file, meets, runs  # noqa: E402

TARGETS = PAPERS["targets"]  # parameter compression, file compression, test error (%)
# Published points: (label, parameter compression, file compression or None, test error %).
PUBLISHED = {arch: [tuple(point) for point in points] for arch, points in PAPERS["records"].items()}


def every_run() -> list[tuple[str, str, dict]]:
    """The committed run (HEAD) and its experiments, then every older commit that has experiments here
    (`dvc exp list -A`: a sweep made before its best point was committed) or, since this script came,
    changed a committed result (`git log` of the metrics folders: the same in every clone), and their
    experiments, newest commit first (points() keeps the first run of a configuration: the newest code's)."""
    listed = subprocess.run(["dvc", "exp", "list", "-A"], capture_output=True, text=True, check=True).stdout
    bases = {git("rev-parse", line[:-1]) for line in listed.splitlines() if line.endswith(":") and not line[0].isspace()}
    came = git("log", "--diff-filter=A", "--format=%H", "--", "studies/frontier.py").split()[-1]
    results = git("log", "--format=%H", f"{came}^..HEAD", "--", "metrics", *(f"{folder}metrics" for folder in STUDIES)).split()
    older = (bases | set(results)) - {git("rev-parse", "HEAD")}
    found = runs("")
    for sha in git("log", "--no-walk", "--format=%H", *older).split() if older else []:
        if sha in bases:
            found += [(f"commit {sha[:7]}" if name == "baseline" else name, rev, params) for name, rev, params in runs("", sha)]
        else:
            found.append((f"commit {sha[:7]}", sha, yaml.safe_load(git_file(sha, "params.yaml"))))
    return found


def configuration(params: dict, model: str) -> str:
    """What a model's results depend on: its entry, its rounds, the data and the scan's grids."""
    rounds = sorted((k, it) for k, it in params["prune"].items() if it["model"] == model)
    return json.dumps([params["models"][model], rounds, params["data"], params["run"], params.get("sensitivity")],
                      sort_keys=True)


STUDIES = ["studies/records/", "studies/rules/"]  # pipelines beside the paper's run, each with its params.yaml, metrics/ and plots/


def pipelines(rev: str, params: dict) -> list[tuple[str, dict]]:
    """(folder, params) of the paper's run ("") and of each study a run's commit holds."""
    found = [("", params)]
    for folder in STUDIES:
        try:
            found.append((folder, yaml.safe_load(git_file(rev, f"{folder}params.yaml"))))
        except subprocess.CalledProcessError:  # a commit from before the study
            pass
    return found


def _flat(d: dict, prefix: str = "") -> dict:
    return {k2: v2 for k, v in d.items()
            for k2, v2 in (_flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(f"{prefix}{k}", v)])}


def changed(params: dict, base: dict, model: str) -> str:
    """What a run set otherwise than the baseline for a model: its entry's and its rounds' values. A
    round the run does not have is named once ("no iter3"), and a value that became a mapping (a q per
    layer) or back is given by the run's keys only."""
    def mine(p):
        rounds = {k.removeprefix(f"{model}-"): it for k, it in p["prune"].items() if it["model"] == model}
        return {**p["models"][model], **rounds}
    now, then = mine(params), mine(base)
    gone = sorted(then.keys() - now.keys())
    now, then = _flat(now), _flat({k: v for k, v in then.items() if k not in gone})
    reshaped = {k for k in then.keys() - now.keys() if any(n.startswith(f"{k}.") or k.startswith(f"{n}.") for n in now)}
    return ", ".join([f"{k}={now.get(k)}" for k in sorted((now.keys() | then.keys()) - reshaped) if now.get(k) != then.get(k)]
                     + [f"no {k}" for k in gone]) or "-"


def points(found: list[tuple[str, str, dict]]) -> list[dict]:
    """One point per configuration of a model of the architectures above (an experiment that left a
    model as it was, or did not run its stages, repeats a result: counted once, under the first run
    that has it): its
    selected round's figures, and every round's (plots/<model>/final/rounds.csv: parameters only,
    as only the selected round is quantized and encoded)."""
    out, seen = [], set()
    base = dict(pipelines(found[0][1], found[0][2]))
    for name, rev, run_params in found:
        for folder, params in pipelines(rev, run_params):
            for model, cfg in params["models"].items():
                key = (folder, model, configuration(params, model))
                if cfg["arch"] not in TARGETS or key in seen:
                    continue
                seen.add(key)
                try:
                    point = _point(name, rev, folder, params, model, cfg, base.get(folder, params))
                except subprocess.CalledProcessError:  # a study not yet run at that commit
                    continue
                # an experiment that ran other stages only (dvc exp run <stage>) holds its baseline's results
                result = (folder, model, *(point[k] for k in ("compression", "file_compression", "val_error",
                                                              "file_val_error", "test_error", "file_test_error")))
                if result not in seen:
                    seen.add(result)
                    out.append(point)
    return out


def _point(name: str, rev: str, folder: str, params: dict, model: str, cfg: dict, base: dict) -> dict:
    m = json.loads(git_file(rev, f"{folder}metrics/{model}.json"))
    s = json.loads(git_file(rev, f"{folder}metrics/select/{model}.json"))
    q = json.loads(git_file(rev, f"{folder}metrics/quantize/{model}.json"))
    rounds = list(csv.DictReader(_io.StringIO(git_file(rev, f"{folder}plots/{model}/final/rounds.csv"))))
    rule = next(it["rule"] + (" gradual" if it.get("gradual") else "")
                for it in params["prune"].values() if it["model"] == model)
    noise = s.get("noise") or (cfg.get("select") or {}).get("noise") or 2.0
    return {"run": name, "model": f"{folder}{model}", "arch": cfg["arch"], "rule": rule, "round": s["round"],
            "changed": changed(params, base, model) if model in base["models"] else "-",
            "compression": m["compression"], "file_compression": m["file_compression"],
            "val_error": 100 * (1 - s["val"]), "file_val_error": 100 * (1 - q["val_finetuned"]),
            "dense_val_error": 100 * (1 - s["val_dense"]),
            "tolerance": 100 * tolerance(s["val_dense"], params["data"].get("val_size", 5000), noise),
            "test_error": 100 * (1 - m["test_pruned"]),
            "file_test_error": 100 * (1 - m["test_compressed"]),
            "rounds": [(float(r["compression"]), 100 * (1 - float(r["test_accuracy"]))) for r in rounds]}


def held(p: dict) -> bool:
    """Whether the selection rule holds a point: its selected round's and its weight-shared model's
    validation error at most its tolerance (points, %) above the dense model's."""
    return max(p["val_error"], p["file_val_error"]) - p["dense_val_error"] <= p["tolerance"] + 1e-9


def chosen(arch_points: list[dict]) -> dict | None:
    """The most compressed point (parameters, then file) that the selection rule holds, for the
    selected round and for the weight-shared model the file holds (validation only)."""
    held_points = [p for p in arch_points if held(p)]
    return max(held_points, key=lambda p: (p["compression"], p["file_compression"])) if held_points else None


def figure(arch: str, pts: list[dict], best: dict | None, out: Path) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rules = sorted({p["rule"] for p in pts})
    colors = {name: f"C{i}" for i, name in enumerate(rules + [n for n, *_ in PUBLISHED.get(arch, [])])}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, error, label in [(axes[0], "compression", "test_error", "parameter compression"),
                                  (axes[1], "file_compression", "file_test_error", "file compression")]:
        for rule in rules:  # the same colour for a rule, or a paper, in both panels
            mine = [p for p in pts if p["rule"] == rule]
            ax.plot([p[key] for p in mine], [p[error] for p in mine], "o", color=colors[rule],
                    label=f"this project, rule {rule} (selected round)")
            if key == "compression":  # every round of each configuration, before weight sharing
                for p in mine:
                    ax.plot(*zip(*p["rounds"]), ".-", color=colors[rule], alpha=0.35, linewidth=0.8,
                            label=f"rule {rule}, every round" if p is mine[0] else None)
        if best:
            ax.plot(best[key], best[error], "o", markersize=13, markerfacecolor="none", color="black",
                    label="chosen on validation")
        for name, params_x, file_x, err in PUBLISHED.get(arch, []):
            x = params_x if key == "compression" else file_x
            ax.plot([] if x is None else [x], [] if x is None else [err], "*", markersize=12, color=colors[name],
                    label=name)
        ax.axhline(TARGETS[arch][2], color="gray", linestyle=":", label=f"target test error {TARGETS[arch][2]:.2f}%")
        ax.set_xscale("log"), ax.set_xlabel(f"{label} (log scale)"), ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x" if v in (2, 3, 5, 20, 30, 50, 200, 300) else ""))
    axes[0].set_ylabel("test error (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, frameon=False)
    fig.suptitle(f"{arch}: every configuration tried")
    with io.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return out.name


def render(pts: list[dict], names: list[str], figures: dict[str, str]) -> str:
    lines = ["# The compression frontier", "",
             f"Every configuration tried: {len(names)} run(s) ({', '.join(names)}), one point per configuration of a "
             "model (a run that left a model as it was is not counted again), its round selected on validation; the "
             "figures also draw every round of each. Generated by `python studies/frontier.py` from the committed "
             "run, every older commit that changed a committed result (named `commit <sha>`) and the finished DVC "
             "experiments of these commits and of any other that has some here, never typed. "
             "Errors in %; \"file\": the weight-shared model the compressed file holds, as the run's own commit "
             "wrote it (its format version then: before 4, codebooks and biases took float32; before 5, the codebooks "
             "kept unused entries, the codes had a table and no gaps a Rice code).", ""]
    for arch in TARGETS:
        mine = sorted((p for p in pts if p["arch"] == arch), key=lambda p: p["compression"])
        if not mine:
            continue
        best = chosen(mine)
        params_x, file_x, error = TARGETS[arch]
        lines += [f"## {arch}", "", "Chosen: the most compressed point that the selection rule holds (its selected round's "
                  "and its file's validation error at most `noise` standard errors above the dense model's: the "
                  f"tolerance column). Target: ≥ {params_x}x parameters, ≥ {file_x}x file, test error ≤ {error:.2f}%.", ""]
        if best:
            met = meets(TARGETS[arch], best["compression"], best["file_compression"], best["test_error"],
                        best["file_test_error"])
            lines += [f"Chosen (validation): `{best['model']}` of {best['run']}, {best['compression']:.1f}x parameters, "
                      f"{best['file_compression']:.1f}x file, test error {best['test_error']:.2f}% (file "
                      f"{best['file_test_error']:.2f}%). Target **{'met' if met else 'not met'}**.", ""]
        else:
            lines += ["No configuration is held by the selection rule.", ""]
        body = [[p["run"], f"`{p['model']}`", p["changed"], p["rule"], p["round"], f"{p['compression']:.2f}", f"{p['file_compression']:.1f}",
                 f"{p['dense_val_error']:.2f} + {p['tolerance']:.2f}", f"{p['val_error']:.2f}", f"{p['file_val_error']:.2f}",
                 "yes" if held(p) else "no", f"{p['test_error']:.2f}",
                 f"{p['file_test_error']:.2f}",
                 "**chosen**" if p is best else ""] for p in mine]
        lines += [tabulate(body, headers=["run", "model", "set otherwise than the baseline", "rule", "round", "params x", "file x",
                                          "dense val error + tolerance", "val error", "file val error", "held",
                                          "test error", "file test error", ""], tablefmt="github"), "",
                  f"![{arch} frontier](frontier/{figures[arch]})", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reports/FRONTIER.md")
    ap.add_argument("--skip", default=r"([\w.-]+-)?seed-\d+$", help="leave out the experiments whose names match "
                    "this regular expression (the seed bands': seed-k, <study>-seed-k; reports/SEEDS*.md)")
    args = ap.parse_args()
    out = Path(args.out)
    found = [run for run in every_run() if not (args.skip and re.match(args.skip, run[0]))]
    pts = points(found)
    figures = {}
    for arch in TARGETS:
        mine = [p for p in pts if p["arch"] == arch]
        if mine:
            figures[arch] = figure(arch, mine, chosen(mine), out.parent / "frontier" / f"{arch}.png")
    io.write_text(out, render(pts, [name for name, _, _ in found], figures))
    print(f"{out}: {len(pts)} points from {len(found)} run(s)")


if __name__ == "__main__":
    main()
