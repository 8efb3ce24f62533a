"""Server-side deployment tooling: a CA and TLS certificate for the SuperLink, the command that starts
it (TLS, SuperNode authentication, the Fleet API public and the Control and Runtime APIs on
loopback only: :mod:`server.superlink_gate`), the ``flwr`` CLI connection to it, SuperNode
registration, and a run that fails loudly unless it completed.

Who can do what (the threat model, also in docs/deployment.md): devices reach only the Fleet API,
and only registered SuperNodes may use it (Flower's node authentication). Registering nodes,
submitting runs and reading their logs go through the Control API, which listens on the server's
loopback interface only: they need a shell on the SuperLink's host.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.flower_env import flwr_env
from common.io import make_private_dir, write_bytes_atomic, write_text_atomic

LOOPBACK_NAMES = ("localhost", "127.0.0.1")


def make_certificates(out: str | Path, hosts: list[str], days: int = 825) -> dict[str, Path]:
    """A private CA and a SuperLink server certificate for ``hosts`` (DNS names or IP addresses).

    Writes ``ca.crt`` (give it to every SuperNode and operator), ``ca.key`` (keep offline),
    ``server.pem`` and ``server.key`` (the SuperLink's). Keys are written with mode 0600.
    """
    if not hosts:
        raise ValueError("give at least one host name or IP address for the SuperLink certificate")
    hosts = list(dict.fromkeys([*hosts, *LOOPBACK_NAMES]))  # the operator's CLI uses the loopback listener
    out = make_private_dir(out)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privrec"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "privrec SuperLink CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=3650))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privrec"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    private = dict(encoding=pem, format=serialization.PrivateFormat.TraditionalOpenSSL,
                   encryption_algorithm=serialization.NoEncryption())
    paths = {"ca_cert": out / "ca.crt", "ca_key": out / "ca.key", "cert": out / "server.pem", "key": out / "server.key"}
    write_bytes_atomic(paths["ca_key"], ca_key.private_bytes(**private), private=True)
    write_bytes_atomic(paths["key"], key.private_bytes(**private), private=True)
    write_text_atomic(paths["ca_cert"], ca_cert.public_bytes(pem).decode())
    write_text_atomic(paths["cert"], cert.public_bytes(pem).decode())
    return paths


def superlink_command(certs: str | Path, port: int, host: str = "127.0.0.1", database: str | Path | None = None,
                      control_port: int = 9093) -> list[str]:
    """The SuperLink (:mod:`server.superlink_gate`): TLS with the certificates of
    :func:`make_certificates`, SuperNode authentication, the Fleet API on ``host:port`` and the
    Control and Runtime APIs on ``127.0.0.1:control_port`` only. With ``database`` its state
    survives restarts; the file is created 0600 in a 0700 folder."""
    certs = Path(certs).resolve()
    for name in ("ca.crt", "server.pem", "server.key"):
        if not (certs / name).is_file():
            raise FileNotFoundError(f"{certs / name}: missing; create it with `privrec deploy certs`")
    cmd = [sys.executable, "-m", "server.superlink_gate", "--host", host, "--port", str(port),
           "--control-port", str(control_port), "--",
           "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
           "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth",
           "--disable-runtime-dependency-installation", "--isolation", "subprocess"]
    if database is not None:  # registrations survive a SuperLink restart only with a database
        database = Path(database).resolve()
        make_private_dir(database.parent)
        if not database.exists():  # SQLite keeps an existing file's mode (and gives its journals the same)
            os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(database, 0o600)
        cmd += ["--database", str(database)]
    return cmd


def write_connection(address: str, ca_cert: str | Path, name: str = "edge",
                     flwr_home: str | Path | None = None) -> Path:
    """Declare the SuperLink connection ``name`` (TLS, this CA) as the default in ``$FLWR_HOME/config.toml``."""
    home = Path(flwr_env(flwr_home)["FLWR_HOME"])
    ca = Path(ca_cert).resolve()
    if not ca.is_file():
        raise FileNotFoundError(f"{ca}: missing CA certificate")
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"connection name must be letters, digits, - or _, got {name!r}")
    text = (f'[superlink]\ndefault = {json.dumps(name)}\n\n[superlink.{name}]\naddress = {json.dumps(address)}\n'
            f'root-certificates = {json.dumps(str(ca))}\n')
    return write_text_atomic(home / "config.toml", text)


def _flwr(args: list[str], flwr_home: str | Path | None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = flwr_env(flwr_home)
    exe = shutil.which("flwr", path=env["PATH"]) or "flwr"
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=timeout)


def register_supernode(public_key: str | Path, name: str = "edge", flwr_home: str | Path | None = None) -> int:
    """Register a SuperNode's public key with the SuperLink; returns the node id it will have."""
    res = _flwr(["supernode", "register", str(Path(public_key).resolve()), name, "--format", "json"], flwr_home)
    try:
        out = json.loads(res.stdout)
    except ValueError:
        out = {}
    if res.returncode != 0 or not out.get("success", False):
        raise RuntimeError(f"registering {public_key} failed: {(res.stdout + res.stderr).strip()[-800:]}")
    return int(out["node-id"])


def list_supernodes(name: str = "edge", flwr_home: str | Path | None = None) -> list[dict]:
    res = _flwr(["supernode", "list", name, "--format", "json"], flwr_home)
    if res.returncode != 0:
        raise RuntimeError(f"listing SuperNodes failed: {(res.stdout + res.stderr).strip()[-800:]}")
    return json.loads(res.stdout).get("nodes", [])


RUN_COMPLETE = "[privrec] run complete:"  # the ServerApp's last log line, once result.json is written
STRAGGLER_GRACE_S = 15.0
_COMPLETION = re.compile(re.escape(RUN_COMPLETE) + r" flower-run (\d+) result (\"(?:[^\"\\]|\\.)*\")")


def completion_line(flower_run_id: int | None, result_path: Path) -> str:
    """The ServerApp's completion line: Flower's run id and where its ``result.json`` is."""
    return f"{RUN_COMPLETE} flower-run {flower_run_id} result {json.dumps(str(Path(result_path).resolve()))}"


def _completed(line: str, run_id: int) -> bool:
    """Whether ``line`` announces the completion of run ``run_id`` and the ``result.json`` it names exists
    and was written by that run. A device's text can reach the ServerApp's log (a reason, a key name),
    so the line alone proves nothing; the file, which only the ServerApp writes, does."""
    match = _COMPLETION.search(line)
    if match is None or int(match.group(1)) != run_id:
        return False
    try:
        result = json.loads(Path(json.loads(match.group(2))).read_text(encoding="utf-8"))
        return int(result["config"]["flower-run-id"]) == run_id
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _run_state(run_id: int, name: str, flwr_home: str | Path | None) -> str:
    status = _flwr(["ls", name, "--run-id", str(run_id), "--format", "json"], flwr_home)
    try:
        run = json.loads(status.stdout)["runs"][0]
        return str(run["status"]) + (f" ({run['status-details']})" if run.get("status-details") else "")
    except (ValueError, KeyError, IndexError):
        return f"unknown: {(status.stdout + status.stderr).strip()[-400:]}"


def _follow_log(run_id: int, name: str, flwr_home: str | Path | None, timeout: float, stream) -> bool:
    """Copy the run's log to ``stream`` until it ends, :data:`RUN_COMPLETE` appears or ``timeout``
    passes; True when the ServerApp said it completed."""
    env = flwr_env(flwr_home)
    exe = shutil.which("flwr", path=env["PATH"]) or "flwr"
    proc = subprocess.Popen([exe, "log", str(run_id), name, "--stream"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline, complete = time.time() + timeout, False
    try:
        while time.time() < deadline:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                break
            if stream is not None:
                stream.write(line)
                stream.flush()
            if RUN_COMPLETE in line and _completed(line, run_id):
                complete = True
                break
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait()
    return complete


def run_and_wait(app_dir: str | Path, run_config: list[str], name: str = "edge",
                 flwr_home: str | Path | None = None, timeout: float = 3600, stream=None) -> tuple[int, str]:
    """Start a run, stream its log until it ends, and return (run id, final status).

    ``flwr run --stream`` exits 0 even when the ServerApp fails, so the status comes from ``flwr ls``.
    Once the ServerApp has logged its completion line and the ``result.json`` it names holds this
    run's id, the run's work is done; a runtime that still waits for a client task (Flower's
    simulation finishes every task it started, however long a hung client takes) is stopped after
    :data:`STRAGGLER_GRACE_S` and the status says so. With ``stream`` None the log goes to stdout.
    """
    args = ["run", str(Path(app_dir).resolve()), name, "--format", "json"]
    for rc in run_config:
        args += ["--run-config", rc]
    res = _flwr(args, flwr_home)
    try:
        run_id = int(json.loads(res.stdout)["run-id"])
    except (ValueError, KeyError):
        raise RuntimeError(f"flwr run failed: {(res.stdout + res.stderr).strip()[-800:]}") from None
    complete = _follow_log(run_id, name, flwr_home, timeout, stream if stream is not None else sys.stdout)
    deadline = time.time() + (STRAGGLER_GRACE_S if complete else 120)  # the status trails the log a moment
    while True:
        state = _run_state(run_id, name, flwr_home)
        if state.startswith("finished:"):
            return run_id, state
        if time.time() > deadline:
            break
        time.sleep(2)
    if not complete:
        return run_id, state
    _flwr(["stop", str(run_id), name], flwr_home)
    return run_id, (f"finished:completed (the ServerApp completed; the runtime still waited for client tasks "
                    f"{STRAGGLER_GRACE_S:.0f} s later and was stopped)")
