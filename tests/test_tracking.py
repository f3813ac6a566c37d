"""MLflow logging (hanprune.tracking.Run): an unreachable store costs one warning and never an
exception, unless tracking is required; a registered model loads back without complaints."""
import logging
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from hanprune import tracking


def _use(run: tracking.Run):
    """Every method a stage calls, as a stage calls them."""
    with run:
        run.params({"a": {"b": 1}})
        run.metrics({"loss": 0.5, "layer": {"fc1": 1}}, step=1, on_parent=True)
        run.run_tags({"registered": "false"})
        run.table([{"layer": "fc1", "kept": 0.5}], "layers.json")
        run.artifact(__file__)
        run.register_model(torch.nn.Linear(2, 2), "tiny", torch.zeros(2, 2).numpy(), {"a": 1})
        run.finish("FAILED")


def _one_warning(capsys, uri):
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.out == ""
    assert lines[0].startswith(f"warning: MLflow tracking store {uri} unreachable: ")
    assert lines[0].endswith("; continuing without tracking")


def test_malformed_uri_warns_once_and_every_call_is_a_no_op(capsys):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        run = tracking.Run("nosuch://x", "e", "stage", {"model": "m"}, False, group={"model": "m"})
        _use(run)
    assert run.id is None and not [x for x in w if "MLflow" in str(x.message)]  # no second warning
    _one_warning(capsys, "nosuch://x")


def test_mlflow_not_importable_warns_once_and_every_call_is_a_no_op(capsys, monkeypatch):
    for name in ["mlflow", "mlflow.tracking", "mlflow.entities", "mlflow.pytorch"]:
        monkeypatch.setitem(sys.modules, name, None)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        run = tracking.Run("sqlite:////nonexistent/mlflow.db", "e", "stage", {}, False)
        _use(run)
    assert not [x for x in w if "MLflow" in str(x.message)]
    _one_warning(capsys, "sqlite:////nonexistent/mlflow.db")


def test_required_tracking_fails_at_construction(capsys):
    with pytest.raises(tracking.TrackingError, match=r"nosuch://x unreachable: .*\(tracking.required is true\)"):
        tracking.Run("nosuch://x", "e", "stage", {}, True)
    assert capsys.readouterr().err == ""


def test_store_failing_after_the_run_started_costs_one_warning_per_call():
    class Gone:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise ConnectionError("store went away")
            return fail

    run = tracking.Run("nosuch://x", "e", "stage", {}, False)
    run.client, run.run, run.parent_id = Gone(), SimpleNamespace(info=SimpleNamespace(run_id="r1")), "p1"
    for call in [lambda: run.params({"a": 1}), lambda: run.metrics({"a": 1.0}, on_parent=True),
                 lambda: run.run_tags({"a": 1}), lambda: run.table([{"a": 1}], "t.json"),
                 lambda: run.artifact(__file__), lambda: run.finish()]:
        with pytest.warns(UserWarning, match="MLflow logging to nosuch://x failed: .*store went away") as w:
            call()
        assert len(w) == 1


def test_registered_model_loads_back_without_a_requirement_mismatch(tmp_path, caplog, capfd):
    """torch==<torch.__version__> pinned a local tag (+cu130) pip does not report: MLflow warned
    'Detected one or more mismatches' on every evaluate."""
    import mlflow
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    model = torch.nn.Linear(4, 3).eval()
    caplog.set_level(logging.WARNING)
    with tracking.Run(uri, "e", "evaluate", {}, True) as run:
        run.register_model(model, "tiny-pruned", torch.zeros(2, 4).numpy(), {"compression": 2.0})
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model("models:/tiny-pruned/1")
    x = torch.randn(5, 4)
    assert torch.equal(loaded(x), model(x))
    version = mlflow.MlflowClient(uri).get_model_version("tiny-pruned", "1")
    assert version.tags == {"compression": "2.0"}
    out, err = capfd.readouterr()
    assert "mismatch" not in (out + err + caplog.text).lower()


def test_experiment_opens_on_its_runs_and_a_parent_spans_its_children(tmp_path):
    """MLflow 3's UI picks an experiment's first page from its kind tag: training runs, not the GenAI
    overview (also for an experiment created before the tag existed). The parent run, created with
    the first child and ended at once, ends again with each child."""
    import time
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("old")  # made by an earlier version, without the tag
    group = {"model": "m", "git_commit": "c", "dvc_exp_name": "workspace"}
    ids = []
    for name, experiment in [("first", "new"), ("second", "new"), ("other", "old")]:
        with tracking.Run(uri, experiment, name, group, True, group) as run:
            time.sleep(0.05)
        ids.append(run.id)
    for experiment in ("new", "old"):
        exp = client.get_experiment_by_name(experiment)
        assert exp.tags[tracking.EXPERIMENT_KIND[0]] == tracking.EXPERIMENT_KIND[1]
    children = [client.get_run(i) for i in ids[:2]]
    parent = client.get_run(children[0].data.tags["mlflow.parentRunId"])
    assert children[1].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.start_time <= children[0].info.start_time
    assert parent.info.end_time >= children[1].info.end_time > children[0].info.start_time


def _runs(uri: str, experiment: str = "e") -> list:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return [r for r in runs if r.data.tags.get("pipeline_parent") != "true"]


def test_background_run_logs_everything_through_its_worker(tmp_path):
    """What a stage hands the worker process ends up in the store, in order, once finish() returns."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    group = {"model": "m", "git_commit": "c", "dvc_exp_name": "workspace"}
    with tracking.Background(uri, "e", "prune@m-iter1", {"dvc_stage": "prune@m-iter1"}, False, group) as run:
        run.params({"a": {"b": 1}})
        for step in (1, 2):
            run.metrics({"loss": 1.0 / step}, step=step, on_parent=True)
        run.run_tags({"registered": "false"})
        run.table([{"layer": "fc1", "kept": 0.5}], "layers.json")
        run.artifact(__file__)
    (logged,) = _runs(uri)
    assert logged.info.run_name == "prune@m-iter1" and logged.info.status == "FINISHED"
    assert logged.data.params == {"a.b": "1"} and logged.data.metrics == {"loss": 0.5}
    assert logged.data.tags["registered"] == "false" and logged.data.tags["mlflow.parentRunId"]
    from mlflow.tracking import MlflowClient
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(logged.info.run_id)}
    assert artifacts == {"layers.json", "test_tracking.py"}


def test_background_run_of_a_stage_that_died_is_failed(tmp_path):
    """A stage that exits without finish() (killed, or os._exit) closes the pipe: the run is FAILED."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = tracking.Background(uri, "e", "stage", {}, True)  # required: connected before it returns
    run.metrics({"loss": 1.0})
    run.proc.stdin.close()
    assert run.proc.wait(timeout=60) == 0
    (logged,) = _runs(uri)
    assert logged.info.status == "FAILED" and logged.data.metrics == {"loss": 1.0}


def test_background_run_with_an_unreachable_store_warns_once(capfd):
    run = tracking.Background("nosuch://x", "e", "stage", {}, False)
    run.params({"a": 1})
    run.metrics({"a": 1.0})
    run.finish()
    out, err = capfd.readouterr()
    assert out == "" and [l for l in err.splitlines() if l.strip()] == [
        l for l in err.splitlines() if l.startswith("warning: MLflow tracking store nosuch://x unreachable: ")]
    assert len(err.strip().splitlines()) == 1


def test_background_required_tracking_fails_at_construction():
    with pytest.raises(tracking.TrackingError, match=r"nosuch://x unreachable: .*\(tracking.required is true\)"):
        tracking.Background("nosuch://x", "e", "stage", {}, True)


def test_a_call_the_worker_cannot_read_costs_that_call_only(tmp_path, monkeypatch, capfd):
    """A model class the worker cannot import (here: a module that appeared after it started) is
    skipped with one warning; the calls before and after it are logged, and the run finishes."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = tracking.Background(uri, "e", "stage", {}, True)
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "latecomer.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "late"))
    import latecomer
    run.params({"before": 1})
    run.run_tags({"thing": latecomer.Thing()})
    run.params({"after": 2})
    with pytest.warns(UserWarning, match="MLflow logging skipped params: "):
        run.params({"f": lambda: 0})  # this process cannot pickle it: skipped here
    run.finish()
    (logged,) = _runs(uri)
    assert logged.info.status == "FINISHED" and logged.data.params == {"before": "1", "after": "2"}
    assert "MLflow logging skipped a call it could not read: ModuleNotFoundError" in capfd.readouterr().err
