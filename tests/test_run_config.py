"""Run-config defaults, types and errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.run_config import DEFAULTS, ConfigError, resolve


def test_pyproject_defaults_are_the_code_defaults():
    raw = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert raw["tool"]["flwr"]["app"]["config"] == DEFAULTS
    components = raw["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "server.app:app", "clientapp": "client.app:app"}


def test_overrides_are_coerced():
    cfg = resolve({"num-server-rounds": 3.0, "central-dp": "true", "learning-rate": 1})
    assert cfg["num-server-rounds"] == 3 and cfg["central-dp"] is True and cfg["learning-rate"] == 1.0


@pytest.mark.parametrize("override, message", [
    ({"strategy": "fedprox"}, r"'strategy': 'fedprox' is not one of \['fedavg', 'fedadam'\]"),
    ({"num-server-rounds": 0}, r"'num-server-rounds': 0 is out of range"),
    ({"noise-multiplier": -1.0}, r"'noise-multiplier'.*out of range"),
    ({"batch-size": 2.5}, r"'batch-size': expected an integer"),
    ({"central-dp": "maybe"}, r"'central-dp': expected true or false"),
    ({"budget-policy": "ignore"}, r"'budget-policy'"),
    ({"num-rounds": 3}, r"unknown key\(s\) \['num-rounds'\]"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve(override)


def test_every_key_is_documented():
    from common.run_config import HELP

    assert set(HELP) == set(DEFAULTS)


def test_key_value_overrides_parse_like_flwr_run_config():
    from common.run_config import parse_overrides

    got = parse_overrides(["num-server-rounds=3", "strategy=fedavg", 'run-name="a b"', "central-dp=true",
                           "learning-rate=0.5"])
    assert got == {"num-server-rounds": 3, "strategy": "fedavg", "run-name": "a b", "central-dp": True,
                   "learning-rate": 0.5}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["num-server-rounds"])


def test_every_federated_benchmark_preset_is_a_valid_run_config():
    """A preset with a misspelt key or a bad value would only fail after minutes of setup."""
    from common.run_config import parse_overrides
    from simulations.bench_federated import CENTRAL_DP, CONFIGS

    for name, overrides in CONFIGS.items():
        for extra in ("", CENTRAL_DP):
            cfg = resolve(parse_overrides((overrides + " " + extra).split()))
            assert cfg["client-epsilon-budget"] == DEFAULTS["client-epsilon-budget"], name
    with pytest.raises(ConfigError, match="num-server-round"):
        resolve(parse_overrides("num-server-round=3".split()))


def test_the_readme_lists_every_field_a_device_sends():
    from pathlib import Path

    from common.wire import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme
