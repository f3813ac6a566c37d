"""Run a command (normally `dvc repro`) and measure every DVC stage it runs: wall time and peak
resident memory (RSS) of the stage's processes, sampled from /proc every 0.2 s (Linux), and, from
the command's output (passed through), each stage's training time (the seconds of the epoch lines
it prints after DVC's "Running stage '<stage>':") and the rest of its wall time, its fixed cost.

DVC puts DVC_STAGE=<stage> into the environment of each stage command, so a process belongs to
the stage named there. Writes benchmarks/stages.json; benchmarks/run.py folds it into results.json.

    python benchmarks/monitor.py --out benchmarks/stages.json -- dvc repro

Stages that DVC restored from its run-cache instead of running are not measured; time them with
`--add ... -- dvc repro -f -s <stage>...`, which adds their figures (and wall time) to the file.
"""
import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hanprune import io  # noqa: E402
from pipeline import epoch_seconds  # noqa: E402  (benchmarks/pipeline.py, beside this script)
from results import cpu_model  # noqa: E402

INTERVAL = 0.2
RUNNING = re.compile(r"Running stage '([^']+)':")


def children() -> dict[int, int]:
    """pid -> parent pid of every process."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            out[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    return out


def descendants(root: int) -> list[int]:
    parents = children()
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == pid]
        found += kids
        frontier += kids
    return found


def stage_and_rss(pid: int) -> tuple[str | None, int]:
    """(DVC_STAGE of the process or None, its RSS in bytes)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None, 0
    stage = next((e[len(b"DVC_STAGE="):].decode() for e in env if e.startswith(b"DVC_STAGE=")), None)
    rss = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return stage, rss


def pass_through(stream, training: dict[str, float]):
    """Copy the command's output to ours, adding up each stage's epoch seconds into `training`."""
    stage = None
    for line in stream:
        print(line, end="", flush=True)
        if m := RUNNING.match(line):
            stage = m[1]
            training[stage] = 0.0
        elif stage:
            training[stage] += epoch_seconds(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/stages.json", help="JSON to write")
    ap.add_argument("--add", action="store_true", help="add to the stages already in --out instead of replacing them")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, errors="replace")
    training: dict[str, float] = {}
    reader = threading.Thread(target=pass_through, args=(proc.stdout, training))
    reader.start()
    stages: dict[str, dict] = {}
    while proc.poll() is None:
        now = time.perf_counter() - start
        rss_by_stage: dict[str, int] = {}
        for pid in descendants(proc.pid):
            stage, rss = stage_and_rss(pid)
            if stage:
                rss_by_stage[stage] = rss_by_stage.get(stage, 0) + rss
        for stage, rss in rss_by_stage.items():
            s = stages.setdefault(stage, {"first_seen": now, "last_seen": now, "peak_rss_bytes": 0})
            s["last_seen"] = now
            s["peak_rss_bytes"] = max(s["peak_rss_bytes"], rss)
        time.sleep(INTERVAL)
    total = time.perf_counter() - start
    reader.join()
    result = {"command": " ".join(command), "cpu": cpu_model(), "returncode": proc.returncode, "wall_seconds": total,
              "stages": {name: {"seconds": s["last_seen"] - s["first_seen"] + INTERVAL,
                                "peak_rss_mb": s["peak_rss_bytes"] / 2 ** 20} for name, s in stages.items()}}
    for name, seconds in training.items():
        if name in result["stages"]:
            s = result["stages"][name]
            s.update(training_seconds=seconds, fixed_seconds=s["seconds"] - seconds)
    if args.add and Path(args.out).exists():
        before = json.loads(Path(args.out).read_text())
        result = {"command": f"{before['command']} + {result['command']}", "cpu": result["cpu"],
                  "returncode": before["returncode"] or result["returncode"],
                  "wall_seconds": before["wall_seconds"] + result["wall_seconds"],
                  "stages": {**before["stages"], **result["stages"]}}
    io.write_json(args.out, result)
    fixed = [s["fixed_seconds"] for s in result["stages"].values() if "fixed_seconds" in s]
    print(f"monitor: {len(stages)} stages in {total:.0f} s, peak RSS "
          f"{max((s['peak_rss_mb'] for s in result['stages'].values()), default=0):.0f} MB, largest fixed cost "
          f"{max(fixed, default=0):.1f} s -> {args.out}")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
