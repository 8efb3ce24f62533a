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


@pytest.mark.parametrize("override, words", [
    ({"delta": 1.0}, "'delta'"),
    ({"min-replies": 30, "clients-per-round": 20}, "min-replies"),
    ({"run-name": "../escaped"}, "plain folder name"),
    ({"run-name": ".hidden"}, "plain folder name"),
], ids=["delta-1", "min-replies", "escape", "hidden"])
def test_run_config_values_that_cannot_work_are_refused_by_name(override, words):
    with pytest.raises(ConfigError, match=words):
        resolve(override)


def test_the_launcher_names_a_bad_key_before_flower_sees_it():
    from simulations.simulate import check_overrides

    with pytest.raises(ConfigError, match="num-server-rouds"):
        check_overrides(["num-server-rouds=3"])
    with pytest.raises(ConfigError, match="num-server-rounds"):
        check_overrides(["num-server-rounds='three'"])
    assert check_overrides(["num-server-rounds=3 run-name='x'"]) == {"num-server-rounds": 3, "run-name": "x"}


def test_a_bad_dataset_path_leaves_no_run_folder_behind(tmp_path):
    from common.errors import DataFormatError
    from server.federation import Federation
    from simulations.inprocess_grid import InProcessGrid

    cfg = {"dataset": str(tmp_path / "nowhere"), "output-dir": str(tmp_path / "runs"), "run-name": "r"}
    with pytest.raises(DataFormatError, match="nowhere"):
        Federation(InProcessGrid(2, cfg), cfg)
    assert not (tmp_path / "runs" / "r").exists()  # a retry under the same name is not blocked


def test_zero_canaries_is_refused_not_replaced_by_the_default(tmp_path):
    from typer.testing import CliRunner

    from simulations.cli import app

    result = CliRunner().invoke(app, ["audit-empirical", "mechanism", "--canaries", "0", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "at least 2 canaries" in result.output, result.output


def test_every_choice_in_the_config_has_its_registered_implementation():
    from common.run_config import FIELDS
    from server.aggregation import STRATEGIES
    from server.sampling import SAMPLERS

    assert set(FIELDS["strategy"].choices) == set(STRATEGIES)
    assert set(FIELDS["client-sampling"].choices) - {"auto"} == set(SAMPLERS)


def test_a_run_folder_from_before_a_changed_default_reads_back_the_value_it_ran_with():
    from common.run_config import DEFAULTS, stored_config

    older = {k: v for k, v in DEFAULTS.items() if k not in ("sequence-exclude-history", "sequence-new-item-boost")}
    assert DEFAULTS["sequence-exclude-history"] and not stored_config(older)["sequence-exclude-history"]
    assert DEFAULTS["sequence-new-item-boost"] == 0.3 and stored_config(older)["sequence-new-item-boost"] == 0.0
    assert stored_config(dict(DEFAULTS))["sequence-exclude-history"]


def test_published_configurations_measured_with_the_full_softmax_rerun_with_it():
    from simulations.bench_federated import CONFIGS, TUNING
    from simulations.bench_schedule import PROBES
    from simulations.bench_secure import CONFIGS as SECURE

    assert not resolve(SECURE["default"])["sequence-exclude-history"]
    for name in TUNING:
        assert "sequence-exclude-history=false" in CONFIGS[name].split(), name
    excluded = {name: resolve(overrides)["sequence-exclude-history"] for name, (overrides, _, _) in PROBES.items()}
    assert {name for name, on in excluded.items() if on} == {"exclude-history", "no-dp-wide-sessions-4-decay",
                                                              "aggregator-mean", "trim-0.05", "bias-scale-1",
                                                              "bias-scale-3", "bias-scale-30", "lr-decay",
                                                              "lr-0.02-decay", "lr-0.015", "lr-0.02", "default-now",
                                                              "no-dp-now", "layers-0", "dim-16"}
