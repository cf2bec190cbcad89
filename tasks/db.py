"""db: PostgreSQL primary and streaming replicas on their hosts."""

from __future__ import annotations

from invoke import Context, task

from tasks.core.cli import deploy_task, load, reported
from tasks.tiers import db_ops
from tasks.tiers.db import TIER

deploy = deploy_task(TIER)


@task
@reported
def status(ctx: Context) -> None:
    """Show each db host's role, replication state, lag and slot; exit 1 when any is wrong."""
    db_ops.status(load(ctx))


@task(help={"host": "the standby to promote (a db_replica host of the inventory)"})
@reported
def promote(ctx: Context, host: str) -> None:
    """Promote a standby and wait until it accepts writes (refused while a primary runs)."""
    db_ops.promote(load(ctx), host)


@task(help={"host": "the standby to promote (default: the one that received the most WAL)"})
@reported
def failover(ctx: Context, host: str = "") -> None:
    """Fence the primary, promote a standby, re-point the others; print the inventory edit."""
    db_ops.failover(load(ctx), host or None)


@task(help={"host": "the db host whose PostgreSQL must stay stopped"})
@reported
def fence(ctx: Context, host: str) -> None:
    """Stop a db host's PostgreSQL for good (masked) so it cannot come back as a primary."""
    db_ops.fence(load(ctx), host)
