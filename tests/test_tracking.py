"""MLflow logging (hanprune.tracking): an unreachable store costs one warning and never an
exception, unless tracking is required; a registered model loads back without complaints; the
worker process of BackgroundRun makes every call, in order, and a wrong call fails where it is made."""
import logging
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hanprune import tracking


def _use(run: tracking.MlflowRun):
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
        run = tracking.MlflowRun("nosuch://x", "e", "stage", {"model": "m"}, False, group={"model": "m"})
        _use(run)
    assert run.id is None and not [x for x in w if "MLflow" in str(x.message)]  # no second warning
    _one_warning(capsys, "nosuch://x")


def test_mlflow_not_importable_warns_once_and_every_call_is_a_no_op(capsys, monkeypatch):
    for name in ["mlflow", "mlflow.tracking", "mlflow.entities", "mlflow.pytorch"]:
        monkeypatch.setitem(sys.modules, name, None)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        run = tracking.MlflowRun("sqlite:////nonexistent/mlflow.db", "e", "stage", {}, False)
        _use(run)
    assert not [x for x in w if "MLflow" in str(x.message)]
    _one_warning(capsys, "sqlite:////nonexistent/mlflow.db")


def test_required_tracking_fails_at_construction(capsys):
    with pytest.raises(tracking.TrackingError, match=r"nosuch://x unreachable: .*\(tracking.required is true\)"):
        tracking.MlflowRun("nosuch://x", "e", "stage", {}, True)
    assert capsys.readouterr().err == ""


def test_store_failing_after_the_run_started_costs_one_warning_and_ends_the_logging(capsys, monkeypatch):
    """A store that went away: one line, and no further call (each would wait for its timeout)."""
    calls = []

    class Gone:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                calls.append(name)
                raise ConnectionError("store went away\n(and a second line)")
            return fail

    monkeypatch.delenv("HANPRUNE_STRICT_TRACKING")  # the failure is the store's, not a bug
    run = tracking.MlflowRun("nosuch://x", "e", "stage", {}, False)
    capsys.readouterr()
    run.client, run.run, run.parent_id = Gone(), SimpleNamespace(info=SimpleNamespace(run_id="r1")), "p1"
    run.params({"a": 1})
    run.metrics({"a": 1.0}, on_parent=True)
    run.run_tags({"a": 1})
    run.finish()
    assert calls == ["log_batch"]
    assert capsys.readouterr().err == ("warning: MLflow logging to nosuch://x failed: ConnectionError: store went away "
                                       "(and a second line); continuing without tracking\n")


def test_strict_tracking_raises_a_failing_call(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with tracking.MlflowRun(uri, "e", "stage", {}, True) as run:
        run.params({"a": 1})
        with pytest.raises(Exception, match="Changing param values is not allowed"):
            run.params({"a": 2})


def test_registered_model_loads_back_without_a_requirement_mismatch(tmp_path, caplog, capfd, monkeypatch):
    """torch==<torch.__version__> pinned a local tag (+cu130) pip does not report: MLflow warned
    'Detected one or more mismatches' on every evaluate."""
    import mlflow
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    model = torch.nn.Linear(4, 3).eval()
    caplog.set_level(logging.WARNING, logger="mlflow")  # MLflow's log lines are off (tracking.py): show its warnings
    monkeypatch.setattr(logging.getLogger("mlflow"), "propagate", True)
    with tracking.MlflowRun(uri, "e", "evaluate", {}, True) as run:
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
        with tracking.MlflowRun(uri, experiment, name, group, True, group) as run:
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


def test_artifacts_go_beside_the_sqlite_store_whatever_the_working_directory(tmp_path, monkeypatch):
    """A study's stages run in its folder (studies/records): their artifacts still go to the
    project's mlruns/, beside mlflow.db, not to a mlruns/ in the study's folder."""
    from mlflow.tracking import MlflowClient
    (tmp_path / "study").mkdir()
    monkeypatch.chdir(tmp_path / "study")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking.MlflowRun(uri, "study", "stage", {}, True) as run:
        run.table([{"layer": "fc1", "kept": 0.5}], "layers.json")
    assert MlflowClient(uri).get_experiment_by_name("study").artifact_location == (tmp_path / "mlruns").as_uri()
    assert list((tmp_path / "mlruns").rglob("layers.json")) and not (tmp_path / "study" / "mlruns").exists()


def test_the_dataset_is_an_input_of_the_run_with_its_md5_as_digest(tmp_path):
    """MLflow 3's Dataset column names the data a stage read (mlflow.log_input's entity)."""
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    md5 = "0123456789abcdef0123456789abcdef"
    with tracking.MlflowRun(uri, "e", "stage", {"dataset": "mnist", "dataset_md5": md5}, True) as run:
        pass
    with tracking.MlflowRun(uri, "e", "report", {"dataset": "", "dataset_md5": ""}, True) as none:
        pass
    (given,) = MlflowClient(uri).get_run(run.id).inputs.dataset_inputs
    assert (given.dataset.name, given.dataset.digest) == ("mnist", md5)
    assert MlflowClient(uri).get_run(none.id).inputs.dataset_inputs == []


def _runs(uri: str, experiment: str = "e") -> list:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return [r for r in runs if r.data.tags.get("pipeline_parent") != "true"]


def test_background_run_logs_everything_through_its_worker(tmp_path):
    """What a stage hands the worker process ends up in the store, in order, once finish() returns."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    group = {"model": "m", "git_commit": "c", "dvc_exp_name": "workspace"}
    with tracking.start_worker(uri) as pool:
        with tracking.BackgroundRun(pool, uri, "e", "prune@m-iter1", {"dvc_stage": "prune@m-iter1"}, False, group) as run:
            run.params({"a": {"b": 1}})
            for step in range(1, 6):
                run.metrics({"loss": 1.0 / step, "layer": {"fc1": step}}, step=step, on_parent=step % 2 == 1)
            run.metrics({"final": 7.0})
            run.run_tags({"registered": "false"})
            run.table([{"layer": "fc1", "kept": 0.5}], "layers.json")
            run.artifact(__file__)
    (logged,) = _runs(uri)
    assert logged.info.run_name == "prune@m-iter1" and logged.info.status == "FINISHED"
    assert logged.data.params == {"a.b": "1"} and logged.data.metrics == {"loss": 0.2, "layer.fc1": 5.0, "final": 7.0}
    assert logged.data.tags["registered"] == "false" and logged.data.tags["mlflow.parentRunId"]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)

    def history(run_id, key):
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    # every call, at its step: none dropped, none doubled (the last value alone would not show it)
    assert history(logged.info.run_id, "loss") == [(k, 1.0 / k) for k in range(1, 6)]
    assert history(logged.info.run_id, "layer.fc1") == [(k, float(k)) for k in range(1, 6)]
    parent = client.get_run(logged.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["pipeline_parent"] == "true" and parent.data.tags["model"] == "m"
    assert history(parent.info.run_id, "loss") == [(k, 1.0 / k) for k in (1, 3, 5)]  # only the on_parent calls
    assert set(parent.data.metrics) == {"loss", "layer.fc1"}
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert artifacts == {"layers.json", "test_tracking.py"}


def test_a_worker_serves_one_run_after_another_in_the_stages_directory(tmp_path, monkeypatch):
    """Tests run stages one after another in one process, each in its own directory: a relative
    artifact path is the stage's."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with tracking.start_worker(uri) as pool:
        for name in ("first", "second"):
            (tmp_path / name).mkdir()
            (tmp_path / name / f"{name}.txt").write_text(name)
            monkeypatch.chdir(tmp_path / name)
            with tracking.BackgroundRun(pool, uri, "e", name, {}, True) as run:
                run.artifact(f"{name}.txt")
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    assert {r.info.run_name: [a.path for a in client.list_artifacts(r.info.run_id)] for r in _runs(uri)} == {
        "first": ["first.txt"], "second": ["second.txt"]}


def test_a_wrong_call_is_a_type_error_where_it_is_made(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with tracking.start_worker(uri) as pool:
        with tracking.BackgroundRun(pool, uri, "e", "stage", {}, False) as run:
            with pytest.raises(TypeError, match="unexpected keyword argument 'stepp'"):
                run.metrics({"loss": 1.0}, stepp=2)
            with pytest.raises(TypeError, match="missing a required argument: 'artifact_file'"):
                run.table([{"a": 1}])
            run.metrics({"loss": 1.0}, step=2)
    (logged,) = _runs(uri)
    assert logged.data.metrics == {"loss": 1.0} and logged.info.status == "FINISHED"


def test_a_call_that_fails_in_the_worker_raises_from_finish_when_strict(tmp_path, monkeypatch, capfd):
    """Under HANPRUNE_STRICT_TRACKING (the tests) a logging bug fails the test; otherwise it costs
    one line, and what could be logged is."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with tracking.start_worker(uri) as pool:
        run = tracking.BackgroundRun(pool, uri, "e", "strict", {}, True)
        run.params({"a": 1})
        run.params({"a": 2})  # MLflow refuses to change a param
        with pytest.raises(Exception, match="Changing param values is not allowed"):
            run.finish()
        monkeypatch.delenv("HANPRUNE_STRICT_TRACKING")
        run = tracking.BackgroundRun(pool, uri, "e", "lenient", {}, True)
        run.params({"f": lambda: 0})  # the worker cannot be handed it
        run.params({"b": 1})
        run.finish()
    lenient = next(r for r in _runs(uri) if r.info.run_name == "lenient")
    assert lenient.info.status == "FINISHED" and lenient.data.params == {"b": "1"}
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: MLflow logging to {uri} failed: ")


def _gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it runs no more code)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.parametrize("finished", [False, True])
def test_the_worker_exits_with_its_stage_and_a_run_left_open_is_failed(tmp_path, finished):
    """A stage that ends with os._exit (as run_stage ends a stage) or dies without finish() (killed):
    its worker process exits too, and marks a run it still holds FAILED; a finished run stays
    FINISHED, with what was logged."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    stage = ("import os, sys; from hanprune import tracking\n"
             f"pool = tracking.start_worker({uri!r})\n"
             f"run = tracking.BackgroundRun(pool, {uri!r}, 'e', 'stage', {{}}, True)\n"
             "run.metrics({'loss': 1.0}, step=1)\n"
             + ("run.finish()\n" if finished else "") +
             "print(*pool._processes, flush=True)\n"
             "os._exit(0)")
    proc = subprocess.run([sys.executable, "-c", stage], cwd=Path(__file__).parents[1], check=True, timeout=60,
                          capture_output=True, text=True)
    (worker,) = map(int, proc.stdout.split())
    deadline = time.monotonic() + 60
    while not (_gone(worker) and _runs(uri)[0].info.status != "RUNNING") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gone(worker), "the worker outlived its stage"
    (run,) = _runs(uri)
    assert run.info.status == ("FINISHED" if finished else "FAILED")
    if finished:
        assert run.data.metrics == {"loss": 1.0}


def test_a_model_registered_through_the_worker_loads_back(tmp_path, monkeypatch):
    """BackgroundRun.register_model: the model travels to the worker process, which logs and
    registers it with the version's tags; the loaded model computes what the model computes."""
    import mlflow
    monkeypatch.chdir(tmp_path)  # the store's artifacts go to ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    with tracking.start_worker(uri) as pool:
        with tracking.BackgroundRun(pool, uri, "e", "evaluate@m", {}, True, {"model": "m"}) as run:
            run.register_model(model, "m-pruned", torch.zeros(2, 4).numpy(), {"compression": 3.5, "dataset": "tiny"})
            run.run_tags({"registered": "true"})
    client = mlflow.MlflowClient(uri)
    (version,) = client.search_model_versions("name = 'm-pruned'")
    assert version.tags == {"compression": "3.5", "dataset": "tiny"}
    (logged,) = _runs(uri)
    assert version.run_id == logged.info.run_id and logged.data.tags["registered"] == "true"
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model(f"models:/m-pruned/{version.version}")
    x = torch.randn(5, 4)
    assert torch.equal(loaded(x), model(x))


def test_background_run_with_an_unreachable_store_warns_once(capfd):
    with tracking.start_worker("nosuch://x") as pool:
        run = tracking.BackgroundRun(pool, "nosuch://x", "e", "stage", {}, False)
        run.params({"a": 1})
        run.metrics({"a": 1.0})
        run.finish()
    out, err = capfd.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith("warning: MLflow tracking store nosuch://x unreachable: ")


def test_background_required_tracking_fails_at_construction():
    with tracking.start_worker("nosuch://x") as pool:
        with pytest.raises(tracking.TrackingError, match=r"nosuch://x unreachable: .*\(tracking.required is true\)"):
            tracking.BackgroundRun(pool, "nosuch://x", "e", "stage", {}, True)
