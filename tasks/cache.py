"""cache: Redis (standalone, Sentinel or Cluster) for Dify's cache and Celery broker."""

from tasks.core.cli import deploy_task
from tasks.tiers.cache import TIER

deploy = deploy_task(TIER)
