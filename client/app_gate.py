"""The device's SuperExec: it starts a ClientApp only when the app is one the device approved.

A Flower SuperNode executes whatever app bundle (FAB) the SuperLink hands it. Flower 1.42 can
verify signed FABs (``flower-supernode --trusted-entities``) only for apps whose signatures come
from Flower Hub, through the SuperLink (``valid_license``); a FAB that an operator submits with
``flwr run`` carries no verification, so that option cannot admit privrec's own app on a
self-hosted SuperLink. privrec therefore runs its SuperNodes with ``--isolation process`` and
this SuperExec beside them. It is Flower's own SuperExec loop (``run_superexec``: acquire a task
from the SuperNode's Runtime API, launch ``flwr-clientapp`` with its token) with one added rule:
a task is launched only if the SHA-256 of its FAB is in the device's approved set. The SuperNode
checks that a FAB's content hashes to the hash it is stored under (``NodeState.store_fab``), so
the approved hash pins the exact code the device runs.

The approved set is, by default, the FAB that Flower builds from the device's own installed
privrec app (``flwr.cli.build.build_fab_from_disk``, deterministic: fixed file dates), so a
device runs the code its owner installed and nothing the server sends; more hashes can be
approved explicitly. A refused task is never started: the SuperNode answers the server with
Flower's ClientApp error when the task's token expires. Only ClientApp tasks are acquired. The
SuperNode creates each task with its run's FAB hash (``task.fab_hash``), the hash under which
``flwr-clientapp`` then fetches the FAB it runs; the Runtime API's ``create-task``, which could set
another, is open only to an app already running on the device, that is, an approved one.

    python -I -m client.app_gate --runtime-api-address 127.0.0.1:9094 --parent-pid PID \\
        --superexec-auth-secret-file SECRET --token-dir DIR --app-dir DIR [--approve SHA256 ...]

``-I`` keeps the current folder off ``sys.path``: started from inside another checkout, ``-m`` would
otherwise import that checkout's ``client`` package as the gate.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
from logging import ERROR, INFO
from pathlib import Path

from common.errors import ConfigError
from common.io import make_private_dir, write_bytes_atomic

APP_DIR = Path(__file__).resolve().parents[1]  # the privrec app folder (its pyproject.toml)


def installed_app_hash(app_dir: str | Path = APP_DIR) -> str:
    """SHA-256 of the FAB Flower builds from ``app_dir`` (what ``flwr run`` of that folder submits)."""
    from flwr.cli.build import build_fab_from_disk

    app_dir = Path(app_dir)
    if not (app_dir / "pyproject.toml").is_file():
        raise ConfigError(f"{app_dir}: no pyproject.toml; give the privrec app folder (--app-dir) or approve a "
                          f"FAB hash explicitly")
    return hashlib.sha256(build_fab_from_disk(app_dir)).hexdigest()


def check_hashes(hashes: list[str]) -> frozenset[str]:
    """The approved set; each entry must be a lowercase hex SHA-256."""
    bad = [h for h in hashes if len(h) != 64 or any(c not in "0123456789abcdef" for c in h)]
    if bad:
        raise ConfigError(f"approved FAB hashes must be 64 lowercase hex digits (SHA-256), got {bad[:3]}")
    if not hashes:
        raise ConfigError("no approved FAB: the device would run nothing")
    return frozenset(hashes)


def approved_plugin(approved: frozenset[str], token_dir: Path):
    """Flower's SuperExec plugin, restricted to ClientApp tasks of an approved FAB. It starts
    ``flwr-clientapp`` itself, with the task's token in a file (0600, in a 0700 folder, removed once
    the ClientApp has ended) instead of on the command line, where any local user could read it."""
    from flwr.supercore import log
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResult
    from flwr.supercore.superexec.plugin import AutoExecPlugin

    make_private_dir(token_dir)
    running: list[tuple[subprocess.Popen, Path]] = []

    class ApprovedAppsOnly(AutoExecPlugin):
        supported_task_types = frozenset({TaskType.CLIENT_APP})

        def launch_task(self, token: str, task) -> LaunchResult:
            for proc, path in list(running):  # tokens of ClientApps that have ended
                if proc.poll() is not None:
                    path.unlink(missing_ok=True)
                    running.remove((proc, path))
            fab_hash = str(getattr(task, "fab_hash", "") or "")
            if task.type != TaskType.CLIENT_APP or fab_hash not in approved:
                log(ERROR, "privrec: refused to start task %d of run %d: its app (FAB %s) is not approved "
                           "on this device", task.task_id, task.run_id, fab_hash[:16] or "unknown")
                return LaunchResult.failed("app not approved on this device")
            log(INFO, "privrec: starting approved app %s for run %d", fab_hash[:16], task.run_id)
            token_file = token_dir / f"task-{int(task.task_id)}.token"
            write_bytes_atomic(token_file, token.encode("utf-8"), private=True)
            cmd = ["flwr-clientapp", "--runtime-api-address", self.runtime_api_address, "--token-file",
                   str(token_file), "--parent-pid", str(os.getpid())]
            cmd += ["--insecure"] if self.insecure else (
                ["--root-certificates", self.root_certificates_path] if self.root_certificates_path else [])
            running.append((subprocess.Popen(cmd), token_file))
            return LaunchResult.accepted()

    return ApprovedAppsOnly


def run(runtime_api_address: str, approved: frozenset[str], secret_file: str | None, parent_pid: int | None,
        token_dir: Path) -> None:
    """Flower's SuperExec loop with :func:`approved_plugin` in place of its default plugin."""
    import flwr.supercore.superexec.run_superexec as flower_superexec
    from flwr.supercore.auth import load_superexec_auth_secret

    if not hasattr(flower_superexec, "AutoExecPlugin"):  # the one name this module replaces
        raise RuntimeError("this Flower version's SuperExec has no AutoExecPlugin to restrict; refusing to run "
                           "apps unchecked")
    flower_superexec.AutoExecPlugin = approved_plugin(approved, token_dir)
    secret = load_superexec_auth_secret(secret_file=secret_file) if secret_file else None
    flower_superexec.run_superexec(runtime_api_address=runtime_api_address, insecure=True,
                                   superexec_auth_secret=secret, parent_pid=parent_pid,
                                   runtime_dependency_install=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="privrec's device SuperExec: runs approved apps only")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (loopback)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    parser.add_argument("--superexec-auth-secret-file", default=None, help="the SuperNode's SuperExec secret")
    parser.add_argument("--approve", action="append", default=[], help="also approve this FAB SHA-256")
    parser.add_argument("--app-dir", default=str(APP_DIR), help="the installed privrec app folder")
    parser.add_argument("--no-installed-app", action="store_true", help="approve only the --approve hashes")
    parser.add_argument("--token-dir", required=True, help="private folder for the tasks' token files")
    args = parser.parse_args(argv)
    try:
        hashes = list(args.approve) + ([] if args.no_installed_app else [installed_app_hash(args.app_dir)])
        approved = check_hashes(hashes)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    from flwr.supercore import log

    log(INFO, "privrec: this device runs only the app(s) %s", ", ".join(sorted(h[:16] for h in approved)))
    run(args.runtime_api_address, approved, args.superexec_auth_secret_file, args.parent_pid, Path(args.token_dir))


if __name__ == "__main__":
    main()
