"""Working as a team, against real servers on loopback started and stopped by team/up and team/down
(SeaweedFS's S3 gateway as DVC's remote and MLflow's artifact store, PostgreSQL behind the MLflow
server): two clones of the tiny project with a bare git repository as their origin. A machine where
the servers cannot start skips these (`pytest -m "not team"` leaves them out anywhere)."""
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.tiny import ROOT, env, ran, sh, tiny_project

pytestmark = [pytest.mark.team, pytest.mark.slow]

MODEL = "lenet_300_100"  # one model, one prune round: the smallest pipeline that has every stage
STAGES = {"download", f"pretrain@{MODEL}", f"sensitivity@{MODEL}", f"schedule@{MODEL}-iter1", f"prune@{MODEL}-iter1",
          f"select@{MODEL}", f"quantize@{MODEL}", f"encode@{MODEL}", f"evaluate@{MODEL}", "report"}
UNTRACKED = {"download", f"schedule@{MODEL}-iter1"}  # stages that open no MLflow run
AFTER_QUANTIZE = {f"quantize@{MODEL}", f"encode@{MODEL}", f"evaluate@{MODEL}", "report"}
MLFLOW_WARNING = re.compile(r"(?:warning: |UserWarning: )MLflow")


class Team:
    """The servers of one test module (team/up and team/down on a state directory of its own, free
    ports), and the two clones: A made the project, B is cloned from the bare origin."""

    def __init__(self, tmp: Path):
        self.tmp, self.state = tmp, tmp / "servers"
        self.a, self.b, self.origin = tmp / "a", tmp / "b", tmp / "origin.git"
        self.exports: dict[str, str] = {}
        self.mid_pipeline = ""  # what the stages printed while the MLflow server went away

    def servers(self, command: str, *args) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / "team" / command), "--dir", str(self.state), *args],
                              env=env(self.tmp), capture_output=True, text=True, timeout=300)

    def on(self, repo: Path, *cmd, check=True, **extra) -> subprocess.CompletedProcess:
        """A command in a clone, with what team/up said to export (credentials, MLflow's URI)."""
        return sh(repo, *cmd, check=check, **{**self.exports, **extra})

    def use_remote(self, repo: Path):
        """The committed remote with this module's endpoint, the way a team member points it elsewhere."""
        sh(repo, "dvc", "remote", "modify", "--local", "team", "endpointurl", self.exports["MLFLOW_S3_ENDPOINT_URL"])


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    t = Team(tmp_path_factory.mktemp("team"))
    up = t.servers("up", "--s3-port", "0", "--postgres-port", "0", "--mlflow-port", "0")
    if up.returncode != 0:
        t.servers("down")
        pytest.skip(f"the team's servers cannot start here: {(up.stderr.strip().splitlines() or ['?'])[-1]}")
    try:
        for line in up.stdout.splitlines():
            if line.startswith("export "):
                key, value = shlex.split(line)[1].split("=", 1)
                t.exports[key] = value
        t.params = tiny_project(t.a, {MODEL: 1})
        t.params["models"][MODEL]["pretrain"]["epochs"] = 2  # the servers are under test, not the learning
        t.params["sensitivity"]["s"] = [0.0, 1.0]
        (t.a / "params.yaml").write_text(yaml.safe_dump(t.params, sort_keys=False))
        t.use_remote(t.a)
        sh(t.tmp, "git", "init", "-q", "--bare", "-b", "main", str(t.origin))
        sh(t.a, "git", "remote", "add", "origin", str(t.origin))
        sh(t.a, "git", "add", "-A")
        sh(t.a, "git", "commit", "-qm", "tiny project")
        t.first = t.on(t.a, "dvc", "repro").stdout
        sh(t.a, "git", "add", "-A")
        sh(t.a, "git", "commit", "-qm", "first run")
        sh(t.a, "git", "push", "-q", "origin", "main")
        yield t
    finally:
        t.servers("down")


def lock_outs(repo: Path) -> list[str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return sorted({o["path"] for st in lock["stages"].values() for o in st.get("outs", [])})


def files(repo: Path) -> dict[str, str]:
    """md5 of every file of every output dvc.lock names."""
    out = {}
    for path in lock_outs(repo):
        p = repo / path
        for f in [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()):
            out[str(f.relative_to(repo))] = hashlib.md5(f.read_bytes()).hexdigest()
    return out


def test_push_fails_while_the_object_store_is_down_and_completes_after_its_restart(team):
    """Part of the outputs is pushed; then the object store dies (SIGKILL) as the full push starts:
    DVC reports its own error. After `team/up s3` a second push sends the rest (the next test's
    fresh clone pulls and checks every output)."""
    assert ran(team.first) == STAGES
    assert re.search(r"\b[1-9]\d* files? pushed", team.on(team.a, "dvc", "push", f"pretrain@{MODEL}").stdout)
    push = subprocess.Popen(["dvc", "push", "--run-cache"], cwd=team.a, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env(team.tmp, **team.exports, AWS_MAX_ATTEMPTS="1"),  # fail fast: no retries
                            text=True)
    os.killpg(json.loads((team.state / "state.json").read_text())["pids"]["s3"], signal.SIGKILL)
    out = push.communicate(timeout=180)[0]
    assert push.returncode != 0, out
    assert re.search(r"^ERROR: .*(connect|endpoint)", out, re.M) and "Traceback" not in out, out
    assert team.servers("up", "s3").returncode == 0
    again = team.on(team.a, "dvc", "push", "--run-cache").stdout
    assert re.search(r"\b[1-9]\d* files? pushed", again), again


def test_a_fresh_clone_pulls_every_output_and_has_nothing_to_run(team):
    sh(team.tmp, "git", "clone", "-q", str(team.origin), str(team.b))
    team.use_remote(team.b)
    assert not (team.b / "models").exists()
    team.on(team.b, "dvc", "pull")
    pulled = files(team.b)
    assert pulled == files(team.a) and f"models/{MODEL}/rounds/iter1.pt" in pulled
    assert json.loads(team.on(team.b, "dvc", "status", "--json").stdout) == {}
    assert ran(team.on(team.b, "dvc", "repro").stdout) == set()


def test_both_clones_log_to_the_mlflow_server_and_share_its_artifacts(team):
    """A's pipeline run and a stage B runs land in one experiment, each stage run under the parent
    of its model and pipeline run: A's at the commit A ran at, B's at the commit B runs at. A
    checkpoint A's evaluate logged downloads on B through the MLflow server, with no object-store
    credentials on B's side; it lies in the object store."""
    from mlflow.tracking import MlflowClient
    assert ran(team.on(team.b, "dvc", "repro", "-f", "-s", f"encode@{MODEL}").stdout) == {f"encode@{MODEL}"}
    client = MlflowClient(team.exports["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(team.params["tracking"]["experiment"])
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id], max_results=1000)}
    children = [r for r in runs.values() if "mlflow.parentRunId" in r.data.tags]
    assert {r.info.run_name for r in children} >= STAGES - UNTRACKED
    for r in children:
        parent = runs[r.data.tags["mlflow.parentRunId"]]
        assert parent.data.tags["pipeline_parent"] == "true"
        assert all(parent.data.tags[k] == r.data.tags[k] for k in ("model", "git_commit", "dvc_exp_name"))
    encodes = {r.data.tags["git_commit"]: r for r in children if r.info.run_name == f"encode@{MODEL}"}
    commits = [sh(repo, "git", "rev-parse", rev).stdout.strip() for repo, rev in [(team.a, "HEAD~1"), (team.b, "HEAD")]]
    assert sorted(encodes) == sorted(commits)  # A's first run, B's: two pipeline runs, two parents
    assert all(r.info.status == "FINISHED" for r in encodes.values())
    (evaluate,) = [r for r in children if r.info.run_name == f"evaluate@{MODEL}"]
    dl = team.tmp / "downloaded"
    sh(team.b, "mlflow", "artifacts", "download", "--run-id", evaluate.info.run_id,
       "--artifact-path", "checkpoint/selected.pt", "--dst-path", str(dl),
       MLFLOW_TRACKING_URI=team.exports["MLFLOW_TRACKING_URI"])  # and no AWS_* variables
    assert (dl / "selected.pt").read_bytes() == (team.a / "models" / MODEL / "selected.pt").read_bytes()
    assert client.search_model_versions(f"name = '{MODEL}-pruned'")
    import boto3
    store = boto3.client("s3", endpoint_url=team.exports["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1",
                         aws_access_key_id=team.exports["AWS_ACCESS_KEY_ID"],
                         aws_secret_access_key=team.exports["AWS_SECRET_ACCESS_KEY"])
    stored = store.list_objects_v2(Bucket="hanprune", Prefix=f"mlartifacts/{exp.experiment_id}/{evaluate.info.run_id}/")
    assert stored["KeyCount"] > 0


def test_an_experiment_travels_between_clones(team):
    """A runs an experiment and pushes it; B pulls it, sees it with its metrics, applies it and
    pulls its outputs: A's compressed model, bytes for bytes."""
    a, b = team.a, team.b
    model = f"models/{MODEL}/compressed.bin"
    baseline = (b / model).read_bytes()
    bits = team.params["models"][MODEL]["quantize"]["bits"]["fc1"] - 1
    out = team.on(a, "dvc", "exp", "run", "-n", "team-exp", "-S", f"models.{MODEL}.quantize.bits.fc1={bits}").stdout
    assert ran(out) == AFTER_QUANTIZE
    team.on(a, "dvc", "exp", "push", "origin", "team-exp")
    team.on(b, "dvc", "exp", "pull", "origin", "team-exp")
    shown = json.loads(team.on(b, "dvc", "exp", "show", "--json").stdout)
    exp = next(e["revs"][0]["data"] for row in shown for e in (row.get("experiments") or [])
               if e["revs"][0]["name"] == "team-exp")
    assert exp["params"]["params.yaml"]["data"]["models"][MODEL]["quantize"]["bits"]["fc1"] == bits
    assert exp["metrics"][f"metrics/{MODEL}.json"]["data"] == json.loads((a / "metrics" / f"{MODEL}.json").read_text())
    team.on(b, "dvc", "exp", "apply", "team-exp")
    team.on(b, "dvc", "pull")
    assert (b / model).read_bytes() == (a / model).read_bytes() != baseline
    assert json.loads(team.on(b, "dvc", "status", "--json").stdout) == {}


def test_mlflow_server_stopped_mid_pipeline_still_gives_every_output(team):
    """The MLflow server is stopped while quantize trains (after its first of five epochs): quantize,
    and encode after it, still write their outputs. The next test reads what they printed."""
    stages = [f"quantize@{MODEL}", f"encode@{MODEL}"]
    params = yaml.safe_load((team.b / "params.yaml").read_text())
    params["models"][MODEL]["quantize"]["finetune"]["epochs"] = 5  # logging goes on after the stop
    (team.b / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    repro = subprocess.Popen(["dvc", "repro", "-f", "-s", *stages], cwd=team.b,
                             env=env(team.tmp, **team.exports, HANPRUNE_STRICT_TRACKING="0"),  # the store fails on purpose
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, stopped = [], None
    try:
        for line in repro.stdout:
            lines.append(line)
            if stopped is None and re.search(r"epoch 1\b", line):
                stopped = team.servers("down", "mlflow")
        repro.wait(timeout=300)
    finally:
        restarted = team.servers("up", "mlflow")
    out = team.mid_pipeline = "".join(lines)
    assert stopped is not None and "stopped: mlflow" in stopped.stderr, out
    assert re.search(r"epoch 5\b", out) and repro.returncode == 0, out
    assert json.loads(team.on(team.b, "dvc", "status", "--json", *stages).stdout) == {}  # their outputs are in dvc.lock
    sections = dict(zip(*[iter(re.split(r"Running stage '([^']+)'", out)[1:])] * 2))
    assert list(sections) == stages
    assert "unreachable" in sections[f"encode@{MODEL}"]
    assert restarted.returncode == 0, restarted.stderr


def test_mlflow_server_stopped_mid_pipeline_costs_one_warning_per_stage(team):
    """Each stage of the previous test says once that it could not log: the stage the server went
    away under, at its first failing call, and the next, when it cannot open its run."""
    sections = dict(zip(*[iter(re.split(r"Running stage '([^']+)'", team.mid_pipeline)[1:])] * 2))
    warnings = {stage: len(MLFLOW_WARNING.findall(text)) for stage, text in sections.items()}
    assert warnings == dict.fromkeys([f"quantize@{MODEL}", f"encode@{MODEL}"], 1), team.mid_pipeline


def test_wrong_credentials_give_one_clear_line(team):
    for key, value in [("AWS_SECRET_ACCESS_KEY", "wrong"), ("AWS_ACCESS_KEY_ID", "nobody")]:
        push = team.on(team.b, "dvc", "push", check=False, **{key: value})
        out = push.stdout + push.stderr
        errors = [line for line in out.splitlines() if line.startswith("ERROR")]
        assert push.returncode != 0 and "Traceback" not in out, out
        assert len(errors) == 1 and re.search(r"Forbidden|403", errors[0]), out


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_down_stops_every_server_and_a_second_down_has_nothing_to_do(team):
    ports = json.loads((team.state / "state.json").read_text())["ports"]
    assert all(port_open(p) for p in ports.values())
    first = team.servers("down")
    assert first.returncode == 0 and "stopped: mlflow, postgres, s3" in first.stderr
    deadline = time.monotonic() + 10
    while any(port_open(p) for p in ports.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(port_open(p) for p in ports.values())
    second = team.servers("down")
    assert second.returncode == 0 and "nothing was running" in second.stderr
