"""The numerics probe (tests/numerics_probe.py) and the step timer (benchmarks/steps.py) under each
numeric configuration, on this CPU; the md5s compared with every CPU's file in benchmarks/numerics/.

    python benchmarks/numerics.py            # run every configuration, write numerics/<this cpu>.json
    python benchmarks/numerics.py --compare  # only the comparison of the files already there

A configuration is the environment given to a fresh process (ATen's, MKL's and oneDNN's settings are
read when torch loads) and whether oneDNN is on. The configurations are those of the files already in
benchmarks/numerics/ (the first was measured on an Intel Xeon, Emerald Rapids), so every CPU's file
answers the same questions. The one the portable mode uses (hanprune/runtime.py) qualifies only if
its 6 md5s are equal in every file."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
DIR = ROOT / "benchmarks" / "numerics"
MODELS = ("lenet_300_100", "lenet5", "lenet5_caffe")
CLEAR = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "LD_PRELOAD")
NOT_INTEL = DIR / "mkl_not_intel.c"  # MKL told this CPU is not Intel's (see the file)
# Beside the files' configurations: MKL's two reproducible branches with MKL's vendor check answered
# "not Intel" (where gcc can build the stand-in).
TOLD_NOT_INTEL = [
    {"config": "portable-today-mkl-told-not-intel", "env": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"},
     "onednn": False, "preload": NOT_INTEL.name},
    {"config": "compatible-onednn-off-mkl-told-not-intel", "env": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"},
     "onednn": False, "preload": NOT_INTEL.name},
]
SHIM = Path("/tmp/hanprune-mkl-not-intel.so")


def cpu() -> dict:
    info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = [f for f in info["flags"].split() if re.match(r"avx|amx|fma|f16c", f)]
    caches = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        kind = (index / "type").read_text().strip()
        if kind != "Instruction":
            caches[f"L{(index / 'level').read_text().strip()}"] = (index / "size").read_text().strip()
    return {"vendor": info["vendor_id"], "model_name": info["model name"], "family": int(info["cpu family"]),
            "model": int(info["model"]), "stepping": int(info["stepping"]), "cores": len(
                re.findall(r"^processor", Path("/proc/cpuinfo").read_text(), re.M)),
            "caches_per_core": caches, "flags": flags}


def slug(c: dict) -> str:
    return f"{c['vendor'].lower()}-family{c['family']}-model{c['model']}"


def child(cmd: list[str], config: dict) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in CLEAR} | config["env"]
    if config.get("preload"):
        e["LD_PRELOAD"] = str(SHIM)
    proc = subprocess.run(cmd, env=e, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(config: dict, data_root: str, steps: int) -> dict:
    onednn = "1" if config["onednn"] else "0"
    probe = child([sys.executable, str(ROOT / "tests" / "numerics_probe.py"), "env", onednn], config)
    timings = {key: child([sys.executable, str(ROOT / "benchmarks" / "steps.py"), data_root, key, str(steps), onednn],
                          config)["ms_per_step"] for key in MODELS} if steps else None
    return {**config, "torch_capability": probe["capability"],
            "md5": {k: v for k, v in probe.items() if "/" in k}, "ms_per_step_real_mnist_batch64": timings}


def compare(files: list[Path]) -> str:
    """One row per configuration: the md5s' first 8 hex digits per CPU, and whether all CPUs agree."""
    runs = {f.stem: {c["config"]: c for c in json.loads(f.read_text())["configs"]} for f in files}
    names = list(dict.fromkeys(n for r in runs.values() for n in r))
    rows = []
    for name in names:
        md5s = [r[name]["md5"] if name in r else None for r in runs.values()]
        known = [m for m in md5s if m]
        agree = "yes" if len(known) > 1 and all(m == known[0] for m in known) else ("-" if len(known) < 2 else "no")
        rows.append([name, *(" ".join(v[:8] for v in m.values()) if m else "" for m in md5s), agree])
    return tabulate(rows, headers=["config", *runs, "same bytes"], tablefmt="github")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "data"), help="data root holding real MNIST (the download stage's)")
    ap.add_argument("--steps", type=int, default=200, help="timed training steps per model and configuration (0: md5s only)")
    ap.add_argument("--compare", action="store_true", help="only print the comparison of the files there")
    args = ap.parse_args()
    if not args.compare:
        here = cpu()
        configs = list({c["config"]: c for f in sorted(DIR.glob("*.json"))
                        for c in json.loads(f.read_text())["configs"]}.values())
        configs = [c for c in configs if not c.get("preload")]
        if subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(SHIM), str(NOT_INTEL)]).returncode == 0:
            configs += TOLD_NOT_INTEL
        results = []
        for config in configs:
            result = measure({k: config[k] for k in ("config", "env", "onednn", "preload") if k in config},
                             args.data, args.steps)
            print(f"{config['config']}: {' '.join(v[:8] for v in result['md5'].values())} "
                  f"{result['ms_per_step_real_mnist_batch64']}", flush=True)
            results.append(result)
        out = DIR / f"{slug(here)}.json"
        out.write_text(json.dumps({"cpu": here, "torch": f"{torch.__version__}, 2 threads, Python {sys.version.split()[0]}",
                                   "probe": "tests/numerics_probe.py env; timings: benchmarks/steps.py",
                                   "configs": results}, indent=1) + "\n")
        print(f"wrote {out}")
    print(compare(sorted(DIR.glob("*.json"))))


if __name__ == "__main__":
    main()
