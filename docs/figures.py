"""The README's figures, made from the committed results, so that they cannot go stale.

    python docs/figures.py          # write the blocks between their markers in README.md
    python docs/figures.py --check  # exit 1 if README.md's blocks differ from the results (tests/test_docs.py)

Each block sits between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->`: `paper` (the paper
against this project, per model, from metrics/, metrics/select/ and hanprune/papers.yaml), `run`
(the committed run's wall time and stage count, from benchmarks/stages.json), `chain` (the first
look's stages and their time, from the same file), `records`, `rules` and `own` (each study's
selected points, and its wall time from benchmarks/<study>-stages.json), `metrics` and `exp` (what
`dvc metrics show` and `dvc exp show` print)."""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"lenet_300_100": "LeNet-300-100", "lenet5_caffe": "LeNet-5 (Caffe, the paper's)",
          "lenet5": "LeNet-5 (classic, the reference implementation's)"}


def _json(root: Path, path: str) -> dict:
    return json.loads((root / path).read_text())


def _papers(root: Path) -> dict:
    return yaml.safe_load((root / "hanprune" / "papers.yaml").read_text())


def _selected(s: dict) -> str:
    """The selected round of metrics/select/<model>.json, of how many, and whether the rule held."""
    return f"{s['round']} ({s['rounds']})" + ("" if s["held"] else ", none within the noise")


def paper_block(root: Path) -> str:
    papers = _papers(root)
    rows = ["| model | paper: params fewer, test error | this project: params fewer, test error | round (of) | "
            "file smaller, test error | budget held |",
            "|---|---|---|---|---|---|"]
    for key, name in MODELS.items():
        m, s = _json(root, f"metrics/{key}.json"), _json(root, f"metrics/select/{key}.json")
        han = papers["han2015"].get(key)
        paper = f"{han['compression']:g}x, {han['pruned_error']:.2f}%" if han else "not in the paper"
        error, budget = 100 * (1 - m["test_pruned"]), papers["budget"][key]
        rows.append(f"| {name} | {paper} | **{m['compression']:.1f}x, {error:.2f}%** | {_selected(s)} | "
                    f"{m['file_compression']:.1f}x, {100 * (1 - m['test_compressed']):.2f}% | "
                    f"{'yes' if m['compression'] >= 12 and error <= budget else 'no'}: >= 12x at <= {budget:g}% |")
    return "\n".join(rows)


def run_block(root: Path) -> str:
    run = _json(root, "benchmarks/stages.json")
    stages = run["stages"]
    fixed = max(s["fixed_seconds"] for s in stages.values() if s["training_seconds"] > 0)
    epochs = sum(s["training_seconds"] for s in stages.values()) / 60
    if " + " not in run["command"]:
        return (f"{len(stages)} stages in {run['wall_seconds'] / 60:.1f} min of wall-clock time "
                f"(`{run['command']}`, every stage run, {epochs:.1f} min of it in epochs; the largest fixed cost of a "
                f"training stage {fixed:.1f} s)")
    # monitor.py --add: later invocations re-ran some stages; each stage's figures are its last run's
    return (f"{len(stages)} stages whose own times sum to {sum(s['seconds'] for s in stages.values()) / 60:.1f} min "
            f"({epochs:.1f} min in epochs; the largest fixed cost of a training stage {fixed:.1f} s), measured over "
            f"`{run['command']}`: {run['wall_seconds'] / 60:.1f} min of wall-clock time in all, the first invocation "
            "running every stage and the next ones re-running what a params change made stale")


def chain_block(root: Path) -> str:
    """The README's first look: lenet_300_100's chain, from benchmarks/stages.json."""
    stages = _json(root, "benchmarks/stages.json")["stages"]
    chain = [s for name, s in stages.items() if name == "download" or name.split("@")[-1].split("-iter")[0] == "lenet_300_100"]
    rounds = sum(name.startswith("prune@lenet_300_100-iter") for name in stages)
    return (f"A first look, one model's chain (download, dense training, the sensitivity scan, {rounds} prune rounds, "
            f"weight sharing, the file, evaluation; its {len(chain)} stages took "
            f"{sum(s['seconds'] for s in chain) / 60:.1f} min together in the committed run, a sum of stage times from "
            "benchmarks/stages.json):")


def records_block(root: Path) -> str:
    """The records study (studies/records): each model's selected point against the issue's targets."""
    targets = _papers(root)["targets"]
    study = root / "studies" / "records"
    rows = ["| model | study: params fewer, test error | round (of), selection | file smaller, test error | target: params, file, "
            "test error | met |", "|---|---|---|---|---|---|"]
    for key in yaml.safe_load((study / "params.yaml").read_text())["models"]:
        m, s = _json(study, f"metrics/{key}.json"), _json(study, f"metrics/select/{key}.json")
        x, file_x, error = targets[key]
        test, file_test = 100 * (1 - m["test_pruned"]), 100 * (1 - m["test_compressed"])
        met = s["held"] and m["compression"] >= x and m["file_compression"] >= file_x and max(test, file_test) <= error
        rows.append(f"| {MODELS[key]} | **{m['compression']:.1f}x, {test:.2f}%** | {_selected(s)} | "
                    f"{m['file_compression']:.1f}x, {file_test:.2f}% | >= {x}x, >= {file_x}x, <= {error:.2f}% | "
                    f"{'yes' if met else 'no'} |")
    return "\n".join(rows) + "\n\n" + _study_time(root, "records")


def _study_time(root: Path, study: str) -> str:
    """A study's stages and their wall time; a measurement over several `dvc repro` calls (the first one, then
    `-f -s` for the stages it skipped) names the first and counts the rest: the file holds the whole command."""
    run = _json(root, f"benchmarks/{study}-stages.json")
    first, *more = run["command"].split(" + ")
    calls = (f"`{first}` and {len(more)} more `dvc repro -f -s` call{'s' * (len(more) > 1)} for the stages it skipped"
             if more and all(c.startswith("dvc repro -f -s ") for c in more) else f"`{run['command']}`")
    return (f"{calls}: {len(run['stages'])} stages in {run['wall_seconds'] / 60:.1f} min of wall-clock time "
            f"(benchmarks/{study}-stages.json).")


def _point(where: Path, key: str) -> str:
    """A study's selected point of one model: the round, its parameters and test error, its file."""
    m, s = _json(where, f"metrics/{key}.json"), _json(where, f"metrics/select/{key}.json")
    return (f"{_selected(s)} | **{m['compression']:.1f}x, {100 * (1 - m['test_pruned']):.2f}%** | "
            f"{m['file_compression']:.1f}x, {100 * (1 - m['test_compressed']):.2f}% | {100 * (1 - m['test_dense']):.2f}%")


HEADER = "round (of), selection | params fewer, test error | file smaller, test error | dense test error |"


def rules_block(root: Path) -> str:
    """The rule comparison (studies/rules): each model and rule's selected round; lenet_300_100's std
    rounds are the paper's run's."""
    study = root / "studies" / "rules"
    params = yaml.safe_load((study / "params.yaml").read_text())
    rows = [f"| model | rule | {HEADER}", "|---|---|---|---|---|---|",
            f"| {MODELS['lenet_300_100']} | std (the paper's run) | {_point(root, 'lenet_300_100')} |"]
    for key, model in params["models"].items():
        rule = next(r["rule"] for r in params["prune"].values() if r["model"] == key)
        rows.append(f"| {MODELS[model['arch']]} | {rule} | {_point(study, key)} |")
    return "\n".join(rows) + "\n\n" + _study_time(root, "rules")


def own_block(root: Path) -> str:
    """The own-model example (studies/own-model): its model's selected round, and the study's time."""
    study = root / "studies" / "own-model"
    params = yaml.safe_load((study / "params.yaml").read_text())
    rows = [f"| model | {HEADER}", "|---|---|---|---|---|"]
    rows += [f"| {key} (`{m['arch']}`) | {_point(study, key)} |" for key, m in params["models"].items()]
    return "\n".join(rows) + "\n\n" + _study_time(root, "own-model")


def _dvc(root: Path, *args: str) -> str:
    """What `dvc <args>` prints on the committed state (DVC from this Python's environment), as a sample."""
    dvc = Path(sys.executable).parent / "dvc"
    out = subprocess.run([str(dvc) if dvc.exists() else "dvc", *args], cwd=root, capture_output=True, text=True,
                         check=True).stdout
    shown = " ".join(a if re.fullmatch(r"[\w./-]+", a) else f"'{a}'" for a in args)
    return f"```text\n$ dvc {shown}\n" + out.rstrip() + "\n```"


def metrics_block(root: Path) -> str:
    return _dvc(root, "metrics", "show")


EXP_COLUMNS = r"Experiment|metrics/[^/]+:(compression|test_pruned)"


def exp_block(root: Path) -> str:
    """`dvc exp show`, the headline columns of the paper's run: one row per experiment after `dvc exp run`."""
    return _dvc(root, "exp", "show", "--md", "--drop", ".*", "--keep", EXP_COLUMNS)


BLOCKS = {"paper": paper_block, "run": run_block, "chain": chain_block, "records": records_block,
          "rules": rules_block, "own": own_block, "metrics": metrics_block, "exp": exp_block}


def render(text: str, root: Path = ROOT, blocks=BLOCKS) -> str:
    for name, make in blocks.items():
        pattern = re.compile(rf"(<!-- figures:{name} -->\n).*?(<!-- /figures:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md: no <!-- figures:{name} --> ... <!-- /figures:{name} --> block")
        text = pattern.sub(lambda m: m[1] + make(root) + "\n" + m[2], text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md is not what the results give")
    args = ap.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    made = render(text)
    if args.check:
        if made != text:
            sys.exit("README.md's figures differ from the committed results: run python docs/figures.py")
        return
    readme.write_text(made)


if __name__ == "__main__":
    main()
