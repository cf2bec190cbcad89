"""deploy: the whole stack in dependency order, through the plan/apply engine."""

from __future__ import annotations

from contextlib import nullcontext

from invoke import Context, task
from invoke.exceptions import Exit

from tasks.backups import schedule as backup_schedule
from tasks.backups import settings as backup_settings
from tasks.core import doctor as medic
from tasks.core import doctor_schedule, hooks, netplan
from tasks.core import preflight as checks
from tasks.core.apply import MAX_PARALLEL
from tasks.core.cli import (
    DIFF_HELP,
    DRY_HELP,
    load,
    refuse_diff_without_dry,
    reported,
    run_tiers,
)
from tasks.core.errors import InputError, Problem
from tasks.core.fleet import table
from tasks.core.health import probe_all
from tasks.core.inventory import Host, Inventory
from tasks.core.lock import Locked, deploy_lock
from tasks.core.tiers import build, select
from tasks.images import show
from tasks.net import apply_firewall
from tasks.tiers import TIERS, firewall, lb_maintenance
from tasks.tiers.images import ImageError, sync

IMAGE_TIERS = ("app", "vector")  # the tiers whose hosts run images (tasks/tiers/images.py)
# deploy.all's tiers: the host firewall first (net.firewall), before any service listens.
DEPLOYED = (firewall.TIER, *TIERS)


@task(help={"dry": f"{DRY_HELP} (no preflight)", "diff": DIFF_HELP,
            "only": "comma-separated tiers to run, e.g. net,db,cache (default: all, in order)",
            "preflight": "check the hosts first and stop on a refusal (--no-preflight: skip)",
            "parallel": f"hosts of one tier deployed at once (default {MAX_PARALLEL}; 1: one "
                        f"host after the other, in inventory order)"})
@reported
def all(ctx: Context, dry: bool = False, only: str = "", preflight: bool = True,
        parallel: int = MAX_PARALLEL, diff: bool = False) -> None:
    """Deploy the firewall and every tier in dependency order, then the backup schedule (or
    only some tiers)."""
    refuse_diff_without_dry(dry, diff)
    if parallel < 1:
        raise InputError([Problem("--parallel", str(parallel), "must be at least 1",
                                  "give how many hosts of a tier to deploy at once, e.g. 1")])
    inventory = load(ctx)
    schedule_on = "" if only else inventory.settings.backup.schedule_on
    if schedule_on and schedule_on != "none":
        backup_settings.check(inventory)  # before any host is touched
    tiers = [tier.name for tier in select(DEPLOYED, only)]
    with nullcontext() if dry else hooks.around("deploy", inventory, command="deploy.all",
                                                 tiers=tiers), \
            nullcontext() if dry else deploy_lock(inventory.name):
        deploy_everything(ctx, inventory, dry=dry, only=only, preflight=preflight,
                          parallel=parallel, diff=diff, schedule_on=schedule_on)


def deploy_everything(ctx: Context, inventory: Inventory, *, dry: bool, only: str,
                      preflight: bool, parallel: int, diff: bool, schedule_on: str) -> None:
    """deploy.all's work between its hooks: preflight, the firewall, images, the tiers, the
    backup schedule."""
    chosen = select(DEPLOYED, only)
    if preflight and not dry:
        checks.check(inventory, preflight_hosts(inventory, only))
    if firewall.TIER in chosen:
        if netplan.firewall_on(inventory):
            apply_firewall(inventory, dry=dry, show_diff=diff)
        else:
            print(firewall_off(inventory), flush=True)
    if not dry:
        sync_images_first(inventory, only, parallel)
    if schedule_on == "none":  # said first: the per-host summary stays the last thing printed
        print("backups: not scheduled by deploy.all (backup.schedule_on: none): run "
              "`inv backup.schedule` on the machine that keeps them", flush=True)
    tiers = [tier for tier in chosen if tier is not firewall.TIER]
    if tiers:
        run_tiers(ctx, tiers, dry=dry, parallel=parallel, diff=diff)
    if schedule_on and schedule_on != "none":
        backup_schedule.install(inventory, dry=dry,
                                host_name="" if schedule_on == "control" else schedule_on)


def firewall_off(inventory: Inventory) -> str:
    """What deploy.all says when it leaves the host firewall out, and what that exposes."""
    if inventory.settings.net.firewall == "auto":
        return ("net: no host firewall (one host, net.firewall: auto); set net.firewall: \"on\" "
                "to apply it")
    return ("net: no host firewall (net.firewall: \"off\"): SSH and every port below are open "
            "to whoever reaches the hosts: " + "; ".join(netplan.exposed(inventory))
            + ". Set net.firewall: auto (and net.management), or run `inv net.apply`")


def sync_images_first(inventory: Inventory, only: str, parallel: int = 4) -> None:
    """With dify.sync_images, get the images onto the hosts before the tiers that run them
    (to at most 4 hosts at once, or --parallel if fewer)."""
    if not inventory.settings.dify.sync_images:
        return
    if not any(tier.name in IMAGE_TIERS for tier in select(TIERS, only)):
        return
    print(f"images of Dify {inventory.profile.version} first (dify.sync_images)", flush=True)
    try:
        rows = sync(inventory, parallel=min(parallel, 4))
    except ImageError as exc:
        show(exc.rows)
        raise ImageError(f"{exc}\n  no tier was deployed") from None
    moved = [row for row in rows if row.status in ("shipped", "pushed", "pulled")]
    if moved:
        show(moved)
    print(f"images: {len(moved)} transfer(s)"
          + ("" if moved else ", every host has every image"), flush=True)


@task(help={"only": "comma-separated tiers to check (default: all)"})
@reported
def status(ctx: Context, only: str = "") -> None:
    """One table of every component on every host; exit non-zero when anything is unhealthy."""
    inventory = load(ctx)
    plans = build(select(TIERS, only), inventory)
    probes = probe_all(plans, inventory.settings.timeouts)
    print(table(["host", "tier", "component", "state", "answer"],
                [(p.host, p.tier, p.component, "healthy" if p.healthy else "UNHEALTHY",
                  p.answer[:100]) for p in probes]))
    print(f"Dify {inventory.profile.version}, inventory {inventory.name}")
    if any(tier.name == "lb" for tier in select(TIERS, only)):
        for mode in lb_maintenance.states(inventory):
            if not mode.ok or mode.value != "off":
                print(f"{mode.host.name}: maintenance {mode.value or 'unknown: ' + mode.error}")
    unhealthy = [p for p in probes if not p.healthy]
    if unhealthy:
        raise Exit(f"error: {len(unhealthy)} component(s) unhealthy: "
                   + ", ".join(f"{p.component} on {p.host}" for p in unhealthy), code=1)


@task(name="preflight",
      help={"only": "comma-separated tiers whose hosts to check (default: every host)"})
@reported
def preflight_task(ctx: Context, only: str = "") -> None:
    """Check the hosts before deploying: OS, size, disk, ports, Docker, clock, names, reach."""
    inventory = load(ctx)
    checks.check(inventory, preflight_hosts(inventory, only))


def preflight_hosts(inventory: Inventory, only: str) -> list[Host]:
    """Every host, or the hosts of the tiers named in --only (unknown names refused)."""
    if not only:
        return list(inventory.hosts)
    roles = [role for tier in select(DEPLOYED, only) for role in tier.roles]
    return inventory.with_role(*roles)


@task(help={"dry": "show what would be restarted; restart nothing, post nothing",
            "only": "comma-separated tiers to check (default: all)",
            "schedule": "instead: run doctor every doctor.every minutes on this machine "
                        "(systemd timer, else cron); with --dry, show it"})
@reported
def doctor(ctx: Context, dry: bool = False, only: str = "", schedule: bool = False) -> None:
    """Restart what is down once (limited across runs); post what needs a person. Cron-safe."""
    inventory = load(ctx)
    if schedule:
        select(TIERS, only)  # unknown tier names refused before anything is installed
        doctor_schedule.install(inventory, dry=dry, only=only)
        return
    try:
        findings, problem = medic.examine(inventory, build(select(TIERS, only), inventory),
                                          dry=dry)
    except Locked as exc:
        raise Exit(f"doctor: {exc}; nothing was checked or restarted: a deploy may be "
                   f"restarting things itself. Run doctor again when it is done.",
                   code=medic.LOCKED_EXIT) from None
    print(table(["host", "healthy", "would restart" if dry else "restarted",
                 "needs a person", "what"], medic.summary_rows(findings)))
    found = [f for f in findings if f.state != medic.HEALTHY]
    down = [f for f in findings if f.state == medic.NEEDS_PERSON]
    if dry and found:
        raise Exit(f"error: {len(found)} component(s) unhealthy (dry run: nothing restarted): "
                   + ", ".join(f.label for f in found), code=1)
    if down:
        raise Exit(f"error: {problem + '; ' if problem else ''}{len(down)} component(s) "
                   f"need a person: "
                   + ", ".join(f.label for f in down), code=1)
    if problem:
        raise Exit(f"error: {problem}; fix the webhook or its receiver", code=1)
    if not found:
        print(f"doctor: all {len(findings)} component(s) healthy", flush=True)
