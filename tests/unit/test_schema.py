"""The value types of config/defaults.yml: every typed setting refuses a value outside its type,
naming the file, the key and the fix, and accepts its default (tasks/core/schema.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.core import schema
from tasks.core.errors import InputError
from tasks.core.project import DEFAULTS_FILE
from tests.unit.conftest import with_setting

DEFAULTS, TYPES = schema.load_defaults(DEFAULTS_FILE)

# A value of the right YAML type but outside each value type.
WRONG: dict[str, Any] = {
    "!path": "srv/../etc", "!host": "dify..example.com", "!slug": "../x", "!name": "a b",
    "!identifier": "dify-vector", "!port": 65536, "!count": 0, "!natural": -1, "!percent": 100,
    "!url": "javascript:alert(1)", "!duration": "15 days", "!time": "3am",
    "!image": "nginx; rm -rf /", "!registry": "http://mirror", "!enum": "maybe",
}


def test_the_defaults_declare_the_types_the_engine_relies_on() -> None:
    expected = {"name": "!slug", "domain": "!host", "db.port": "!port",
                "storage.path": "!path", "app.deploy_dir": "!path", "upload_limit_mb": "!count",
                "cache.master_name": "!name", "vector.pgvector_user": "!identifier",
                "monitor.alert_webhook": "!url", "monitor.retention": "!duration",
                "backup.time": "!time", "cache.proxy_image": "!image",
                "dify.registry_mirror": "!registry", "tls.mode": "!enum"}
    assert {key: TYPES[key].tag for key in expected} == expected
    assert DEFAULTS["tls"]["mode"] == "off" and DEFAULTS["db"]["port"] == 5432
    assert DEFAULTS["lb"]["frame_options"] == "SAMEORIGIN"


def test_every_default_is_of_its_own_type() -> None:
    assert list(schema.problems(DEFAULTS, DEFAULTS, TYPES, "defaults.yml")) == []


@pytest.mark.parametrize("key", sorted(TYPES))
def test_a_value_outside_its_type_is_refused_by_the_loader(load, base, key: str) -> None:
    wrong = WRONG[TYPES[key].tag]
    with pytest.raises(InputError) as refused:
        load(with_setting(base, key, wrong))
    problem = next(p for p in refused.value.problems if p.key == key)
    assert problem.file.endswith("inventory.yml")
    assert problem.message == f"{wrong!r} is not {TYPES[key].what}"
    assert problem.fix.startswith("use ") and "default" in problem.fix


def test_an_empty_default_means_unset_and_a_set_value_is_typed(load, base) -> None:
    assert load(with_setting(base, "monitor.alert_webhook", "")).settings["monitor"] \
        ["alert_webhook"] == ""
    hook = "https://hooks.example.com/dify"
    assert load(with_setting(base, "monitor.alert_webhook", hook)).settings["monitor"] \
        ["alert_webhook"] == hook


def test_a_required_typed_value_cannot_be_emptied(load, base) -> None:
    with pytest.raises(InputError, match=r"storage.path: '' is not a plain absolute path"):
        load(with_setting(base, "storage.path", ""))


def test_an_enum_lists_its_choices_the_first_being_the_default(tmp_path: Path) -> None:
    file = tmp_path / "defaults.yml"
    file.write_text("tls:\n  mode: !enum off|self-signed|file\nport: !port 80\n")
    defaults, types = schema.load_defaults(file)
    assert defaults == {"tls": {"mode": "off"}, "port": 80}
    assert types["tls.mode"].accepts("file") and not types["tls.mode"].accepts(False)
    assert types["tls.mode"].what == "one of 'off', 'self-signed', 'file'"


def test_an_unknown_value_type_is_an_error_in_the_schema(tmp_path: Path) -> None:
    file = tmp_path / "defaults.yml"
    file.write_text("port: !prot 80\n")
    with pytest.raises(yaml.YAMLError, match="unknown value type !prot"):
        schema.load_defaults(file)


def keys_of(node: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in node.items():
        found.append(key)
        if isinstance(value, dict):
            found.extend(keys_of(value, f"{prefix}{key}."))
    return found


def test_the_loaded_settings_are_frozen_and_read_by_attribute(load, base) -> None:
    settings = load(base).settings
    assert settings.db.port == settings["db"]["port"] == 5432
    assert isinstance(settings.lb.trusted_proxies, tuple)
    with pytest.raises(AttributeError, match="frozen"):
        settings.db.port = 1
    with pytest.raises(TypeError):
        settings.db["port"] = 1  # type: ignore[index]
    with pytest.raises(AttributeError, match="no setting 'prot'"):
        _ = settings.db.prot


def test_replace_builds_new_settings_and_leaves_the_old_ones(load, base) -> None:
    settings = load(base).settings
    changed = settings.replace(dify=settings.dify.replace(version="1.13.3"))
    assert (changed.dify.version, settings.dify.version) == ("1.13.3", "1.16.1")
    assert changed.db is settings.db


def test_no_setting_is_hidden_behind_a_method_of_the_settings() -> None:
    methods = {name for name in dir(schema.Section) if not name.startswith("_")}
    assert methods == {"get", "items", "keys", "values", "replace"}
    assert not methods & set(keys_of(DEFAULTS))
