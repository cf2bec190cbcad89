"""The command line as an operator meets it: `inv --list`, config tasks on shipped inventories."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.core.profiles import available_versions, load_profile

ROOT = Path(__file__).resolve().parents[2]
NAMESPACES = ("config", "db", "cache", "vector", "app", "images", "lb", "monitor", "backup", "dev",
              "deploy", "net", "logging", "hosts")


def inv(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `inv` from the project root the way an operator does."""
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **(env or {})}, timeout=120,
                          check=False)


def test_list_shows_every_namespace_with_a_summary() -> None:
    listing = inv("--list")
    assert listing.returncode == 0, listing.stderr
    names = [line.split()[0] for line in listing.stdout.splitlines()[2:] if line.strip()
             and not line.startswith(" " * 5)]
    assert {name.split(".")[0] for name in names} >= set(NAMESPACES)
    assert all("." in name for name in names)
    assert "config.check" in names and "deploy.all" in names


def test_every_flag_has_help() -> None:
    from invoke import Collection

    import tasks

    def walk(collection: Collection):
        yield from collection.tasks.values()
        for sub in collection.collections.values():
            yield from walk(sub)

    for task in walk(tasks.ns):
        params = [p for p in task.get_arguments() if p.name not in ("ctx",)]
        assert task.__doc__ or task.body.__doc__, task.name
        missing = [p.name for p in params if not p.help]
        assert missing == [], f"{task.name}: flags without help: {missing}"
        short = [name for p in params for name in p.names if len(name) == 1]
        named = list(getattr(task, "short_flags", {}).values())
        assert short == named, f"{task.name}: short flags {short} (long only but {named})"


def test_help_names_each_flag_once_and_in_full() -> None:
    shown = inv("--help", "deploy.all")
    assert shown.returncode == 0, shown.stderr
    assert "  --parallel=INT " in shown.stdout and "-a INT" not in shown.stdout
    one_off = inv("--help", "app.exec")
    assert "  -i, --interactive " in one_off.stdout and "-h STRING" not in one_off.stdout


@pytest.mark.parametrize("name", ["local", "production", "homelab"])
def test_shipped_inventories_pass_config_check(name: str, tmp_path: Path) -> None:
    env = {"DIFY_INVENTORY": str(ROOT / "config" / "inventories" / f"{name}.yml"),
           "DIFY_SECRETS": str(tmp_path / f"{name}.env")}
    generated = inv("config.secrets", env=env)
    assert generated.returncode == 0, generated.stdout + generated.stderr
    secret_values = [line.split("=", 1)[1] for line in
                     (tmp_path / f"{name}.env").read_text().splitlines()]
    assert not any(value in generated.stdout for value in secret_values)
    checked = inv("config.check", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"config/inventories/{name}.yml: valid" in checked.stdout
    assert "failed" not in checked.stdout


# 1.5.1 has four queues: production.yml's dataset group names queues it does not have, which
# config.check refuses (tests/unit/test_validation.py).
@pytest.mark.parametrize("version", [v for v in available_versions() if v != "1.5.1"])
def test_production_checks_on_every_release_and_says_what_it_deploys(version: str,
                                                                     tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "config" / "inventories" / "production.yml").read_text())
    data["dify"] = {"version": version}
    inventory = tmp_path / "production.yml"
    inventory.write_text(yaml.safe_dump(data))
    env = {"DIFY_INVENTORY": str(inventory), "DIFY_SECRETS": str(tmp_path / "p.env")}
    assert inv("config.secrets", env=env).returncode == 0
    checked = inv("config.check", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    profile = load_profile(version)
    assert f"Dify {version} deploys:" in checked.stdout
    assert f"  queues ({len(profile.queues)}): {', '.join(profile.queues)}" in checked.stdout
    assert "  service worker_beat: worker1" in checked.stdout
    assert "/e/ -> plugin_daemon" in checked.stdout
    for route in profile.routes["api"]:
        assert f"{route} -> api" in checked.stdout
    assert "failed" not in checked.stdout


def test_config_check_fails_before_any_host_on_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("name: bad\nhosts:\n  - {name: a, connection: local, roles: [webb]}\n")
    result = inv("config.check", env={"DIFY_INVENTORY": str(bad),
                                      "DIFY_SECRETS": str(tmp_path / "none.env")})
    assert result.returncode == 1
    assert "bad.yml: hosts[0].roles[0]: unknown role 'webb' (did you mean 'web'?)" in result.stderr


def test_render_writes_every_host(tmp_path: Path) -> None:
    env = {"DIFY_INVENTORY": str(ROOT / "config" / "inventories" / "production.yml"),
           "DIFY_SECRETS": str(tmp_path / "p.env")}
    assert inv("config.secrets", env=env).returncode == 0
    result = inv("config.render", "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 0, result.stderr
    hosts = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert hosts == sorted(["lb1", "web1", "web2", "api1", "api2", "api3", "worker1", "worker2",
                            "db1", "db2", "db3", "vector1", "monitor1", "logs1"])
    env_file = tmp_path / "out" / "api1" / "opt" / "dify" / ".env"
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"


def test_unknown_tier_in_only_is_refused(tmp_path: Path) -> None:
    env = {"DIFY_SECRETS": str(tmp_path / "l.env")}
    assert inv("config.secrets", env=env).returncode == 0
    result = inv("deploy.all", "--dry", "--only", "db,nginx", env=env)
    assert result.returncode == 1
    assert "--only: nginx: unknown tier" in result.stderr


def test_diff_without_dry_is_refused_before_any_host() -> None:
    for command in ("deploy.all", "db.deploy"):
        result = inv(command, "--diff")
        assert result.returncode == 1, result.stdout
        assert "--diff: without --dry: shows what a dry run would change" in result.stderr
        assert "fix: add --dry" in result.stderr and "preflight" not in result.stdout


def test_chained_tier_deploys_each_run(tmp_path: Path) -> None:
    env = {"DIFY_SECRETS": str(tmp_path / "l.env")}
    assert inv("config.secrets", env=env).returncode == 0
    result = inv("db.deploy", "--dry", "cache.deploy", "--dry", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[db]" in result.stdout and "[cache]" in result.stdout, result.stdout


@pytest.mark.parametrize("words", [("backup.restore", "--help"), ("db.promote", "-h"),
                                   ("app.upgrade", "--help"), ("lb.maintenance", "--help")])
def test_help_after_a_positional_task_shows_where_the_help_is_and_runs_nothing(
        words: tuple[str, ...], tmp_path: Path) -> None:
    # No secrets file: the task would stop on it if it ran.
    result = inv(*words, env={"DIFY_SECRETS": str(tmp_path / "none.env")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"Its arguments and options: inv --help {words[0]}"
    assert "secrets file" not in result.stderr
