"""Server-side deployment tooling: a CA and TLS certificate for the SuperLink, the command that starts
it with TLS and SuperNode authentication, the ``flwr`` CLI connection to it, SuperNode
registration, and a run that fails loudly unless it completed.

Flower 1.42's SuperLink serves its Fleet, Control and Runtime APIs on one HTTPS port. Its
Control API (register nodes, start runs) has no user authentication without Flower's account
auth: expose that port only where operators and devices can reach it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import shutil
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.flower_env import flwr_env
from common.io import write_bytes_atomic, write_text_atomic


def make_certificates(out: str | Path, hosts: list[str], days: int = 825) -> dict[str, Path]:
    """A private CA and a SuperLink server certificate for ``hosts`` (DNS names or IP addresses).

    Writes ``ca.crt`` (give it to every SuperNode and operator), ``ca.key`` (keep offline),
    ``server.pem`` and ``server.key`` (the SuperLink's). Keys are written with mode 0600.
    """
    if not hosts:
        raise ValueError("give at least one host name or IP address for the SuperLink certificate")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
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


def superlink_command(certs: str | Path, port: int, host: str = "127.0.0.1",
                      database: str | Path | None = None) -> list[str]:
    """flower-superlink with TLS (the certificates from :func:`make_certificates`) and SuperNode auth."""
    certs = Path(certs).resolve()
    for name in ("ca.crt", "server.pem", "server.key"):
        if not (certs / name).is_file():
            raise FileNotFoundError(f"{certs / name}: missing; create it with `privrec deploy certs`")
    cmd = [shutil.which("flower-superlink", path=flwr_env()["PATH"]) or "flower-superlink",
           "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
           "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth",
           "--disable-runtime-dependency-installation", "--isolation", "subprocess",
           "--host", host, "--port", str(port)]
    if database is not None:  # registrations survive a SuperLink restart only with a database
        cmd += ["--database", str(Path(database).resolve())]
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


def run_and_wait(app_dir: str | Path, run_config: list[str], name: str = "edge",
                 flwr_home: str | Path | None = None, timeout: float = 3600, stream=None) -> tuple[int, str]:
    """Start a run, stream its log until it ends, and return (run id, final status).

    ``flwr run --stream`` exits 0 even when the ServerApp fails, so the status comes from ``flwr ls``.
    """
    args = ["run", str(Path(app_dir).resolve()), name, "--format", "json"]
    for rc in run_config:
        args += ["--run-config", rc]
    res = _flwr(args, flwr_home)
    try:
        run_id = int(json.loads(res.stdout)["run-id"])
    except (ValueError, KeyError):
        raise RuntimeError(f"flwr run failed: {(res.stdout + res.stderr).strip()[-800:]}") from None
    env = flwr_env(flwr_home)
    exe = shutil.which("flwr", path=env["PATH"]) or "flwr"
    subprocess.run([exe, "log", str(run_id), name, "--stream"], env=env, timeout=timeout,
                   stdout=stream, stderr=subprocess.STDOUT if stream is not None else None)
    deadline = time.time() + 120  # the status can trail the end of the log stream by a moment
    while True:
        status = _flwr(["ls", name, "--run-id", str(run_id), "--format", "json"], flwr_home)
        try:
            run = json.loads(status.stdout)["runs"][0]
            state = str(run["status"]) + (f" ({run['status-details']})" if run.get("status-details") else "")
        except (ValueError, KeyError, IndexError):
            state = f"unknown: {(status.stdout + status.stderr).strip()[-400:]}"
        if state.startswith("finished:") or time.time() > deadline:
            return run_id, state
        time.sleep(2)
