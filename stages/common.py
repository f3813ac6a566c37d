"""Glue shared by the stage scripts: params, device and threads, MLflow run tags, error exits.
This is the only place that knows about DVC (its environment variables)."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hanprune import config, tracking  # noqa: E402
from hanprune.data import DataError  # noqa: E402
from hanprune.encoding import EncodingError  # noqa: E402
from hanprune.pruning import CheckpointError  # noqa: E402
from hanprune.storage import StorageError  # noqa: E402
from hanprune.train import make_deterministic, pick_device  # noqa: E402

KNOWN_ERRORS = (config.ConfigError, DataError, CheckpointError, EncodingError, StorageError, tracking.TrackingError,
                OSError, RuntimeError)


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return ap


def run(main):
    """Run a stage's main(); known failures become one 'error: ...' line and exit code 1."""
    try:
        main()
    except KNOWN_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


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


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def setup(params, seed: int):
    """Seed, fix threads and deterministic algorithms; return the torch device."""
    device = pick_device(params.run.device)
    make_deterministic(seed, params.run.threads or os.cpu_count(), device)
    return device


def open_run(params, name: str, model: str | None, data_md5: str | None) -> tracking.Run:
    """An MLflow run named after the DVC stage. Runs of one model in one pipeline run are grouped
    under a parent run identified by (model, git commit, DVC experiment name): every stage process
    finds the same parent by searching these tags, so no run id has to travel between stages."""
    group = {"model": model or "all", "git_commit": git_commit(),
             "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "workspace")}
    tags = {**group, "dvc_stage": os.environ.get("DVC_STAGE", name), "dataset_md5": data_md5 or ""}
    return tracking.Run(tracking.default_uri(repo_root()), params.tracking.experiment,
                        os.environ.get("DVC_STAGE", name), tags, params.tracking.required, group)


def epoch_logger(run: tracking.Run, label: str):
    def log(record: dict):
        extra = f" test {record['test_accuracy']:.4f}" if "test_accuracy" in record else ""
        print(f"{label} epoch {record['epoch']}: loss {record['train_loss']:.4f} "
              f"val {record['val_accuracy']:.4f}{extra} ({record['seconds']:.1f} s)", flush=True)
        run.metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])
    return log
