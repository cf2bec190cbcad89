"""backup: back up, verify, restore, list and prune backups of Dify; schedule the daily run."""

from __future__ import annotations

from invoke import Context, task

from tasks.backups import engine
from tasks.backups import schedule as timer
from tasks.core.cli import load, reported


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
    timer.install(load(ctx), host_name=host, dry=dry, cron=cron)
