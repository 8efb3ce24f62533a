"""Edge deployment on loopback: a SuperLink with TLS and SuperNode authentication (Fleet API on one
port, Control API on a loopback-only port), three devices each holding one exported MovieLens user
(a SuperNode and the SuperExec that runs approved apps only), real `flwr run`s, a killed device, an
unregistered one, an outsider holding only the CA certificate, a foreign app, the wire, file modes,
and on-device recommendations and feedback."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from client.deploy import make_node_key
from client.device_state import CATALOGUE
from client.export import export_user
from client.feedback import record_feedback
from client.recommend import DeviceRecommender
from common.errors import DataFormatError
from common.flower_env import flwr_env
from common.wire import TRAIN_METRICS
from server.deploy import (
    list_supernodes,
    make_certificates,
    register_supernode,
    run_and_wait,
    superlink_command,
    write_connection,
)
from simulations.cli import app

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
USERS = ("1", "2", "3")
PRIVREC = [str(Path(flwr_env()["PATH"].split(os.pathsep)[0]) / "privrec")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port}")


class Cluster:
    """The processes of one loopback deployment, and where their files are."""

    def __init__(self, root: Path, dataset: Path) -> None:
        self.root, self.dataset = root, dataset
        self.home = root / "flwr-home"
        self.port, self.control_port = _free_port(), _free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.certs = make_certificates(root / "certs", ["localhost", "127.0.0.1"])
        self.keys = {f"node{i}": make_node_key(root / "keys", f"node{i}") for i in range(4)}
        self.node_ports = {name: _free_port() for name in self.keys}

    def data(self, node: str) -> Path:
        return self.root / "data" / node

    def state(self, node: str) -> Path:
        return self.root / "state" / node

    def ledger(self, node: str) -> dict:
        return json.loads((self.state(node) / f"ledger-{node}.json").read_text())

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(cmd, env=flwr_env(self.home), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return self.procs[name]

    def start_supernode(self, node: str) -> subprocess.Popen:
        """The device as its owner starts it: `privrec deploy supernode` (SuperNode + app gate)."""
        # The devices' own policy allows the budget these short runs ask for (the default is 8).
        return self.start(node, [*PRIVREC, "deploy", "supernode", "--superlink", f"127.0.0.1:{self.port}",
                                 "--ca", str(self.certs["ca_cert"]), "--key", str(self.keys[node][0]),
                                 "--data-path", str(self.data(node)), "--state-dir", str(self.state(node)),
                                 "--port", str(self.node_ports[node]), "--client-id", node,
                                 "--policy", "privacy-epsilon-budget=60.0"])

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def run(self, name: str, **overrides) -> tuple[int, str, Path]:
        cfg = {"num-server-rounds": 2, "clients-per-round": 3, "evaluate-clients": 0, "eval-every": 100,
               "examples-per-user": 6, "history-len": 3, "max-length": 32, "batch-size": 3,
               "max-update-norm": 1000.0, "round-timeout": 120.0, "client-epsilon-budget": 60.0, "wire-log": "true",
               "publish-catalogue": "true",
               "dataset": f"'{self.dataset}'", "output-dir": f"'{self.root / 'runs'}'", "run-name": f"'{name}'"}
        cfg.update({k.replace("_", "-"): v for k, v in overrides.items()})
        with open(self.root / f"run-{name}.log", "w") as stream:
            run_id, status = run_and_wait(REPO, [" ".join(f"{k}={v}" for k, v in cfg.items())], "edge", self.home,
                                          timeout=900, stream=stream)
        return run_id, status, self.root / "runs" / name


@pytest.fixture(scope="module")
def cluster(ml100k, small_ml100k, tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("deploy"), small_ml100k)
    for node, user in zip(("node0", "node1", "node2"), USERS):
        export_user(ml100k, user, c.data(node))
    c.start("superlink", superlink_command(c.root / "certs", c.port, database=c.root / "server" / "superlink.db",
                                           control_port=c.control_port))
    try:
        _wait_port(c.port)
        _wait_port(c.control_port)
        write_connection(f"127.0.0.1:{c.control_port}", c.certs["ca_cert"], "edge", c.home)
        c.node_ids = {n: register_supernode(c.keys[n][1], "edge", c.home) for n in ("node0", "node1", "node2")}
        for node in ("node0", "node1", "node2"):
            c.start_supernode(node)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def first_run(cluster):
    run_id, status, run_dir = cluster.run("e2e")
    assert status.startswith("finished:completed"), (status, cluster.log("superlink")[-3000:])
    return run_dir


def test_an_unregistered_supernode_cannot_join(cluster):
    export_user_dir = cluster.data("node3")
    export_user_dir.mkdir(parents=True, exist_ok=True)
    for name in ("events.jsonl", "catalogue.jsonl"):
        (export_user_dir / name).write_bytes((cluster.data("node0") / name).read_bytes())
    proc = cluster.start_supernode("node3")
    assert proc.wait(timeout=90) != 0
    assert "Failed to activate SuperNode" in cluster.log("node3") or "2004" in cluster.log("node3")
    assert not (cluster.state("node3") / "ledger-node3.json").exists()


def test_two_rounds_over_tls_change_the_model_and_fill_every_ledger(cluster, first_run):
    run_dir = first_run
    for name in ("config.json", "metrics.jsonl", "rounds.jsonl", "result.json", "adapters.safetensors",
                 "catalogue.safetensors", "catalogue.sha256", "wire.jsonl"):
        assert (run_dir / name).stat().st_size > 0, name
    final = load_file(str(run_dir / "adapters.safetensors"))
    assert np.abs(final["text_out.weight"]).max() > 0, "the sequence model's output layer is still zero"
    rows = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [len(r["trained"]) for r in rows] == [3, 3]
    assert {n for r in rows for n in r["trained"]} == set(cluster.node_ids.values())
    for node in ("node0", "node1", "node2"):
        sessions = [s for s in cluster.ledger(node)["sessions"] if s["run_id"] == "e2e"]
        assert [s["round"] for s in sessions] == [1, 2]
        assert {s["node_id"] for s in sessions} == {cluster.node_ids[node]}  # stable node id per key
        for name in ("global-state.safetensors", "catalogue.safetensors", "catalogue.sha256", "device.json"):
            assert (cluster.state(node) / name).is_file(), (node, name)


def test_the_wire_carries_only_the_listed_fields(cluster, first_run, ml100k):
    rows = [json.loads(x) for x in (first_run / "wire.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    names = set(load_file(str(first_run / "adapters.safetensors")))
    secrets = set()
    for node in ("node0", "node1", "node2"):
        for line in (cluster.data(node) / "events.jsonl").read_text().splitlines():
            item = json.loads(line)["item"]
            secrets.add(str(item))
            secrets.add(ml100k.items[ml100k.item_index[str(item)]].title)
    for row in rows:
        assert set(row["arrays"]) == {"arrays"} and set(row["arrays"]["arrays"]) == names
        assert all(dtype == "float32" for dtype, _ in row["arrays"]["arrays"].values())
        assert set(row["metrics"]) == {"metrics"} and row["configs"] == {}
        assert set(row["metrics"]["metrics"]) == set(TRAIN_METRICS)  # the privacy statement's list, exactly
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row["metrics"]["metrics"].values())
        # no text of any kind (the tensors' names are the model's, checked above)
        assert "text" not in json.dumps({**row, "arrays": {}}) and not any(
            isinstance(v, str) and v in secrets for v in row["metrics"]["metrics"].values())


def test_recommendations_on_the_device_are_unseen_explained_and_checked(cluster, first_run):
    state = cluster.state("node0")
    rec = DeviceRecommender(state)
    seen = {json.loads(x)["item"] for x in (cluster.data("node0") / "events.jsonl").read_text().splitlines()}
    recs = rec.recommend(k=10)
    assert len(recs) == 10 and len({r.item_id for r in recs}) == 10
    assert not {r.item_id for r in recs} & seen
    assert all(len(r.because) == 2 and all(i in seen for i, _, _ in r.because) for r in recs)
    assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)
    with_text = rec.recommend(k=10, text="a scary space alien movie")
    assert len(with_text) == 10 and {r.item_id for r in with_text} != {r.item_id for r in recs}
    # The same through the CLI, as a user on the device runs it.
    runner = CliRunner()
    shown = runner.invoke(app, ["recommend", "--state-dir", str(state), "--k", "5", "--text", "funny"])
    assert shown.exit_code == 0 and shown.output.count("(0.") >= 5, shown.output
    # Feedback on a recommendation joins the device's data and is excluded from then on.
    accepted = runner.invoke(app, ["feedback", "--state-dir", str(state), "--item", recs[0].item_id, "--accept"])
    assert accepted.exit_code == 0, accepted.output
    last = json.loads((cluster.data("node0") / "events.jsonl").read_text().splitlines()[-1])
    assert last["item"] == recs[0].item_id and last["rating"] == 5.0
    event = record_feedback(state, recs[1].item_id, 4.0)
    assert event["item"] == recs[1].item_id
    assert not {recs[0].item_id, recs[1].item_id} & {r.item_id for r in rec.recommend(k=10)}
    with pytest.raises(DataFormatError, match="unknown item id"):
        record_feedback(state, "99999", 4.0)
    with pytest.raises(ValueError, match="rating"):
        record_feedback(state, recs[2].item_id, 7)
    # A catalogue altered on the device is refused.
    path = state / CATALOGUE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataFormatError, match="checksum mismatch"):
        DeviceRecommender(state)


def test_a_killed_supernode_does_not_stall_the_run_and_rejoins_with_its_ledger(cluster, first_run):
    before = cluster.ledger("node2")["sessions"]
    victim = cluster.procs["node2"]
    killed = threading.Event()

    def kill_when_training() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed.is_set():
            sessions = cluster.ledger("node2")["sessions"]
            if any(s["run_id"] == "e2e-kill" for s in sessions):
                os.killpg(victim.pid, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_when_training, daemon=True)
    watcher.start()
    # The text model's sessions take seconds, so the kill lands inside one (a sequence-model session
    # is over in tens of milliseconds, before the watcher sees its ledger entry).
    _, status, run_dir = cluster.run("e2e-kill", round_timeout=60.0, user_model='"text"')
    watcher.join(timeout=5)
    assert killed.is_set(), "node2 never started training"
    assert status.startswith("finished:completed"), status
    rows = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    dead = cluster.node_ids["node2"]
    assert dead not in rows[0]["trained"] and len(rows[0]["trained"]) == 2
    assert rows[0]["failed"] == [dead] and rows[1]["failed"] == [dead]  # timed out, then unavailable
    assert len(rows[1]["trained"]) == 2
    after_kill = cluster.ledger("node2")["sessions"]
    assert after_kill[:len(before)] == before and len(after_kill) == len(before) + 1  # spend kept, round 1 recorded
    # Restart with the same key once the SuperLink has marked it offline: it rejoins as the same node.
    deadline = time.time() + 150
    while time.time() < deadline:
        status = {int(n["node-id"]): n["status"] for n in list_supernodes("edge", cluster.home)}
        if status.get(dead) == "offline":
            break
        time.sleep(3)
    cluster.start_supernode("node2")
    deadline = time.time() + 60
    online = False
    while time.time() < deadline and not online:
        time.sleep(3)
        online = {int(n["node-id"]): n["status"] for n in list_supernodes("edge", cluster.home)}.get(dead) == "online"
    assert online, cluster.log("node2")[-2000:]
    assert cluster.ledger("node2")["sessions"] == after_kill


FOREIGN_APP = {
    "pyproject.toml": '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "foreignapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "eve"

[tool.flwr.app.components]
serverapp = "foreign_server:app"
clientapp = "foreign_client:app"

[tool.flwr.app.config]
server-marker = ""
client-marker = ""
loot = ""
timeout = 40.0
''',
    # A ServerApp that writes a file of its choosing on the server host and collects whatever the
    # devices send back.
    "foreign_server.py": '''import json
import pathlib

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    cfg = context.run_config
    pathlib.Path(cfg["server-marker"]).write_text("the foreign server app ran")
    nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=n, message_type=MessageType.TRAIN)
            for n in nodes]
    got = []
    for reply in grid.send_and_receive(msgs, timeout=float(cfg["timeout"])):
        if reply.has_error():
            got.append({"error": int(reply.error.code)})
        else:
            got.append({"loot": dict(reply.content["loot"])})
    pathlib.Path(cfg["loot"]).write_text(json.dumps({"nodes": len(nodes), "replies": got}))
''',
    # A ClientApp that reads the device's raw ratings and node config and sends them back.
    "foreign_client.py": '''import json
import pathlib

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def steal(msg, context):
    node = dict(context.node_config)
    pathlib.Path(str(context.run_config["client-marker"]) + f"-{context.node_id}").write_text(json.dumps(node))
    events = pathlib.Path(str(node["data-path"])) / "events.jsonl"
    return Message(RecordDict({"loot": ConfigRecord({"events": events.read_text(), "node": json.dumps(node)})}),
                   reply_to=msg)
''',
}


def _foreign_app(folder: Path) -> Path:
    app_dir = folder / "foreignapp"
    app_dir.mkdir(parents=True)
    for name, text in FOREIGN_APP.items():
        (app_dir / name).write_text(text)
    return app_dir


def _flwr_json(home: Path, *args: str) -> dict:
    res = subprocess.run([str(Path(flwr_env()["PATH"].split(os.pathsep)[0]) / "flwr"), *args, "--format", "json"],
                         env=flwr_env(home), capture_output=True, text=True, timeout=120)
    try:
        return json.loads(res.stdout)
    except ValueError:
        return {"success": False, "error-message": (res.stdout + res.stderr)[-800:]}


def test_an_outsider_with_only_the_ca_certificate_is_refused_every_step(cluster, first_run, tmp_path):
    """The attack of issue 19, replayed: Eve holds ca.crt and her own Flower home and key, and can
    reach the address devices connect to."""
    eve_home = tmp_path / "eve-home"
    write_connection(f"127.0.0.1:{cluster.port}", cluster.certs["ca_cert"], "edge", eve_home)
    _, eve_pub = make_node_key(tmp_path / "eve-keys", "eve")
    registered = _flwr_json(eve_home, "supernode", "register", str(eve_pub), "edge")
    assert registered["success"] is False and "404" in registered["error-message"], registered
    listed = _flwr_json(eve_home, "ls", "edge")
    assert listed["success"] is False and "404" in listed["error-message"], listed
    nodes = _flwr_json(eve_home, "supernode", "list", "edge")
    assert nodes["success"] is False, nodes
    logs = _flwr_json(eve_home, "log", "1", "edge")
    assert logs.get("success") is not True
    app_dir = _foreign_app(tmp_path)
    markers = {k: tmp_path / k for k in ("server-marker", "client-marker", "loot")}
    overrides = " ".join(f"{k}='{v}'" for k, v in markers.items())
    with pytest.raises(RuntimeError, match="flwr run failed"):
        run_and_wait(app_dir, [overrides], "edge", eve_home, timeout=120)
    # Flower's Runtime API (what a ServerApp's SuperExec uses) is not on the public port either.
    ssl_context = ssl.create_default_context(cafile=str(cluster.certs["ca_cert"]))
    with httpx.Client(verify=ssl_context, timeout=30) as web:
        for path in ("/v1/runtime/acquire-task", "/v1/control/start-run", "/v1/fleet/../control/list-runs",
                     "/v1/control/list-nodes/", "/docs", "/openapi.json"):
            assert web.post(f"https://127.0.0.1:{cluster.port}{path}", content=b"").status_code == 404, path
        assert web.get(f"https://127.0.0.1:{cluster.port}/health").status_code == 200
    # The operator's own listener is on loopback only.
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex(("127.0.0.1", cluster.control_port)) == 0
    assert "127.0.0.1" == _bound_host(cluster.control_port)
    time.sleep(2)
    assert not any(markers[k].exists() for k in ("server-marker", "loot"))
    assert not list(tmp_path.glob("client-marker*"))
    # Her key was never registered, so her SuperNode cannot join either.
    assert str(eve_pub) not in json.dumps(list_supernodes("edge", cluster.home))


def _bound_host(port: int) -> str:
    """The local address the listener on ``port`` is bound to (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        host_hex, port_hex = local.split(":")
        if int(port_hex, 16) == port and state == "0A":  # LISTEN
            return socket.inet_ntoa(bytes.fromhex(host_hex)[::-1])
    raise AssertionError(f"nothing listens on {port}")


def test_a_device_runs_no_app_but_the_one_its_owner_installed(cluster, first_run, tmp_path):
    """Even a run submitted through the operator's own Control API (a compromised server, a
    colluding operator) cannot make a device run foreign code: the app gate never starts it."""
    ledgers_before = {n: cluster.ledger(n)["sessions"] for n in ("node0", "node1", "node2")}
    app_dir = _foreign_app(tmp_path)
    markers = {k: tmp_path / k for k in ("server-marker", "client-marker", "loot")}
    overrides = " ".join(f"{k}='{v}'" for k, v in markers.items())
    _, status = run_and_wait(app_dir, [overrides], "edge", cluster.home, timeout=400)
    assert markers["server-marker"].exists(), status  # it did run on the server (the operator's own host)
    loot = json.loads(markers["loot"].read_text())
    assert loot["nodes"] == 3
    assert all("loot" not in r for r in loot["replies"]), loot  # no device sent anything back
    assert not list(tmp_path.glob("client-marker*"))  # and none ran the foreign ClientApp
    for node in ("node0", "node1", "node2"):
        assert "refused to start task" in cluster.log(node)
        assert cluster.ledger(node)["sessions"] == ledgers_before[node]


def test_device_and_server_files_are_private(cluster, first_run):
    for path in (cluster.root / "server", cluster.state("node0"), cluster.root / "keys", cluster.data("node0")):
        assert (path.stat().st_mode & 0o777) == 0o700, path
    private = [cluster.root / "server" / "superlink.db", cluster.certs["key"], cluster.certs["ca_key"],
               cluster.keys["node0"][0], cluster.state("node0") / "superexec.secret",
               cluster.state("node0") / "ledger-node0.json", cluster.state("node0") / "global-state.safetensors",
               cluster.state("node0") / "device.json", cluster.data("node0") / "events.jsonl"]
    for path in private:
        assert (path.stat().st_mode & 0o777) == 0o600, path


def test_the_gate_refuses_to_serve_without_tls_or_without_supernode_authentication(tmp_path):
    """The public allowlist includes node registration: only Flower's node authentication restricts it."""
    from server.superlink_gate import _flower_config, check_public_config

    certs = make_certificates(tmp_path / "certs", ["localhost"])
    tls = ["--ssl-ca-certfile", str(certs["ca_cert"]), "--ssl-certfile", str(certs["cert"]),
           "--ssl-keyfile", str(certs["key"]), "--host", "127.0.0.1", "--port", "9"]
    with pytest.raises(SystemExit, match="needs TLS"):
        check_public_config(_flower_config(["--host", "127.0.0.1", "--port", "9", "--insecure"]))
    with pytest.raises(SystemExit, match="needs SuperNode authentication"):
        check_public_config(_flower_config(tls))
    check_public_config(_flower_config([*tls, "--enable-supernode-auth"]))  # what privrec deploy superlink runs
