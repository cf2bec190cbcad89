"""Operator hooks: executables run on the control machine around deploys and upgrades.

`hooks/` in the project (or the folder DIFYOPS_HOOKS names) may hold `pre-deploy`, `post-deploy`,
`pre-upgrade`, `post-upgrade` and `post-failure`. Each one present runs with what is happening in
its environment: DIFYOPS_HOOK, DIFYOPS_COMMAND (e.g. deploy.all), DIFYOPS_INVENTORY (its name),
DIFYOPS_INVENTORY_FILE, DIFYOPS_TIERS (comma-separated), DIFYOPS_DIFY_VERSION (the release being
deployed or upgraded to), DIFYOPS_FROM_VERSION (upgrades: the inventory's release), and for post
hooks DIFYOPS_OUTCOME (succeeded or failed) and, after a failure, DIFYOPS_ERROR.

A pre-hook that fails stops the command before any host is touched. post-failure runs when the
command failed; the command's own error is what it ends with. Dry runs run no hook.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.core.errors import DifyopsError, InputError, Problem
from tasks.core.inventory import Inventory
from tasks.core.project import ROOT, display

HOOKS_ENV = "DIFYOPS_HOOKS"
TIMEOUT = 600  # seconds a hook may take


def hooks_dir() -> Path:
    """Where the hooks are: DIFYOPS_HOOKS, else hooks/ in the project."""
    return Path(os.environ.get(HOOKS_ENV) or ROOT / "hooks")


def run_hook(name: str, env: dict[str, str]) -> None:
    """Run one hook when it exists (its output goes to the terminal); a failure raises."""
    path = hooks_dir() / name
    if not path.exists():
        return
    if not path.is_file() or not os.access(path, os.X_OK):
        raise InputError([Problem(display(path), name, "is not an executable file",
                                  f"chmod +x {display(path)}, or remove it")])
    print(f"hook {name}: {display(path)}", flush=True)
    try:
        result = subprocess.run([str(path)], env={**os.environ, **env, "DIFYOPS_HOOK": name},
                                cwd=ROOT, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise DifyopsError(f"hook {name} ({display(path)}) ran longer than {TIMEOUT} s") from None
    except OSError as exc:
        raise DifyopsError(f"hook {name} ({display(path)}) cannot run: {exc}") from None
    if result.returncode != 0:
        raise DifyopsError(f"hook {name} ({display(path)}) failed with exit {result.returncode}")


@contextmanager
def around(action: str, inventory: Inventory, *, command: str, tiers: list[str],
           version: str = "") -> Iterator[None]:
    """pre-<action> first (its failure: nothing touched), then the body; post-<action> when it
    succeeded, post-failure when it raised (the body's error is re-raised)."""
    env = {"DIFYOPS_COMMAND": command, "DIFYOPS_INVENTORY": inventory.name,
           "DIFYOPS_INVENTORY_FILE": str(inventory.file), "DIFYOPS_TIERS": ",".join(tiers),
           "DIFYOPS_DIFY_VERSION": version or inventory.profile.version}
    if version:
        env["DIFYOPS_FROM_VERSION"] = inventory.profile.version
    try:
        run_hook(f"pre-{action}", env)
    except InputError:
        raise
    except DifyopsError as exc:
        raise DifyopsError(f"{exc}: {command} stopped before touching any host") from None
    try:
        yield
    except Exception as exc:
        try:
            run_hook("post-failure", {**env, "DIFYOPS_OUTCOME": "failed",
                                      "DIFYOPS_ERROR": str(exc)[:2000]})
        except DifyopsError as hook_error:
            print(f"error: {hook_error}", flush=True)
        raise
    run_hook(f"post-{action}", {**env, "DIFYOPS_OUTCOME": "succeeded"})
