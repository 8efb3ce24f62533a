"""Device-side deployment tooling: a SuperNode authentication key pair, and the launch of a device:
a SuperNode (TLS, that key, ``--node-config`` pointing at the device's data, state and privacy
policy) beside the device's own SuperExec (:mod:`client.app_gate`), which starts a ClientApp only
for an app the device approved. Both are supervised together by :func:`run_supervised`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.device_policy import DevicePolicy
from common.errors import ConfigError
from common.flower_env import flwr_env
from common.io import make_private_dir, write_bytes_atomic, write_text_atomic

SUPEREXEC_SECRET = "superexec.secret"  # in the state folder: lets only this device's SuperExec take tasks
TOKENS = "tokens"  # in the state folder: the token files of running ClientApps
APP_DIR = Path(__file__).resolve().parents[1]  # this installation's privrec app folder


def make_node_key(out: str | Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format (what Flower's SuperNode auth expects):
    ``<name>`` (private, mode 0600, stays on the device) and ``<name>.pub`` (register it)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"key name must be a plain file name, got {name!r}")
    out = Path(out)
    make_private_dir(out)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    priv_path, pub_path = out / name, out / f"{name}.pub"
    write_bytes_atomic(priv_path, private, private=True)
    write_text_atomic(pub_path, public.decode() + f" {name}\n")
    return priv_path, pub_path


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def superexec_secret(state_dir: str | Path) -> Path:
    """The device's SuperExec secret (32 random bytes from the OS, mode 0600), created once."""
    path = Path(state_dir) / SUPEREXEC_SECRET
    if not path.is_file():
        write_bytes_atomic(path, os.urandom(32).hex().encode(), private=True)
    os.chmod(path, 0o600)
    return path


@dataclass(frozen=True)
class DeviceLaunch:
    """The two processes of one device: its SuperNode and its SuperExec (the latter is given the
    SuperNode's pid with ``--parent-pid`` once started)."""

    supernode: list[str]
    app_gate: list[str]


def device_launch(superlink: str, ca_cert: str | Path, key: str | Path, data_path: str | Path,
                  state_dir: str | Path, port: int, client_id: str | None = None,
                  policy: Mapping[str, Any] | None = None, approve: list[str] | None = None,
                  app_dir: str | Path | None = None) -> DeviceLaunch:
    """The commands of a device holding one user's data (``data-path``: the JSONL user format),
    its persistent state (``state-dir``: ledger, global adapters, catalogue; created 0700) and its
    own privacy policy (``privacy-*`` keys of :class:`common.device_policy.DevicePolicy`; defaults
    for the keys not given). The device runs only the app built from its installed privrec
    (``app_dir``, default this installation) and the FAB hashes in ``approve``."""
    policy = dict(policy or {})
    others = sorted(k for k in policy if not str(k).startswith("privacy-"))
    if others:  # e.g. partition-id or data-path: node config the launcher sets, not policy
        raise ConfigError(f"--policy takes privacy-* keys only, got {others}")
    DevicePolicy.from_node_config(policy)  # refuse a malformed policy here, not at the first message
    for path, what in ((ca_cert, "CA certificate"), (key, "SuperNode private key")):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: missing {what}")
    data_path, state_dir = Path(data_path).resolve(), Path(state_dir).resolve()
    if not (data_path / "u.data").is_file():
        for name in ("events.jsonl", "catalogue.jsonl"):
            if not (data_path / name).is_file():
                raise FileNotFoundError(f"{data_path / name}: missing (export a user with `privrec export-user`)")
    make_private_dir(state_dir)
    secret = superexec_secret(state_dir)
    node_config = f"data-path={_toml_string(str(data_path))} state-dir={_toml_string(str(state_dir))}"
    if client_id:
        node_config += f" client-id={_toml_string(client_id)}"
    for k, v in policy.items():
        value = ("true" if v else "false") if isinstance(v, bool) else _toml_string(v) if isinstance(v, str) else repr(v)
        node_config += f" {k}={value}"
    path = flwr_env()["PATH"]
    import shutil

    supernode = [shutil.which("flower-supernode", path=path) or "flower-supernode",
                 "--superlink", superlink, "--root-certificates", str(Path(ca_cert).resolve()),
                 "--auth-supernode-private-key", str(Path(key).resolve()), "--host", "127.0.0.1", "--port", str(port),
                 "--isolation", "process", "--superexec-auth-secret-file", str(secret),
                 "--node-config", node_config]
    # -I: never import a `client` package from the folder the owner happens to be in (see client.app_gate)
    gate = [sys.executable, "-I", "-m", "client.app_gate", "--runtime-api-address", f"127.0.0.1:{port}",
            "--superexec-auth-secret-file", str(secret), "--token-dir", str(state_dir / TOKENS),
            "--app-dir", str(Path(app_dir or APP_DIR).resolve())]
    for h in approve or []:
        gate += ["--approve", h]
    return DeviceLaunch(supernode=supernode, app_gate=gate)


def run_supervised(launch: DeviceLaunch, env: dict[str, str] | None = None, poll: float = 0.5) -> int:
    """Start the SuperNode, then the device's SuperExec bound to it; when either exits (or this
    process gets SIGTERM or SIGINT), stop the other. Returns the exit code of the first to exit
    (1 if it was stopped by a signal)."""
    env = env or flwr_env()
    supernode = subprocess.Popen(launch.supernode, env=env)
    gate = subprocess.Popen([*launch.app_gate, "--parent-pid", str(supernode.pid)], env=env)
    stop = {"signal": None}

    def on_signal(sig, _frame) -> None:
        stop["signal"] = sig

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    supernode_exited_first = False
    try:
        while stop["signal"] is None and supernode.poll() is None and gate.poll() is None:
            time.sleep(poll)
        supernode_exited_first = supernode.poll() is not None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for proc in (gate, supernode):
            if proc.poll() is None:
                proc.terminate()
        for proc in (gate, supernode):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if stop["signal"] is not None:
        return 1
    first = supernode if supernode_exited_first else gate
    return first.returncode if first.returncode is not None and first.returncode >= 0 else 1
