"""Glue shared by the stage scripts: their shared arguments, the opening every stage shares
(params, numeric mode, device and seeds, verified data, MLflow run) and error exits. This is the
only place that knows about DVC (its environment variables).

Every stage script imports this module first, before torch, and importing it does the two things
that must come before torch: it applies run.portable of the params file on the command line (the
kernel libraries read their settings when they load), and it forks the MLflow worker process
(tracking.start_worker), which imports MLflow while this process imports torch."""
import argparse
import contextlib
import os
import subprocess
import sys
import traceback
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: hanprune, models' code

from hanprune import runtime, tracking  # noqa: E402  (neither imports torch)


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


# Before torch is imported:
runtime.configure(portable_requested(sys.argv[1:]))
TRACKING_WORKER = tracking.start_worker(tracking.default_uri(repo_root()))

from hanprune import config, data  # noqa: E402  (these import torch)
from hanprune.errors import HanpruneError  # noqa: E402

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
    """Run a stage's main(). The project's own errors and file errors become one 'error: ...' line
    and exit code 1; anything else is a bug: its traceback, one line saying so, exit code 2.
    A stage that the interpreter was started for (`python stages/x.py ...`, not a test running
    main() in its process) ends with os._exit(0) once main() has written and logged everything: it
    skips the interpreter's teardown of torch, a large part of a short stage's fixed cost."""
    try:
        main()
        if sys.orig_argv[1:] == sys.argv:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except (HanpruneError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print("error: this is a bug in hanprune, not a problem with your input; please report it with the "
              "traceback above", file=sys.stderr)
        sys.exit(2)


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


@contextlib.contextmanager
def opening(p: config.Params, name: str, model: str | None = None, seed: int = 0, data_root=None):
    """What every stage does first: numeric mode, device, seed and threads (hanprune.runtime); the
    dataset data.name under data_root, verified and moved to the device as splits (splits.dataset
    says what it is); the MLflow run, named after the DVC stage and tagged with the dataset.
    Yields (device, splits or None, run).

    Runs of one model in one pipeline run are grouped under a parent run identified by (model, git
    commit, DVC experiment name): every stage process finds the same parent by searching these
    tags, so no run id has to travel between stages."""
    device = runtime.start(p.run.device, p.run.threads, p.run.portable, seed)
    splits = None
    if data_root is not None:
        dataset = data.verified(data.raw_dir(data_root, p.data.name), p.data.name)
        splits = data.Splits(dataset, p.data.val_size, p.data.val_seed).to(device)
    group = {"model": model or "all", "git_commit": git_commit(),
             "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "workspace")}
    stage = os.environ.get("DVC_STAGE", name)
    tags = {**group, "dvc_stage": stage, **dataset_tags(splits and splits.dataset)}
    with tracking.BackgroundRun(TRACKING_WORKER, tracking.default_uri(repo_root()), p.tracking.experiment,
                                stage, tags, p.tracking.required, group) as mlrun:
        yield device, splits, mlrun


def dataset_tags(dataset: data.Dataset | None) -> dict[str, str]:
    return {"dataset": dataset.name if dataset else "", "dataset_md5": dataset.md5 if dataset else ""}


def epoch_logger(run: tracking.BackgroundRun, label: str):
    """Print each epoch's line (benchmarks/pipeline.py and monitor.py add up its seconds) and log it."""
    def log(record: dict):
        extra = f" test {record['test_accuracy']:.4f}" if "test_accuracy" in record else ""
        print(f"{label} epoch {record['epoch']}: loss {record['train_loss']:.4f} "
              f"val {record['val_accuracy']:.4f}{extra} ({record['seconds']:.2f} s)", flush=True)
        run.metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])
    return log
