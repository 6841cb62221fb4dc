"""Each role's meta/argument_specs.yml documents exactly the settings its defaults/main.yml
holds, with the same default wherever the spec states a literal one: the spec is what
ansible-doc and the preflight show an operator, so it must not drift from what applies."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROLES = sorted(
    p.parent.parent
    for p in (Path(__file__).resolve().parents[2] / "ansible/roles").glob("*/defaults/main.yml")
)


def load(role: Path) -> tuple[dict, dict]:
    defaults = yaml.safe_load((role / "defaults/main.yml").read_text()) or {}
    specs = yaml.safe_load((role / "meta/argument_specs.yml").read_text())["argument_specs"]
    return defaults, specs["main"].get("options", {})


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_spec_lists_every_default_and_nothing_else(role: Path) -> None:
    defaults, options = load(role)
    assert sorted(set(defaults) - set(options)) == [], "defaults missing from argument_specs"
    optional = {name for name, spec in options.items() if not spec.get("required")}
    assert sorted(optional - set(defaults)) == [], "argument_specs options with no default"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_spec_defaults_are_the_defaults(role: Path) -> None:
    defaults, options = load(role)
    differ = {
        name: (options[name]["default"], value)
        for name, value in defaults.items()
        # A templated default is described in words in the spec, not repeated.
        if "default" in options.get(name, {}) and "{{" not in yaml.safe_dump(value)
        if options[name]["default"] != value
    }
    assert differ == {}, "argument_specs default vs defaults/main.yml"
