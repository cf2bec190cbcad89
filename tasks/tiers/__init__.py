"""The tiers of a Dify installation, in the order deploy.all brings them up."""

from tasks.tiers import app, cache, db, dev_backend, dev_frontend, lb, vector

TIERS = (db.TIER, cache.TIER, vector.TIER, app.TIER, lb.TIER)
# The home-lab development machines (no host has their roles outside a home-lab inventory).
TIERS += (dev_backend.TIER, dev_frontend.TIER)
