"""MLflow logging that never costs a DVC output: if the store is unreachable the stage warns once
and goes on, unless tracking is required, in which case it fails before any work is done.

Run logs in the calling process. Background runs the same Run in a worker process (this module as
`python -m hanprune.tracking`), so that MLflow's import and its store (about 2 s on the 2-core
machines) overlap with the stage's own work instead of adding to it."""
import contextlib
import fcntl
import functools
import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path

from .errors import HanpruneError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


class TrackingError(HanpruneError):
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


def _best_effort(method):
    """A Run method that is a no-op when the store could not be reached, and whose failure (the
    store went away) costs one warning, never an exception."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.run is None:
            return
        try:
            method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any store failure is reported the same way
            warnings.warn(f"MLflow logging to {self.uri} failed: {type(e).__name__}: {str(e)[:300]}")
    return call


class Run:
    """One MLflow run. All methods are no-ops when the store could not be reached.

    With `group` (tags that identify one pipeline run of one model), the run is created as a child
    of the parent run carrying exactly those tags, found by a search or created on first use, so
    stages running as separate processes land under one parent without sharing any state."""

    def __init__(self, uri: str, experiment: str, name: str, tags: dict, required: bool,
                 group: dict | None = None, client=None):
        self.uri, self.client, self.run, self.parent_id = uri, None, None, None
        try:
            from mlflow.tracking import MlflowClient
            with _store_lock(uri):
                self.client = client or MlflowClient(uri)
                exp_id = self._experiment(experiment)
                tags = {k: str(v) for k, v in tags.items()}
                if group:
                    self.parent_id = self._parent(exp_id, {k: str(v) for k, v in group.items()})
                    tags["mlflow.parentRunId"] = self.parent_id
            self.run = self.client.create_run(exp_id, run_name=name, tags=tags)
        except Exception as e:  # noqa: BLE001 - any store failure is reported the same way
            reason = " ".join(str(e).split())[:300]  # one line, whatever the store said
            message = f"MLflow tracking store {uri} unreachable: {type(e).__name__}: {reason}"
            if required:
                raise TrackingError(message + " (tracking.required is true)") from None
            print(f"warning: {message}; continuing without tracking", file=sys.stderr)

    def _experiment(self, name: str) -> str:
        """The experiment's id, created if need be, and marked as model training (EXPERIMENT_KIND),
        so MLflow 3's UI opens it on its runs rather than on the GenAI overview."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                self.client.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
            except Exception:  # noqa: BLE001 - another process (e.g. a parallel experiment) created it first
                pass
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise TrackingError(f"could not create or find the experiment {name!r}")
        key, kind = EXPERIMENT_KIND
        if exp.tags.get(key) != kind:
            self.client.set_experiment_tag(exp.experiment_id, key, kind)
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

    @_best_effort
    def params(self, params: dict):
        from mlflow.entities import Param
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.id, params=items[i:i + 100])

    @_best_effort
    def metrics(self, metrics: dict, step: int = 0, on_parent: bool = False):
        """Log numeric metrics (nested dicts flattened to a.b.c) at `step`; also on the parent run
        with on_parent, so the parent charts them across steps (e.g. prune iterations)."""
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in flatten(metrics).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.id, metrics=items[i:i + 500])
            if on_parent and self.parent_id:
                self.client.log_batch(self.parent_id, metrics=items[i:i + 500])

    @_best_effort
    def run_tags(self, tags: dict):
        for k, v in tags.items():
            self.client.set_tag(self.id, k, str(v))

    @_best_effort
    def table(self, rows: list[dict], artifact_file: str):
        self.client.log_table(self.id, data=_columns(rows), artifact_file=artifact_file)

    @_best_effort
    def artifact(self, path, artifact_path=None):
        self.client.log_artifact(self.id, str(path), artifact_path)

    @_best_effort
    def register_model(self, model, name: str, input_example, version_tags: dict):
        """Log `model` as this run's MLflow model and register it as a new version of `name` in the
        Model Registry, with `version_tags` on the version. The model is saved with torch.export
        (MLflow's default; loading it never unpickles code); an input example of batch size 2 makes
        the batch dimension dynamic. The torch requirement is the version pip reports: torch.__version__
        may carry a local tag (2.14.1+cu130) that the installed distribution's version lacks, and
        MLflow would warn of a mismatch."""
        import importlib.metadata
        import mlflow
        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=self.id):
            info = mlflow.pytorch.log_model(model, name="model", input_example=input_example,
                                            pip_requirements=[f"torch=={importlib.metadata.version('torch')}"],
                                            registered_model_name=name)
        for key, value in version_tags.items():
            self.client.set_model_version_tag(name, info.registered_model_version, key, str(value))

    @_best_effort
    def finish(self, status="FINISHED"):
        """End the run, and the parent at the same moment, so that the parent spans its children."""
        end = int(time.time() * 1000)
        self.client.set_terminated(self.id, status, end_time=end)
        if self.parent_id:
            self.client.set_terminated(self.parent_id, "FINISHED", end_time=end)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.finish("FAILED" if exc_type else "FINISHED")


class Background:
    """A Run in a worker process. Every call is handed over (pickled through a pipe) and returns at
    once; finish() waits until the worker has logged everything. The worker reports an
    unreachable store itself (one warning); with `required` the constructor waits for it to
    connect, and raises TrackingError if it cannot, so the stage fails before any work. A worker
    that cannot even start costs one warning."""

    def __init__(self, uri: str, experiment: str, name: str, tags: dict, required: bool,
                 group: dict | None = None, worker: subprocess.Popen | None = None):
        self.proc = worker or start_worker(uri)
        self._send("open", uri, experiment, name, tags, required, group)
        if required:
            answer = self.proc.stdout.readline().decode().strip()
            if answer != "ok":
                self.proc.wait()
                raise TrackingError(answer or f"MLflow tracking worker for {uri} exited without connecting")

    def _send(self, method: str, *args, **kwargs):
        """One message: its length (8 bytes), then the pickled call, so that a call the worker
        cannot unpickle (a model class it cannot import) costs that call only."""
        if self.proc.stdin.closed:
            return
        try:
            message = pickle.dumps((method, args, kwargs))
        except Exception as e:  # noqa: BLE001 - whatever pickle raises for an object it cannot take
            warnings.warn(f"MLflow logging skipped {method}: {type(e).__name__}: {e}")
            return
        try:
            self.proc.stdin.write(len(message).to_bytes(8, "little") + message)
            self.proc.stdin.flush()
        except OSError as e:  # the worker is gone
            warnings.warn(f"MLflow logging stopped: its worker process exited ({e})")
            self.proc.stdin.close()

    def __getattr__(self, method):
        if method not in LOGGING_METHODS:
            raise AttributeError(method)
        return lambda *args, **kwargs: self._send(method, *args, **kwargs)

    def finish(self, status="FINISHED"):
        self._send("finish", status)
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.finish("FAILED" if exc_type else "FINISHED")


LOGGING_METHODS = ("params", "metrics", "run_tags", "table", "artifact", "register_model")


def start_worker(uri: str) -> subprocess.Popen:
    """A worker process for Background. Started before the stage imports torch, it imports MLflow
    and opens the store at `uri` meanwhile, on the other core, at a lower priority than the stage."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the stage's imports
    return subprocess.Popen([sys.executable, "-m", "hanprune.tracking", uri], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)


def _serve(uri: str):
    """The worker: open the store, build the Run from the first message, apply the others to it in
    order; a stage that ends without calling finish (it was killed) leaves a FAILED run."""
    os.nice(5)
    client = None
    with contextlib.suppress(Exception):  # Run reports what fails, once it is asked for
        from mlflow.tracking import MlflowClient
        with _store_lock(uri):
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)  # creates the store's tables on first use
    messages = _messages(sys.stdin.buffer)
    try:
        _, (uri_asked, experiment, name, tags, required, group), _ = pickle.loads(next(messages))
    except StopIteration:  # the stage ended before opening a run (--help, a bad argument)
        return
    try:
        run = Run(uri_asked, experiment, name, tags, required, group, client if uri_asked == uri else None)
    except TrackingError as e:
        print(e, flush=True)
        return
    if required:
        print("ok", flush=True)
    for message in messages:
        try:
            method, args, kwargs = pickle.loads(message)
        except Exception as e:  # noqa: BLE001 - e.g. a model whose class this process cannot import
            warnings.warn(f"MLflow logging skipped a call it could not read: {type(e).__name__}: {e}")
            continue
        getattr(run, method)(*args, **kwargs)
        if method == "finish":
            break
    else:  # the stage ended without finish(): it was killed
        run.finish("FAILED")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # all logged: skip the interpreter's teardown of MLflow and SQLAlchemy


def _messages(stream):
    """The messages Background._send wrote, until the stage closes the pipe."""
    while len(head := stream.read(8)) == 8:
        yield stream.read(int.from_bytes(head, "little"))


def _columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}


if __name__ == "__main__":
    _serve(sys.argv[1])
