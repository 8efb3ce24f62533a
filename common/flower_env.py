"""The environment every Flower process privrec starts runs in (SuperLink, SuperNode, the ``flwr`` CLI)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_FLWR_HOME = ".flwr-deploy"


def flwr_env(flwr_home: str | Path | None = None) -> dict[str, str]:
    """Environment for Flower processes: the venv's binaries first (Flower starts flower-superexec by
    name), no runtime dependency installation (it would pull a CUDA torch), no update checks."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(Path(flwr_home or env.get("FLWR_HOME") or DEFAULT_FLWR_HOME).resolve())
    env.update({"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_TELEMETRY_ENABLED": "0"})
    return env
