"""Run every stage of the pipeline without DVC, in dependency order, in a working directory of its
own: for a machine that has torch but no DVC (the GPU check, benchmarks/gpu_check.sh). The stages
and their commands are those DVC resolved and wrote into dvc.lock (`foreach` expanded, `${...}`
filled in), so they are the committed run's: a change to dvc.yaml or to the params that name stages
or fill their commands needs `dvc repro` first. The params file given is the one the stages read;
their scripts are this checkout's. Times every stage (wall time, and from the stage itself its
training time: the seconds of the epoch lines it prints; the rest is its fixed cost) and writes them
as JSON.

    python benchmarks/pipeline.py --workdir /tmp/run --params my-params.yaml --out timings.json

DVC remains the way to run the pipeline: this runs every stage every time, caches nothing and
checks no hashes.
"""
import argparse
import graphlib
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


def inside(a: str, b: str) -> bool:
    """Whether path a is b or lies under it (or the reverse)."""
    a, b = Path(a).parts, Path(b).parts
    return a[:len(b)] == b or b[:len(a)] == a


def in_order(lock: dict) -> list[tuple[str, str]]:
    """(name, cmd) of every stage of dvc.lock, each after the stages whose outputs it depends on
    (DVC appends a new stage to dvc.lock, so its own order need not be one)."""
    stages = lock["stages"]
    outs = {name: [o["path"] for o in s.get("outs", [])] for name, s in stages.items()}
    needs = {name: [other for other in stages if other != name and any(  # a list, in dvc.lock's order: one order every run
        inside(d["path"], o) for d in s.get("deps", []) for o in outs[other])] for name, s in stages.items()}
    try:
        return [(name, stages[name]["cmd"]) for name in graphlib.TopologicalSorter(needs).static_order()]
    except graphlib.CycleError as e:
        raise SystemExit(f"pipeline: dependency cycle among {e.args[1]}") from None


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
    order = in_order(yaml.safe_load((ROOT / "dvc.lock").read_text()))
    out = Path(args.out or work / "timings.json")
    start, seconds, training = time.perf_counter(), {}, {}
    for name, cmd in order:
        cmd = cmd.replace("python stages/", f"{sys.executable} {ROOT}/stages/", 1)
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, shell=True, cwd=work, env={**os.environ, "DVC_STAGE": name},
                                stdout=subprocess.PIPE, text=True, errors="replace")
        training[name] = 0.0
        for line in proc.stdout:
            print(line, end="", flush=True)
            training[name] += epoch_seconds(line)
        proc.wait()
        seconds[name] = time.perf_counter() - t
        print(f"pipeline: {name} {seconds[name]:.1f} s", flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"pipeline: stage {name} failed (exit {proc.returncode})")
        write_timings(out, seconds, training, time.perf_counter() - start, len(order))
    print(f"pipeline: {len(order)} stages in {time.perf_counter() - start:.0f} s -> {out}")


def write_timings(out: Path, seconds: dict, training: dict, total: float, stages: int):
    """The timings so far (after every stage, so that a run cut short keeps what it measured)."""
    out.write_text(json.dumps({"seconds": total, "complete": len(seconds) == stages, "stages": {
        name: {"seconds": sec, "training_seconds": training[name], "fixed_seconds": sec - training[name]}
        for name, sec in seconds.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
