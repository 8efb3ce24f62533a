"""The README is kept in step with the code it describes."""

from __future__ import annotations

from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_the_readme_lists_every_field_a_device_sends():
    from common.wire import markdown_table

    assert markdown_table() in README


def test_the_readme_configuration_table_is_the_run_config():
    from common.run_config import markdown_table

    assert markdown_table() in README


def test_the_readme_starts_with_the_two_commands():
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert "bash scripts/simulate.sh" in first_block and "bash scripts/test.sh" in first_block


def test_no_other_installed_distribution_provides_our_top_level_packages():
    """The packages keep the fixed folder names; make sure nothing else installed claims them."""
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    for name in ("common", "client", "server", "simulations"):
        assert set(owners.get(name, ["privrec"])) == {"privrec"}, (name, owners.get(name))


def test_the_readme_states_how_many_configurations_the_defaults_were_chosen_among():
    """The count every result.json repeats (privacy.tuning) is the README's."""
    from common.run_config import DEFAULTS_CONFIGURATIONS_TRIED

    assert f"{DEFAULTS_CONFIGURATIONS_TRIED} configurations tried" in README
    assert f"among {DEFAULTS_CONFIGURATIONS_TRIED}\n  configurations" in README  # the privacy statement's bullet
