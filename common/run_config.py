"""Every knob of a federated run: one table of fields, each with its group, default, help, range and
choices, and the validation of a run config against it.

The defaults here are the ones in ``pyproject.toml`` ``[tool.flwr.app.config]`` (a test keeps the
two identical; the external key names never change). Flower hands the apps ``context.run_config``
(pyproject values overridden by ``--run-config``); :func:`resolve` merges it over the defaults and
checks each key, raising one clear error that names the key and what is allowed.
:func:`stored_config` is the one place that fills keys an older run folder's config lacks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from common.errors import ConfigError

__all__ = ["ConfigError", "DEFAULTS", "FIELDS", "GROUPS", "HELP", "resolve", "stored_config"]

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Field:
    """One run-config key: its default (whose type is the key's type), group and help, and either the
    allowed choices or a numeric range [low, high] (low excluded when ``low_inclusive`` is False)."""

    default: Any
    group: str
    help: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True

    def check(self, key: str, value: Any) -> None:
        """Raise ConfigError naming ``key`` when ``value`` is outside the choices or the range."""
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"run config '{key}': {value!r} is not one of {list(self.choices)}")
        if self.low is not None:
            ok = (value >= self.low if self.low_inclusive else value > self.low) and value <= self.high
            if not ok:
                bound = f"{'>=' if self.low_inclusive else '>'} {self.low:g} and <= {self.high:g}"
                raise ConfigError(f"run config '{key}': {value!r} is out of range (expected {bound})")


# How many configurations the published federated defaults were chosen among, on the validation split (the list:
# simulations/results/federated-sequence/summary.md); every result's privacy statement repeats it.
DEFAULTS_CONFIGURATIONS_TRIED = 38

FIELDS: dict[str, Field] = {
    # -- model -------------------------------------------------------------------------------------
    "user-model": Field(
        "sequence", "model",
        ("sequence (a small transformer over the user's last history-len items, scored against the zero-shot "
         "encoder's item text vectors; exchanges only its small layers) or text (the LoRA-adapted encoder over "
         "the history rendered as text; exchanges the adapters; its published setting: history-len 5, "
         "examples-per-user 50, batch-size 50)"),
        choices=("sequence", "text")),
    "sequence-dim": Field(32, "model", "sequence model: width of the transformer", low=2, high=1024),
    "sequence-layers": Field(1, "model", "sequence model: transformer blocks", low=0, high=8),
    "sequence-heads": Field(2, "model", "sequence model: attention heads (dividing sequence-dim)", low=1, high=64),
    "sequence-prior-weight": Field(
        10.0, "model",
        ("sequence model: weight of the parameter-free text prior (cosine of the rating-weighted, recency-decayed "
         "mean of the history's item text vectors with each item's)"), low=0, high=1000.0),
    "sequence-id-dropout": Field(
        0.0, "model",
        ("sequence model: share of the catalogue whose trained item bias each training row leaves out, so that "
         "the bias predicted from the text learns what new items need (under local DP drawn per row from the "
         "device's secure random stream, secret and independent of the data; without DP from the run's seed)"),
        low=0, high=0.9),
    "sequence-exclude-history": Field(
        True, "model",
        ("sequence model, training: the items in a training row's history window (its last history-len "
         "items, other than its target) leave that row's softmax, since ranking never recommends a user an item "
         "they have (a per-row rule on the row's own input: each loss still depends on its own example alone)")),
    "sequence-new-item-boost": Field(
        0.3, "model",
        ("sequence model, ranking only: an item marked as never trained on gets this constant in place of the "
         "trained item bias it lacks, favouring such items by the factor exp(boost) (0: their text terms alone). "
         "Only cold-start-holdout's items are ever so marked (a device's recommender treats every catalogue item "
         "as trained on), so it is a knob of the cold-start simulation: measured trade-off in the README"),
        low=-10.0, high=10.0),
    "lora-rank": Field(8, "model", "text model: LoRA rank", low=1, high=384),
    "lora-alpha": Field(16, "model", "LoRA alpha", low=1, high=10000.0),
    "item-bias": Field(True, "model", "train and exchange a per-item bias (new items fall back to text only)"),
    "item-bias-scale": Field(
        10.0, "model",
        ("the item bias is this times the exchanged parameter; under DP-SGD's joint per-example clipping "
         "it sets the bias's share of the clip norm"), low=0, high=10000.0, low_inclusive=False),
    "history-len": Field(
        50, "model",
        ("interactions a user's input holds (the most recent; it bounds the unit of privacy, see the device "
         "policy's privacy-max-history-len)"), low=1, high=1000),
    "max-length": Field(64, "model", "token limit of a user text (longer ones are cut and counted)", low=8, high=512),
    "item-max-length": Field(32, "model", "token limit of an item text", low=8, high=512),
    # -- local training ----------------------------------------------------------------------------
    "local-epochs": Field(
        1.0, "local training",
        ("passes over a client's examples per session"), low=0, high=1000.0, low_inclusive=False),
    "batch-size": Field(
        200, "local training",
        ("expected local batch size and the public denominator of the averaged noisy gradient; the Poisson"
         " rate is min(1, batch-size / examples-per-user) (1 when examples-per-user is 0)"), low=1, high=1000000.0),
    "examples-per-user": Field(
        200, "local training",
        ("a client's most recent training targets used, padded to this many rows: the public session size "
         "the DP schedule is derived from (0: all, only without local DP)"), low=0, high=1000000.0),
    "local-optimizer": Field("sgd", "local training", "adam or sgd on the client", choices=("adam", "sgd")),
    "learning-rate": Field(
        1.0, "local training",
        ("client learning rate (the sequence model: every tensor; the text model: the LoRA adapters)"), low=0,
        high=1000, low_inclusive=False),
    "item-learning-rate": Field(
        1.0, "local training",
        ("text model: client learning rate for the item bias parameter (in logit units the step is "
         "item-bias-scale squared times this with SGD)"), low=0, high=1000),
    # -- local DP ----------------------------------------------------------------------------------
    "local-dp": Field(True, "local DP", "Opacus DP-SGD on every client (example-level DP)"),
    "noise-multiplier": Field(
        1.28, "local DP",
        ("DP-SGD noise multiplier on the client"), low=0, high=10000.0, low_inclusive=False),
    "max-grad-norm": Field(
        1.0, "local DP",
        ("DP-SGD per-example clipping norm"), low=0, high=1000000.0, low_inclusive=False),
    "delta": Field(1e-05, "local DP", "delta of the example-level guarantee", low=0, high=0.01, low_inclusive=False),
    "accountant": Field("rdp", "local DP", "rdp or prv (Opacus) for the client ledgers", choices=("rdp", "prv")),
    "client-epsilon-budget": Field(
        8.0, "local DP",
        ("a client's cap on its composed example-level epsilon"), low=0, high=1000000.0, low_inclusive=False),
    "budget-policy": Field(
        "truncate", "local DP",
        ("truncate (fewer steps, refuse at 0) or refuse when a session would exceed the cap"),
        choices=("truncate", "refuse")),
    "eval-noise-multiplier": Field(
        4.0, "local DP",
        ("noise multiplier of a federated evaluation reply (Gaussian on HR@10 and NDCG@10, L2 sensitivity "
         "sqrt(2))"), low=0, high=10000.0, low_inclusive=False),
    # -- central DP --------------------------------------------------------------------------------
    "central-dp": Field(
        False, "central DP",
        ("user-level central DP on client updates (DP-FedAvg, Poisson client sampling)")),
    "central-noise-multiplier": Field(
        1.0, "central DP",
        ("noise multiplier of the server's Gaussian mechanism"), low=0, high=10000.0, low_inclusive=False),
    "central-clip": Field(
        0.5, "central DP",
        ("L2 bound on each client's update under central DP"), low=0, high=1000000.0, low_inclusive=False),
    "central-delta": Field(
        0.0001, "central DP",
        ("delta of the user-level guarantee"), low=0, high=1, low_inclusive=False),
    # -- secure aggregation (user-level distributed DP) ---------------------------------------------
    "secure-aggregation": Field(
        False, "secure aggregation",
        ("user-level DP on a secure sum: each device clips its whole session update to user-clip, adds its share "
         "of Skellam noise and sends it masked through Flower's SecAgg+; the server sees only the sum (sequence "
         "model; example-level DP-SGD on top when local-dp is true)")),
    "user-clip": Field(
        1.0, "secure aggregation", "L2 bound on a device's whole session update", low=0, high=1000000.0,
        low_inclusive=False),
    "user-noise-multiplier": Field(
        0.6, "secure aggregation",
        ("standard deviation of the secure sum's noise over its L2 sensitivity once min-survivors devices have "
         "added their shares (0.6: user-level epsilon 7.82 at user-delta 1e-4 for one participation)"), low=0,
        high=10000.0, low_inclusive=False),
    "min-survivors": Field(
        16, "secure aggregation",
        ("the fewest devices whose noise shares a sum must hold: each adds 1/min-survivors of the noise, and a "
         "round with fewer surviving devices is aborted before anything is unmasked"), low=3, high=10000000.0),
    "user-delta": Field(1e-4, "secure aggregation", "delta of the user-level guarantee", low=0, high=0.01,
                        low_inclusive=False),
    "user-epsilon-budget": Field(
        8.0, "secure aggregation", "a device's cap on its composed user-level epsilon", low=0, high=1000000.0,
        low_inclusive=False),
    "secagg-threshold": Field(
        0.5, "secure aggregation",
        ("SecAgg+ reconstruction threshold as a share of each device's neighbourhood (every device shares "
         "its secrets with its neighbours), never less than a strict majority of it: the fewest neighbours "
         "that must collude with the server to unmask one device; more than the rest of a neighbourhood "
         "dropping out aborts the round"),
        low=0, high=1.0, low_inclusive=False),
    "secagg-neighbours": Field(
        0, "secure aggregation",
        ("SecAgg+: how many other devices each device shares its secrets with (0: all of the round; a few "
         "dozen keep large rounds cheap, SecAgg+'s sparse graph)"), low=0, high=10000000.0),
    # -- server ------------------------------------------------------------------------------------
    "num-server-rounds": Field(48, "server", "federated rounds", low=1, high=1000000.0),
    "clients-per-round": Field(
        20, "server",
        ("clients sampled per round (the expected number under Poisson sampling)"), low=1, high=10000000.0),
    "client-sampling": Field(
        "auto", "server",
        ("auto (poisson under central DP, else cyclic), cyclic (every client once per pass over the "
         "population, in a fresh random order each pass), uniform (a fresh uniform sample each round) or "
         "poisson (each client independently at rate clients-per-round / N)"),
        choices=("auto", "cyclic", "uniform", "poisson")),
    "min-replies": Field(
        1, "server",
        ("a round with fewer accepted updates leaves the global model unchanged (without central DP; with "
         "it the noisy aggregate is always released, as the accountant assumes)"), low=1, high=10000000.0),
    "round-timeout": Field(600.0, "server", "seconds the server waits for a round's replies", low=1, high=1000000.0),
    "max-failed-share": Field(
        0.5, "server",
        ("the run stops (after checkpointing the round) when more than this share of a round's sampled "
         "clients send no usable reply (none, an error, or a rejected one); refusals count as answers"),
        low=0, high=1.0),
    "max-update-norm": Field(
        0.0, "server",
        ("replies whose update norm exceeds this are rejected; 0: derived from the public local-DP mechanism "
         "(the bound an honest update exceeds with probability below 1e-9; 50 without local DP)"),
        low=0, high=1000000000.0),
    "aggregator": Field(
        "auto", "server",
        ("how accepted updates are combined before the server step: auto (trimmed-mean, or mean under "
         "central DP, which needs it), mean, median, trimmed-mean, krum, multikrum or bulyan (Flower's "
         "FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan rules)"),
        choices=("auto", "mean", "median", "trimmed-mean", "krum", "multikrum", "bulyan")),
    "trim-fraction": Field(
        0.1, "server", "trimmed-mean: the fraction of values dropped at each end of every coordinate",
        low=0, high=0.49),
    "byzantine-clients": Field(
        1, "server", "krum, multikrum, bulyan: the number f of hostile clients per round the rule assumes",
        low=0, high=10000000.0),
    "strategy": Field("fedadam", "server", "the server step: fedavg (take the aggregate) or fedadam (Adam on it)",
                      choices=("fedavg", "fedadam")),
    "server-learning-rate": Field(
        0.01, "server",
        ("FedAdam's server learning rate (eta)"), low=0, high=10, low_inclusive=False),
    "server-lr-final-factor": Field(
        1.0, "server",
        ("FedAdam's learning rate falls linearly from server-learning-rate in round 1 towards this share of "
         "it, reached one round after the last (1: constant)"), low=0, high=1),
    "evaluate-clients": Field(
        0, "server",
        ("clients asked to score their own held-out item when the model is evaluated; each reply is a DP "
         "release (eval-noise-multiplier) that the client's ledger counts"), low=0, high=10000000.0),
    "eval-every": Field(
        12, "server",
        ("server-side PROTOCOL evaluation every this many rounds (and after the last)"), low=1, high=1000000.0),
    "publish-catalogue": Field(
        False, "server",
        ("publish the catalogue's item embeddings for the current global model each round and send them, "
         "with their SHA-256, to the clients (for on-device recommendations)")),
    "wire-log": Field(
        False, "server",
        ("write wire.jsonl in the run folder: the structure of every reply received and each of its non-"
         "tensor values, to check what devices send")),
    # -- run ---------------------------------------------------------------------------------------
    "seed": Field(0, "run", "seed of sampling, LoRA initialisation and local training", low=0, high=2147483647),
    "dataset": Field("recbole", "run", "recbole (the wheel's MovieLens-100K) or a GroupLens ml-100k folder"),
    "output-dir": Field("runs", "run", "where run folders go"),
    "run-name": Field("", "run", "run folder name (default: run-<time>-seed<seed>)"),
    "resume": Field(False, "run", "continue the run folder run-name from its latest checkpoint"),
    "cold-start-holdout": Field(
        False, "run",
        ("simulation only: the PROTOCOL's cold-start items (a published list) join the catalogue after "
         "training: no client holds a rating of them, and the sequence model leaves them out of the training "
         "softmax and scores them by their text alone (PROTOCOL section 4)")),
    "ledger-dir": Field(
        "", "run",
        ("simulation only: folder of the simulated clients' ledgers, kept across runs (default: the run "
         "folder's clients/, so each run is a separate simulated deployment whose budgets do not compose "
         "with other runs on the same data)")),
}
GROUPS = tuple(dict.fromkeys(f.group for f in FIELDS.values()))
DEFAULTS: dict[str, Any] = {k: f.default for k, f in FIELDS.items()}
HELP: dict[str, str] = {k: f.help for k, f in FIELDS.items()}


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
    for key, field in FIELDS.items():
        field.check(key, cfg[key])
    cfg["client-sampling"] = _sampling_scheme(cfg)
    if cfg["aggregator"] == "auto":
        cfg["aggregator"] = "mean" if cfg["central-dp"] or cfg["secure-aggregation"] else "trimmed-mean"
    if cfg["secure-aggregation"]:
        _check_secure(cfg)
    if cfg["strategy"] != "fedadam" and cfg["server-lr-final-factor"] != 1.0:
        raise ConfigError(f"run config 'server-lr-final-factor': {cfg['server-lr-final-factor']:g} schedules "
                          f"FedAdam's learning rate; strategy {cfg['strategy']!r} has none (use 1)")
    if cfg["local-dp"] and cfg["examples-per-user"] == 0:
        raise ConfigError("run config 'examples-per-user': 0 (all of a device's examples) cannot be used with "
                          "local-dp=true: a session's size, and so its duration, would depend on how many examples "
                          "the device holds; set a public cap (e.g. examples-per-user=200) and sessions pad to it")
    if cfg["central-dp"] and cfg["aggregator"] != "mean":
        raise ConfigError(f"run config 'aggregator': {cfg['aggregator']!r} cannot be used with central-dp=true: the "
                          f"accountant assumes the noise covers a sum of clipped updates (sensitivity central-clip); "
                          f"a robust rule has another sensitivity (use aggregator=mean)")
    if cfg["sequence-dim"] % cfg["sequence-heads"]:
        raise ConfigError(f"run config 'sequence-heads': {cfg['sequence-heads']} does not divide sequence-dim "
                          f"{cfg['sequence-dim']} (each head gets an equal share of the width)")
    if cfg["min-replies"] > cfg["clients-per-round"]:
        raise ConfigError(f"run config 'min-replies': {cfg['min-replies']} is more than clients-per-round "
                          f"{cfg['clients-per-round']}, so no round could ever update the model")
    if cfg["run-name"] and not _PLAIN_NAME.fullmatch(cfg["run-name"]):
        raise ConfigError(f"run config 'run-name': {cfg['run-name']!r} must be a plain folder name (letters, digits, "
                          f"'.', '_' and '-', not starting with '.' or '-'): it names a folder inside output-dir")
    if cfg["dataset"] != "recbole" and not cfg["dataset"]:
        raise ConfigError("run config 'dataset': expected 'recbole' or a path to an ml-100k folder")
    return cfg


def _check_secure(cfg: Mapping[str, Any]) -> None:
    """What a secure-aggregation run cannot be combined with (the server sees only a masked sum)."""
    problems = []
    if cfg["user-model"] != "sequence":
        problems.append("user-model must be 'sequence' (the text model's adapters are not wired to it)")
    if cfg["central-dp"]:
        problems.append("central-dp must be false (the devices add the noise)")
    if cfg["aggregator"] != "mean":
        problems.append(f"aggregator {cfg['aggregator']!r} needs each update, the server only sees their sum "
                        f"(use mean)")
    if cfg["client-sampling"] == "poisson":
        problems.append("client-sampling 'poisson' gives a variable round size; use cyclic or uniform")
    if cfg["examples-per-user"] == 0:
        problems.append("examples-per-user must be a public cap (> 0): a session's shape must not depend on the data")
    if cfg["min-survivors"] > cfg["clients-per-round"]:
        problems.append(f"min-survivors {cfg['min-survivors']} is more than clients-per-round "
                        f"{cfg['clients-per-round']}")
    if cfg["evaluate-clients"] > 0:
        problems.append("evaluate-clients must be 0: a federated evaluation reply is a release the server sees in "
                        "the clear, outside the user-level accounting")
    if problems:
        raise ConfigError("run config 'secure-aggregation': " + "; ".join(problems))


def stored_config(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A run config read back from a run folder, with every key that privrec version lacked filled in:
    the value that reproduces what that run did where a key's default has changed since (a plain
    item bias; the text model; the sampling used before client-sampling existed: uniform, Poisson under central
    DP; the plain mean before aggregator existed; no failure threshold; the full training softmax before
    sequence-exclude-history existed; no new-item boost before its key existed), the current default
    otherwise. The one place that knows about older run folders."""
    legacy = {"user-model": "text", "item-bias-scale": 1.0,
              "client-sampling": "poisson" if stored.get("central-dp") else "uniform",
              "aggregator": "mean", "max-failed-share": 1.0, "sequence-exclude-history": False,
              "sequence-new-item-boost": 0.0}
    return {**DEFAULTS, **legacy, **stored}


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


def markdown_table() -> str:
    """The README's configuration table, by group (a test keeps the README in step with it)."""
    rows = ["| group | key | default | meaning |", "|---|---|---|---|"]
    for key, f in FIELDS.items():
        default = f'"{f.default}"' if isinstance(f.default, str) else str(f.default).lower() \
            if isinstance(f.default, bool) else f"{f.default:g}" if isinstance(f.default, float) else str(f.default)
        rows.append(f"| {f.group} | `{key}` | `{default}` | {f.help} |")
    return "\n".join(rows)
