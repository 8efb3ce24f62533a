"""A device's own privacy policy: the least privacy it will ever accept from a run.

Whoever submits a run chooses its run config; a device must not take its protection from
there. The policy comes from the device's node config (``--node-config`` of its SuperNode,
keys ``privacy-*``); simulated devices, which have no node config of their own, use the
same object with its defaults. The ClientApp checks every run against it and refuses a run
that asks for less: DP off, less noise, a larger clip, a larger delta or a larger budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from common.errors import ConfigError
from common.ledger import ADJACENCIES, MAX_DELTA
from common.privacy import session_sensitivity

NODE_CONFIG_KEYS = {
    "privacy-local-dp": "require_local_dp",
    "privacy-min-noise-multiplier": "min_noise_multiplier",
    "privacy-max-clip": "max_clip",
    "privacy-delta": "delta",
    "privacy-epsilon-budget": "epsilon_budget",
    "privacy-adjacency": "adjacency",
    "privacy-max-history-len": "max_history_len",
    "privacy-max-length": "max_length",
    "privacy-secure-aggregation": "allow_secure_aggregation",
    "privacy-min-user-noise-multiplier": "min_user_noise_multiplier",
    "privacy-max-user-clip": "max_user_clip",
    "privacy-user-delta": "user_delta",
    "privacy-user-epsilon-budget": "user_epsilon_budget",
    "privacy-min-survivors": "min_survivors",
    "privacy-reply-time-quantum": "reply_time_quantum",
}


# Seconds. A positive quantum below the minimum is no pacing worth the name (and would overflow the count of
# quanta); one above the maximum would outlast servers' reply timeouts (privrec's round-timeout is 600 s).
MIN_REPLY_TIME_QUANTUM, MAX_REPLY_TIME_QUANTUM = 1e-3, 300.0
LEGACY_HISTORY_LEN = 5  # the run default (and so the unit) of the releases whose ledgers did not record it


@dataclass(frozen=True)
class DevicePolicy:
    """The device's floor on privacy; a run that asks for less is refused."""

    require_local_dp: bool = True
    # the least noise per unit of a release's sensitivity, as the accountant sees it: a training
    # session's noise-multiplier / 2 (every session is capped, sensitivity 2C), evaluation's as set
    min_noise_multiplier: float = 0.5
    max_clip: float = 1.0
    delta: float = 1e-5  # the delta this device accounts at; a run must state the same delta
    epsilon_budget: float = 8.0  # the most this device will ever spend (a run may ask for less)
    adjacency: str = "add-remove"  # replace-one: accounted with twice the sensitivity
    # The unit of privacy is one example, whose input is the user's last ``history-len`` interactions
    # (the text model: rendered in at most ``max-length`` tokens): one rating touches up to history-len
    # later examples, so these bound how far the example-level guarantee is from a rating-level one. The
    # defaults are the published run defaults: a server cannot lengthen the unit beyond them without the
    # device owner's say, nor beyond what the device's ledger already recorded.
    max_history_len: int = 50
    max_length: int = 64
    # Whether the owner set privacy-max-history-len. If not, a device whose ledger already holds sessions
    # never lets a run lengthen the unit beyond the longest history it recorded (:meth:`lengthens_unit`):
    # an upgrade that raised this default (5 before the sequence model) changes nothing for it.
    owner_set_history_len: bool = False
    # A secure-aggregation run (user-level DP on a masked sum; trust: a semi-honest server and at least
    # min-survivors honest devices) may stand in for local DP, if the owner opts in and these floors hold.
    # Simulated devices, which have no owner, opt in (see from_node_config).
    allow_secure_aggregation: bool = False
    min_user_noise_multiplier: float = 0.5
    max_user_clip: float = 1.0
    user_delta: float = 1e-4
    user_epsilon_budget: float = 8.0
    min_survivors: int = 3
    # Seconds: every reply leaves at the first whole multiple of this after the ClientApp took its request (at
    # least one), so its arrival time does not tell the server how long the device's data took to read
    # (client.reply_pacing). 0 turns pacing off. Simulated devices, whose replies no outside server times, use
    # 0 (see from_node_config).
    reply_time_quantum: float = 1.0

    def __post_init__(self) -> None:
        checks = (("min_noise_multiplier", math.isfinite(self.min_noise_multiplier) and self.min_noise_multiplier > 0),
                  ("max_clip", math.isfinite(self.max_clip) and self.max_clip > 0),
                  ("delta", 0 < self.delta <= MAX_DELTA),
                  ("epsilon_budget", math.isfinite(self.epsilon_budget) and self.epsilon_budget > 0),
                  ("adjacency", self.adjacency in ADJACENCIES),
                  ("max_history_len", _positive_int(self.max_history_len)),
                  ("max_length", _positive_int(self.max_length)),
                  ("min_user_noise_multiplier", math.isfinite(self.min_user_noise_multiplier)
                   and self.min_user_noise_multiplier > 0),
                  ("max_user_clip", math.isfinite(self.max_user_clip) and self.max_user_clip > 0),
                  ("user_delta", 0 < self.user_delta <= MAX_DELTA),
                  ("user_epsilon_budget", math.isfinite(self.user_epsilon_budget) and self.user_epsilon_budget > 0),
                  ("min_survivors", _positive_int(self.min_survivors) and self.min_survivors >= 3),
                  ("reply_time_quantum", self.reply_time_quantum == 0 or (
                      math.isfinite(self.reply_time_quantum)
                      and MIN_REPLY_TIME_QUANTUM <= self.reply_time_quantum <= MAX_REPLY_TIME_QUANTUM)))
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise ConfigError(f"device privacy policy: invalid {', '.join(bad)} in {asdict(self)} (noise, clip and "
                              f"budget must be positive, delta in (0, {MAX_DELTA:g}], adjacency one of {ADJACENCIES}, "
                              f"history and token limits positive integers, the reply time quantum 0 or in "
                              f"[{MIN_REPLY_TIME_QUANTUM:g}, {MAX_REPLY_TIME_QUANTUM:g}] seconds)")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "DevicePolicy":
        """The policy given by the node config's ``privacy-*`` keys (defaults for absent ones)."""
        given = {k: v for k, v in node_config.items() if str(k).startswith("privacy-")}
        unknown = sorted(set(given) - set(NODE_CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"node config: unknown privacy key(s) {unknown}; allowed: {sorted(NODE_CONFIG_KEYS)}")
        values: dict[str, Any] = {"owner_set_history_len": "privacy-max-history-len" in given}
        if "partition-id" in node_config and "data-path" not in node_config:
            values["allow_secure_aggregation"] = True  # a simulated person: the study chooses the mechanism
            values["reply_time_quantum"] = 0.0  # and no outside server times its replies
        for key, value in given.items():
            name = NODE_CONFIG_KEYS[key]
            default = getattr(cls(), name)
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"node config '{key}': expected true or false, got {value!r}")
            elif isinstance(default, int) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"node config '{key}': expected an integer, got {value!r}")
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"node config '{key}': expected a number, got {value!r}")
                try:
                    value = float(value)
                except OverflowError:
                    raise ConfigError(f"node config '{key}': the number is too large") from None
            elif not isinstance(value, str):
                raise ConfigError(f"node config '{key}': expected a string, got {value!r}")
            values[name] = value
        return cls(**values)

    def violations(self, cfg: Mapping[str, Any]) -> list[str]:
        """The run config keys (resolved config) that ask for less privacy than this policy allows."""
        out = []
        secure = bool(cfg["secure-aggregation"])
        if self.require_local_dp and not cfg["local-dp"] and not (secure and self.allow_secure_aggregation):
            out.append("local-dp")
        if secure:
            if not (self.allow_secure_aggregation or cfg["local-dp"]):
                out.append("secure-aggregation")
            for key, bad in (("user-noise-multiplier", cfg["user-noise-multiplier"] < self.min_user_noise_multiplier),
                             ("user-clip", cfg["user-clip"] > self.max_user_clip),
                             ("user-delta", cfg["user-delta"] != self.user_delta),
                             ("user-epsilon-budget", cfg["user-epsilon-budget"] > self.user_epsilon_budget),
                             ("min-survivors", cfg["min-survivors"] < self.min_survivors)):
                if bad:
                    out.append(key)
        if cfg["local-dp"] or self.require_local_dp:
            per_sensitivity = cfg["noise-multiplier"] / session_sensitivity(cfg["examples-per-user"], self.adjacency)
            if per_sensitivity < self.min_noise_multiplier:
                out.append("noise-multiplier")
            if cfg["max-grad-norm"] > self.max_clip:
                out.append("max-grad-norm")
            if cfg["delta"] != self.delta:
                out.append("delta")
            if cfg["client-epsilon-budget"] > self.epsilon_budget:
                out.append("client-epsilon-budget")
            if cfg["eval-noise-multiplier"] < self.min_noise_multiplier:
                out.append("eval-noise-multiplier")
        # these define the unit of privacy, with DP or without
        if cfg["history-len"] > self.max_history_len:
            out.append("history-len")
        if cfg["max-length"] > self.max_length:
            out.append("max-length")
        return out

    def lengthens_unit(self, cfg: Mapping[str, Any], recorded_history_lens: list[int | None]) -> bool:
        """True when the run asks for a longer history than every session this device has recorded
        and its owner did not set ``privacy-max-history-len`` (a session recorded before ledgers kept
        the history length ran under a release whose default, and limit, was 5)."""
        if self.owner_set_history_len or not recorded_history_lens:
            return False
        longest = max(LEGACY_HISTORY_LEN if h is None else h for h in recorded_history_lens)
        return cfg["history-len"] > longest

    def to_json(self) -> dict[str, Any]:
        """The policy as stored in the ledger."""
        return asdict(self)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
