"""lb: the nginx load balancer in front of Dify."""

from tasks.core.cli import deploy_task
from tasks.tiers.lb import TIER

deploy = deploy_task(TIER)
