"""Glue shared by the stage scripts: their arguments, the opening every stage shares (params,
numeric mode, device and seeds, the MLflow run) and error exits. This is the only place that knows
about DVC (its environment variables). Importing it does nothing but import: a stage script runs
`run_stage(main)` under `if __name__ == "__main__"`, and tests call its `main(argv)`."""
import argparse
import os
import subprocess
import sys
import traceback
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: hanprune, models' code

from hanprune import config, runtime, tracking  # noqa: E402
from hanprune.errors import HanpruneError  # noqa: E402

_worker = None  # the MLflow worker process of a stage started by run_stage (tracking.start_worker)


def repo_root() -> Path:
    """The project root: DVC_ROOT under `dvc exp run --queue/--temp` (cwd is a temporary copy),
    else the git top level, else the working directory."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"])
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        return Path(top.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd()


def portable_requested(argv: list[str]) -> bool:
    """run.portable of the params file that --params names in argv (default params.yaml). A bad
    argument or a file that cannot be read counts as false here: the stage's parser and
    config.load report what is wrong."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--params", default="params.yaml")
    try:
        path = pre.parse_known_args(argv)[0].params
        return yaml.safe_load(Path(path).read_text())["run"]["portable"] is True
    except (argparse.ArgumentError, OSError, yaml.YAMLError, TypeError, KeyError):
        return False


SHARED_ARGUMENTS = {
    "model": {"help": "model key, e.g. lenet5"},
    "--data": {"default": "data", "help": "data root (default: data)"},
    "--dense": {"required": True, "help": "dense checkpoint"},
    "--pruned": {"required": True, "help": "the selected pruned checkpoint (select stage)"},
}


def parser(description: str, *shared: str) -> argparse.ArgumentParser:
    """A stage's argument parser: --params and the `shared` arguments (names in SHARED_ARGUMENTS)."""
    ap = argparse.ArgumentParser(description=description)
    for name in shared:
        ap.add_argument(name, **SHARED_ARGUMENTS[name])
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return ap


def run_stage(main):
    """Run `python stages/<stage>.py ARGS`: the numeric mode of the params file that --params
    names (torch reads its kernel settings at its first operation, not at import: runtime.configure),
    the MLflow worker, then main(ARGS) through call(). Ends with os._exit: it skips the
    interpreter's teardown of torch, a large part of a short stage's fixed cost."""
    global _worker
    argv = sys.argv[1:]
    runtime.configure(portable_requested(argv))
    _worker = tracking.start_worker(tracking.default_uri(repo_root()))
    code = call(main, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def call(main, argv: list[str]) -> int:
    """main(argv) and its exit code. The project's own errors and file errors become one
    'error: ...' line and code 1; anything else is a bug: its traceback, one line saying so, code 2."""
    try:
        main(argv)
        return 0
    except (HanpruneError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:  # argparse: --help, or a bad argument it has reported
        return e.code if isinstance(e.code, int) else 1
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print("error: this is a bug in hanprune, not a problem with your input; please report it with the "
              "traceback above", file=sys.stderr)
        return 2


def load_params(path, model: str | None = None) -> config.Params:
    p = config.load(path)
    if model is not None and model not in p.models:
        raise config.ConfigError(f"model {model!r} is not in params models: {', '.join(p.models)}")
    return p


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def start(p: config.Params, seed: int = 0):
    """Numeric mode, device, seed and threads (hanprune.runtime); returns the device."""
    return runtime.start(p.run.device, p.run.threads, p.run.portable, seed)


def tracked(p: config.Params, name: str, model: str | None = None, dataset=None):
    """The stage's MLflow run (a context manager), named after the DVC stage and tagged with the
    dataset (an object with name and md5, e.g. data.Splits.dataset), made by the worker process
    that run_stage started, else (a test calling main) in this process.

    Runs of one model in one pipeline run are grouped under a parent run identified by (model, git
    commit, DVC experiment name): every stage process finds the same parent by searching these
    tags, so no run id has to travel between stages."""
    group = {"model": model or "all", "git_commit": git_commit(),
             "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "workspace")}
    stage = os.environ.get("DVC_STAGE", name)
    tags = {**group, "dvc_stage": stage, **dataset_tags(dataset)}
    uri = tracking.default_uri(repo_root())
    if _worker is None:
        return tracking.MlflowRun(uri, p.tracking.experiment, stage, tags, p.tracking.required, group)
    return tracking.BackgroundRun(_worker, uri, p.tracking.experiment, stage, tags, p.tracking.required, group)


def dataset_tags(dataset) -> dict[str, str]:
    return {"dataset": dataset.name if dataset else "", "dataset_md5": dataset.md5 if dataset else ""}


def epoch_logger(run, label: str):
    """Print each epoch's line (benchmarks/pipeline.py and monitor.py add up its seconds) and log it."""
    def log(record: dict):
        extra = f" test {record['test_accuracy']:.4f}" if "test_accuracy" in record else ""
        print(f"{label} epoch {record['epoch']}: loss {record['train_loss']:.4f} "
              f"val {record['val_accuracy']:.4f}{extra} ({record['seconds']:.2f} s)", flush=True)
        run.metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])
    return log
