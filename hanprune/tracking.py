"""MLflow logging that never costs a DVC output.

MlflowRun logs in the calling process. BackgroundRun has an MlflowRun in a worker process make
the calls: the one process of a concurrent.futures pool (start_worker), forked by run_stage before
the stage's first torch operation, so that MLflow's import and the opening of its store overlap the stage's own work
on the other core. BackgroundRun's methods check their arguments in the calling process (a wrong
call is a TypeError where it is made) and return at once; the worker makes the calls in order;
finish() waits for them all.

Whatever goes wrong costs one line on stderr (warn), never an output:
- the store cannot be opened (unreachable, MLflow missing, a read-only database): every later
  call is a no-op; with tracking.required the stage fails instead, before any work;
- a logging call fails (the server went away): the run logs nothing more;
- the worker process dies (killed, out of memory): the run logs nothing more.
MLflow's own log lines (a 40-line traceback for a read-only database) are off; HANPRUNE_DEBUG=1
keeps them and prints the traceback behind each warning.

HANPRUNE_STRICT_TRACKING=1 (tests/conftest.py sets it) makes a logging call that fails after the
run is open raise instead (from finish(), for a BackgroundRun): against the tests' local stores
such a failure is a bug in this project (a value MLflow refuses, an argument it cannot take), not a
store going away. Tests that make a store fail on purpose unset it. A store that cannot be opened
and a dead worker still only warn."""
import contextlib
import fcntl
import functools
import inspect
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import SimpleNamespace

from .errors import HanpruneError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
if not os.environ.get("HANPRUNE_DEBUG"):
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "CRITICAL")  # what fails is reported by warn(), in one line


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


class TrackingError(HanpruneError):
    pass


def warn(message: str):
    """One line on stderr (with HANPRUNE_DEBUG=1, after the traceback being handled)."""
    if os.environ.get("HANPRUNE_DEBUG"):
        traceback.print_exc()
    print(f"warning: {message}; continuing without tracking", file=sys.stderr, flush=True)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"  # one line, whatever the store said


def _strict() -> bool:
    return os.environ.get("HANPRUNE_STRICT_TRACKING") == "1"


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
    create the experiment is handled in MlflowRun._experiment."""
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
    """An MlflowRun method that is a no-op when the store could not be reached, and whose failure
    (the store went away) costs one warning and ends the run's logging: every later call would wait
    for its own timeout. Under HANPRUNE_STRICT_TRACKING the failure is raised."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.run is None:
            return
        try:
            method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any store failure is reported the same way
            if _strict():
                raise
            warn(f"MLflow logging to {self.uri} failed: {_reason(e)}")
            self.run = None
    return call


def _artifact_root(uri: str) -> str | None:
    """For a SQLite store, mlruns/ beside its file; else the server's choice (None). MLflow's own
    default, ./mlruns, would follow the working directory, where a study's stages run in its folder."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri()
    return None


class MlflowRun:
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
            if tags.get("dataset"):  # MLflow's Dataset column: the data the stage read, by its md5
                self._dataset(tags["dataset"], tags.get("dataset_md5", ""))
        except Exception as e:  # noqa: BLE001 - any store failure is reported the same way
            message = f"MLflow tracking store {uri} unreachable: {_reason(e)}"
            if required:
                raise TrackingError(message + " (tracking.required is true)") from None
            warn(message)

    def _experiment(self, name: str) -> str:
        """The experiment's id, created if need be, and marked as model training (EXPERIMENT_KIND),
        so MLflow 3's UI opens it on its runs rather than on the GenAI overview."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                self.client.create_experiment(name, artifact_location=_artifact_root(self.uri),
                                              tags=dict([EXPERIMENT_KIND]))
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

    def _dataset(self, name: str, md5: str):
        """The dataset as an input of the run (mlflow.log_input's entity), its md5 as the digest."""
        from mlflow.entities import Dataset, DatasetInput
        dataset = Dataset(name=name, digest=md5, source_type="local", source=f'{{"data.name": "{name}"}}')
        self.client.log_inputs(self.run.info.run_id, datasets=[DatasetInput(dataset=dataset)])

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


def start_worker(uri: str) -> ProcessPoolExecutor:
    """The worker process for BackgroundRun, forked now: call it before torch's first operation (a fork
    after torch's thread pool ran leaves the worker hanging at its first parallel operation). It
    imports MLflow and opens the store at `uri` meanwhile, at a lower priority than the stage."""
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork"))
    pool.submit(_start, uri)  # a fork pool forks at its first task
    return pool


def _in_worker(method):
    """A BackgroundRun method: the worker calls MlflowRun's `method`, whose signature the arguments
    are checked against here first."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def submit(self, *args, **kwargs):
        signature.bind(self, *args, **kwargs)  # a wrong call is a TypeError here, not a warning from the worker
        self._submit(_call, method.__name__, args, kwargs)
    return submit


class BackgroundRun:
    """An MlflowRun made by the worker process of `pool` (start_worker; one pool serves one run
    after another). Every call returns at once; finish() waits until the worker has made them all.
    The worker reports a store it cannot open (one warning); with `required` the constructor waits
    for it to open the run, and raises TrackingError if it cannot, so the stage fails before any
    work. A worker that died costs one warning, at whichever call finds it dead."""

    def __init__(self, pool: ProcessPoolExecutor, uri: str, experiment: str, name: str, tags: dict,
                 required: bool, group: dict | None = None):
        self.pool, self.uri, self.calls = pool, uri, []
        self._submit(_open, os.getcwd(), uri, experiment, name, tags, required, group)
        if required:
            try:
                if self.pool is None:  # already dead
                    raise BrokenProcessPool
                self.calls.pop().result()
            except BrokenProcessPool:
                raise TrackingError(f"MLflow tracking worker for {uri} died before opening the run "
                                    "(tracking.required is true)") from None

    def _submit(self, fn, *args):
        if self.pool is None:
            return
        try:
            self.calls.append(self.pool.submit(fn, *args))
        except BrokenProcessPool:
            self._worker_died()

    def _worker_died(self):
        if self.pool is not None:
            warn(f"MLflow logging to {self.uri} stopped: its worker process died")
            self.pool = None

    params = _in_worker(MlflowRun.params)
    metrics = _in_worker(MlflowRun.metrics)
    run_tags = _in_worker(MlflowRun.run_tags)
    table = _in_worker(MlflowRun.table)
    artifact = _in_worker(MlflowRun.artifact)
    register_model = _in_worker(MlflowRun.register_model)

    def finish(self, status="FINISHED"):
        """End the run, once the worker has made every call before; the failure of a call that the
        worker did not report itself (an argument it could not take) costs one warning."""
        self._submit(_finish, status)
        calls, self.calls = self.calls, []
        for call in calls:
            try:
                call.result()
            except BrokenProcessPool:
                self._worker_died()
            except Exception as e:  # noqa: BLE001 - whatever the call raised
                if _strict():
                    raise
                warn(f"MLflow logging to {self.uri} failed: {_reason(e)}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.finish("FAILED" if exc_type else "FINISHED")


# The worker process's state: the store it opened (once connected is set), the run it logs to.
_worker = SimpleNamespace(uri=None, client=None, connected=threading.Event(), run=None)


def _start(uri: str):
    """The worker's first task. It opens the store in a thread, so that a stage that ends before
    opening a run (--help, a bad argument) is not kept waiting for it. Ctrl-C stops the stage, not
    the worker, which goes when the stage goes."""
    os.nice(5)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_connect_then_watch, args=(uri,), daemon=True).start()


def _connect_then_watch(uri: str):
    """Import MLflow and open the store (MlflowRun reports what fails, once a run is asked for);
    then wait for the stage process to end: if it ends without finish() (it was killed), the run is
    FAILED and the worker exits."""
    with contextlib.suppress(Exception):
        from mlflow.tracking import MlflowClient
        with _store_lock(uri):
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)  # creates the store's tables on first use
        _worker.uri, _worker.client = uri, client
    _worker.connected.set()
    multiprocessing.parent_process().join()
    if _worker.run is not None:
        with contextlib.suppress(Exception):
            _worker.run.finish("FAILED")
    os._exit(0)


def _open(cwd: str, uri: str, experiment: str, name: str, tags: dict, required: bool, group: dict | None):
    os.chdir(cwd)  # relative paths (artifacts) as the stage means them
    _worker.connected.wait()
    _worker.run = MlflowRun(uri, experiment, name, tags, required, group,
                            _worker.client if uri == _worker.uri else None)


def _call(method: str, args: tuple, kwargs: dict):
    getattr(_worker.run, method)(*args, **kwargs)


def _finish(status: str):
    run, _worker.run = _worker.run, None
    run.finish(status)


def _columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}

