"""Plumbing shared by every task module: choosing the inventory, running tiers, failing well."""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from invoke import Context, Task, task
from invoke.exceptions import Exit

from tasks.core import hooks, hostkeys
from tasks.core.apply import MAX_PARALLEL, execute
from tasks.core.errors import DifyopsError, InputError, Problem
from tasks.core.inventory import Inventory, endpoint, load_inventory
from tasks.core.lock import audit, deploy_lock
from tasks.core.plan import TierPlan
from tasks.core.project import display, inventory_path
from tasks.core.render import write_tree
from tasks.core.report import CHANGED, Report
from tasks.core.tiers import Tier, build, select
from tasks.core.validators import validate


def load(ctx: Context, *, check_secrets: bool = True) -> Inventory:
    """The inventory: DIFY_INVENTORY, else the invoke config's difyops.inventory, else local.yml."""
    configured = (ctx.config.get("difyops") or {}).get("inventory")
    return load_inventory(inventory_path(os.environ.get("DIFY_INVENTORY") or configured),
                          check_secrets=check_secrets)


class ShortFlagged(Task):
    """A task whose flags are long only (see tasks/__init__.py) but for the short ones it names,
    such as ``-i`` for ``--interactive`` as ``docker run -i`` has it:
    ``@task(klass=ShortFlagged, short_flags={"interactive": "i"})``."""

    def __init__(self, *args: Any, short_flags: dict[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.short_flags = short_flags or {}

    def arg_opts(self, name: str, default: str, taken_names: set[str]) -> dict[str, Any]:
        opts = super().arg_opts(name, default, taken_names)
        if name in self.short_flags:
            opts["names"] = [*opts["names"], self.short_flags[name]]
        return opts


def words_after_dashes(argv: list[str] | None = None) -> list[str]:
    """The words after a bare `--` on the command line, as the shell passed them (Invoke keeps
    only a copy joined by spaces, which loses their quoting); [] without one."""
    argv = sys.argv if argv is None else argv
    return argv[argv.index("--") + 1:] if "--" in argv else []


def reported(task_body: Callable[..., Any]) -> Callable[..., Any]:
    """Turn difyops errors into a non-zero exit with the message (no traceback). Invoke reads
    `inv db.promote --help` as the host `--help`: such a call prints the task's summary and
    where its help is instead of running."""
    name = (f"{task_body.__module__.rsplit('.', 1)[-1]}."
            f"{task_body.__name__.rstrip('_').replace('_', '-')}")
    summary = (task_body.__doc__ or "").strip().split("\n\n")[0]

    @functools.wraps(task_body)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if any(value in ("--help", "-h") for value in [*args[1:], *kwargs.values()]):
            print(f"{name}: {summary}\nIts arguments and options: inv --help {name}")
            return None
        try:
            return task_body(*args, **kwargs)
        except DifyopsError as exc:
            raise Exit(f"error: {exc}", code=1) from None

    return wrapper


def run_tiers(ctx: Context, tiers: list[Tier], *, dry: bool, only: str | None = None,
              parallel: int = MAX_PARALLEL, diff: bool = False) -> Report:
    """Validate, plan and apply (or dry-run) tiers; exit non-zero when any step failed.

    parallel: how many hosts of one tier are deployed at once (1: one host after the other).
    diff: a dry run shows every file in full (new) or as a diff (changed), not their sizes.
    """
    refuse_diff_without_dry(dry, diff)
    inventory = load(ctx)
    chosen = select(tiers, only)
    action = "dry run of" if dry else "applying"
    print(f"{action} {', '.join(t.name for t in chosen)} on inventory {inventory.name} "
          f"({len(inventory.hosts)} host(s), Dify {inventory.profile.version})", flush=True)
    plans = build(chosen, inventory)
    refuse_invalid([plan for tier, plan in zip(chosen, plans, strict=True) if tier.validate],
                   inventory.secrets.values())
    refuse_unrecorded(plans)
    if dry:
        report = execute(plans, dry=True, show_diff=diff, timeouts=inventory.settings.timeouts,
                         parallel=parallel)
    else:
        with deploy_lock(inventory.name) as me:
            report = execute(plans, timeouts=inventory.settings.timeouts, parallel=parallel)
            audit(inventory.name, {**me, "inventory": str(inventory.file),
                                   "dify_version": inventory.profile.version,
                                   "tiers": [t.name for t in chosen],
                                   "changed": report.count(CHANGED),
                                   "failed": len(report.failed),
                                   "finished": datetime.now(UTC).isoformat(timespec="seconds")})
    if report.failed:
        raise Exit(f"error: {len(report.failed)} step(s) failed; see the summary above. "
                   f"Fix the cause and run the same command again: it resumes.", code=1)
    return report


def refuse_diff_without_dry(dry: bool, diff: bool) -> None:
    """--diff only shows what a dry run would change: refused alone, before any host."""
    if diff and not dry:
        raise InputError([Problem("--diff", "without --dry", "shows what a dry run would change",
                                  "add --dry (a deploy applies the files; --diff shows them)")])


def refuse_unrecorded(plans: list[TierPlan]) -> None:
    """Every SSH host the plans touch must have a recorded host key: refused before any host
    is touched otherwise (not one host after another, halfway through a tier)."""
    hosts = {plan.host.name: plan.host for tier in plans for plan in tier.hosts if plan.steps}
    missing = hostkeys.unrecorded(hosts.values())
    if missing:
        raise InputError([Problem(display(path), host.name,
                                  f"no SSH host key recorded for "
                                  f"{endpoint(host.address, host.ssh.port)}",
                                  f"check the host's fingerprint, then run `inv hosts.trust "
                                  f"--host {host.name}`") for host, path in missing])


def refuse_invalid(plans: list[TierPlan], secrets: Iterable[str] = ()) -> None:
    """Check the plans' rendered files with the real validators (in a dry run too); raise
    before any host is touched. Secrets are masked in what the tools print."""
    if not plans:
        return
    with tempfile.TemporaryDirectory(prefix="difyops-validate.") as scratch:
        write_tree(plans, Path(scratch))
        verdicts = validate(Path(scratch), secrets)
    for verdict in verdicts:
        if verdict.status != "failed":
            print(f"  {verdict}", flush=True)
    failed = [verdict for verdict in verdicts if verdict.status == "failed"]
    if failed:
        raise DifyopsError("rendered files fail validation; no host was touched:\n"
                           + "\n".join(f"  {verdict}" for verdict in failed)
                           + "\n    fix: correct the inventory setting or template named above")


DRY_HELP = "print the plan: each file that would change, with its size; change nothing"
DIFF_HELP = "with --dry: show each new file in full and each changed one as a diff"


class TierTask(Task):
    """A task built for one tier. Invoke takes tasks with the same name and function body for
    one task and runs it once, which would drop `cache.deploy` from `inv db.deploy cache.deploy`."""

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = Task.__hash__


def deploy_task(tier: Tier) -> Task:
    """The `<tier>.deploy` task: the tier alone through the same plan/apply machinery."""

    def deploy(ctx: Context, dry: bool = False, diff: bool = False) -> None:
        refuse_diff_without_dry(dry, diff)
        with nullcontext() if dry else hooks.around("deploy", load(ctx),
                                                     command=f"{tier.name}.deploy",
                                                     tiers=[tier.name]):
            run_tiers(ctx, [tier], dry=dry, diff=diff)

    deploy.__doc__ = f"Deploy the {tier.summary} (--dry: show the plan, touch nothing)."
    return task(reported(deploy), klass=TierTask, help={"dry": DRY_HELP, "diff": DIFF_HELP})
