"""Every knob of a federated run: defaults, types, allowed values, and validation.

The defaults here are the ones in ``pyproject.toml`` ``[tool.flwr.app.config]``
(a test keeps the two identical). Flower hands the apps ``context.run_config``
(pyproject values overridden by ``--run-config``); :func:`resolve` merges it over
the defaults and checks each key, raising one clear error that names the key and
what is allowed.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from common.errors import ConfigError

__all__ = ["ConfigError", "DEFAULTS", "HELP", "resolve"]

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")

DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 48,
    "clients-per-round": 20,
    "client-sampling": "auto",
    "evaluate-clients": 0,
    "eval-every": 12,
    "local-epochs": 1.0,
    "batch-size": 50,
    "local-optimizer": "sgd",
    "learning-rate": 1.0,
    "item-learning-rate": 1.0,
    "lora-rank": 8,
    "lora-alpha": 16,
    "item-bias": True,
    "item-bias-scale": 10.0,
    "history-len": 5,
    "max-length": 64,
    "item-max-length": 32,
    "examples-per-user": 50,
    "local-dp": True,
    "noise-multiplier": 0.64,
    "eval-noise-multiplier": 4.0,
    "max-grad-norm": 1.0,
    "delta": 1e-5,
    "accountant": "rdp",
    "client-epsilon-budget": 8.0,
    "budget-policy": "truncate",
    "central-dp": False,
    "central-noise-multiplier": 1.0,
    "central-clip": 0.5,
    "central-delta": 1e-4,
    "max-update-norm": 50.0,
    "strategy": "fedadam",
    "server-learning-rate": 0.01,
    "seed": 0,
    "output-dir": "runs",
    "ledger-dir": "",
    "run-name": "",
    "resume": False,
    "dataset": "recbole",
    "round-timeout": 600.0,
    "min-replies": 1,
    "publish-catalogue": False,
    "wire-log": False,
}

CHOICES: dict[str, tuple[Any, ...]] = {
    "accountant": ("rdp", "prv"),
    "budget-policy": ("truncate", "refuse"),
    "strategy": ("fedavg", "fedadam"),
    "local-optimizer": ("adam", "sgd"),
    "client-sampling": ("auto", "cyclic", "uniform", "poisson"),
}

# (lower bound, upper bound, lower inclusive) for numeric keys
RANGES: dict[str, tuple[float, float, bool]] = {
    "num-server-rounds": (1, 1e6, True),
    "clients-per-round": (1, 1e7, True),
    "evaluate-clients": (0, 1e7, True),
    "eval-every": (1, 1e6, True),
    "local-epochs": (0, 1e3, False),
    "batch-size": (1, 1e6, True),
    "learning-rate": (0, 1000, False),
    "item-learning-rate": (0, 1000, True),
    "item-bias-scale": (0, 1e4, False),
    "lora-rank": (1, 384, True),
    "lora-alpha": (1, 1e4, True),
    "history-len": (1, 1000, True),
    "max-length": (8, 512, True),
    "item-max-length": (8, 512, True),
    "examples-per-user": (0, 1e6, True),
    "noise-multiplier": (0, 1e4, False),
    "eval-noise-multiplier": (0, 1e4, False),
    "max-grad-norm": (0, 1e6, False),
    "delta": (0, 0.01, False),
    "client-epsilon-budget": (0, 1e6, False),
    "central-noise-multiplier": (0, 1e4, False),
    "central-clip": (0, 1e6, False),
    "central-delta": (0, 1, False),
    "max-update-norm": (0, 1e9, False),
    "server-learning-rate": (0, 10, False),
    "seed": (0, 2**31 - 1, True),
    "round-timeout": (1, 1e6, True),
    "min-replies": (1, 1e7, True),
}


def _coerce(key: str, value: Any) -> Any:
    default = DEFAULTS[key]
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"run config '{key}': expected true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"run config '{key}': expected an integer, got {value!r}")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"run config '{key}': expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"run config '{key}': expected a string, got {value!r}")
    return value


def _sampling_scheme(cfg: Mapping[str, Any]) -> str:
    """The concrete client sampling scheme: ``auto`` is Poisson under central DP, else cyclic."""
    scheme = cfg["client-sampling"]
    if cfg["central-dp"]:
        if scheme not in ("auto", "poisson"):
            raise ConfigError(f"run config 'client-sampling': {scheme!r} cannot be used with central-dp=true, "
                              "whose accountant models Poisson client sampling (expected 'auto' or 'poisson')")
        return "poisson"
    return "cyclic" if scheme == "auto" else scheme


def resolve(run_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults overridden by ``run_config``, each value type- and range-checked."""
    given = dict(run_config or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"run config: unknown key(s) {unknown}; allowed keys are {sorted(DEFAULTS)}")
    cfg = {k: _coerce(k, given.get(k, v)) for k, v in DEFAULTS.items()}
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise ConfigError(f"run config '{key}': {cfg[key]!r} is not one of {list(allowed)}")
    for key, (lo, hi, lo_inclusive) in RANGES.items():
        v = cfg[key]
        ok = (v >= lo if lo_inclusive else v > lo) and v <= hi
        if not ok:
            bound = f"{'>=' if lo_inclusive else '>'} {lo:g} and <= {hi:g}"
            raise ConfigError(f"run config '{key}': {v!r} is out of range (expected {bound})")
    cfg["client-sampling"] = _sampling_scheme(cfg)
    if cfg["min-replies"] > cfg["clients-per-round"]:
        raise ConfigError(f"run config 'min-replies': {cfg['min-replies']} is more than clients-per-round "
                          f"{cfg['clients-per-round']}, so no round could ever update the model")
    if cfg["run-name"] and not _PLAIN_NAME.fullmatch(cfg["run-name"]):
        raise ConfigError(f"run config 'run-name': {cfg['run-name']!r} must be a plain folder name (letters, digits, "
                          f"'.', '_' and '-', not starting with '.' or '-'): it names a folder inside output-dir")
    if cfg["dataset"] != "recbole" and not cfg["dataset"]:
        raise ConfigError("run config 'dataset': expected 'recbole' or a path to an ml-100k folder")
    return cfg


HELP: dict[str, str] = {
    "num-server-rounds": "federated rounds",
    "clients-per-round": "clients sampled per round (the expected number under Poisson sampling)",
    "client-sampling": ("auto (poisson under central DP, else cyclic), cyclic (every client once per pass over "
                        "the population, in a fresh random order each pass), uniform (a fresh uniform sample "
                        "each round) or poisson (each client independently at rate clients-per-round / N)"),
    "evaluate-clients": ("clients asked to score their own held-out item when the model is evaluated; each reply "
                         "is a DP release (eval-noise-multiplier) that the client's ledger counts"),
    "eval-every": "server-side PROTOCOL evaluation every this many rounds (and after the last)",
    "local-epochs": "passes over a client's examples per session",
    "batch-size": ("expected local batch size and the public denominator of the averaged noisy gradient; the "
                   "Poisson rate is min(1, batch-size / examples-per-user) (1 when examples-per-user is 0)"),
    "local-optimizer": "adam or sgd on the client",
    "learning-rate": "client learning rate for the LoRA adapters",
    "item-learning-rate": ("client learning rate for the item bias parameter (in logit units the step is "
                           "item-bias-scale squared times this with SGD)"),
    "lora-rank": "LoRA rank",
    "lora-alpha": "LoRA alpha",
    "item-bias": "train and exchange a per-item bias (new items fall back to text only)",
    "item-bias-scale": ("the item bias is this times the exchanged parameter; under DP-SGD's joint "
                        "per-example clipping it sets the bias's share of the clip norm"),
    "history-len": "interactions in a user's text (newest first)",
    "max-length": "token limit of a user text (longer ones are cut and counted)",
    "item-max-length": "token limit of an item text",
    "examples-per-user": ("a client's most recent training targets used (0: all); the public session size the "
                          "DP schedule is derived from"),
    "local-dp": "Opacus DP-SGD on every client (example-level DP)",
    "noise-multiplier": "DP-SGD noise multiplier on the client",
    "eval-noise-multiplier": ("noise multiplier of a federated evaluation reply (Gaussian on HR@10 and NDCG@10, "
                              "L2 sensitivity sqrt(2))"),
    "max-grad-norm": "DP-SGD per-example clipping norm",
    "delta": "delta of the example-level guarantee",
    "accountant": "rdp or prv (Opacus) for the client ledgers",
    "client-epsilon-budget": "a client's cap on its composed example-level epsilon",
    "budget-policy": "truncate (fewer steps, refuse at 0) or refuse when a session would exceed the cap",
    "central-dp": "user-level central DP on client updates (DP-FedAvg, Poisson client sampling)",
    "central-noise-multiplier": "noise multiplier of the server's Gaussian mechanism",
    "central-clip": "L2 bound on each client's update under central DP",
    "central-delta": "delta of the user-level guarantee",
    "max-update-norm": "replies whose update norm exceeds this are rejected",
    "strategy": "fedavg or fedadam (Flower strategies)",
    "server-learning-rate": "FedAdam's server learning rate (eta)",
    "seed": "seed of sampling, LoRA initialisation and local training",
    "output-dir": "where run folders go",
    "ledger-dir": ("simulation only: folder of the simulated clients' ledgers, kept across runs (default: the run "
                   "folder's clients/, so each run is a separate simulated deployment whose budgets do not "
                   "compose with other runs on the same data)"),
    "run-name": "run folder name (default: run-<time>-seed<seed>)",
    "resume": "continue the run folder run-name from its latest checkpoint",
    "dataset": "recbole (the wheel's MovieLens-100K) or a GroupLens ml-100k folder",
    "round-timeout": "seconds the server waits for a round's replies",
    "min-replies": ("a round with fewer accepted updates leaves the global model unchanged (without central "
                    "DP; with it the noisy aggregate is always released, as the accountant assumes)"),
    "publish-catalogue": ("publish the catalogue's item embeddings for the current global model each round "
                          "and send them, with their SHA-256, to the clients (for on-device recommendations)"),
    "wire-log": ("write wire.jsonl in the run folder: the structure of every reply received and each of its "
                 "non-tensor values, to check what devices send"),
}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings (TOML values, as in ``flwr run --run-config``) to a dict; unquoted
    words are taken as strings."""
    import tomllib

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {pair!r}: expected key=value")
        try:
            out[key] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw.strip()
    return out
