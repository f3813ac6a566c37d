"""Glue shared by the stage scripts: the opening every stage shares (params, numeric mode, device
and seeds, verified data, MLflow run), error exits. This is the only place that knows about DVC
(its environment variables)."""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hanprune import runtime, tracking  # noqa: E402  (import no torch)


def _portable_requested(argv: list[str]) -> bool:
    """run.portable of the params file given on the command line, read before torch is imported.
    A file that cannot be read counts as false here; config.load reports what is wrong with it."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--params=")), None)
    if path is None:
        path = argv[argv.index("--params") + 1] if "--params" in argv[:-1] else "params.yaml"
    try:
        return yaml.safe_load(Path(path).read_text())["run"]["portable"] is True
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        return False


runtime.configure(_portable_requested(sys.argv))


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


_tracking_worker = tracking.start_worker(tracking.default_uri(repo_root()))  # MLflow loads while torch does

from hanprune import config, data  # noqa: E402
from hanprune.errors import HanpruneError  # noqa: E402


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return ap


def run(main):
    """Run a stage's main(). The project's own errors and file errors become one 'error: ...' line
    and exit code 1; anything else is a bug: its traceback, one line saying so, exit code 2.
    With HANPRUNE_TIMINGS set (benchmarks/monitor.py, benchmarks/pipeline.py), append the stage's
    time from process start and its training time (the epochs) to that file, one JSON line."""
    try:
        main()
        _record_timing()
        if _is_the_program(main):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # all written and logged: skip the interpreter's teardown (0.3-0.7 s)
    except (HanpruneError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print("error: this is a bug in hanprune, not a problem with your input; please report it with the "
              "traceback above", file=sys.stderr)
        sys.exit(2)


_training_seconds = 0.0


def _is_the_program(main) -> bool:
    """Whether this process was started to run main's script (`python stages/x.py`), rather than a
    test running it in-process (sys.orig_argv is the interpreter's own command line)."""
    script = sys.orig_argv[1] if len(sys.orig_argv) > 1 else ""
    return Path(script).resolve() == Path(main.__code__.co_filename).resolve()


def _process_age() -> float:
    """Seconds since this process started, from /proc on Linux (10 ms ticks); else since this
    module loaded."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - _LOADED


_LOADED = time.time()


def _record_timing():
    path = os.environ.get("HANPRUNE_TIMINGS")
    if path:
        record = {"stage": os.environ.get("DVC_STAGE", Path(sys.argv[0]).stem),
                  "seconds": _process_age(), "training_seconds": _training_seconds}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def load_params(path, model: str | None = None) -> config.Params:
    p = config.load(path)
    if model is not None and model not in p.models:
        raise config.ConfigError(f"model {model!r} is not in params models: {', '.join(p.models)}")
    return p


@contextlib.contextmanager
def opening(p: config.Params, name: str, model: str | None = None, seed: int = 0, data_root=None):
    """What every stage does first: numeric mode, device, seed and threads (hanprune.runtime); the
    dataset data.name under data_root, verified and moved to the device as splits (splits.dataset
    says what it is); the MLflow run, tagged with the dataset. Yields (device, splits or None, run)."""
    device = runtime.start(p.run.device, p.run.threads, p.run.portable, seed)
    splits = None
    if data_root is not None:
        dataset = data.verified(data.raw_dir(data_root, p.data.name), p.data.name)
        splits = data.Splits(dataset, p.data.val_size, p.data.val_seed).to(device)
    with open_run(p, name, model, splits and splits.dataset) as mlrun:
        yield device, splits, mlrun


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def open_run(params, name: str, model: str | None, dataset: data.Dataset | None) -> tracking.Background:
    """An MLflow run named after the DVC stage. Runs of one model in one pipeline run are grouped
    under a parent run identified by (model, git commit, DVC experiment name): every stage process
    finds the same parent by searching these tags, so no run id has to travel between stages."""
    group = {"model": model or "all", "git_commit": git_commit(),
             "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "workspace")}
    tags = {**group, "dvc_stage": os.environ.get("DVC_STAGE", name), **dataset_tags(dataset)}
    global _tracking_worker
    worker, _tracking_worker = _tracking_worker, None  # the one started at import, else a new one
    return tracking.Background(tracking.default_uri(repo_root()), params.tracking.experiment,
                               os.environ.get("DVC_STAGE", name), tags, params.tracking.required, group,
                               worker=worker)


def dataset_tags(dataset: data.Dataset | None) -> dict[str, str]:
    return {"dataset": dataset.name if dataset else "", "dataset_md5": dataset.md5 if dataset else ""}


def epoch_logger(run: tracking.Background, label: str):
    def log(record: dict):
        global _training_seconds
        _training_seconds += record["seconds"]
        extra = f" test {record['test_accuracy']:.4f}" if "test_accuracy" in record else ""
        print(f"{label} epoch {record['epoch']}: loss {record['train_loss']:.4f} "
              f"val {record['val_accuracy']:.4f}{extra} ({record['seconds']:.1f} s)", flush=True)
        run.metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])
    return log
