"""cache: Redis (standalone, Sentinel or Cluster) for Dify's cache and Celery broker."""

from __future__ import annotations

from invoke import Context, task

from tasks.core.cli import deploy_task, load, reported
from tasks.tiers import cache_ops
from tasks.tiers.cache import TIER

deploy = deploy_task(TIER)


@task
@reported
def status(ctx: Context) -> None:
    """Show each Redis node's role, master, offset, lag and Sentinel's view; exit 1 if wrong."""
    cache_ops.status(load(ctx))
