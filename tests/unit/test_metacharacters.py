"""Every string setting of config/defaults.yml filled with shell, SQL, nginx and YAML
metacharacters: the inventory is refused naming that key, or every command the plans would run
keeps its token structure (the value never becomes a word of its own)."""

from __future__ import annotations

import shlex
from collections.abc import Iterator

import pytest

from tasks.core.errors import InputError
from tasks.core.plan import RunCommand
from tasks.core.project import DEFAULTS_FILE
from tasks.core.schema import load_defaults
from tasks.core.tiers import build
from tasks.tiers import TIERS
from tests.unit.conftest import with_setting

EVIL = "x;touch /tmp/pwn $(id) `id` 'q\" {};\n  privileged: true"
DEFAULTS, _ = load_defaults(DEFAULTS_FILE)


def string_settings(node: dict, prefix: str = "") -> Iterator[str]:
    """The dotted keys of every string setting."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from string_settings(value, f"{prefix}{key}.")
        elif isinstance(value, str):
            yield f"{prefix}{key}"


@pytest.mark.parametrize("key", list(string_settings(DEFAULTS)))
def test_a_hostile_value_is_refused_or_stays_one_word(load, base, key: str) -> None:
    try:
        inventory = load(with_setting(base, key, EVIL))
        plans = build(TIERS, inventory)
    except InputError as refused:
        assert key in str(refused) or (key == "secrets_file" and "secrets" in str(refused))
        return
    for tier in plans:
        for host_plan in tier.hosts:
            for step in host_plan.steps:
                if not isinstance(step, RunCommand):
                    continue
                for command in (step.command, step.probe):
                    if "/tmp/pwn" not in command:
                        continue
                    words = shlex.split(command)
                    assert "/tmp/pwn" not in words and "touch" not in words, \
                        (tier.tier, step.name, command)
