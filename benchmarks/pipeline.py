"""Run every stage of dvc.yaml without DVC, in dependency order, in a working directory of its own:
for a machine that has torch but no DVC (the GPU check, benchmarks/gpu_check.sh). Each stage's
command is dvc.yaml's, with `foreach` expanded and `${...}` filled in from the params file, and
its stage scripts taken from this checkout. Times every stage (wall time, and its training time:
the seconds of the epoch lines it prints; the rest is its fixed cost) and writes them as JSON.

    python benchmarks/pipeline.py --workdir /tmp/run --params my-params.yaml --out timings.json

DVC remains the way to run the pipeline: this runs every stage every time, caches nothing and
checks no hashes.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EPOCH_LINE = re.compile(r" epoch \d+: .*\((\d+\.\d+) s\)$")  # stages/common.py epoch_logger


def epoch_seconds(line: str) -> float:
    """The seconds of an epoch line a stage prints, else 0."""
    m = EPOCH_LINE.search(line.rstrip("\n"))
    return float(m[1]) if m else 0.0


def lookup(context: dict, dotted: str):
    value = context
    for part in dotted.split("."):
        value = value[part]
    return value


def fill(text: str, context: dict) -> str:
    return re.sub(r"\$\{([^}]+)\}", lambda m: str(lookup(context, m.group(1).strip())), text)


def paths(entries) -> list[str]:
    """Paths of a deps/outs/metrics/plots list, whose entries are strings or {path: options}."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def stages(dvc_yaml: dict, params: dict) -> list[dict]:
    """Every stage, foreach expanded: name, cmd, deps, outs (all resolved), in dvc.yaml's order."""
    out = []
    for name, spec in dvc_yaml["stages"].items():
        if "foreach" in spec:
            items = lookup(params, spec["foreach"].strip()[2:-1])
            runs = [(f"{name}@{key}", {**params, "key": key, "item": item}, spec["do"]) for key, item in items.items()]
        else:
            runs = [(name, params, spec)]
        for stage, context, body in runs:
            produced = paths(body.get("outs")) + paths(body.get("metrics")) + paths(body.get("plots"))
            out.append({"name": stage, "cmd": " ".join(fill(body["cmd"], context).split()),
                        "deps": [fill(d, context) for d in paths(body.get("deps"))],
                        "outs": [fill(o, context) for o in produced]})
    return out


def inside(a: str, b: str) -> bool:
    """Whether path a is b or lies under it (or the reverse)."""
    a, b = Path(a).parts, Path(b).parts
    return a[:len(b)] == b or b[:len(a)] == a


def in_order(all_stages: list[dict]) -> list[dict]:
    """A topological order (a stage after every stage whose outputs it depends on), otherwise
    dvc.yaml's order."""
    done, ordered, left = set(), [], list(all_stages)
    while left:
        for s in left:
            needs = {o["name"] for o in all_stages if o is not s and any(inside(d, x) for d in s["deps"] for x in o["outs"])}
            if needs <= done:
                break
        else:
            raise SystemExit(f"pipeline: dependency cycle among {[s['name'] for s in left]}")
        left.remove(s)
        ordered.append(s)
        done.add(s["name"])
    return ordered


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="directory to run in (outputs land here)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="params file (copied into the workdir)")
    ap.add_argument("--out", help="JSON file for the timings (default: WORKDIR/timings.json)")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    params_text = Path(args.params).read_text()
    (work / "params.yaml").write_text(params_text)
    order = in_order(stages(yaml.safe_load((ROOT / "dvc.yaml").read_text()), yaml.safe_load(params_text)))
    out = Path(args.out or work / "timings.json")
    start, seconds, training = time.perf_counter(), {}, {}
    for s in order:
        cmd = s["cmd"].replace("python stages/", f"{sys.executable} {ROOT}/stages/", 1)
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, shell=True, cwd=work, env={**os.environ, "DVC_STAGE": s["name"]},
                                stdout=subprocess.PIPE, text=True, errors="replace")
        training[s["name"]] = 0.0
        for line in proc.stdout:
            print(line, end="", flush=True)
            training[s["name"]] += epoch_seconds(line)
        proc.wait()
        seconds[s["name"]] = time.perf_counter() - t
        print(f"pipeline: {s['name']} {seconds[s['name']]:.1f} s", flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"pipeline: stage {s['name']} failed (exit {proc.returncode})")
        write_timings(out, seconds, training, time.perf_counter() - start, len(order))
    print(f"pipeline: {len(order)} stages in {time.perf_counter() - start:.0f} s -> {out}")


def write_timings(out: Path, seconds: dict, training: dict, total: float, stages: int):
    """The timings so far (after every stage, so that a run cut short keeps what it measured)."""
    out.write_text(json.dumps({"seconds": total, "complete": len(seconds) == stages, "stages": {
        name: {"seconds": sec, "training_seconds": training[name], "fixed_seconds": sec - training[name]}
        for name, sec in seconds.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
