"""Inventory values and secrets reach shells, SQL, nginx and config files only through the
escaping of each target, or are refused before any host is touched."""

from __future__ import annotations

import hashlib
import re
import shlex
import subprocess

import pytest

from tasks.core import validators
from tasks.core.errors import DifyopsError, InputError
from tasks.core.plan import RunCommand
from tasks.core.render import Renderer, env_quote, pgpass_field, redis_quote, sql_literal
from tasks.tiers import app, lb
from tests.unit.conftest import good_secrets


def refusal(load, data, secret_values=None) -> str:
    with pytest.raises(InputError) as caught:
        load(data, secret_values)
    return str(caught.value)


@pytest.mark.parametrize(("written", "said"), [
    # as the secrets file holds them (python-dotenv decodes \n in double quotes)
    ('"line-one-of-the-value\\nREDIS_HOST=evil.example"', "holds a control character"),
    ('"it\'s-a-long-enough-password"', "holds a quote (') or a backslash"),
    ("'back\\slash-long-enough-password'", "holds a quote (') or a backslash"),
])
def test_secrets_that_no_file_can_hold_as_they_are_are_refused_without_printing_them(
        load, base, written: str, said: str) -> None:
    message = refusal(load, base, {**good_secrets(), "REDIS_PASSWORD": written})
    assert f"REDIS_PASSWORD: {said}" in message
    assert "line-one-of-the-value" not in message and "long-enough-password" not in message


def test_a_database_password_with_a_space_is_refused(load, base) -> None:
    # The plugin daemon writes it unquoted into its libpq connection string.
    message = refusal(load, base, {**good_secrets(),
                                   "DB_PLUGIN_PASSWORD": "two words-long-password"})
    assert "DB_PLUGIN_PASSWORD: holds a space, which the plugin daemon's database" in message
    assert "long-password" not in message


def test_each_target_escapes_for_itself() -> None:
    assert sql_literal("a'b\"$c") == "'a''b\"$c'"
    assert redis_quote("plain-value_1") == "plain-value_1"
    assert redis_quote('sp ace"q') == '"sp ace\\"q"'
    assert pgpass_field("a:b\\c") == "a\\:b\\\\c"
    assert env_quote("a b$c") == "'a b$c'"
    with pytest.raises(DifyopsError):
        env_quote("a'b")  # refused, never shortened


def test_sql_and_redis_files_carry_the_secret_whole(load, base) -> None:
    password = 'Aa1"$ {x} ;--long-password'
    db_password = 'Aa1"$x;--{long}-password'  # a space is refused there (see below)
    inventory = load(base, {**good_secrets(), "DB_PASSWORD": db_password,
                            "REDIS_PASSWORD": password, "REDIS_ADMIN_PASSWORD": password})
    renderer = Renderer(inventory)
    roles = renderer.render("config/postgres/roles.sql.j2", inventory.host("db1"), slots=[])
    assert f"ALTER ROLE dify WITH LOGIN PASSWORD '{db_password}';" in roles
    conf = renderer.render("config/redis/redis.conf.j2", inventory.host("db1"), port=6379,
                           data_dir="/var/lib/redis", log_file="/var/log/redis/r.log",
                           pid_file="", maxmemory=0, cluster=False, tls_dir="",
                           acl_file="/etc/difyops/redis/users.acl")
    assert 'masterauth "Aa1\\"$ {x} ;--long-password"' in conf
    auth = renderer.render("config/redis/auth.env.j2", inventory.host("db1"))
    assert [shlex.split(line) for line in auth.splitlines()[-2:]] == [
        [f"REDISCLI_AUTH={password}"], [f"SENTINEL_AUTH={password}"]]
    # The users file holds each password's SHA-256: nothing there to quote.
    users = renderer.render("config/redis/users.acl.j2", inventory.host("db1"))
    digest = hashlib.sha256(password.encode()).hexdigest()
    assert f"user default on #{digest} ~* &* +@all -@dangerous" in users
    assert password not in users


@pytest.mark.parametrize(("key", "value"), [
    ("storage", {"type": "shared-fs", "path": "/srv/dify;touch /tmp/X"}),
    ("app", {"deploy_dir": "/opt/dify $(id)"}),
    ("cache", {"mode": "sentinel", "master_name": "m; rm -rf /"}),
    ("vector", {"store": "pgvector", "pgvector_user": "x; DROP ROLE dify"}),
])
def test_strings_that_would_reach_a_shell_or_sql_are_refused(load, base, key: str,
                                                             value: dict) -> None:
    base[key] = value
    if key == "vector":
        base["hosts"] = [h for h in base["hosts"] if h["name"] != "vector1"]
    field = next(k for k in value if k not in ("type", "mode", "store"))
    assert re.search(rf"{key}\.{field}: '.*' is not a", refusal(load, base))


def test_paths_in_commands_are_quoted(load, base) -> None:
    inventory = load(base)
    check = app.release_check(inventory, inventory.host("api1"))
    assert isinstance(check, RunCommand)
    assert "grep -qF '\"version\": \"1.16.1\"' /opt/dify/release.json" in check.command


def test_lb_and_app_files_are_validated_before_any_host_in_a_dry_run_too() -> None:
    assert lb.TIER.validate and app.TIER.validate


def test_validator_output_never_shows_a_secret(monkeypatch, tmp_path) -> None:
    def leaky(root):
        return [validators.Verdict("nginx -t", "lb1:/etc/nginx/x.conf", "failed",
                                   'unknown directive "s3cr3t-value-xyz" in line 3')]

    monkeypatch.setattr(validators, "VALIDATORS", (leaky,))
    verdict = validators.validate(tmp_path, hide=["s3cr3t-value-xyz", "ab"])[0]
    assert verdict.detail == 'unknown directive "***" in line 3'


def test_the_release_check_message_is_never_expanded_by_the_shell(load, base, monkeypatch,
                                                                   tmp_path) -> None:
    base["app"] = {"deploy_dir": str(tmp_path)}
    inventory = load(base)
    pwned = tmp_path / "pwned"
    monkeypatch.setattr(app, "release", lambda inv, host: {
        "version": "1.16.1", "images": {"api": f"img$(touch {pwned})`touch {pwned}`"}})
    (tmp_path / "release.json").write_text('{\n  "version": "1.13.3"\n}\n')
    check = app.release_check(inventory, inventory.host("api1"))
    result = subprocess.run(["sh", "-c", check.command], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 1 and not pwned.exists()
    assert result.stderr.startswith("api1 runs Dify 1.13.3 (")
    assert f"img$(touch {pwned})" in result.stderr


@pytest.mark.parametrize(("key", "value"), [
    ("dify", {"registry_mirror": "m.example/$(id)/"}),
    ("dify", {"images": {"api": "dify-api:1 --privileged"}}),
    ("cache", {"mode": "sentinel", "proxy_image": "haproxy:2.8\n    privileged: true"}),
])
def test_image_names_are_references_only(load, base, key: str, value: dict) -> None:
    base[key] = value
    assert "is not a" in refusal(load, base) and key in refusal(load, base)
