"""app: Dify's api, workers, beat, web, plugin daemon, sandbox and SSRF proxy."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext

from invoke import Context, task
from invoke.exceptions import Exit

from tasks.core import hooks
from tasks.core.cli import ShortFlagged, deploy_task, load, reported, words_after_dashes
from tasks.core.fleet import each_host, table
from tasks.core.hosts import Machine
from tasks.core.inventory import APP_ROLES
from tasks.core.report import Report
from tasks.tiers import app as app_tier
from tasks.tiers import app_logs, app_ops, app_release, lb_maintenance
from tasks.tiers.app import PROJECT, TIER, compose, deploy_dir, migration_host

deploy = deploy_task(TIER)


@task(help={"version": "the Dify version to migrate to (default: the inventory's dify.version); "
                       "its images must be on the migration host"})
@reported
def migrate(ctx: Context, version: str = "") -> None:
    """Run the one database migration of a release on the first api host, and verify it."""
    inventory = load(ctx)
    if version:
        inventory = app_release.with_release(inventory, version)
    host = migration_host(inventory)
    app_release.ensure_images(inventory, [host])
    outcome = app_release.migrate(inventory, Report())
    if outcome.ran:
        print(f"migrated from {outcome.before or '(empty)'} to {outcome.after}")


@task(help={"version": "the Dify version to upgrade to (a config/profiles/<version>.yml must "
                       "exist; its images are shipped with inv images.sync --version V)",
            "maintenance": "the balancers answer 503 and a maintenance page for the whole "
                           "upgrade (inv lb.maintenance), for a release that cannot be "
                           "upgraded online; turned off once it succeeded"})
@reported
def upgrade(ctx: Context, version: str, maintenance: bool = False) -> None:
    """Upgrade Dify: backup, one migration, api/web hosts one at a time, then the workers."""
    inventory = load(ctx)
    report = Report()
    print(f"upgrading Dify to {version} on inventory {inventory.name}", flush=True)
    with hooks.around("upgrade", inventory, command="app.upgrade", tiers=["app"],
                      version=version):
        message = f"Dify is being upgraded to {version} and will be back shortly."
        with lb_maintenance.held_during(inventory, message) if maintenance else nullcontext():
            outcome = app_release.upgrade(inventory, version, report)
    print(f"\nupgraded to Dify {version}: replaced {', '.join(outcome.replaced) or 'none'}"
          + (f"; already there: {', '.join(outcome.unchanged)}" if outcome.unchanged else ""))
    note = app_release.reminder(inventory, version)
    if note:
        print(f"note: {note}")


@task
@reported
def rollback(ctx: Context) -> None:
    """Go back to the release before the last upgrade (refused across a migration: restore)."""
    inventory = load(ctx)
    report = Report()
    outcome = app_release.rollback(inventory, report)
    history = app_release.read_history(inventory)
    version = history[-1]["version"]
    print(f"\nrolled back to Dify {version}: replaced {', '.join(outcome.replaced) or 'none'}")
    note = app_release.reminder(inventory, version)
    if note:
        print(f"note: {note}")


def containers(machine: Machine, directory: str) -> list[dict]:
    """The compose project's containers with image, state, health and worker queues."""
    result = machine.run(f"{compose(directory, PROJECT)} ps -a --format json")
    if not result.ok:
        return [{"Service": "-", "Image": "-", "State": f"error: {result.answer}",
                 "Health": ""}]
    text = result.stdout.strip()
    items = json.loads(text) if text.startswith("[") else [json.loads(line) for line in
                                                          text.splitlines() if line.strip()]
    for item in items:
        if item.get("Service", "").startswith("worker_") and item["Service"] != "worker_beat":
            env = machine.run("docker inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "
                              f"{item['Name']}")
            queues = [line.split("=", 1)[1] for line in env.stdout.splitlines()
                      if line.startswith("CELERY_QUEUES=")]
            item["Queues"] = queues[0] if queues else ""
    return items


@task
@reported
def status(ctx: Context) -> None:
    """Per app host and container: image, state, health, and the queues each worker consumes."""
    inventory = load(ctx)
    directory = deploy_dir(inventory)
    outcomes = each_host(inventory.with_role(*APP_ROLES),
                         lambda m: containers(m, directory), inventory.settings.timeouts)
    rows = []
    for outcome in outcomes:
        if not outcome.ok:
            rows.append((outcome.host.name, "-", "-", "unreachable", "", outcome.error))
            continue
        for item in outcome.value or []:
            rows.append((outcome.host.name, item.get("Service", "-"), item.get("Image", "-"),
                         item.get("State", "-"), item.get("Health", "") or "-",
                         item.get("Queues", "")))
        present = {item.get("Service") for item in outcome.value or []}
        rows += [(outcome.host.name, service, "-", "missing", "-", "")
                 for service in app_tier.services_of(inventory, outcome.host)
                 if outcome.value and service not in present]
        if not outcome.value:
            rows.append((outcome.host.name, "-", "-", "no containers", "-", ""))
    print(table(["host", "service", "image", "state", "health", "queues"], rows))
    bad = [r for r in rows if r[3] != "running" or r[4] not in ("healthy", "-")]
    if bad:
        raise Exit(f"error: {len(bad)} container(s) not running and healthy; see above", code=1)


ONE_OFF_HELP = {
    "host": "the host to run it on (default: the first host that runs the service)",
    "interactive": "a terminal of its own, with this one's input (a shell, a prompt)",
    "force": "run even while a deploy of the inventory holds its lock",
}


@task(name="exec", klass=ShortFlagged, short_flags={"interactive": "i"},
      help={**ONE_OFF_HELP, "service": "the compose service whose release, environment and "
                                       "networks to use"})
@reported
def exec_(ctx: Context, host: str = "", service: str = "api", interactive: bool = False,
          force: bool = False) -> None:
    """Run a command in a fresh container of an app service, removed after: inv app.exec -- CMD"""
    code = app_ops.run_one_off(load(ctx), words_after_dashes(), service=service, host=host,
                               interactive=interactive, force=force)
    if code:
        raise Exit(code=code)


@task(klass=ShortFlagged, short_flags={"interactive": "i"}, help=ONE_OFF_HELP)
@reported
def flask(ctx: Context, host: str = "", interactive: bool = False, force: bool = False) -> None:
    """Run one of Dify's flask commands in a fresh api container: inv app.flask -- reset-password
    --email E ... (inv app.flask -- --help lists them)"""
    code = app_ops.run_one_off(load(ctx), ["flask", *words_after_dashes()], host=host,
                               interactive=interactive, force=force)
    if code:
        raise Exit(code=code)


@task(help={"service": "one compose service (api, worker_<group>, worker_beat, web, ...) or "
                       "home-lab unit (api, worker, web); default: every service",
            "host": "one host (default: every app host)",
            "since": "from this long ago (10m, 2h, 1h30m) or this time (2026-12-07T09:00:00Z)",
            "grep": "only the lines that contain this text",
            "follow": "stream new lines as they come, until Ctrl-C"})
@reported
def logs(ctx: Context, service: str = "", host: str = "", since: str = "10m", grep: str = "",
         follow: bool = False) -> None:
    """The logs of every host that runs a service (containers, or the home lab's systemd
    units), each line prefixed with host and service, merged in time order (or followed)."""
    inventory = load(ctx)
    for note in app_logs.unread(inventory, service, host):
        print(note, file=sys.stderr)
    chosen = app_logs.sources(inventory, service, host)
    if not follow:
        lines = app_logs.read(inventory, chosen, since, grep)
        print("\n".join(lines) if lines else f"no log lines since {since or 'the start'}")
        return
    try:
        app_logs.follow(inventory, chosen, since, grep)
    except KeyboardInterrupt:
        print("", file=sys.stderr)  # after the ^C the terminal echoed
