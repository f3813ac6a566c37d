"""Tiny generated MNIST-like data and a params.yaml for it, so the pipeline runs in seconds; a copy
of the project using them, in a temporary git repository, and how to run commands in it."""
import hashlib
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from hanprune.idx import idx_images, idx_labels

TINY = "tiny"  # data.name of the generated data: it lies in <root>/tiny/raw
ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "stages"
PROJECT_FILES = ["hanprune", "stages", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"]
CPUINFO = Path("/proc/cpuinfo")
HAS_AVX512 = CPUINFO.exists() and "avx512f" in CPUINFO.read_text()  # the fast mode's bytes differ only there


def write_tiny_mnist(directory: Path, n_train=600, n_test=200, seed=0) -> dict[str, str]:
    """Each class is a fixed random blob pattern plus noise (learnable). Returns file name -> md5."""
    rng = np.random.default_rng(seed)
    patterns = rng.random((10, 28, 28)) > 0.7
    directory.mkdir(parents=True, exist_ok=True)
    md5 = {}
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        labels = rng.integers(0, 10, n)
        images = patterns[labels] * 200 + rng.integers(0, 55, (n, 28, 28))
        for name, blob in [(f"{prefix}-images-idx3-ubyte", idx_images(images)),
                           (f"{prefix}-labels-idx1-ubyte", idx_labels(labels))]:
            (directory / name).write_bytes(blob)
            md5[name] = hashlib.md5(blob).hexdigest()
    return md5


def tiny_params(params_file: Path, local_dir: Path, md5: dict, iterations: dict[str, int]) -> dict:
    """The project's params.yaml shrunk to 1-epoch runs on the tiny data, with `iterations[model]`
    prune rounds per model (models not listed are dropped)."""
    p = yaml.safe_load(params_file.read_text())
    p["data"].update(name=TINY, source="local", local_dir=str(local_dir), md5=md5, val_size=100)
    p["run"]["threads"] = 2  # the thread count of the real pipeline: thread-order effects show
    p["models"] = {k: v for k, v in p["models"].items() if k in iterations}
    for key, n in iterations.items():
        p["models"][key]["pretrain"].update(epochs=12, batch_size=32)  # lenet5 learns the tiny data by epoch 8
        p["models"][key]["retrain"].update(epochs=1, batch_size=32)
        p["models"][key]["quantize"]["finetune"].update(epochs=1, batch_size=32)
        p["models"][key]["select"] = {"max_drop": 1.0}  # a fixed tolerance: the last round, whatever the tiny data's accuracies
    prune = {}
    for key, it in p["prune"].items():
        if it["model"] in iterations and it["iteration"] <= iterations[it["model"]]:
            prune[key] = {**it, "epochs": 1}
            if "gradual" in it:  # a mask update every step: the tiny data has few
                prune[key]["gradual"] = {**it["gradual"], "every": 1}
    p["prune"] = prune
    return p


def stage_commands(key: str, rounds: int) -> list[list[str]]:
    """The commands dvc.yaml runs for one model after download (script name, then arguments), with
    `rounds` prune rounds, the data under data/, run from the project directory."""
    m = f"models/{key}"
    prune = [cmd for k in range(1, rounds + 1) for cmd in (
        ["schedule.py", f"{key}-iter{k}", "--scan", f"plots/{key}/sensitivity.csv", "--out",
         f"metrics/schedule/{key}-iter{k}.json"],
        ["prune.py", f"{key}-iter{k}", "--data", "data", "--start", f"{m}/dense.pt" if k == 1 else f"{m}/rounds/iter{k - 1}.pt",
         "--schedule", f"metrics/schedule/{key}-iter{k}.json", "--out", f"{m}/rounds/iter{k}.pt",
         "--metrics", f"metrics/prune/{key}-iter{k}.json", "--plot", f"plots/{key}/retrain{k}.csv"])]
    final = f"{m}/selected.pt"
    return [
        ["pretrain.py", key, "--data", "data", "--out", f"{m}/dense.pt", "--plot", f"plots/{key}/pretrain.csv"],
        ["sensitivity.py", key, "--data", "data", "--dense", f"{m}/dense.pt", "--out", f"plots/{key}/sensitivity.csv"],
        *prune,
        ["select_round.py", key, "--rounds", f"{m}/rounds", "--out", final, "--metrics", f"metrics/select/{key}.json"],
        ["quantize.py", key, "--data", "data", "--pruned", final, "--out", f"{m}/quantized.pt",
         "--metrics", f"metrics/quantize/{key}.json"],
        ["encode.py", key, "--dense", f"{m}/dense.pt", "--pruned", final, "--quantized", f"{m}/quantized.pt",
         "--out", f"{m}/compressed.bin", "--storage", f"{m}/storage"],
        ["evaluate.py", key, "--data", "data", "--dense", f"{m}/dense.pt", "--pruned", final,
         "--compressed", f"{m}/compressed.bin", "--storage", f"{m}/storage", "--rounds", f"{m}/rounds",
         "--selection", f"metrics/select/{key}.json", "--metrics", f"metrics/{key}.json", "--plots", f"plots/{key}/final"],
        ["report.py", "--metrics", "metrics", "--plots", "plots", "--out", "reports"],
    ]


def tiny_project(repo: Path, iterations: dict[str, int]) -> dict:
    """A copy of the project (its code, dvc.yaml and .dvc/config) in a new git repository `repo`,
    not yet committed, with tiny data beside it (repo/../tiny-mnist) and the tiny params.yaml for
    `iterations` (tiny_params). Returns the params."""
    repo.mkdir()
    for name in PROJECT_FILES:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    for d in repo.rglob("__pycache__"):
        shutil.rmtree(d)
    md5 = write_tiny_mnist(repo.parent / "tiny-mnist")
    params = tiny_params(ROOT / "params.yaml", repo.parent / "tiny-mnist", md5, iterations)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, "git", "init", "-q", "-b", "main")
    return params


def fork(repo: Path, dest: Path) -> Path:
    """A copy of the tiny project `repo` (its git history, DVC cache and outputs) at dest/project,
    without its MLflow store (the copy's stages make their own): a test that edits params, commits
    or runs experiments works on its own state and leaves `repo` as it was."""
    copy = dest / "project"
    shutil.copytree(repo, copy, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlruns"))
    return copy


def env(tmp: Path, **extra) -> dict:
    """The environment commands run in: the Python environment's bin first, no MLflow, DVC or AWS
    settings of the caller's, DVC's site cache under `tmp`."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "AWS_"))}
    e.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}", DVC_NO_ANALYTICS="1",
             DVC_SITE_CACHE_DIR=str(tmp / "dvc-site"), MLFLOW_DISABLE_TELEMETRY="true",
             GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    e.update(extra)
    return e


def sh(repo: Path, *cmd, check=True, **extra_env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=repo, env=env(repo.parent, **extra_env), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def stage(script: str):
    """The module of stages/<script>.py, imported as `python stages/<script>.py` finds its imports
    (stages/ on sys.path, for `common`); its main(argv) runs the stage in this process."""
    if str(STAGES) not in sys.path:
        sys.path.insert(0, str(STAGES))
    return importlib.import_module(script)


def run_stage(script: str, *args) -> int:
    """stages/<script>.py's main(args) in this process, with the errors and exit code of `python
    stages/<script>.py args` (common.call): 0, or 1 after one `error: ...` line on stderr."""
    return stage("common").call(stage(script).main, [str(a) for a in args])


OLD = b"the output of an earlier run"


def stage_project(tmp_path: Path) -> Path:
    """A working directory with the tiny data in data/tiny/raw, a valid params.yaml, a dense
    checkpoint of lenet_300_100 and, at the outputs the stages would write, files of an earlier run."""
    from hanprune import data, datasets, io, pruning, sources
    from hanprune.models import make
    md5 = write_tiny_mnist(tmp_path / "source")
    params = tiny_params(ROOT / "params.yaml", tmp_path / "source", md5, {"lenet_300_100": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _write_schedule(tmp_path, params)
    spec = datasets.spec(TINY, md5)
    data.write_raw(sources.fetch(spec, "local", tmp_path / "source")[1], tmp_path / "data", spec)  # as download does
    model = make("lenet_300_100")
    io.save_torch(tmp_path / "models/lenet_300_100/dense.pt",
                  pruning.checkpoint("lenet_300_100", "lenet_300_100", {}, model, pruning.weight_std(model), []))
    for out in ["out.pt", "metrics.json", "plot.csv"]:
        (tmp_path / out).write_bytes(OLD)
    return tmp_path


PRUNE = ["prune", "lenet_300_100-iter1", "--start", "models/lenet_300_100/dense.pt", "--schedule", "schedule.json",
         "--out", "out.pt", "--metrics", "metrics.json", "--plot", "plot.csv"]


def _write_schedule(project, params):
    from hanprune import io
    """schedule.json as the schedule stage writes it for round 1's s (when the params still have one)."""
    it = (params.get("prune") or {}).get("lenet_300_100-iter1")
    if isinstance(it, dict) and isinstance(it.get("s"), dict):
        io.write_json(project / "schedule.json", {"rule": "std", "s": it["s"]})


def edit_params(project, change):
    p = yaml.safe_load((project / "params.yaml").read_text())
    change(p)
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    _write_schedule(project, p)
