"""The tiers of a Dify installation, in the order deploy.all brings them up."""

from tasks.tiers import app, cache, db, lb, monitor, vector

TIERS = (db.TIER, cache.TIER, vector.TIER, app.TIER, lb.TIER, monitor.TIER)
