"""Device-side deployment tooling: a SuperNode authentication key pair, and the command that starts a
SuperNode with TLS, that key, and ``--node-config`` pointing at the device's data and state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.device_policy import DevicePolicy
from common.flower_env import flwr_env
from common.io import write_bytes_atomic, write_text_atomic


def make_node_key(out: str | Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format (what Flower's SuperNode auth expects):
    ``<name>`` (private, mode 0600, stays on the device) and ``<name>.pub`` (register it)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"key name must be a plain file name, got {name!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
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


def supernode_command(superlink: str, ca_cert: str | Path, key: str | Path, data_path: str | Path,
                      state_dir: str | Path, port: int, client_id: str | None = None,
                      policy: Mapping[str, Any] | None = None) -> list[str]:
    """flower-superlink's client side: a SuperNode holding one device's data (``data-path``: the JSONL
    user format), persistent state (``state-dir``: ledger, global adapters, catalogue) and its own
    privacy policy (``privacy-*`` keys of :class:`common.device_policy.DevicePolicy`; defaults for the
    keys not given)."""
    policy = dict(policy or {})
    DevicePolicy.from_node_config(policy)  # refuse a malformed policy here, not at the first message
    for path, what in ((ca_cert, "CA certificate"), (key, "SuperNode private key")):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: missing {what}")
    data_path, state_dir = Path(data_path).resolve(), Path(state_dir).resolve()
    if not (data_path / "u.data").is_file():
        for name in ("events.jsonl", "catalogue.jsonl"):
            if not (data_path / name).is_file():
                raise FileNotFoundError(f"{data_path / name}: missing (export a user with `privrec export-user`)")
    node_config = f"data-path={_toml_string(str(data_path))} state-dir={_toml_string(str(state_dir))}"
    if client_id:
        node_config += f" client-id={_toml_string(client_id)}"
    for k, v in policy.items():
        value = ("true" if v else "false") if isinstance(v, bool) else _toml_string(v) if isinstance(v, str) else repr(v)
        node_config += f" {k}={value}"
    return [shutil.which("flower-supernode", path=flwr_env()["PATH"]) or "flower-supernode",
            "--superlink", superlink, "--root-certificates", str(Path(ca_cert).resolve()),
            "--auth-supernode-private-key", str(Path(key).resolve()), "--host", "127.0.0.1", "--port", str(port),
            "--node-config", node_config]
