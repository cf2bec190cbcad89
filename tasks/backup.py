"""backup: back up, verify, restore, list and prune backups of Dify; schedule the daily run."""

from __future__ import annotations

from invoke import Context, task
from invoke.exceptions import Exit

from tasks.backups import engine, settings
from tasks.backups import schedule as timer
from tasks.core.apply import execute
from tasks.core.cli import load, reported
from tasks.core.hosts import connect


@task(help={"skip_verify": "do not restore the new backup into scratch databases afterwards "
                           "(backup.verify_after_run)"})
@reported
def run(ctx: Context, skip_verify: bool = False) -> None:
    """Back up both databases, storage, plugin data, config and secrets into backup.dir."""
    engine.backup_now(load(ctx), skip_verify=skip_verify)


# Invoke's positional arguments are always required: the optional id is a flag (-b ID).
@task(help={"backup_id": "the backup to verify (default: the newest; `inv backup.list`)"})
@reported
def verify(ctx: Context, backup_id: str = "") -> None:
    """Check a backup's checksums and restore its dumps into scratch databases (row counts)."""
    engine.verify_one(load(ctx), backup_id or None)


@task(help={"backup_id": "the backup to restore (`inv backup.list` shows the ids)",
            "force": "restore even when the backup's Dify version or SECRET_KEY differs",
            "config": "also restore the secrets file and the app hosts' rendered files"})
@reported
def restore(ctx: Context, backup_id: str, force: bool = False, config: bool = False) -> None:
    """Restore a backup onto the current deployment (app stopped and started around it)."""
    engine.restore_one(load(ctx), backup_id, force=force, with_config=config)


@task(name="list")
@reported
def list_backups(ctx: Context) -> None:
    """List the backups in backup.dir, newest first, with size, state and copy."""
    print(engine.listing(load(ctx)))


@task(help={"dry": "show what would be deleted; delete nothing"})
@reported
def prune(ctx: Context, dry: bool = False) -> None:
    """Delete backups that backup.keep_* do not keep (never the newest verified one)."""
    engine.prune(load(ctx), dry=dry)


@task(name="schedule",
      help={"dry": "print the plan with file diffs; change nothing",
            "cron": "install an /etc/cron.d line even where systemd runs",
            "host": "install on this inventory host (holding this same checkout) instead of "
                    "this machine"})
@reported
def schedule_task(ctx: Context, dry: bool = False, cron: bool = False, host: str = "") -> None:
    """Run `inv backup.run` daily at backup.time: systemd timer, else a cron line."""
    inventory = load(ctx)
    settings.check(inventory)
    target = timer.target(inventory, host)
    machine = connect(target, inventory.settings["timeouts"])
    try:
        use_cron = cron or not timer.has_systemd(machine)
        if use_cron and not timer.has_cron(machine):
            raise Exit(f"error: {target.target} runs neither systemd nor a cron with "
                       f"{timer.CRON_DIR}: add this line to root's crontab (`crontab -e`):\n"
                       f"{timer.cron_line(inventory)}\nthen run `inv backup.schedule` again "
                       f"to install the script it calls", code=1)
    finally:
        machine.close()
    kind = "cron line" if use_cron else "systemd timer"
    print(f"{'dry run of' if dry else 'installing'} the {kind} {timer.unit_name(inventory)} on "
          f"{target.target}: daily at {inventory.settings['backup']['time']}", flush=True)
    report = execute(timer.plan(inventory, target, cron=use_cron), dry=dry,
                     timeouts=inventory.settings["timeouts"])
    if report.failed:
        raise Exit("error: the schedule was not installed completely; see the summary above, "
                   "fix the cause and run the same command again", code=1)
