"""app: Dify's api, workers, beat, web, plugin daemon, sandbox and SSRF proxy."""

from tasks.core.cli import deploy_task
from tasks.tiers.app import TIER

deploy = deploy_task(TIER)
