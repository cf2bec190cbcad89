"""db: PostgreSQL primary and streaming replicas on their hosts."""

from tasks.core.cli import deploy_task
from tasks.tiers.db import TIER

deploy = deploy_task(TIER)
