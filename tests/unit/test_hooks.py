"""Operator hooks (tasks/core/hooks.py): real executables run around a deploy or an upgrade."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core import hooks
from tasks.core.errors import DifyopsError, InputError
from tasks.core.project import ROOT


def hook(folder: Path, name: str, body: str) -> Path:
    """An executable shell hook that records its environment in folder/<name>.env first."""
    path = folder / name
    path.write_text(f"#!/bin/sh\nenv | grep '^DIFYOPS_' | sort > '{folder}/{name}.env'\n{body}\n")
    path.chmod(0o755)
    return path


def seen(folder: Path, name: str) -> dict[str, str]:
    """The DIFYOPS_* variables a hook ran with ({} when it did not run)."""
    recorded = folder / f"{name}.env"
    if not recorded.exists():
        return {}
    return dict(line.split("=", 1) for line in recorded.read_text().splitlines())


def test_pre_and_post_hooks_run_around_a_success_with_what_happens(
        load, base, no_operator_hooks: Path) -> None:
    inventory = load(base)
    for name in ("pre-upgrade", "post-upgrade", "post-failure"):
        hook(no_operator_hooks, name, "exit 0")
    ran: list[str] = []
    with hooks.around("upgrade", inventory, command="app.upgrade", tiers=["app"],
                      version="1.16.1"):
        ran.append("body")
        assert seen(no_operator_hooks, "pre-upgrade")  # before the body
    assert ran == ["body"]
    before = seen(no_operator_hooks, "pre-upgrade")
    assert {key: before.get(key) for key in (
        "DIFYOPS_COMMAND", "DIFYOPS_DIFY_VERSION", "DIFYOPS_FROM_VERSION", "DIFYOPS_HOOK",
        "DIFYOPS_INVENTORY", "DIFYOPS_INVENTORY_FILE", "DIFYOPS_TIERS")} == {
        "DIFYOPS_COMMAND": "app.upgrade", "DIFYOPS_DIFY_VERSION": "1.16.1",
        "DIFYOPS_FROM_VERSION": inventory.profile.version, "DIFYOPS_HOOK": "pre-upgrade",
        "DIFYOPS_INVENTORY": "unit", "DIFYOPS_INVENTORY_FILE": str(inventory.file),
        "DIFYOPS_TIERS": "app"}
    assert "DIFYOPS_OUTCOME" not in before  # (the run's other DIFYOPS_* settings pass through)
    assert seen(no_operator_hooks, "post-upgrade")["DIFYOPS_OUTCOME"] == "succeeded"
    assert seen(no_operator_hooks, "post-failure") == {}


def test_a_failing_pre_hook_stops_before_the_body(load, base, no_operator_hooks: Path) -> None:
    hook(no_operator_hooks, "pre-deploy", "echo 'change freeze' >&2; exit 3")
    hook(no_operator_hooks, "post-failure", "exit 0")
    with pytest.raises(DifyopsError) as caught, \
            hooks.around("deploy", load(base), command="deploy.all", tiers=["db", "app"]):
        pytest.fail("the body ran after a failing pre-deploy hook")
    assert "hook pre-deploy" in str(caught.value) and "failed with exit 3" in str(caught.value)
    assert "deploy.all stopped before touching any host" in str(caught.value)
    assert seen(no_operator_hooks, "post-failure") == {}  # nothing ran, nothing failed


def test_post_failure_runs_with_the_error_and_the_error_stays(load, base,
                                                              no_operator_hooks: Path) -> None:
    for name in ("post-deploy", "post-failure"):
        hook(no_operator_hooks, name, "exit 0")
    with pytest.raises(RuntimeError, match="db1 refused"), \
            hooks.around("deploy", load(base), command="db.deploy", tiers=["db"]):
        raise RuntimeError("db1 refused")
    after = seen(no_operator_hooks, "post-failure")
    assert (after["DIFYOPS_OUTCOME"], after["DIFYOPS_ERROR"]) == ("failed", "db1 refused")
    assert seen(no_operator_hooks, "post-deploy") == {}


def test_a_hook_that_is_not_executable_is_refused_with_the_fix(load, base,
                                                                no_operator_hooks: Path) -> None:
    (no_operator_hooks / "pre-deploy").write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(InputError, match="pre-deploy: is not an executable file"), \
            hooks.around("deploy", load(base), command="deploy.all", tiers=["db"]):
        pytest.fail("the body ran")


def test_the_real_cli_stops_a_deploy_on_its_pre_hook(tmp_path: Path,
                                                    no_operator_hooks: Path) -> None:
    hook(no_operator_hooks, "pre-deploy", "exit 7")
    env = {"DIFY_SECRETS": str(tmp_path / "local.env"), "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "invoke"]
    assert subprocess.run([*run, "config.secrets"], cwd=ROOT, env={**env, hooks.HOOKS_ENV:
                          str(no_operator_hooks)}, capture_output=True).returncode == 0
    result = subprocess.run([*run, "deploy.all"], cwd=ROOT, text=True, capture_output=True,
                            env={**env, hooks.HOOKS_ENV: str(no_operator_hooks)})
    assert result.returncode == 1, result.stdout
    assert "failed with exit 7: deploy.all stopped before touching any host" in result.stderr
    assert "preflight" not in result.stdout  # nothing after the hook ran
    assert seen(no_operator_hooks, "pre-deploy")["DIFYOPS_COMMAND"] == "deploy.all"
