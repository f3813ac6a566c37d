"""MLflow logging that never costs a DVC output: if the store is unreachable the stage warns once
and goes on, unless tracking is required, in which case it fails before any work is done."""
import contextlib
import fcntl
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class TrackingError(Exception):
    pass


def default_uri(root) -> str:
    """MLFLOW_TRACKING_URI if set, else the SQLite store mlflow.db at the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve()}/mlflow.db"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextlib.contextmanager
def _store_lock(uri: str):
    """For a SQLite store, an exclusive lock (a file beside the database) held while a process
    opens the store and finds or creates the experiment and the parent run: stages of parallel
    experiments (`dvc queue start -j 2`) would otherwise race to create the tables, the experiment
    or a parent. Other stores take no lock: a server creates its tables once, and a lost race to
    create the experiment is handled in Run._experiment."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri[len("sqlite:///"):] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Run:
    """One MLflow run. All methods are no-ops when the store could not be reached.

    With `group` (tags that identify one pipeline run of one model), the run is created as a child
    of the parent run carrying exactly those tags, found by a search or created on first use, so
    stages running as separate processes land under one parent without sharing any state."""

    def __init__(self, uri: str, experiment: str, name: str, tags: dict, required: bool,
                 group: dict | None = None):
        self.uri, self.run, self.parent_id = uri, None, None
        try:
            from mlflow.tracking import MlflowClient
            with _store_lock(uri):
                self.client = MlflowClient(uri)
                exp_id = self._experiment(experiment)
                tags = {k: str(v) for k, v in tags.items()}
                if group:
                    self.parent_id = self._parent(exp_id, {k: str(v) for k, v in group.items()})
                    tags["mlflow.parentRunId"] = self.parent_id
            self.run = self.client.create_run(exp_id, run_name=name, tags=tags)
        except Exception as e:  # noqa: BLE001 - any store failure is reported the same way
            message = f"MLflow tracking store {uri} unreachable: {type(e).__name__}: {str(e)[:300]}"
            if required:
                raise TrackingError(message + " (tracking.required is true)") from None
            print(f"warning: {message}; continuing without tracking", file=sys.stderr)

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # noqa: BLE001 - another process (e.g. a parallel experiment) created it first
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _parent(self, exp_id: str, group: dict) -> str:
        query = " and ".join(f"tags.{k} = '{v}'" for k, v in group.items())
        found = self.client.search_runs([exp_id], filter_string=f"{query} and tags.pipeline_parent = 'true'",
                                        max_results=1, order_by=["attributes.start_time ASC"])
        if found:
            return found[0].info.run_id
        name = group.get("model") or "pipeline"
        parent = self.client.create_run(exp_id, run_name=name, tags={**group, "pipeline_parent": "true"})
        self.client.set_terminated(parent.info.run_id)
        return parent.info.run_id

    @property
    def id(self):
        return self.run.info.run_id if self.run else None

    def _call(self, fn, *args, **kwargs):
        if self.run is None:
            return
        try:
            fn(self.run.info.run_id, *args, **kwargs)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"MLflow logging to {self.uri} failed: {e}")

    def params(self, params: dict):
        from mlflow.entities import Param
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self._call(self.client.log_batch, params=items[i:i + 100])

    def metrics(self, metrics: dict, step: int = 0, on_parent: bool = False):
        """Log numeric metrics (nested dicts flattened to a.b.c) at `step`; also on the parent run
        with on_parent, so the parent charts them across steps (e.g. prune iterations)."""
        import time
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in flatten(metrics).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), 500):
            self._call(self.client.log_batch, metrics=items[i:i + 500])
            if on_parent and self.parent_id:
                self._call(lambda _: self.client.log_batch(self.parent_id, metrics=items[i:i + 500]))

    def run_tags(self, tags: dict):
        for k, v in tags.items():
            self._call(self.client.set_tag, k, str(v))

    def table(self, rows: list[dict], artifact_file: str):
        self._call(lambda run_id: self.client.log_table(run_id, data=_columns(rows), artifact_file=artifact_file))

    def artifact(self, path, artifact_path=None):
        self._call(self.client.log_artifact, str(path), artifact_path)

    def register_model(self, model, name: str, input_example, version_tags: dict):
        """Log `model` as this run's MLflow model and register it as a new version of `name` in the
        Model Registry, with `version_tags` on the version. The model is saved with torch.export
        (MLflow's default; loading it never unpickles code); an input example of batch size 2 makes
        the batch dimension dynamic."""
        def log(run_id):
            import mlflow
            import torch
            mlflow.set_tracking_uri(self.uri)
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pytorch.log_model(model, name="model", input_example=input_example,
                                                pip_requirements=[f"torch=={torch.__version__}"],
                                                registered_model_name=name)
            for key, value in version_tags.items():
                self.client.set_model_version_tag(name, info.registered_model_version, key, str(value))
        self._call(log)

    def finish(self, status="FINISHED"):
        self._call(self.client.set_terminated, status)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.finish("FAILED" if exc_type else "FINISHED")


def _columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}
