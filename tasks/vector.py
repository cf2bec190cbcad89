"""vector: the vector store Dify indexes documents into."""

from tasks.core.cli import deploy_task
from tasks.tiers.vector import TIER

deploy = deploy_task(TIER)
